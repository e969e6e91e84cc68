"""Bad inputs, file names and isolation, through the real server (and in-process where no stock
node can build the input).

Every bad input must end as a ComfyUI node error (or a validation rejection) whose message names
the input and says what to do, and the server must go on serving: after each error a tiny good
asynchronous prompt is run and must succeed.

Sizes: the test checkpoint's UNet costs about 2-4 s per step at 64x64 on the shared 2-core
machines, so most prompts here are 32x32 (a 4x4 latent) with 1-3 steps and the "still serving"
prompt is 16x16 with key words and 1 step; sizes matter only where the test is about a size
(72x56, mask resizing). Every prompt gets a fresh seed so ComfyUI's cache never answers for the
node under test.

In-process parts (ComfyUI imported into the test process, small random models from
tests/model_factory.py): an unsupported model family, a conditioning batch that fits no latent
batch (no stock node makes a batched conditioning), the sampler refusal, non-finite latents through
SamplerCustom, the schedule-name checks of the loader/saver nodes' execute, and a check that the
pack keeps no module-level state.
"""

from __future__ import annotations

import ast
import copy
import importlib
import itertools
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.server.conftest import running_server
from tests.server.test_server import api_workflow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A server of this module's own: its history holds NaN inputs on purpose, which the frontend tests'
    JSON parser must never see, so these prompts stay out of the shared session server."""
    with running_server(Path(tmp_path_factory.mktemp("comfy_hardening"))) as srv:
        yield srv

ASYN = "asyndm_text_to_image.json"
PLAIN = "ksampler_baseline.json"
SEEDS = itertools.count(90_001)
SIZE = 32


# ------------------------------------------------------------------------------------------------
# Helpers


def latent_size(prompt: dict, width: int, height: int, batch: int = 1) -> dict:
    prompt["4"]["inputs"].update(width=width, height=height, batch_size=batch)
    return prompt


def asyn(size: int = SIZE, **overrides: Any) -> dict:
    overrides.setdefault("steps", 1)
    overrides.setdefault("seed", next(SEEDS))
    return latent_size(api_workflow(ASYN, **overrides), size, size)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def images_of(server: Any, entry: dict, strips: bool = False) -> list[np.ndarray]:
    files = [f for f in server.output_files(entry) if ("timestep_maps" in str(f)) == strips]
    return [pixels(f) for f in sorted(files)]


def image_of(server: Any, entry: dict) -> np.ndarray:
    images = images_of(server, entry)
    assert len(images) == 1, len(images)
    return images[0]


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for k, data in entry.get("status", {}).get("messages", []) if k == kind]


def run_ok(server: Any, prompt: dict) -> dict:
    from comfy_server import error_message

    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", error_message(entry) or entry["status"]
    return entry


def still_serving(server: Any) -> None:
    """The tiny good prompt that must succeed after every error: key words, 16x16, 1 step, cfg 1."""
    entry = run_ok(server, asyn(size=16, cfg=1.0))
    assert image_of(server, entry).shape == (16, 16, 3)


def rejected_inputs(body: str) -> set[str]:
    data = json.loads(body)
    return {str(e.get("extra_info", {}).get("input_name")) for ne in data.get("node_errors", {}).values()
            for e in ne.get("errors", [])}


def expect_error(server: Any, prompt: dict, *needles: str, node: str = "5", input_name: str | None = None,
                 good: Any = still_serving) -> str:
    """Run a prompt that must fail: rejected by validation naming `input_name`, or a node error at `node`
    whose message holds every needle (case-insensitive). Then the server must still serve a good prompt."""
    from comfy_server import PromptRejected, error_message

    try:
        entry = server.run(prompt, timeout=300)
    except PromptRejected as rejected:
        assert input_name is not None, f"rejected by validation, expected a node error: {rejected.body[:800]}"
        assert input_name in rejected_inputs(rejected.body), (input_name, rejected.body[:800])
        good(server)
        return rejected.body
    assert entry["status"]["status_str"] == "error", f"the prompt succeeded; expected an error with {needles}"
    message = error_message(entry) or ""
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    errors = messages(entry, "execution_error")
    assert errors and str(errors[0].get("node_id")) == node, errors
    good(server)
    return message


def solid_mask(value: float, width: int = SIZE, height: int = SIZE, batch: int = 1) -> dict:
    """Nodes "20".. making a MASK at ["20", 0] (batch > 1 through MaskToImage / RepeatImageBatch)."""
    nodes: dict[str, Any] = {"20": {"class_type": "SolidMask", "inputs": {"value": value, "width": width,
                                                                          "height": height}}}
    if batch > 1:
        nodes["20"] = {"class_type": "ImageToMask", "inputs": {"image": ["22", 0], "channel": "red"}}
        nodes["22"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["23", 0], "amount": batch}}
        nodes["23"] = {"class_type": "MaskToImage", "inputs": {"mask": ["24", 0]}}
        nodes["24"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": width, "height": height}}
    return nodes


def with_mask(prompt: dict, mask_nodes: dict, k: float = 0.8) -> dict:
    prompt.update(copy.deepcopy(mask_nodes))
    prompt["21"] = {"class_type": "AsynDMMaskToTimestepMap", "inputs": {
        "mask": ["20", 0], "k": k, "curve": "bin", "threshold": 0.5, "feather": 0, "preview_steps": 4,
        "mask_batch": "images"}}
    prompt["5"]["inputs"]["schedule"] = ["21", 0]
    return prompt


# ------------------------------------------------------------------------------------------------
# 1. Bad inputs through the server


def test_key_word_errors_name_the_word_and_the_fix(server) -> None:
    expect_error(server, asyn(key_words="rabbit, giraffe"), "key word 'giraffe'", "not in the prompt",
                 "its words are", "rabbit", "basketball")
    expect_error(server, asyn(key_words="rabbit,,ball"), "empty key word", "rabbit,,ball", "single commas")
    expect_error(server, asyn(key_words="rabbit:high"), "rabbit:high", "priority k in [0, 1]")


def test_out_of_range_numbers_are_rejected_naming_each_input(server) -> None:
    from comfy_server import PromptRejected

    for values in ({"k": 1.5, "mask_threshold": 20.0, "steps": 0, "eta": 2.0, "denoise": 1.5},
                   {"k": -0.1, "mask_threshold": 0.0, "eta": -1.0, "denoise": -0.5}):
        with pytest.raises(PromptRejected) as info:
            server.run(asyn(**values))
        assert rejected_inputs(info.value.body) >= set(values), info.value.body[:1500]
        still_serving(server)


@pytest.mark.parametrize("name, needle", [("k", "k must lie in [0, 1], got nan"),
                                          ("mask_threshold", "mask threshold must be a positive finite number"),
                                          ("denoise", "denoise is nan"), ("cfg", "cfg is nan"),
                                          ("eta", "eta must be a finite number >= 0 (got nan)")])
def test_nan_numbers_pass_validation_but_are_refused_by_name(server, name: str, needle: str) -> None:
    """JSON NaN slips through ComfyUI's min/max check (every comparison with NaN is false)."""
    expect_error(server, asyn(**{name: float("nan")}), needle)


@pytest.mark.parametrize("overrides", [
    {"mask_mode": "dynamic"},
    {"mask_mode": "static"},
    {"reference": True},
    {"key_words": "", "denoise": 0.4},
], ids=["dynamic", "static", "reference", "synchronous-img2img"])
def test_one_step_works(server, overrides: dict) -> None:
    entry = run_ok(server, asyn(steps=1, **overrides))
    assert image_of(server, entry).shape == (SIZE, SIZE, 3)


def test_denoise_zero_is_a_clear_error(server) -> None:
    expect_error(server, asyn(denoise=0.0), "denoise is 0", "set denoise above 0")


def test_mask_batch_must_fit_the_latent_batch(server) -> None:
    prompt = latent_size(with_mask(asyn(), solid_mask(1.0, batch=3)), SIZE, SIZE, batch=2)
    expect_error(server, prompt, "masks have batch 3", "latent batch is 2", "give 1 or 2 masks")
    # a batch of 2 masks of another size (1x1 px, resized to the latent) fits
    entry = run_ok(server, latent_size(with_mask(asyn(), solid_mask(1.0, 1, 1, batch=2)), SIZE, SIZE, batch=2))
    assert len(images_of(server, entry)) == 2


def test_all_zero_mask_samples_synchronously_and_all_one_runs(server) -> None:
    """Also: masks of any size (7x300, 100x30 px) are resized to the latent."""
    seed = next(SEEDS)
    sync = run_ok(server, asyn(seed=seed, steps=2, key_words=""))
    zero = run_ok(server, with_mask(asyn(seed=seed, steps=2), solid_mask(0.0, 7, 300)))
    one = run_ok(server, with_mask(asyn(seed=seed, steps=2), solid_mask(1.0, 100, 30)))
    assert np.array_equal(image_of(server, zero), image_of(server, sync)), "all-zero must be synchronous"
    assert np.array_equal(images_of(server, zero, strips=True)[0], images_of(server, sync, strips=True)[0])
    # all-one: every pixel on the key curve (no division by an empty background); its maps differ
    assert np.isfinite(image_of(server, one).astype(float)).all()
    assert not np.array_equal(images_of(server, one, strips=True)[0], images_of(server, sync, strips=True)[0])


def test_nan_mask_is_refused_by_name(server) -> None:
    # SolidMask's value 0..1 is checked by the server, but JSON NaN passes min/max
    expect_error(server, with_mask(asyn(), solid_mask(float("nan"))), "mask holds NaN", node="21")


def test_non_finite_latents_are_refused_by_name(server) -> None:
    import torch
    from safetensors.torch import save_file

    prompt = asyn()
    prompt["30"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["4", 0], "multiplier": float("nan")}}
    prompt["5"]["inputs"]["latent_image"] = ["30", 0]
    expect_error(server, prompt, "latent_image holds NaN or infinite", "fix the node that produced it")

    latent = torch.zeros(1, 4, 4, 4)
    latent[0, 1, 2, 3] = float("inf")
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.zeros(1)},
              str(server.run_dir / "in" / "asyndm-inf.latent"))
    prompt = asyn()
    prompt["30"] = {"class_type": "LoadLatent", "inputs": {"latent": "asyndm-inf.latent"}}
    prompt["5"]["inputs"]["latent_image"] = ["30", 0]
    expect_error(server, prompt, "latent_image holds NaN or infinite")


@pytest.mark.parametrize("mode, steps", [("dynamic", 2), ("static", 1), ("masks", 1)])
def test_latent_size_off_the_attention_grid_works(server, mode: str, steps: int) -> None:
    """72x56 px = a 9x7 latent: odd sizes at every UNet level (attention grid 3x2)."""
    prompt = latent_size(asyn(steps=steps, mask_mode="static" if mode == "static" else "dynamic"), 72, 56)
    if mode == "masks":
        prompt = with_mask(prompt, solid_mask(1.0, 40, 40))
    entry = run_ok(server, prompt)
    assert image_of(server, entry).shape == (56, 72, 3)


def test_latent_batch_two_with_batch_one_conditioning(server) -> None:
    entry = run_ok(server, latent_size(asyn(), SIZE, SIZE, batch=2))
    a, b = images_of(server, entry)
    assert not np.array_equal(a, b)  # each image has its own noise


def test_unknown_sampler_scheduler_and_options(server) -> None:
    # This ComfyUI does not check V3 combo values (newer ones reject them): either answer is fine.
    expect_error(server, asyn(sampler_name="not_a_sampler"), "unknown sampler 'not_a_sampler'", "euler",
                 "dpmpp_2m_sde", input_name="sampler_name")
    expect_error(server, asyn(scheduler="bogus"), "unknown scheduler 'bogus'", "karras", input_name="scheduler")
    expect_error(server, asyn(curve="wavy"), "unknown curve 'wavy'", "bin, lin, exp", input_name="curve")
    expect_error(server, asyn(mask_mode="sometimes"), "mask_mode", "'sometimes'", "'dynamic' or 'static'",
                 input_name="mask_mode")
    expect_error(server, asyn(reference=True, denoise=0.5), "reference", "set denoise to 1.0")


# ------------------------------------------------------------------------------------------------
# 2. Schedule file names from the UI through the server

BAD_NAMES = ["../x.safetensors", "/etc/passwd", "a/../../b.safetensors", "..\\x.safetensors", "ok\x00.safetensors",
             "../../../../../../etc/hostname"]
K_VALUES = itertools.count(1)


def _loader(name: str) -> dict:
    return {
        "1": {"class_type": "AsynDMSchedulerLoader", "inputs": {
            "schedule_name": name, "key_words": "rabbit", "k": round(next(K_VALUES) % 97 / 100, 2),
            "mask_threshold": 1.0, "mask_mode": "dynamic"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }


def _saver(filename: str) -> dict:
    return {"1": {"class_type": "AsynDMSaveSchedule", "inputs": {
        "filename": filename, "curve": "bin", "k_values": "0.7", "fitted_steps": 4, "description": "",
        "overwrite": True}}}


def _loader_serves(server: Any) -> None:
    """A good prompt after a name error: a listed schedule loads and is plotted (no sampling needed)."""
    entry = run_ok(server, _loader("asyndm-bin-k0.7.safetensors"))
    assert server.output_files(entry, kind="temp")


def _safetensors_files(*roots: Path) -> set[Path]:
    out: set[Path] = set()
    for root in roots:
        if root.is_dir():
            out |= {p.resolve() for p in root.rglob("*.safetensors")}
    return out


def test_schedule_names_cannot_leave_the_folders_through_the_server(server) -> None:
    from tests.conftest import comfyui_path

    comfy = comfyui_path()
    roots = [server.run_dir, comfy / "models", REPO_ROOT / ".dev" / "models"]
    before = _safetensors_files(*roots)
    for name in BAD_NAMES:
        expect_error(server, _loader(name), "outside the schedule folders", node="1", input_name="schedule_name",
                     good=_loader_serves)
        expect_error(server, _saver(name), "is not allowed", "letters, digits", node="1", input_name="filename",
                     good=_loader_serves)
    assert _safetensors_files(*roots) == before
    for written in ["x.safetensors", "b.safetensors", "..\\x.safetensors", "passwd.safetensors",
                    "hostname.safetensors"]:
        for folder in [comfy, comfy / "models", Path("/etc"), server.run_dir, server.run_dir / "out"]:
            assert not (folder / written).exists(), folder / written
    still_serving(server)


def _plot_route(server: Any, prefix: str = "/api", **query: str) -> tuple[int, dict]:
    url = f"{server.url}{prefix}/asyndm/schedule_plot?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_plot_route_reads_only_listed_files(server) -> None:
    """GET /asyndm/schedule_plot (Load Learned Scheduler's in-node plot) answers for a listed file, under
    /api too, and refuses every name that is not one the loader lists, reading and writing nothing."""
    from tests.conftest import comfyui_path

    for prefix in ("", "/api"):
        status, body = _plot_route(server, prefix, name="asyndm-lin-k0.7.safetensors", k="0.7,0.2", steps="12")
        assert status == 200 and body["curve"] == "lin" and body["steps"] == 12, body
        assert [t["k"] for t in body["tracks"]] == [0.7, 0.2] and len(body["background"]) == 13
    roots = [server.run_dir, comfyui_path() / "models", REPO_ROOT / ".dev" / "models"]
    before = _safetensors_files(*roots)
    for name in [*BAD_NAMES, str(REPO_ROOT / "schedules" / "asyndm-bin-k0.7.safetensors"),
                 "schedules/asyndm-bin-k0.7.safetensors"]:
        status, body = _plot_route(server, name=name)
        assert status == 404 and "is not a schedule file" in body["error"], (name, status, body)
    status, body = _plot_route(server, name="asyndm-lin-k0.7.safetensors", k="2")
    assert status == 400 and "outside [0, 1]" in body["error"]
    assert _safetensors_files(*roots) == before
    still_serving(server)


# ------------------------------------------------------------------------------------------------
# 3. Isolation: failed, interrupted and asynchronous prompts leave plain sampling bit-identical


def _on_model_b(prompt: dict) -> dict:
    """Model B: the same loaded checkpoint under a ModelSamplingDiscrete patch (a clone of A)."""
    prompt["9"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction",
                                                                     "zsnr": False}}
    prompt["5"]["inputs"]["model"] = ["9", 0]
    return prompt


def _plain(seed: int, prefix: str, *, patched: bool = False) -> dict:
    prompt = latent_size(api_workflow(PLAIN, steps=2, seed=seed, filename_prefix=prefix), 16, 16)
    return _on_model_b(prompt) if patched else prompt


def _wait_running(server: Any, prompt_id: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = server.get("/queue").get("queue_running", [])
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} never started")


def test_failed_and_interrupted_prompts_leave_no_state(server) -> None:
    seed = next(SEEDS)
    base_a = run_ok(server, _plain(seed, "iso/a0"))
    base_b = run_ok(server, _plain(seed, "iso/b0", patched=True))
    a0, b0 = image_of(server, base_a), image_of(server, base_b)
    assert not np.array_equal(a0, b0)  # the patch really changes model B

    # fails inside sampling, after the wrappers and time-embedding hooks are installed
    bad_masks = latent_size(with_mask(asyn(steps=3), solid_mask(1.0, batch=3)), SIZE, SIZE, batch=2)
    expect_error(server, bad_masks, "masks have batch 3")

    # interrupted while the asynchronous sampler runs (64 px, many steps: about 2-4 s per step here)
    long = asyn(size=64, steps=400)
    prompt_id = server.queue(long)
    _wait_running(server, prompt_id)
    time.sleep(1.5)  # checkpoint and prompts are cached: by now the sampler node is running
    server.post("/interrupt", {"prompt_id": prompt_id})
    entry = server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    interrupted = messages(entry, "execution_interrupted")
    assert interrupted and str(interrupted[0]["node_id"]) == "5", entry["status"]["messages"]

    # successful asynchronous prompts on the patched model B (masks) and on A (key words)
    run_ok(server, _on_model_b(with_mask(asyn(size=16, steps=2), solid_mask(1.0, 16, 8))))
    run_ok(server, asyn(size=16, steps=2))

    # the same plain prompts again; only the file prefix differs (the KSampler itself must run again)
    again_a = run_ok(server, _plain(seed, "iso/a1"))
    again_b = run_ok(server, _plain(seed, "iso/b1", patched=True))
    for entry in (again_a, again_b):
        cached = {str(n) for m in messages(entry, "execution_cached") for n in m.get("nodes", [])}
        assert "5" not in cached, "the KSampler answered from the cache: the comparison would prove nothing"
    assert np.array_equal(image_of(server, again_a), a0), "plain sampling on model A changed"
    assert np.array_equal(image_of(server, again_b), b0), "plain sampling on model B changed"


@pytest.fixture(scope="module")
def comfy_inprocess() -> Any:
    """ComfyUI importable in this process on the CPU, and the pack imported as ComfyUI imports it."""
    conftest = importlib.import_module("tests.inprocess.conftest")
    conftest.load_pack()
    return conftest.PACK_MODULE


@pytest.fixture(scope="module")
def small_sd15(comfy_inprocess: str) -> Any:
    from tests.model_factory import build_sd15

    return build_sd15(32, num_heads=2)


def _node_sample(comfy_inprocess: str, model: Any, positive: Any, negative: Any, latent: Any, **kw: Any) -> Any:
    sampling = importlib.import_module(f"{comfy_inprocess}.nodes.sampling")
    args = dict(seed=0, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple", denoise=1.0, key_words="",
                k=0.7, curve="bin", mask_threshold=1.0, mask_mode="dynamic", eta=0.0, reference=False)
    args.update(kw)
    return sampling.AsynDMKSampler.execute(model, positive, negative, latent, **args).args[0]["samples"]


def test_unsupported_model_family_is_named(comfy_inprocess: str) -> None:
    import torch

    from tests.factory_flux_family import build_hunyuan_image, make_hunyuan_image_conditioning

    distilled = build_hunyuan_image(meanflow=True)  # Flux's layout; meanflow's time_r_in cannot go per token
    cond = make_hunyuan_image_conditioning(seed=0)
    latent = {"samples": torch.zeros(1, 64, 8, 8)}
    for key_words in ("", "rabbit"):
        with pytest.raises(ValueError) as info:
            _node_sample(comfy_inprocess, distilled, cond, cond, latent, key_words=key_words, cfg=1.0)
        msg = str(info.value)
        assert "not supported" in msg and "HunyuanImage 2.1 distilled" in msg, msg
        for family in ("SD1.x", "SD2.x", "SDXL", "Flux"):
            assert family in msg, msg


def test_unknown_sampler_is_refused_in_process(comfy_inprocess: str) -> None:
    adapter = importlib.import_module(f"{comfy_inprocess}.asyndm.comfy_adapter.sampler")
    sampling = importlib.import_module(f"{comfy_inprocess}.nodes.sampling")
    with pytest.raises(ValueError, match=r"unknown sampler 'lms2': use one of ComfyUI's samplers \(euler, "):
        adapter.AsynSampler("lms2", None)
    with pytest.raises(ValueError, match="unknown sampler 'lms2'"):
        sampling.AsynDMSampler.execute("lms2", "", 0.7, "bin", 1.0, "dynamic", 0.0, False)
    with pytest.raises(ValueError, match="the sampler input is a str, not one of ComfyUI's k-diffusion samplers"):
        sampling.AsynDMSampler.execute("euler", "", 0.7, "bin", 1.0, "dynamic", 0.0, False, None, "euler")
    adapter.AsynSampler("lms", None)  # every one of ComfyUI's samplers
    with pytest.raises(ValueError, match="mask_mode must be 'dynamic' or 'static'"):
        sampling.AsynDMSampler.execute("euler", "rabbit", 0.7, "bin", 1.0, "Dynamic", 0.0, False)


def test_conditioning_batch_must_fit_the_latent_batch(comfy_inprocess: str, small_sd15: Any) -> None:
    import torch

    from tests.model_factory import make_conditioning

    neg = make_conditioning(small_sd15, seed=2)
    two = {"samples": torch.zeros(2, 4, 8, 8)}
    out = _node_sample(comfy_inprocess, small_sd15, make_conditioning(small_sd15, batch=1), neg, two)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    out = _node_sample(comfy_inprocess, small_sd15, make_conditioning(small_sd15, batch=2), neg, two)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    for batch, latent_batch in [(3, 2), (2, 3), (4, 2)]:
        latent = {"samples": torch.zeros(latent_batch, 4, 8, 8)}
        with pytest.raises(ValueError, match=f"positive conditioning has batch {batch} but the latent batch is "
                                             f"{latent_batch}: give a conditioning of batch 1"):
            _node_sample(comfy_inprocess, small_sd15, make_conditioning(small_sd15, batch=batch), neg, latent)
        with pytest.raises(ValueError, match=f"negative conditioning has batch {batch}"):
            _node_sample(comfy_inprocess, small_sd15, neg, make_conditioning(small_sd15, batch=batch), latent)


def test_non_finite_latent_through_sampler_custom(comfy_inprocess: str, small_sd15: Any) -> None:
    import torch

    from tests.model_factory import make_conditioning

    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    sampling = importlib.import_module(f"{comfy_inprocess}.nodes.sampling")
    sampler = sampling.AsynDMSampler.execute("euler", "", 0.7, "bin", 1.0, "dynamic", 0.0, False).args[0]
    pos, neg = make_conditioning(small_sd15, seed=1), make_conditioning(small_sd15, seed=2)
    sigmas = custom.BasicScheduler.execute(small_sd15, "simple", 2, 1.0).args[0]
    for bad in (float("nan"), float("inf")):
        samples = torch.zeros(1, 4, 8, 8)
        samples[0, 0, 1, 1] = bad
        with pytest.raises(ValueError, match="latent_image holds NaN or infinite"):
            custom.SamplerCustom.execute(small_sd15, True, 1, 2.0, pos, neg, sampler, sigmas, {"samples": samples})
    mask = torch.ones(1, 8, 8)
    mask[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="noise_mask holds NaN"):
        custom.SamplerCustom.execute(small_sd15, True, 1, 2.0, pos, neg, sampler, sigmas,
                                     {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": mask})


@pytest.fixture
def schedule_folders(comfy_inprocess: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models_dir in tmp_path/models; the scheduler folders = its asyndm_schedulers + the shipped folder;
    a valid schedule file sits at every place the bad names below would reach."""
    import folder_paths

    schedules = importlib.import_module(f"{comfy_inprocess}.nodes.schedules")
    good = (REPO_ROOT / "schedules" / "asyndm-bin-k0.7.safetensors").read_bytes()
    models = tmp_path / "a" / "models"
    user = models / "asyndm_schedulers"
    user.mkdir(parents=True)
    for bait in (models / "x.safetensors", models / "b.safetensors", tmp_path / "a" / "b.safetensors",
                 models.parent / "x.safetensors"):
        bait.write_bytes(good)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "asyndm_schedulers",
                        ([str(user), schedules.SHIPPED_SCHEDULES], {".safetensors"}))
    folder_paths.filename_list_cache.pop("asyndm_schedulers", None)
    yield user
    folder_paths.filename_list_cache.pop("asyndm_schedulers", None)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 5), (9, 7), (13, 2), (5, 33)])
def test_odd_latent_sizes_find_the_attention_in_process(comfy_inprocess: str, small_sd15: Any, h: int, w: int) -> None:
    """Static mode raises when the pre-pass sees no attention at the capture grid, so passing proves the
    grid (1/4 of the latent, rounded up at each level) is found for sizes that are no multiple of it."""
    import torch

    from tests.model_factory import make_conditioning

    tokens = importlib.import_module(f"{comfy_inprocess}.asyndm.comfy_adapter.tokens")
    prompt = tokens.PromptTokens("a rabbit", [[49406, 320, 10274] + [49407] * 74], {"a": [320], "rabbit": [10274]})
    pos = [[c[0], {**c[1], tokens.KEY: prompt}] for c in make_conditioning(small_sd15, seed=1)]
    neg = make_conditioning(small_sd15, seed=2)
    for mode in ("static", "dynamic"):
        out = _node_sample(comfy_inprocess, small_sd15, pos, neg, {"samples": torch.zeros(1, 4, h, w)},
                           key_words="rabbit", mask_mode=mode, steps=2)
        assert out.shape == (1, 4, h, w) and torch.isfinite(out).all()


def test_schedule_names_cannot_leave_the_folders_in_process(comfy_inprocess: str, schedule_folders: Path,
                                                            tmp_path: Path) -> None:
    schedules = importlib.import_module(f"{comfy_inprocess}.nodes.schedules")
    (schedule_folders / "sub").mkdir()
    names = [*BAD_NAMES, "sub/../../x.safetensors", str(tmp_path / "a" / "b.safetensors"), "\x00",
             "sub/..\\..\\x.safetensors"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for name in names:
        with pytest.raises(ValueError, match="outside the schedule folders|not a .safetensors"):
            schedules.AsynDMSchedulerLoader.execute(name, "rabbit", 0.7, 1.0, "dynamic", None)
        assert schedules.AsynDMSchedulerLoader.fingerprint_inputs(schedule_name=name) == name
        with pytest.raises(ValueError, match="is not allowed"):
            schedules.AsynDMSaveSchedule.execute(name, "bin", "0.7", 4, "", True, None)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written or replaced
    # the same node loads and saves a plain name in the folder
    schedules.AsynDMSaveSchedule.execute("mine", "bin", "0.7", 4, "", False, None)
    assert (schedule_folders / "mine.safetensors").is_file()
    out = schedules.AsynDMSchedulerLoader.execute("mine.safetensors", "rabbit", 0.7, 1.0, "dynamic", None)
    assert out.args[0].table is not None


# ------------------------------------------------------------------------------------------------
# No module-level state in the pack

ALLOWED_MODULE_CONSTANTS = {  # read-only tables (never mutated), checked below
    ("asyndm/schedule_file.py", "FLOAT_DTYPES"),
}


def _pack_sources() -> list[Path]:
    files = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "nodes").glob("*.py")),
             *sorted((REPO_ROOT / "asyndm").rglob("*.py"))]
    return [f for f in files if f.is_file()]


def test_pack_keeps_no_module_level_state() -> None:
    mutable_calls = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque", "WeakKeyDictionary",
                     "WeakValueDictionary", "Counter"}
    found: set[tuple[str, str]] = set()
    problems: list[str] = []
    for path in _pack_sources():
        rel = path.relative_to(REPO_ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for node in tree.body:
            targets: list[ast.expr] = []
            value = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in mutable_calls)
            for t in targets:
                if mutable and isinstance(t, ast.Name) and t.id not in ("__all__", "NODES"):
                    found.add((rel, t.id))
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                problems.append(f"{rel}:{node.lineno}: global {', '.join(node.names)}")
            decorators = getattr(node, "decorator_list", [])
            for d in decorators:
                text = ast.unparse(d)
                if "cache" in text:
                    problems.append(f"{rel}:{node.lineno}: @{text} keeps results between prompts")
    assert not problems, problems
    assert found <= ALLOWED_MODULE_CONSTANTS, f"new module-level mutable values (caches must be keyed and bounded): " \
                                              f"{sorted(found - ALLOWED_MODULE_CONSTANTS)}"


def test_module_constants_are_not_changed_by_sampling(comfy_inprocess: str, small_sd15: Any) -> None:
    import torch

    from tests.model_factory import make_conditioning

    adapter = importlib.import_module(f"{comfy_inprocess}.asyndm.comfy_adapter.sampler")
    schedule_file = importlib.import_module(f"{comfy_inprocess}.asyndm.schedule_file")
    lockstep = importlib.import_module(f"{comfy_inprocess}.asyndm.comfy_adapter.lockstep")

    def tables() -> tuple[str, ...]:
        return (repr(adapter.REFUSED_SAMPLERS), repr(dict(lockstep.REFUSED)), repr(dict(lockstep.BROWNIAN_SAMPLERS)),
                repr(sorted(schedule_file.FLOAT_DTYPES)))

    before = tables()
    pos, neg = make_conditioning(small_sd15, seed=1), make_conditioning(small_sd15, seed=2)
    for sampler in ("euler", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "heun"):
        _node_sample(comfy_inprocess, small_sd15, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)},
                     sampler_name=sampler, eta=0.0)
    assert tables() == before
