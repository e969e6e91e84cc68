"""GET /asyndm/schedule_plot: the numbers behind Load Learned Scheduler's in-node plot.

The browser never reads a schedule file: it asks this route for the timesteps a background pixel
and key pixels of given priorities see over a run that follows the chosen table. Query:

  name   a file name exactly as the loader lists it (folder_paths.get_filename_list); nothing else
  k      optional, up to MAX_ITEMS comma-separated priorities in [0, 1]; none = the table's own levels
  steps  optional, 1..MAX_PLOT_STEPS; none = the table's fitted_steps (50 when that is out of range)

Answers 200 with JSON {name, curve, description, fitted_steps, levels, steps, source, background,
tracks: [{k, values}]}; 400 (bad query), 404 (a name the loader does not list) or 422 (the file does
not load: the message of asyndm.schedule_file.load_schedule) with {"error": text}. ComfyUI also
serves it under /api. Registered once, from the pack's entry point (nodes.extension).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

import folder_paths

from ..asyndm.mask_schedule import table_tracks
from ..asyndm.schedule_file import load_schedule
from .schedules import SCHEDULER_FOLDER, resolve_schedule_file

ROUTE = "/asyndm/schedule_plot"
MAX_ITEMS = 8
MAX_PLOT_STEPS = 1000
DEFAULT_STEPS = 50
MAX_NAME = 1024

log = logging.getLogger(__name__)


class PlotRequestError(ValueError):
    """A request the route answers with an HTTP error status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _listed_names() -> list[str]:
    try:
        return list(folder_paths.get_filename_list(SCHEDULER_FOLDER))
    except KeyError:  # the folder was never registered
        return []


def _priorities(text: str | None) -> list[float] | None:
    if text is None or not text.strip():
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_ITEMS:
        raise PlotRequestError(400, f"k: at most {MAX_ITEMS} priorities, got {len(parts)}")
    out: list[float] = []
    for part in parts:
        try:
            v = float(part)
        except ValueError:
            raise PlotRequestError(400, f"k: {part[:20]!r} is not a number") from None
        if not math.isfinite(v) or not (0.0 <= v <= 1.0):
            raise PlotRequestError(400, f"k: {part[:20]!r} is outside [0, 1]")
        out.append(v)
    return out


def _steps(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    if not text.strip().isdigit():
        raise PlotRequestError(400, f"steps must be a whole number in 1..{MAX_PLOT_STEPS}, got {text[:20]!r}")
    n = int(text.strip())
    if not (1 <= n <= MAX_PLOT_STEPS):
        raise PlotRequestError(400, f"steps must lie in 1..{MAX_PLOT_STEPS}, got {n}")
    return n


def plot_data(query: Mapping[str, str]) -> dict[str, Any]:
    """The route's answer for a query (raises PlotRequestError with the status to answer)."""
    name = query.get("name")
    if not isinstance(name, str) or not name:
        raise PlotRequestError(400, "name: give a schedule file name as Load Learned Scheduler lists it")
    if len(name) > MAX_NAME:
        raise PlotRequestError(400, "name is too long")
    ks = _priorities(query.get("k"))
    steps = _steps(query.get("steps"))
    if name not in _listed_names():  # only what the loader lists: never a path from the request
        raise PlotRequestError(404, f"{name!r} is not a schedule file in models/asyndm_schedulers or the pack's "
                                    "schedules folder; refresh the node list (R)")
    try:
        table = load_schedule(resolve_schedule_file(name))
    except (ValueError, OSError) as e:  # ScheduleFileError is a ValueError; a file removed since listing
        raise PlotRequestError(422, str(e)) from None
    levels = [float(v) for v in table.priorities.tolist()]
    fitted = int(table.fitted_steps)
    if steps is None:
        steps = fitted if 1 <= fitted <= MAX_PLOT_STEPS else DEFAULT_STEPS
    source = "levels" if ks is None else "k"
    tracks = table_tracks(table, levels if ks is None else ks, num_steps=steps)
    return {
        "name": name,
        "curve": table.curve,
        "description": table.description,
        "fitted_steps": fitted,
        "levels": levels,
        "steps": steps,
        "source": source,
        "background": tracks[0].tolist(),
        "tracks": [{"k": k, "values": row.tolist()}
                   for k, row in zip(levels if ks is None else ks, tracks[1:], strict=True)],
    }


async def handle_schedule_plot(request: Any) -> Any:
    from aiohttp import web

    query = {key: request.query.get(key) for key in ("name", "k", "steps") if key in request.query}
    try:
        # loading and tabulating takes milliseconds, but it reads a file: keep it off the event loop
        body = await asyncio.to_thread(plot_data, query)
    except PlotRequestError as e:
        return web.json_response({"error": str(e)}, status=e.status)
    return web.json_response(body)


def register_routes(server: Any = None) -> bool:
    """Add GET ROUTE to ComfyUI's PromptServer (once). False when no server runs (in-process use)."""
    if server is None:
        # ComfyUI's main imports its server module before it loads custom nodes; never import it here
        module = sys.modules.get("server")
        server = getattr(getattr(module, "PromptServer", None), "instance", None)
    routes = getattr(server, "routes", None)
    if routes is None:
        return False
    if any(getattr(r, "path", None) == ROUTE and getattr(r, "method", None) == "GET" for r in routes):
        return True
    routes.get(ROUTE)(handle_schedule_plot)
    log.debug("AsynDM: %s registered", ROUTE)
    return True
