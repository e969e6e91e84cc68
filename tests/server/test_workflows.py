"""The pack's example workflows (workflows/*.json, UI format): valid, listed as templates, and they run.

Every workflow is converted to an API prompt by tests/server/workflow_convert.py (the frontend's
own mapping, checked against the frontend's graphToPrompt in the browser test below), pointed at
the random-weight test models, shrunk (64x64 latents, 3 steps) and queued through POST /prompt;
each SaveImage / PreviewImage must then have written non-flat images of the expected size.

The diffusion-transformer workflows (asyndm_flux, asyndm_flux_kontext, asyndm_sd35, asyndm_qwen_image,
asyndm_z_image) are what a user runs with the real models (flux1-dev.safetensors,
flux1-dev-kontext_fp8_scaled.safetensors, sd3.5_large.safetensors, qwen_image_fp8_e4m3fn.safetensors,
z_image_turbo_bf16.safetensors, their text encoders and VAEs). For the tests their loaders point at the
random-weight files of scripts/make_dit_models.py, and -- the change to the graph itself -- THEIR TEXT
ENCODERS ARE REPLACED: T5-XXL, CLIP-G, Qwen2.5-VL 7B and Qwen3 4B cannot be built on these machines, so
with_test_conditioning() removes the DualCLIPLoader / TripleCLIPLoader / CLIPLoader and puts the test-only
node TestOnlyDiTConditioning (tests/server/comfy_nodes/asyndm_test_conditioning.py: seeded conditioning of
the shapes those encoders give) in place of each text-encode node, with the same node id and the same
output links. That conditioning records no tokens, so the variant also empties the samplers' key_words
(asyndm_qwen_image and asyndm_z_image use key words; the others use masks). Flux Kontext's variant also
bypasses FluxKontextImageScale (mode 4): it scales any image to about a megapixel, 4096 image tokens plus
as many reference tokens, minutes per step for the random Flux on these machines; its LoadImage gets a
64 x 64 test image with a painted (transparent) box, written into the server's input folder.
Everything else (the pack's nodes, FluxGuidance, ReferenceLatent, masks, sampler, VAE encode and decode)
runs as shipped. The API runs and the browser runs below both use that variant (the browser loads the
template as the template browser does, then opens the variant in the same tab); the template itself is
what the frontend's graphToPrompt is compared on.

Qwen-Image runs on asyndm-random-qwen-image.safetensors with its own VAE, asyndm-random-qwen-image-vae
(ComfyUI's Wan 2.1 VAE at the real width, 127M parameters, about 1.5 s per 64 x 64 decode here), and
Z-Image on asyndm-random-z-image.safetensors with the Flux test VAE (the real workflow uses Flux's
ae.safetensors). A workflow whose test files (TEST_UNETS / TEST_VAES) the model folders lack -- a stale
.dev/dit-models, say -- is still checked as a file and in the browser (load, convert, save, reopen) but
not run: its API and UI runs are skipped, naming the missing file.

The SDXL workflow runs on an SDXL random checkpoint when the model folders hold one
(`asyndm-random-sdxl.safetensors`, from `scripts/make_models.py --sdxl`); writing that file takes
about 95 s on the 2-core machines (58 s for the checkpoint alone, CLIP-G is 694M parameters), too
slow for this module, so by default the SD1.5 test checkpoint stands in for it (at 128x128).

The browser part (tests/server/browser/run_workflows.mjs, headless Chromium as in
test_frontend.py, one page for all twelve, 1 to 2.5 minutes on the 2-core machines) takes every
workflow through what a user does with it in the real frontend:

- loads it from the template URL the frontend uses and compares graphToPrompt with the converter;
- applies the test settings on the widgets, checks every pack widget and the widgets_values against
  the Python view of the same settings, and that a serialize -> JSON -> loadGraphData round trip
  and a real save (Ctrl+S, the frontend's filename prompt, POST /api/userdata into the server's user
  folder) followed by reopening the file give every value back exactly;
- queues the reopened graph with app.queuePrompt and checks its images like the API runs' (seeds
  shifted by BROWSER_SEED_OFFSET, so the run executes instead of coming from the cache);
- for one workflow per pack node type (reload_workflows()), gives every editable pack widget a new
  value, reloads the page and checks that the workflow the frontend restores from session storage
  (setting Comfy.Workflow.Persist) has them all;
- and fails on any error dialog, error toast or native alert in any of these steps (reported with
  its text), on page errors, and on any console error or warning from the pack's scripts.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.server.conftest import CHROMIUM, DEFAULT_CKPT, NODE_DIR, TEST_CONDITIONING, require_browser_tools
from tests.server.workflow_convert import (
    FRONTEND_ONLY,
    NOTE_TYPES,
    convert,
    linked_primitive,
    output_nodes,
    set_widget,
    widget_index,
    widget_inputs,
    widget_values,
)

WORKFLOWS = REPO_ROOT / "workflows"
PACK = "asyndm-comfyui"  # the pack's folder name in custom_nodes (scripts/comfy_server.py PACK_LINK_NAME)
EXPECTED = {
    "asyndm_sd15_text_to_image",
    "asyndm_drawn_mask",
    "asyndm_attention_mask_edit",
    "asyndm_learned_scheduler",
    "asyndm_sync_vs_async",
    "asyndm_sdxl",
    "asyndm_sampler_custom_advanced",
    "asyndm_flux",
    "asyndm_sd35",
    "asyndm_qwen_image",
    "asyndm_z_image",
    "asyndm_flux_kontext",
}
# Model names users actually have (what the workflows ship with), by loader, with their family.
REAL_CKPTS = {"v1-5-pruned-emaonly-fp16.safetensors": "sd15", "sd_xl_base_1.0.safetensors": "sdxl",
              "sd3.5_large.safetensors": "sd35"}
REAL_UNETS = {"flux1-dev.safetensors": "flux", "flux1-dev-kontext_fp8_scaled.safetensors": "flux",
              "qwen_image_fp8_e4m3fn.safetensors": "qwen_image", "z_image_turbo_bf16.safetensors": "z_image"}
REAL_VAES = {"ae.safetensors": "flux", "qwen_image_vae.safetensors": "qwen_image"}
REAL_TEXT_ENCODERS = {"clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
                      "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_3_4b.safetensors"}
VAE_FAMILY = {"z_image": "flux"}  # Z-Image decodes with the Flux VAE (ae.safetensors); the others with their own
# Each loader's model widget, and the models folder its file goes in.
MODEL_WIDGETS = {"CheckpointLoaderSimple": (("ckpt_name",), "checkpoints"), "UNETLoader": (("unet_name",), "diffusion_models"),
                 "VAELoader": (("vae_name",), "vae"), "CLIPLoader": (("clip_name",), "text_encoders"),
                 "DualCLIPLoader": (("clip_name1", "clip_name2"), "text_encoders"),
                 "TripleCLIPLoader": (("clip_name1", "clip_name2", "clip_name3"), "text_encoders")}
FAMILY = {"asyndm_sdxl": "sdxl", "asyndm_flux": "flux", "asyndm_sd35": "sd35", "asyndm_flux_kontext": "flux",
          "asyndm_qwen_image": "qwen_image", "asyndm_z_image": "z_image"}  # the others: sd15
SDXL_TEST_CKPT = "asyndm-random-sdxl.safetensors"
# The random-weight files that stand in for the real ones (scripts/make_dit_models.py writes them all;
# Z-Image's VAE is Flux's, see VAE_FAMILY). A workflow whose test files the server does not list is not run
# (missing_test_models). Flux Kontext has Flux dev's layout and runs on the Flux dev file.
TEST_CKPTS = {"sd35": "asyndm-random-sd35-large.safetensors"}
TEST_UNETS = {"flux": "asyndm-random-flux-dev.safetensors", "qwen_image": "asyndm-random-qwen-image.safetensors",
              "z_image": "asyndm-random-z-image.safetensors"}
TEST_VAES = {"flux": "asyndm-random-flux-vae.safetensors", "qwen_image": "asyndm-random-qwen-image-vae.safetensors"}
# The image LoadImage gets in the tests (written into the server's input folder by the object_info fixture):
# TEST_IMAGE_SIZE square, a transparent box in it = the region painted in the mask editor (MASK = 1 - alpha).
TEST_IMAGE = "asyndm-test-kontext-input.png"
TEST_IMAGE_BOX = (16, 8, 44, 40)  # left, top, right, bottom
# Nodes the test variants bypass (mode 4; see the module docstring).
TEST_BYPASSED = {"FluxKontextImageScale"}
# AsynDMKSampler's widgets_values: seed, its control, steps, cfg, sampler_name, scheduler, denoise, key_words, ...
KEY_WORDS_INDEX = 7
SIZE, SDXL_SIZE, STEPS = 64, 128, 3
# Text encoders the test variants replace with TEST_CONDITIONING, by the CLIP loader that feeds them.
TEXT_ENCODERS = {"CLIPTextEncode", "AsynDMTextEncode", "CLIPTextEncodeFlux"}
CLIP_LOADER_FAMILY = {"DualCLIPLoader": "flux", "TripleCLIPLoader": "sd3", "CLIPLoader": None}  # CLIPLoader: by its type
CLIP_TYPE_FAMILY = {"qwen_image": "qwen_image", "lumina2": "z_image"}  # CLIPLoader type -> test conditioning family
# What each workflow must contain (the brief of each example).
REQUIRED_NODES = {
    "asyndm_sd15_text_to_image": {"CheckpointLoaderSimple", "AsynDMTextEncode", "CLIPTextEncode", "AsynDMKSampler",
                                  "VAEDecode", "SaveImage", "PreviewImage"},
    "asyndm_drawn_mask": {"AsynDMMaskToTimestepMap", "AsynDMKSampler", "SolidMask", "MaskComposite", "SaveImage"},
    "asyndm_attention_mask_edit": {"AsynDMCrossAttentionMask", "GrowMask", "AsynDMMaskToTimestepMap", "AsynDMKSampler",
                                   "MaskToImage", "PreviewImage", "SaveImage"},
    "asyndm_learned_scheduler": {"AsynDMSchedulerLoader", "AsynDMKSampler", "SaveImage"},
    "asyndm_sync_vs_async": {"KSampler", "AsynDMKSampler", "PrimitiveNode", "SaveImage"},
    "asyndm_sdxl": {"CheckpointLoaderSimple", "AsynDMTextEncode", "AsynDMKSampler", "SaveImage"},
    "asyndm_sampler_custom_advanced": {"AsynDMSampler", "BasicScheduler", "CFGGuider", "RandomNoise",
                                       "SamplerCustomAdvanced", "SaveImage"},
    "asyndm_flux": {"UNETLoader", "DualCLIPLoader", "VAELoader", "AsynDMTextEncode", "FluxGuidance", "EmptySD3LatentImage",
                    "SolidMask", "MaskComposite", "AsynDMMaskToTimestepMap", "AsynDMKSampler", "VAEDecode", "SaveImage"},
    "asyndm_sd35": {"CheckpointLoaderSimple", "TripleCLIPLoader", "AsynDMTextEncode", "CLIPTextEncode", "EmptySD3LatentImage",
                    "SolidMask", "MaskComposite", "AsynDMMaskToTimestepMap", "AsynDMKSampler", "VAEDecode", "SaveImage"},
    "asyndm_qwen_image": {"UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingAuraFlow", "EmptySD3LatentImage",
                          "AsynDMTextEncode", "CLIPTextEncode", "AsynDMKSampler", "VAEDecode", "SaveImage", "PreviewImage"},
    "asyndm_z_image": {"UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingAuraFlow", "EmptySD3LatentImage",
                       "AsynDMTextEncode", "ConditioningZeroOut", "AsynDMKSampler", "VAEDecode", "SaveImage", "PreviewImage"},
    "asyndm_flux_kontext": {"UNETLoader", "DualCLIPLoader", "VAELoader", "LoadImage", "FluxKontextImageScale", "VAEEncode",
                            "AsynDMTextEncode", "ReferenceLatent", "FluxGuidance", "ConditioningZeroOut",
                            "AsynDMMaskToTimestepMap", "AsynDMKSampler", "VAEDecode", "SaveImage"},
}

BROWSER_SCRIPT = Path(__file__).resolve().parent / "browser" / "run_workflows.mjs"


def load(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def nodes_of(workflow: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [n for n in workflow["nodes"] if n["type"] == kind]


def _clip_family(node: dict[str, Any]) -> str:
    family = CLIP_LOADER_FAMILY[node["type"]]
    return family if family is not None else CLIP_TYPE_FAMILY[node["widgets_values"][1]]  # CLIPLoader: [clip_name, type, device]


def with_test_conditioning(workflow: dict[str, Any]) -> dict[str, Any]:
    """The workflow as the tests run it (see the module docstring): every text-encode node fed by a
    DualCLIPLoader / TripleCLIPLoader / CLIPLoader becomes a TEST_CONDITIONING node (same id, position and
    output links; family from the loader, the node id as its seed), those loaders and their links go, and
    the pack's samplers get empty key_words (the test conditioning records no tokens). Workflows without
    such loaders come back unchanged (a copy)."""
    out = copy.deepcopy(workflow)
    by_id = {n["id"]: n for n in out["nodes"]}
    loaders = {n["id"]: _clip_family(n) for n in out["nodes"] if n["type"] in CLIP_LOADER_FAMILY}
    if not loaders:
        return out
    dropped_links = {row[0] for row in out["links"] if row[1] in loaders}
    for row in out["links"]:
        if row[0] not in dropped_links:
            continue
        target = by_id[row[3]]
        if target["type"] not in TEXT_ENCODERS:
            raise ValueError(f"node {target['id']} ({target['type']}) takes a CLIP but is not a text encoder")
        outputs = target["outputs"]
        by_id[row[3]] = {
            "id": target["id"], "type": TEST_CONDITIONING, "pos": target["pos"], "size": [315, 106], "flags": {},
            "order": target["order"], "mode": 0,
            "inputs": [{"localized_name": w, "name": w, "type": t, "widget": {"name": w}, "link": None}
                       for w, t in (("family", "COMBO"), ("tokens", "INT"), ("values_seed", "INT"))],
            "outputs": [{"localized_name": "CONDITIONING", "name": "CONDITIONING", "type": "CONDITIONING",
                         "links": outputs[0]["links"]}],
            "title": f"TEST ONLY: {target.get('title') or target['type']}",
            "properties": {"Node name for S&R": TEST_CONDITIONING},
            "widgets_values": [loaders[row[1]], 8, int(target["id"])],
        }
    out["nodes"] = [by_id[n["id"]] for n in out["nodes"] if n["id"] not in loaders]
    out["links"] = [row for row in out["links"] if row[0] not in dropped_links]
    for node in out["nodes"]:
        if node["type"] == "AsynDMKSampler":
            node["widgets_values"][KEY_WORDS_INDEX] = ""
    return out


def with_test_bypasses(workflow: dict[str, Any]) -> dict[str, Any]:
    """The workflow with the TEST_BYPASSED nodes bypassed (mode 4: the frontend passes each output on from
    the input of the same type; see the module docstring). A copy."""
    out = copy.deepcopy(workflow)
    for node in out["nodes"]:
        if node["type"] in TEST_BYPASSED:
            node["mode"] = 4
    return out


def load_for_tests(name: str) -> dict[str, Any]:
    return with_test_bypasses(with_test_conditioning(load(name)))


def write_test_image(folder: Path) -> Path:
    """TEST_IMAGE in `folder`: a colour gradient, opaque but for TEST_IMAGE_BOX (alpha 0: what the mask editor
    writes where the user paints, so LoadImage's MASK is 1 there)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgba = np.stack([x * 255 // (SIZE - 1), y * 255 // (SIZE - 1), (x + y) * 127 // (SIZE - 1), np.full_like(x, 255)], -1)
    left, top, right, bottom = TEST_IMAGE_BOX
    rgba[top:bottom, left:right, 3] = 0
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TEST_IMAGE
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def object_info(server) -> dict[str, Any]:
    write_test_image(server.run_dir / "in")  # before /object_info, so LoadImage lists it
    return dict(server.get("/object_info"))


def missing_test_models(workflow: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """The random-weight test files the workflow's UNET / VAE loaders would run on that the server does not
    list (none, once scripts/setup.sh has built .dev/dit-models: see TEST_UNETS)."""
    missing = []
    for kind, table, real in (("UNETLoader", TEST_UNETS, REAL_UNETS), ("VAELoader", TEST_VAES, REAL_VAES)):
        (widget,), _ = MODEL_WIDGETS[kind]
        listed = set(object_info[kind]["input"]["required"][widget][0])
        for node in nodes_of(workflow, kind):
            test_file = table[real[node["widgets_values"][0]]]
            if test_file not in listed:
                missing.append(test_file)
    return sorted(set(missing))


# ------------------------------------------------------------------------------------------------
# Test settings, applied to the UI workflow (so the browser can apply exactly the same).


def settings_for_tests(workflow: dict[str, Any], object_info: dict[str, Any], seed_offset: int = 0) -> tuple[dict, dict]:
    """{node id: {widget: value}} that points the workflow at the test models and shrinks it, and what
    the checks need to know ({'size': side, 'sdxl_substituted': bool, 'missing': the test files the server
    lacks}). A workflow with missing test files keeps its real model names (it is not run)."""
    available = set(object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0])
    changes: dict[str, dict[str, Any]] = {}
    is_sdxl = any(REAL_CKPTS.get(n["widgets_values"][0]) == "sdxl" for n in nodes_of(workflow, "CheckpointLoaderSimple"))
    size = SDXL_SIZE if is_sdxl else SIZE
    substituted = is_sdxl and SDXL_TEST_CKPT not in available
    missing = missing_test_models(workflow, object_info)

    def change(node: dict[str, Any], widget: str, value: Any) -> None:
        changes.setdefault(str(node["id"]), {})[widget] = value

    for node in workflow["nodes"]:
        kind = node["type"]
        if kind == "CheckpointLoaderSimple":
            family = REAL_CKPTS.get(node["widgets_values"][0], "sd15")
            if family in TEST_CKPTS:
                change(node, "ckpt_name", TEST_CKPTS[family])
            else:
                change(node, "ckpt_name", SDXL_TEST_CKPT if is_sdxl and not substituted else DEFAULT_CKPT)
        elif kind == "UNETLoader" and not missing:
            change(node, "unet_name", TEST_UNETS[REAL_UNETS[node["widgets_values"][0]]])
        elif kind == "VAELoader" and not missing:
            change(node, "vae_name", TEST_VAES[REAL_VAES[node["widgets_values"][0]]])
        elif kind == "LoadImage":
            change(node, "image", TEST_IMAGE)
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            change(node, "width", size)
            change(node, "height", size)
        if kind in FRONTEND_ONLY or kind not in object_info:
            continue
        widgets = {name for section in ("required", "optional") for name in object_info[kind]["input"].get(section, {})}
        if "steps" in widgets:
            change(node, "steps", STEPS)
        for seed in ("seed", "noise_seed"):
            if seed in widgets:
                primitive = linked_primitive(workflow, node, seed)
                if primitive is not None:
                    change(primitive, "value", int(primitive["widgets_values"][0]) + seed_offset)
                else:
                    change(node, seed, int(widget_values(node, object_info[kind])[seed]) + seed_offset)
    return changes, {"size": size, "sdxl_substituted": substituted, "missing": missing}


def apply_settings(workflow: dict[str, Any], changes: dict[str, dict[str, Any]], object_info: dict[str, Any]) -> dict:
    out = copy.deepcopy(workflow)
    by_id = {str(n["id"]): n for n in out["nodes"]}
    for node_id, widgets in changes.items():
        node = by_id[node_id]
        for name, value in widgets.items():
            set_widget(node, object_info.get(node["type"]), name, value)
    return out


def prompt_for_tests(name: str, object_info: dict[str, Any], seed_offset: int = 0) -> tuple[dict, dict]:
    workflow = load_for_tests(name)
    changes, facts = settings_for_tests(workflow, object_info, seed_offset)
    return convert(apply_settings(workflow, changes, object_info), object_info), facts


# ------------------------------------------------------------------------------------------------
# Checking what a run wrote.


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def _view(server, img: dict[str, Any]) -> bytes:
    """An output or temp image, fetched as the frontend shows it (GET /view)."""
    query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""), "type": img["type"]})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
        return bytes(r.read())


def _source(prompt: dict[str, Any], node_id: str) -> dict[str, Any]:
    link = prompt[node_id]["inputs"]["images"]
    return prompt[link[0]]


def check_outputs(server, entry: dict[str, Any], prompt: dict[str, Any], object_info: dict[str, Any],
                  size: int) -> dict[str, list[tuple[int, ...]]]:
    """Every output node wrote images: decoded pictures and masks at the latent's size in pixels, non-flat
    and finite; strips and plots at least 32 px. Returns {node id: [image shapes]}."""
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for node_id in output_nodes(prompt, object_info):
        node = prompt[node_id]
        assert node["class_type"] in ("SaveImage", "PreviewImage"), node
        images = entry["outputs"].get(node_id, {}).get("images", [])
        assert images, f"{node['class_type']} {node_id} ({node['_meta']['title']}) wrote nothing"
        src = _source(prompt, node_id)
        for img in images:
            assert img["type"] == ("output" if node["class_type"] == "SaveImage" else "temp"), img
            if img["type"] == "output":
                assert (server.run_dir / "out" / img.get("subfolder", "") / img["filename"]).exists(), img
            pixels = _image(_view(server, img))
            assert np.isfinite(pixels).all()
            shapes.setdefault(node_id, []).append(pixels.shape)
            if src["class_type"] in ("VAEDecode", "MaskToImage"):
                assert pixels.shape == (size, size, 3), (node_id, src["class_type"], pixels.shape)
            else:  # timestep-map strips, schedule previews, table plots
                assert min(pixels.shape[:2]) >= 32, (node_id, src["class_type"], pixels.shape)
            if src["class_type"] == "VAEDecode":
                assert pixels.std() > 0.5, f"{img['filename']} is one flat colour (NaN in the pipeline?)"
    return shapes


# ------------------------------------------------------------------------------------------------
# The converter on its own (the browser test below checks it against the frontend on the real files).


def test_converter_maps_widgets_links_reroutes_and_primitives() -> None:
    info = {
        "Src": {"input": {"required": {}}, "output": ["LATENT"]},
        "Dst": {"input": {"required": {"x": ["LATENT", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "mode": [["a", "b"], {}], "n": ["INT", {"forceInput": True}]},
                          "optional": {"text": ["STRING", {}], "noise_seed": ["INT", {}]}},
                "input_order": {"required": ["x", "seed", "mode", "n"], "optional": ["text", "noise_seed"]},
                "output": [], "output_node": True},
    }
    workflow = {
        "version": 0.4,
        "nodes": [
            {"id": 1, "type": "Src", "inputs": [], "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1]}],
             "widgets_values": []},
            {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "LATENT", "links": [2]}]},
            {"id": 3, "type": "Dst", "widgets_values": [5, "randomize", "b", "hello", 9, "fixed"],
             "inputs": [{"name": "x", "type": "LATENT", "link": 2},
                        {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 3},
                        {"name": "n", "type": "INT", "link": None}]},
            {"id": 4, "type": "PrimitiveNode", "widgets_values": [77, "fixed"],
             "outputs": [{"name": "INT", "type": "INT", "links": [3], "widget": {"name": "seed"}}]},
            {"id": 5, "type": "Note", "widgets_values": ["a note"]},
        ],
        "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 4, 0, 3, 1, "INT"]],
    }
    prompt = convert(workflow, info)
    assert set(prompt) == {"1", "3"}
    # noise_seed (no control option, but named like a seed) carries a control value too, as in the frontend
    assert prompt["3"]["inputs"] == {"x": ["1", 0], "seed": 77, "mode": "b", "text": "hello", "noise_seed": 9}
    assert output_nodes(prompt, info) == ["3"]
    node = workflow["nodes"][2]
    set_widget(node, info["Dst"], "text", "bye")
    assert node["widgets_values"] == [5, "randomize", "b", "bye", 9, "fixed"]
    assert linked_primitive(workflow, node, "seed") is workflow["nodes"][3]
    node["widgets_values"] = [5, "b", "hello"]  # the control value after seed is missing
    with pytest.raises(ValueError, match="3 widget values"):
        convert(workflow, info)

    # A bypassed node (mode 4) is left out; a link from its output comes from its input of the same type.
    info["Mid"] = {"input": {"required": {"n": ["INT", {"forceInput": True}], "x": ["LATENT", {}]}},
                   "input_order": {"required": ["n", "x"]}, "output": ["LATENT"]}
    bypassed = {"version": 0.4, "nodes": [
        {"id": 1, "type": "Src", "inputs": [], "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1]}],
         "widgets_values": []},
        {"id": 2, "type": "Mid", "mode": 4, "widgets_values": [],
         "inputs": [{"name": "n", "type": "INT", "link": None}, {"name": "x", "type": "LATENT", "link": 1}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}]},
        {"id": 3, "type": "Dst", "widgets_values": [5, "fixed", "a", "", 0, "fixed"],
         "inputs": [{"name": "x", "type": "LATENT", "link": 2}]},
    ], "links": [[1, 1, 0, 2, 1, "LATENT"], [2, 2, 0, 3, 0, "LATENT"]]}
    prompt = convert(bypassed, info)
    assert set(prompt) == {"1", "3"} and prompt["3"]["inputs"]["x"] == ["1", 0]


# ------------------------------------------------------------------------------------------------
# The files.


def test_the_twelve_workflows_are_there() -> None:
    found = {p.stem for p in WORKFLOWS.glob("*.json")}
    assert found == EXPECTED, f"missing {sorted(EXPECTED - found)}, unexpected {sorted(found - EXPECTED)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_is_valid_ui_json(name: str, object_info: dict[str, Any]) -> None:
    wf = load(name)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    assert isinstance(wf.get("groups", []), list) and "ds" in wf.get("extra", {})
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(row[0] for row in wf["links"])
    unknown = sorted({n["type"] for n in wf["nodes"]} - set(object_info) - FRONTEND_ONLY)
    assert unknown == [], f"node types not in /object_info: {unknown}"
    assert REQUIRED_NODES[name] <= {n["type"] for n in wf["nodes"]}, REQUIRED_NODES[name] - {n["type"] for n in wf["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, _type in wf["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"], (name, link_id)
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, (name, link_id)
    for node in wf["nodes"]:
        for slot in node.get("inputs", []):
            assert slot.get("link") is None or any(row[0] == slot["link"] for row in wf["links"]), (node["id"], slot)
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
    # A note that explains the workflow, and says what the test models give.
    notes = [n for n in wf["nodes"] if n["type"] in NOTE_TYPES]
    assert len(notes) == 1, f"{len(notes)} notes"
    text = notes[0]["widgets_values"][0]
    assert len(text) > 300 and "random-weight" in text and "noise" in text, text[:200]
    # Real model names, with where to get them (the frontend's missing-models dialog offers the download), all
    # of the workflow's family.
    real = {"CheckpointLoaderSimple": REAL_CKPTS, "UNETLoader": REAL_UNETS, "VAELoader": REAL_VAES}
    families, vae_families = set(), set()
    for node in wf["nodes"]:
        if node["type"] not in MODEL_WIDGETS:
            continue
        widgets, directory = MODEL_WIDGETS[node["type"]]
        files = [widget_values(node, object_info[node["type"]])[w] for w in widgets]
        listed = {m["name"]: m for m in node["properties"]["models"]}
        assert sorted(listed) == sorted(files), (node["id"], node["type"], files, sorted(listed))
        for file in files:
            assert listed[file]["url"].startswith("https://huggingface.co/") and listed[file]["directory"] == directory, listed[file]
            if node["type"] in real:
                assert file in real[node["type"]], (node["type"], file)
                (vae_families if node["type"] == "VAELoader" else families).add(real[node["type"]][file])
            else:
                assert file in REAL_TEXT_ENCODERS, (node["type"], file)
    family = FAMILY.get(name, "sd15")
    assert families == {family}, families
    assert vae_families <= {VAE_FAMILY.get(family, family)}, vae_families
    prompt = convert(wf, object_info)  # every node's widget values match its definition
    assert output_nodes(prompt, object_info), "no output node"


def test_workflow_details(object_info: dict[str, Any]) -> None:
    """The particular wiring each example promises."""
    t2i = convert(load("asyndm_sd15_text_to_image"), object_info)
    sampler = next(i for i, n in t2i.items() if n["class_type"] == "AsynDMKSampler")
    previews = [n for n in t2i.values() if n["class_type"] == "PreviewImage"]
    assert [p["inputs"]["images"] for p in previews] == [[sampler, 1]]  # timestep_maps -> PreviewImage
    assert t2i[sampler]["inputs"]["key_words"]
    assert t2i[t2i[sampler]["inputs"]["positive"][0]]["class_type"] == "AsynDMTextEncode"
    assert t2i[t2i[sampler]["inputs"]["negative"][0]]["class_type"] == "CLIPTextEncode"

    sdxl = convert(load("asyndm_sdxl"), object_info)
    latent = next(n for n in sdxl.values() if n["class_type"] == "EmptyLatentImage")
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (1024, 1024)

    svsa = convert(load("asyndm_sync_vs_async"), object_info)
    samplers = [n for n in svsa.values() if n["class_type"] in ("KSampler", "AsynDMKSampler")]
    assert len(samplers) == 2 and samplers[0]["inputs"]["seed"] == samplers[1]["inputs"]["seed"]
    for key in ("steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "model"):
        assert samplers[0]["inputs"][key] == samplers[1]["inputs"][key], key
    assert sum(n["class_type"] == "SaveImage" for n in svsa.values()) == 2

    for name, source in (("asyndm_drawn_mask", "AsynDMMaskToTimestepMap"), ("asyndm_attention_mask_edit", "AsynDMMaskToTimestepMap"),
                         ("asyndm_learned_scheduler", "AsynDMSchedulerLoader")):
        p = convert(load(name), object_info)
        sampler = next(n for n in p.values() if n["class_type"] == "AsynDMKSampler")
        assert p[sampler["inputs"]["schedule"][0]]["class_type"] == source, name
    edit = convert(load("asyndm_attention_mask_edit"), object_info)
    mt = next(n for n in edit.values() if n["class_type"] == "AsynDMMaskToTimestepMap")
    assert mt["inputs"]["mask_batch"] == "items" and edit[mt["inputs"]["mask"][0]]["class_type"] == "GrowMask"
    for name in ("asyndm_flux", "asyndm_sd35"):  # a drawn-mask schedule on a 1024 x 1024 16-channel latent
        p = convert(load(name), object_info)
        sampler = next(n for n in p.values() if n["class_type"] == "AsynDMKSampler")
        assert p[sampler["inputs"]["schedule"][0]]["class_type"] == "AsynDMMaskToTimestepMap", name
        assert sampler["inputs"]["key_words"] == "" and sampler["inputs"]["sampler_name"] == "euler", name
        latent = p[sampler["inputs"]["latent_image"][0]]
        assert latent["class_type"] == "EmptySD3LatentImage" and (latent["inputs"]["width"], latent["inputs"]["height"]) == (1024, 1024)
        assert p[sampler["inputs"]["positive"][0]]["class_type"] == ("FluxGuidance" if name == "asyndm_flux" else "AsynDMTextEncode")
    flux = convert(load("asyndm_flux"), object_info)
    sampler = next(n for n in flux.values() if n["class_type"] == "AsynDMKSampler")
    assert flux[sampler["inputs"]["model"][0]]["class_type"] == "UNETLoader" and sampler["inputs"]["cfg"] == 1.0
    guidance = flux[sampler["inputs"]["positive"][0]]
    assert guidance["inputs"]["guidance"] == 3.5 and flux[guidance["inputs"]["conditioning"][0]]["class_type"] == "AsynDMTextEncode"
    (dual,) = [n for n in flux.values() if n["class_type"] == "DualCLIPLoader"]
    assert dual["inputs"]["type"] == "flux"
    assert flux[next(n for n in flux.values() if n["class_type"] == "VAEDecode")["inputs"]["vae"][0]]["class_type"] == "VAELoader"
    sd35 = convert(load("asyndm_sd35"), object_info)
    sampler = next(n for n in sd35.values() if n["class_type"] == "AsynDMKSampler")
    assert sd35[sampler["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple" and sampler["inputs"]["cfg"] > 1
    for side in ("positive", "negative"):
        encoder = sd35[sampler["inputs"][side][0]]
        assert sd35[encoder["inputs"]["clip"][0]]["class_type"] == "TripleCLIPLoader", side

    # Qwen-Image and Z-Image: ComfyUI's own text-to-image wiring (UNETLoader -> ModelSamplingAuraFlow, CLIPLoader of
    # the family's type), the prompt through CLIP Text Encode (AsynDM) and key words that are words of it.
    for name, clip_type, shift, size, steps, cfg, negative, sampler_name in (
            ("asyndm_qwen_image", "qwen_image", 3.1, 1328, 20, 2.5, "CLIPTextEncode", "euler"),
            ("asyndm_z_image", "lumina2", 3.0, 1024, 9, 1.0, "ConditioningZeroOut", "res_multistep")):
        p = convert(load(name), object_info)
        sampler = next(n for n in p.values() if n["class_type"] == "AsynDMKSampler")
        assert "schedule" not in sampler["inputs"], name
        inputs = sampler["inputs"]
        assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["scheduler"]) == (
            steps, cfg, sampler_name, "simple"), name
        sampling = p[inputs["model"][0]]
        assert sampling["class_type"] == "ModelSamplingAuraFlow" and sampling["inputs"]["shift"] == shift, name
        assert p[sampling["inputs"]["model"][0]]["class_type"] == "UNETLoader", name
        latent = p[inputs["latent_image"][0]]
        assert latent["class_type"] == "EmptySD3LatentImage" and (latent["inputs"]["width"], latent["inputs"]["height"]) == (size, size)
        encoder = p[inputs["positive"][0]]
        assert encoder["class_type"] == "AsynDMTextEncode", name
        clip = p[encoder["inputs"]["clip"][0]]
        assert clip["class_type"] == "CLIPLoader" and clip["inputs"]["type"] == clip_type, name
        assert p[inputs["negative"][0]]["class_type"] == negative, name
        words = [w.split(":")[0].strip() for w in inputs["key_words"].split(",")]
        assert words and all(w and w in encoder["inputs"]["text"] for w in words), (name, inputs["key_words"])
    # Flux Kontext: the painted mask of the loaded image is the schedule; the Kontext-scaled image, encoded, is the
    # reference latent on the prompt and the sampler's latent; FluxGuidance 2.5, cfg 1.
    kontext = convert(load("asyndm_flux_kontext"), object_info)
    sampler = next(n for n in kontext.values() if n["class_type"] == "AsynDMKSampler")
    inputs = sampler["inputs"]
    assert (inputs["cfg"], inputs["sampler_name"], inputs["scheduler"], inputs["key_words"]) == (1.0, "euler", "simple", "")
    schedule = kontext[inputs["schedule"][0]]
    assert schedule["class_type"] == "AsynDMMaskToTimestepMap" and schedule["inputs"]["mask"][1] == 1  # LoadImage's MASK
    image = kontext[schedule["inputs"]["mask"][0]]
    assert image["class_type"] == "LoadImage"
    encode = kontext[inputs["latent_image"][0]]
    assert encode["class_type"] == "VAEEncode"
    scale = kontext[encode["inputs"]["pixels"][0]]
    assert scale["class_type"] == "FluxKontextImageScale" and kontext[scale["inputs"]["image"][0]] is image
    guidance = kontext[inputs["positive"][0]]
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 2.5
    reference = kontext[guidance["inputs"]["conditioning"][0]]
    assert reference["class_type"] == "ReferenceLatent" and reference["inputs"]["latent"] == inputs["latent_image"]
    assert kontext[reference["inputs"]["conditioning"][0]]["class_type"] == "AsynDMTextEncode"
    assert kontext[inputs["model"][0]]["inputs"]["unet_name"] == "flux1-dev-kontext_fp8_scaled.safetensors"
    (dual,) = [n for n in kontext.values() if n["class_type"] == "DualCLIPLoader"]
    assert dual["inputs"]["type"] == "flux"

    loader = next(n for n in convert(load("asyndm_learned_scheduler"), object_info).values()
                  if n["class_type"] == "AsynDMSchedulerLoader")
    shipped = {p.name for p in (REPO_ROOT / "schedules").glob("*.safetensors")}
    assert loader["inputs"]["schedule_name"] in shipped, (loader["inputs"]["schedule_name"], shipped)


TEST_FAMILY = {"asyndm_flux": "flux", "asyndm_flux_kontext": "flux", "asyndm_sd35": "sd3",
               "asyndm_qwen_image": "qwen_image", "asyndm_z_image": "z_image"}


def test_test_variants_replace_only_the_text_encoders(object_info: dict[str, Any]) -> None:
    """What the tests run of the DiT workflows is the template with its text-encoder part swapped for the test
    conditioning node, the key words emptied and, for Flux Kontext, FluxKontextImageScale bypassed (its image
    goes straight to VAEEncode); nothing else. The other workflows run as they are."""
    for name in sorted(EXPECTED):
        original, variant = convert(load(name), object_info), convert(load_for_tests(name), object_info)
        if name not in TEST_FAMILY:
            assert variant == original, name
            continue
        gone = {i for i, n in original.items() if n["class_type"] in CLIP_LOADER_FAMILY}
        swapped = {i for i, n in original.items() if n["class_type"] in TEXT_ENCODERS}
        bypassed = {i: n for i, n in original.items() if n["class_type"] in TEST_BYPASSED}
        assert gone and swapped and set(variant) == set(original) - gone - set(bypassed), name
        assert bool(bypassed) == (name == "asyndm_flux_kontext"), name
        for node_id, node in variant.items():
            want = dict(original[node_id]["inputs"])
            if node_id in swapped:
                assert node == {"class_type": TEST_CONDITIONING, "_meta": node["_meta"],
                                "inputs": {"family": TEST_FAMILY[name], "tokens": 8, "values_seed": int(node_id)}}, node
                continue
            if node["class_type"] == "AsynDMKSampler":
                want["key_words"] = ""
            for key, value in want.items():  # a link from a bypassed node comes from that node's image input
                if isinstance(value, list) and value and value[0] in bypassed:
                    want[key] = bypassed[value[0]]["inputs"]["image"]
            assert node["inputs"] == want, (name, node_id)


def test_templates_are_listed_and_served(server) -> None:
    """GET /workflow_templates lists the twelve under the pack's folder name; the frontend fetches each from
    /api/workflow_templates/<pack>/<name>.json (workflows/api/ is not a template)."""
    listed = server.get("/workflow_templates")
    assert set(listed.get(PACK, [])) == EXPECTED, listed.get(PACK)
    for name in sorted(EXPECTED):
        served = server.get(f"/api/workflow_templates/{PACK}/{name}.json")
        assert served == load(name), name


def test_every_template_has_a_current_thumbnail(server) -> None:
    """workflows/<name>.jpg beside each template (the template browser shows /api/workflow_templates/<pack>/
    <name>.jpg): a small square JPEG made from this very workflow file (its comment records the file's
    SHA-256; after editing a workflow, rerun scripts/make_thumbnails.py), served as an image, never listed as
    a template itself."""
    for name in sorted(EXPECTED):
        path = WORKFLOWS / f"{name}.jpg"
        assert path.is_file(), f"{path.name} is missing: run `.dev/venv/bin/python scripts/make_thumbnails.py {name}`"
        assert path.stat().st_size < 100_000, (path.name, path.stat().st_size)
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (512, 512), (path.name, img.format, img.size)
            comment = img.info.get("comment", b"").decode()
        digest = hashlib.sha256((WORKFLOWS / f"{name}.json").read_bytes()).hexdigest()
        assert comment == f"asyndm-thumbnail workflow-sha256={digest}", (
            f"{path.name} was made from another version of {name}.json: rerun "
            f"`.dev/venv/bin/python scripts/make_thumbnails.py {name}`")
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30) as r:
            assert r.headers.get_content_type() == "image/jpeg" and r.read() == path.read_bytes(), name
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == sorted(EXPECTED)  # no thumbnail without a template


# ------------------------------------------------------------------------------------------------
# Running them through the API.


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_runs_through_the_api(server, object_info: dict[str, Any], name: str) -> None:
    prompt, facts = prompt_for_tests(name, object_info)
    if facts["missing"]:
        pytest.skip(f"{name}: no random-weight test model for it ({', '.join(facts['missing'])} not in the "
                    f"model folders; scripts/setup.sh has scripts/make_dit_models.py write it)")
    if name == "asyndm_sdxl":
        ckpt = next(n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple")["inputs"]["ckpt_name"]
        # Without an SDXL test checkpoint the SD1.5 one stands in (see the module docstring).
        assert ckpt == (DEFAULT_CKPT if facts["sdxl_substituted"] else SDXL_TEST_CKPT)
    entry = server.run(prompt, timeout=240)
    shapes = check_outputs(server, entry, prompt, object_info, facts["size"])
    if name == "asyndm_attention_mask_edit":  # one mask per key word ("cat, dog"), in the previews
        mask_previews = [i for i in shapes if _source(prompt, i)["class_type"] == "MaskToImage"]
        assert len(mask_previews) == 3 and all(len(shapes[i]) == 2 for i in mask_previews), shapes
    if name == "asyndm_sync_vs_async":
        saved = [i for i in shapes if prompt[i]["class_type"] == "SaveImage"]
        assert len(saved) == 2
    if name == "asyndm_flux_kontext":  # the painted box is the key item: the schedule preview is not flat
        mt = next(i for i, n in prompt.items() if n["class_type"] == "AsynDMMaskToTimestepMap")
        preview = next(i for i in shapes if _source(prompt, i) is prompt[mt])
        (img,) = entry["outputs"][preview]["images"]
        assert _image(_view(server, img)).std() > 1.0, "the painted region gave an empty schedule"


def test_sync_vs_async_gives_one_image_without_key_words(server, object_info: dict[str, Any]) -> None:
    """What the example's note promises: with eta 0 and the key words cleared, both halves agree."""
    workflow = load("asyndm_sync_vs_async")
    changes, facts = settings_for_tests(workflow, object_info, seed_offset=2000)
    sampler = next(n for n in workflow["nodes"] if n["type"] == "AsynDMKSampler")
    changes.setdefault(str(sampler["id"]), {})["key_words"] = ""
    prompt = convert(apply_settings(workflow, changes, object_info), object_info)
    assert prompt[str(sampler["id"])]["inputs"]["eta"] == 0.0
    entry = server.run(prompt, timeout=240)
    check_outputs(server, entry, prompt, object_info, facts["size"])
    saved = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            (img,) = entry["outputs"][node_id]["images"]
            saved[node["inputs"]["filename_prefix"]] = _image(_view(server, img))
    sync, asyn = saved["asyndm/compare_sync"], saved["asyndm/compare_async"]
    assert np.abs(sync - asyn).max() <= 1.0  # 8-bit images: at most one level of rounding


# ------------------------------------------------------------------------------------------------
# In the browser: loaded as the frontend loads a template, converted by the frontend, saved and
# reopened, queued from the UI, edited and restored by a page reload (browser/run_workflows.mjs).

BROWSER_SEED_OFFSET = 1000  # the API runs above use 0, test_sync_vs_async_gives_one_image... 2000
SAVE_SUFFIX = "-saved"  # the browser saves each workflow as workflows/<name>-saved.json in the user folder
PACK_PREFIX = "AsynDM"  # the pack's node types
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
PACK_URL = f"/extensions/{PACK}/"




def _input_specs(node_def: dict[str, Any]) -> dict[str, Any]:
    return {name: spec for section in ("required", "optional") for name, spec in (node_def["input"].get(section) or {}).items()}


def _combo_options(spec: list[Any]) -> list[Any]:
    """A combo's options: the old form lists them first, the V3 form ("COMBO", {"options": [...]}) in its options."""
    if isinstance(spec[0], list):
        return list(spec[0])
    return list(spec[1].get("options", [])) if len(spec) > 1 else []


def pack_edits(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A new value for every widget of the pack's nodes that is not fed by a link: ints and floats one
    step on, strings longer (multiline ones by a line, with quotes and non-ASCII), booleans flipped,
    combos (and a seed's control_after_generate) on to the next option. Reloading the page must give
    all of them back. (A linked widget is left alone: its value comes from the link's source.)"""
    edits: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if not node["type"].startswith(PACK_PREFIX):
            continue
        node_def = object_info[node["type"]]
        specs, values = _input_specs(node_def), widget_values(node, node_def)
        linked = {slot.get("widget", {}).get("name") or slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        out: dict[str, Any] = {}
        for name, count in widget_inputs(node_def):
            if name in linked:
                continue
            spec, value = specs[name], values[name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if kind == "INT":
                out[name] = value + 1 if value + 1 <= opts.get("max", value + 1) else value - 1
            elif kind == "FLOAT":
                step = opts.get("step", 0.05)
                up = round(value + step, 6)
                out[name] = up if up <= opts.get("max", up) else round(value - step, 6)
            elif kind == "STRING" and opts.get("multiline"):
                out[name] = (f"{value}\n" if value else "") + 'a second line: "quoted", ünïcode ✓'
            elif kind == "STRING":
                out[name] = (f"{value}, " if value else "") + "ünïcode:0.35"
            elif kind == "BOOLEAN":
                out[name] = not value
            elif kind == "COMBO":
                options = _combo_options(spec)
                if len(options) > 1:
                    out[name] = options[(options.index(value) + 1) % len(options)] if value in options else options[0]
            if count == 2 and kind == "INT":  # the seed's control_after_generate, the value after it
                control = node["widgets_values"][widget_index(node, node_def, name) + 1]
                out["control_after_generate"] = SEED_CONTROLS[(SEED_CONTROLS.index(control) + 1) % len(SEED_CONTROLS)]
        edits[str(node["id"])] = out
    return edits


def reload_workflows() -> list[str]:
    """The workflows the page-reload check runs on: the first (in name order) with each of the pack's node
    types that the workflows use. A reload costs about 5 s on the 2-core machines, so not all twelve."""
    chosen, covered = [], set()
    for name in sorted(EXPECTED):
        types = {n["type"] for n in load_for_tests(name)["nodes"] if n["type"].startswith(PACK_PREFIX)}
        if types - covered:
            chosen.append(name)
            covered |= types
    return chosen


def browser_items(object_info: dict[str, Any]) -> list[dict[str, Any]]:
    """What the browser does with each workflow: the test settings (seeds shifted so that the UI run is
    not answered from the cache of an API run), the name to save it as, whether to check a page reload
    and the edits before it."""
    items = []
    for name in sorted(EXPECTED):
        variant = load_for_tests(name)
        changes, facts = settings_for_tests(variant, object_info, seed_offset=BROWSER_SEED_OFFSET)
        set_up = apply_settings(variant, changes, object_info)
        items.append({"name": name, "saveAs": f"{name}{SAVE_SUFFIX}", "changes": changes, "run": not facts["missing"],
                      "substitute": variant if variant != load(name) else None,
                      "reload": name in reload_workflows(), "edits": pack_edits(set_up, object_info)})
    return items


@pytest.fixture(scope="module")
def browser_run(server, object_info: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_browser_tools()
    tmp = Path(tmp_path_factory.mktemp("workflows_browser"))
    server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False,
                              "Comfy.Workflow.ShowMissingModelsWarning": False})
    spec = {"url": server.url, "chromium": str(CHROMIUM), "nodeDir": str(NODE_DIR), "pack": PACK,
            "userDataDir": str(tmp / "chromium-profile"), "out": str(tmp / "result.json"),
            "workflows": browser_items(object_info), "timeoutMs": 20000, "runTimeoutMs": 120000}
    spec_path = tmp / "input.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(["node", str(BROWSER_SCRIPT), str(spec_path)], capture_output=True, text=True,
                              timeout=480, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser script ran past 480 s; stderr:\n{(e.stderr or '')[-3000:]}")
    report = tmp / "result.json"
    if proc.returncode != 0 or not report.exists():
        pytest.fail(f"browser script failed (rc {proc.returncode}):\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(report.read_text())
    if not result.get("ok"):
        dialogs = [d for d in result.get("dialogs", []) if d["phase"] == result.get("error", "").split(": ")[0]]
        pytest.fail(f"browser run stopped (done: {result.get('steps')}):\n{result.get('error')}\ndialogs then: {dialogs}")
    return result


# Console errors the frontend logs for any workflow on these offline machines: blocked calls to
# api.comfy.org / huggingface.co (the page's CSP) and missing optional files (404); and one that
# frontend 1.32.9 logs at every start, with or without this pack's scripts (its render-mode setting
# hook sets a setting that is not registered yet: settingStore.set -> onChange reads `.id` of undefined).
HARMLESS_CONSOLE = ("Content Security Policy", "Failed to load resource", "Error fetching file size", "Failed to fetch",
                    "TypeError: Cannot read properties of undefined (reading 'id')\n    at onChange (")


def _strip_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    return {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in prompt.items()}


def _norm(value: Any) -> Any:
    """A value as JSON carries it, for an exact comparison: booleans stay apart from numbers (True == 1
    in Python), ints and floats are one kind (JSON writes 8.0 as 8)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return ("other", repr(value))


def _pack_nodes(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i: n for i, n in snapshot["nodes"].items() if n["type"].startswith(PACK_PREFIX)}


def _widget_state(node: dict[str, Any]) -> dict[str, Any]:
    """Name -> value of every widget (the plot's DOM widget included: it must stay out of widgets_values),
    and the serialized widgets_values. Left out: the frontend's own '$$' widgets (such as
    '$$canvas-image-preview', the last run's images drawn on the node), which are never saved."""
    return {"widgets": {w["name"]: _norm(w["value"]) for w in node["widgets"] if not w["name"].startswith("$$")},
            "widgets_values": _norm(node["widgetsValues"])}


def as_the_frontend_shows(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The workflow with every widget that a PrimitiveNode feeds set to the primitive's value: the frontend
    copies a primitive's value into its targets' widgets (and so into their widgets_values), the file
    format keeps whatever was there."""
    out = copy.deepcopy(workflow)
    for node in out["nodes"]:
        node_def = object_info.get(node["type"])
        if node["type"] in FRONTEND_ONLY or node_def is None:
            continue
        for slot in node.get("inputs", []):
            name = slot.get("widget", {}).get("name")
            primitive = linked_primitive(out, node, name) if name and slot.get("link") is not None else None
            if primitive is not None:
                set_widget(node, node_def, name, primitive["widgets_values"][0])
    return out


def assert_same_pack_widgets(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Every widget value and the widgets_values of every pack node in `got` are those in `want`."""
    got_nodes, want_nodes = _pack_nodes(got), _pack_nodes(want)
    assert got_nodes.keys() == want_nodes.keys(), f"{what}: pack nodes {sorted(got_nodes)} != {sorted(want_nodes)}"
    assert want_nodes, f"{what}: no pack node"
    for node_id, node in want_nodes.items():
        a, b = _widget_state(got_nodes[node_id]), _widget_state(node)
        changed = {name: (b["widgets"].get(name), a["widgets"].get(name))
                   for name in a["widgets"].keys() | b["widgets"].keys() if a["widgets"].get(name) != b["widgets"].get(name)}
        assert not changed, f"{what}: {node['type']} {node_id} widgets changed (before, after): {changed}"
        assert a["widgets_values"] == b["widgets_values"], \
            f"{what}: {node['type']} {node_id} widgets_values\n before {node['widgetsValues']}\n after  {got_nodes[node_id]['widgetsValues']}"


def _seen(browser_run: dict[str, Any], name: str) -> dict[str, Any]:
    """What the browser saw of one workflow; a step of it that failed fails the test, with the dialogs and
    errors seen in that step (usually the reason)."""
    seen = browser_run["workflows"].get(name)
    assert seen is not None, f"{name}: the browser did not get to this workflow"
    if seen.get("error"):
        failed_phase = seen["error"].split(": ")[0]
        pytest.fail(f"{name}: the browser stopped at {seen['error'][:3000]}\nproblems then: {_problems(browser_run, failed_phase)}")
    return dict(seen)


def test_frontend_converts_every_workflow_as_the_converter_does(browser_run: dict[str, Any],
                                                                object_info: dict[str, Any]) -> None:
    for name in sorted(EXPECTED):
        seen = _seen(browser_run, name)
        assert seen["loadError"] is None, (name, seen["loadError"])
        assert seen["template"] == load(name), f"{name}: the template the frontend fetched is not the file"
        assert seen["missingTypes"] == [], (name, seen["missingTypes"])
        assert _strip_meta(seen["prompt"]) == _strip_meta(convert(load(name), object_info)), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_runs_from_the_ui(server, browser_run: dict[str, Any], object_info: dict[str, Any], name: str) -> None:
    """Queued with app.queuePrompt from the graph reopened from its saved file: the frontend sends what the
    converter gives for the same settings, the run executes (no output node is answered from the cache)
    and writes the images the API run writes."""
    seen = _seen(browser_run, name)
    prompt, facts = prompt_for_tests(name, object_info, seed_offset=BROWSER_SEED_OFFSET)
    if facts["missing"]:
        pytest.skip(f"{name}: not queued, no random-weight test model for it ({', '.join(facts['missing'])})")
    entry = seen.get("history")
    assert entry, f"{name}: no history entry after app.queuePrompt ({seen.get('runError')})"
    sent = entry["prompt"][2]  # what the frontend queued: the same as the converter gives for the same settings
    assert _strip_meta(sent) == _strip_meta(prompt)
    check_outputs(server, entry, sent, object_info, facts["size"])
    # A cached output node writes no file, and check_outputs would pass on the API run's: none may be cached.
    cached = {n for kind, data in entry["status"].get("messages", []) if kind == "execution_cached" for n in data.get("nodes", [])}
    from_cache = sorted(set(output_nodes(sent, object_info)) & cached)
    assert from_cache == [], f"{name}: output nodes {from_cache} were answered from the cache, not run"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pack_widgets_survive_save_and_reopen(server, browser_run: dict[str, Any], object_info: dict[str, Any],
                                              name: str) -> None:
    """The values set in the UI are the ones the workflow file gets (compared with the Python converter's
    view of the same settings), and they come back unchanged from a serialize/parse/load round trip and
    from saving (Ctrl+S, the frontend's filename prompt, POST /api/userdata) and reopening the file."""
    seen = _seen(browser_run, name)
    item = next(i for i in browser_items(object_info) if i["name"] == name)
    assert seen["missingWidgets"] == [], f"{name}: widgets the test settings name are missing: {seen['missingWidgets']}"
    expected = as_the_frontend_shows(apply_settings(load_for_tests(name), item["changes"], object_info), object_info)
    settings = seen["snapshots"]["settings"]
    for node in expected["nodes"]:
        if not node["type"].startswith(PACK_PREFIX):
            continue
        got = settings["nodes"][str(node["id"])]
        assert _norm(got["widgetsValues"]) == _norm(node["widgets_values"]), \
            f"{name}: {node['type']} {node['id']} serializes {got['widgetsValues']}, the file format wants {node['widgets_values']}"
        shown = {w["name"]: w["value"] for w in got["widgets"]}
        for widget, value in widget_values(node, object_info[node["type"]]).items():
            assert _norm(shown.get(widget)) == _norm(value), f"{name}: {node['type']} {node['id']}.{widget} shows {shown.get(widget)!r}, not {value!r}"
        # the schedule plot is the only widget kept out of widgets_values, and it is not sent either
        assert {w["name"] for w in got["widgets"] if not w["serialize"]} <= {"asyndm_schedule_plot"}, got["widgets"]
        assert all(not w["inPrompt"] for w in got["widgets"] if w["name"] == "asyndm_schedule_plot"), got["widgets"]

    roundtrip = seen["snapshots"]["roundtrip"]
    assert roundtrip["stale"] == 0, f"{name}: loadGraphData kept {roundtrip['stale']} old node objects"
    assert_same_pack_widgets(roundtrip, settings, f"{name}, serialize -> JSON -> loadGraphData")

    save = seen["save"]
    assert save["defaultName"] == name, f"{name}: the save prompt offered {save['defaultName']!r}"
    assert "Save" in save["promptDialog"], save["promptDialog"]
    assert (save["postStatus"], save["getStatus"]) == (200, 200), save
    on_disk = server.run_dir / "user" / "default" / "workflows" / f"{item['saveAs']}.json"
    assert on_disk.exists(), f"{name}: the frontend's save did not write {on_disk}"
    saved = json.loads(on_disk.read_text())
    assert saved == save["saved"]
    saved_nodes = {str(n["id"]): n for n in saved["nodes"]}
    for node_id, node in _pack_nodes(settings).items():
        assert _norm(saved_nodes[node_id]["widgets_values"]) == _norm(node["widgetsValues"]), \
            f"{name}: saved file, {node['type']} {node_id}: {saved_nodes[node_id]['widgets_values']} != {node['widgetsValues']}"
    assert _strip_meta(convert(saved, object_info)) == _strip_meta(convert(expected, object_info)), f"{name}: the saved file converts differently"

    reopened = seen["snapshots"]["reopened"]
    assert reopened["stale"] == 0, f"{name}: reopening kept {reopened['stale']} old node objects"
    assert reopened["workflow"]["path"] == f"workflows/{item['saveAs']}.json" and reopened["workflow"]["persisted"], reopened["workflow"]
    assert_same_pack_widgets(reopened, settings, f"{name}, saved and reopened")


@pytest.mark.parametrize("name", reload_workflows())
def test_pack_widgets_survive_a_page_reload(browser_run: dict[str, Any], object_info: dict[str, Any], name: str) -> None:
    """Every editable widget of the pack's nodes changed, then the page reloaded: the frontend restores the
    workflow from session storage (Comfy.Workflow.Persist) with every value and widgets_values intact."""
    seen = _seen(browser_run, name)
    item = next(i for i in browser_items(object_info) if i["name"] == name)
    assert seen["missingEdits"] == [], f"{name}: widgets to edit are missing: {seen['missingEdits']}"
    edited = seen["snapshots"]["edited"]
    for node_id, edits in item["edits"].items():
        node = edited["nodes"][node_id]
        assert edits, f"{name}: nothing to edit on {node['type']} {node_id}"
        shown = {w["name"]: w["value"] for w in node["widgets"]}
        for widget, value in edits.items():
            assert _norm(shown[widget]) == _norm(value), f"{name}: {node['type']} {node_id}.{widget} took {shown[widget]!r}, not {value!r}"
    assert seen["storedWorkflow"]["previous"] == f"{item['saveAs']}.json", seen["storedWorkflow"]
    reloaded = seen["snapshots"]["reloaded"]
    assert reloaded["workflow"]["key"] == f"{item['saveAs']}.json", f"{name}: after the reload the open workflow is {reloaded['workflow']}"
    assert_same_pack_widgets(reloaded, edited, f"{name}, edited and the page reloaded")


def _ours(text: str) -> bool:
    return PACK_URL in text or "asyndm.SchedulePlot" in text


def _problems(browser_run: dict[str, Any], phase_prefix: str) -> list[str]:
    """What went wrong on screen or in the page during the phases that start with phase_prefix: error
    dialogs, error toasts, native alert/confirm dialogs, page errors, console errors that are not the
    offline frontend's usual ones, and every console error or warning from the pack's own scripts."""
    out = []
    for d in browser_run["dialogs"]:
        if not d["phase"].startswith(phase_prefix):
            continue
        is_save_prompt = d["phase"].endswith(":save") and "p-dialog" in d["className"] and "Save workflow" in d["text"]
        is_toast = "p-toast-message" in d["className"]
        if is_save_prompt or (is_toast and "p-toast-message-error" not in d["className"]):
            continue
        out.append(f"[{d['phase']}] dialog {d['className']!r}: {d['text']}")
    for d in browser_run["nativeDialogs"]:
        if d["phase"].startswith(phase_prefix) and d["type"] != "beforeunload":
            out.append(f"[{d['phase']}] native {d['type']}: {d['message']}")
    for e in browser_run["pageErrors"]:
        if e["phase"].startswith(phase_prefix):
            out.append(f"[{e['phase']}] page error: {e['text']}")
    for c in browser_run["console"]:
        if not c["phase"].startswith(phase_prefix):
            continue
        ours = _ours(c["url"]) or _ours(c["text"])
        if ours or (c["type"] == "error" and not any(h in c["text"] for h in HARMLESS_CONSOLE)):
            out.append(f"[{c['phase']}] console {c['type']} ({c['url']}): {c['text']}")
    return out


def test_app_starts_without_errors(browser_run: dict[str, Any]) -> None:
    assert _problems(browser_run, "start") == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_error_dialog_or_pack_error(browser_run: dict[str, Any], name: str) -> None:
    """Nothing went wrong on screen while the workflow was loaded, edited, saved, run and reloaded, and
    nothing is left open at the end of any step."""
    assert _problems(browser_run, f"{name}:") == []
    seen = _seen(browser_run, name)
    for phase, state in seen["phases"].items():
        left_open = [d for d in state["visibleDialogs"]
                     if "p-toast-message" not in d["className"] or "p-toast-message-error" in d["className"]]
        assert left_open == [], f"{name}: open at the end of {phase}: {left_open}"
