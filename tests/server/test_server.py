"""The pack inside a real ComfyUI server: it loads, its nodes are documented, workflows run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.server.conftest import DEFAULT_CKPT

PACK_NODES = {"AsynDMKSampler", "AsynDMSampler", "AsynDMTextEncode", "AsynDMMaskToTimestepMap", "AsynDMCrossAttentionMask", "AsynDMSchedulerLoader", "AsynDMSaveSchedule"}


def api_workflow(name: str, **overrides: object) -> dict:
    prompt = json.loads((REPO_ROOT / "workflows" / "api" / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = DEFAULT_CKPT
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["width"] = node["inputs"]["height"] = 64
        for key, value in overrides.items():
            if key in node["inputs"]:
                node["inputs"][key] = value
    return prompt


def test_pack_loads_without_import_failure(server) -> None:
    log = server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "asyndm" in line]
    assert not failed, log[-3000:]
    assert "Cannot import" not in log or "asyndm" not in log.split("Cannot import", 1)[1][:300], log[-3000:]
    info = server.get("/object_info")
    assert PACK_NODES <= set(info), sorted(n for n in info if "AsynDM" in n)


def test_every_pack_node_is_documented(server) -> None:
    info = server.get("/object_info")
    for name in PACK_NODES:
        node = info[name]
        assert node["category"].startswith("sampling/asyndm"), name
        assert len(node.get("description", "")) > 40, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_ksampler_workflow_runs_end_to_end(server) -> None:
    entry = server.run(api_workflow("ksampler_baseline.json", steps=4, seed=1))
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].exists()
    img = _image(files[0])
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()


def test_asynchronous_workflow_runs_end_to_end(server) -> None:
    entry = server.run(api_workflow("asyndm_text_to_image.json", steps=4, seed=2))
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = server.output_files(entry)
    names = sorted(f.name for f in files)
    assert len(files) == 2, names
    assert all(f.exists() for f in files)
    strip = next(f for f in files if "timestep_maps" in str(f))
    assert _image(strip).shape[0] >= 64
    # the node also shows the strip in the UI as a temp preview
    previews = server.output_files(entry, kind="temp")
    assert previews and all(p.exists() for p in previews)


def test_empty_key_words_reproduce_the_ksampler_through_the_server(server) -> None:
    base = server.run(api_workflow("ksampler_baseline.json", steps=4, seed=7, sampler_name="euler"))
    prompt = api_workflow("asyndm_text_to_image.json", steps=4, seed=7, sampler_name="euler", key_words="", eta=0.0)
    asyn = server.run(copy.deepcopy(prompt))
    a = _image(server.output_files(base)[0])
    b = _image(next(f for f in server.output_files(asyn) if "image" in f.name and "timestep" not in str(f)))
    assert np.abs(a - b).max() <= 1.0  # 8-bit images: at most one level of rounding
