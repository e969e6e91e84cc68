"""Convert a UI-format ComfyUI workflow (what the frontend saves, version 0.4) into an API prompt.

The frontend does this itself (``app.graphToPrompt()``); this is the same mapping in Python, so the
tests can queue the pack's example workflows through ``POST /prompt`` without a browser:

- widget values: ``widgets_values[i]`` belongs to the i-th widget input of the node's definition
  in ``/object_info`` (required inputs first, then optional ones, in ``input_order``). An input is
  a widget when its type is INT, FLOAT, STRING, BOOLEAN or a combo (a list of options, or
  ``"COMBO"``), unless ``forceInput`` is set. An INT with ``control_after_generate`` (or named
  ``seed`` / ``noise_seed`` when the option is absent) and a combo with ``control_after_generate``
  carry one more value after their own ("fixed", "randomize", ...), as does a combo with an
  upload button (``image_upload`` and the like);
- links: ``links`` rows are ``[id, origin_id, origin_slot, target_id, target_slot, type]``; a
  connected input becomes ``[str(origin_id), origin_slot]``, also when it is a widget converted to
  a socket;
- frontend-only nodes are left out: notes, ``Reroute`` (followed to its source) and
  ``PrimitiveNode`` (its value replaces the link, as the frontend does);
- muted nodes (mode 2) are left out, with the links into them; a bypassed node (mode 4) is left
  out too, and a link from one of its outputs is followed to the link into its input of the same
  type (the input at the output's own slot index first, then the first input of that type), as the
  frontend's graphToPrompt does (the tests bypass FluxKontextImageScale that way); subgraphs are
  refused (the example workflows use none).

``convert(workflow, object_info)`` returns ``{node_id: {"class_type", "inputs", "_meta"}}``;
``set_widget`` changes one widget value of a UI workflow in place (the tests shrink sizes and
steps that way, in the UI format, so the browser test can apply the very same changes).
"""

from __future__ import annotations

from typing import Any

# Nodes the frontend draws but never sends to the server.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
FRONTEND_ONLY = NOTE_TYPES | {"Reroute", "PrimitiveNode"}
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, wrong number of widget values, ...)."""


def _spec_type(spec: Any) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def _spec_options(spec: Any) -> dict[str, Any]:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def widget_inputs(node_def: dict[str, Any]) -> list[tuple[str, int]]:
    """(input name, number of values it takes in widgets_values) for each widget input, in order."""
    out: list[tuple[str, int]] = []
    order = node_def.get("input_order") or {}
    for section in ("required", "optional"):
        specs = node_def.get("input", {}).get(section, {}) or {}
        names = [n for n in order.get(section, []) if n in specs] or list(specs)
        for name in names:
            spec = specs[name]
            kind, opts = _spec_type(spec), _spec_options(spec)
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            values = 1
            if kind == "INT":
                control = opts.get("control_after_generate")
                if control if control is not None else name in ("seed", "noise_seed"):
                    values = 2
            elif kind == "COMBO" and (opts.get("control_after_generate") or any(opts.get(o) for o in UPLOAD_OPTIONS)):
                values = 2
            out.append((name, values))
    return out


def widget_values(node: dict[str, Any], node_def: dict[str, Any]) -> dict[str, Any]:
    """The node's widget values by input name."""
    raw = node.get("widgets_values")
    if raw is None:
        return {}
    if isinstance(raw, dict):  # some nodes save their widgets by name
        return dict(raw)
    slots = widget_inputs(node_def)
    wanted = sum(n for _, n in slots)
    if len(raw) != wanted:
        raise WorkflowError(
            f"node {node.get('id')} ({node.get('type')}): {len(raw)} widget values, but its definition has "
            f"{wanted} ({', '.join(f'{name} x{n}' if n > 1 else name for name, n in slots)})"
        )
    values, i = {}, 0
    for name, n in slots:
        values[name] = raw[i]
        i += n
    return values


def widget_index(node: dict[str, Any], node_def: dict[str, Any] | None, name: str) -> int:
    """Index in widgets_values of the widget input `name` (a PrimitiveNode has one widget, 'value')."""
    if node["type"] == "PrimitiveNode":
        if name != "value":
            raise WorkflowError(f"a PrimitiveNode has only the widget 'value', not {name!r}")
        return 0
    if node_def is None:
        raise WorkflowError(f"node {node.get('id')}: no definition for {node['type']!r}")
    i = 0
    for widget, n in widget_inputs(node_def):
        if widget == name:
            return i
        i += n
    raise WorkflowError(f"node {node.get('id')} ({node['type']}) has no widget {name!r}")


def set_widget(node: dict[str, Any], node_def: dict[str, Any] | None, name: str, value: Any) -> None:
    """Set a widget value of a UI-format node in place."""
    if isinstance(node.get("widgets_values"), dict):
        node["widgets_values"][name] = value
        return
    if node_def is not None and node["type"] != "PrimitiveNode":
        widget_values(node, node_def)  # checks the count
    node["widgets_values"][widget_index(node, node_def, name)] = value


def linked_primitive(workflow: dict[str, Any], node: dict[str, Any], input_name: str) -> dict[str, Any] | None:
    """The PrimitiveNode feeding the widget input `input_name` of `node`, if any."""
    links = _links(workflow)
    nodes: dict[int, dict[str, Any]] = {int(n["id"]): n for n in workflow.get("nodes", [])}
    for slot in node.get("inputs", []) or []:
        if (slot.get("widget", {}).get("name") or slot.get("name")) == input_name and slot.get("link") is not None:
            row = links.get(int(slot["link"]))
            origin = nodes.get(row[0]) if row else None
            if origin is not None and origin["type"] == "PrimitiveNode":
                return origin
    return None


def _links(workflow: dict[str, Any]) -> dict[int, tuple[int, int, int, int]]:
    out = {}
    for row in workflow.get("links", []):
        if isinstance(row, dict):  # the 1.0 schema writes links as objects
            out[int(row["id"])] = (int(row["origin_id"]), int(row["origin_slot"]), int(row["target_id"]),
                                   int(row["target_slot"]))
        else:
            out[int(row[0])] = (int(row[1]), int(row[2]), int(row[3]), int(row[4]))
    return out


def convert(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt of a UI-format workflow (see the module docstring)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links(workflow)

    def source(link_id: int, seen: frozenset[int] = frozenset()) -> tuple[str, Any] | None:
        """('link', [id, slot]) or ('value', v) for what a link carries; None when it leads nowhere."""
        if link_id not in links or link_id in seen:
            return None
        origin_id, origin_slot, _, _ = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} starts at a missing node {origin_id}")
        kind = origin["type"]
        if kind == "Reroute":
            upstream = next((i.get("link") for i in origin.get("inputs", []) if i.get("link") is not None), None)
            return None if upstream is None else source(int(upstream), seen | {link_id})
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"PrimitiveNode {origin_id} has no value")
            return ("value", values[0])
        if origin.get("mode", 0) == MODE_MUTED:
            return None
        if origin.get("mode", 0) == MODE_BYPASSED:
            slots = origin.get("inputs", []) or []
            out_type = (origin.get("outputs") or [])[origin_slot]["type"] if origin_slot < len(origin.get("outputs") or []) else None
            order = [origin_slot, *range(len(slots))]
            match = next((i for i in order if i < len(slots) and slots[i].get("type") == out_type), None)
            upstream = None if match is None else slots[match].get("link")
            return None if upstream is None else source(int(upstream), seen | {link_id})
        return ("link", [str(origin_id), origin_slot])

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        mode = node.get("mode", 0)
        if mode in (MODE_MUTED, MODE_BYPASSED):
            continue
        node_def = object_info.get(kind)
        if node_def is None:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not in /object_info (missing custom node?)")
        inputs: dict[str, Any] = widget_values(node, node_def)
        for slot in node.get("inputs", []) or []:
            link = slot.get("link")
            if link is None:
                continue
            found = source(int(link))
            name = slot.get("widget", {}).get("name") or slot["name"]
            if found is None:
                continue  # fed by a muted node: the input stays unset (or keeps its widget value)
            inputs[name] = found[1]
        title = node.get("title") or node_def.get("display_name") or kind
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}

    # Drop what no longer leads anywhere: links into nodes that were left out.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def output_nodes(prompt: dict[str, dict[str, Any]], object_info: dict[str, Any]) -> list[str]:
    """Ids of the prompt's output nodes (what the server executes)."""
    return [i for i, n in prompt.items() if object_info.get(n["class_type"], {}).get("output_node")]
