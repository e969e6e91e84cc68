"""benchmarks/bench_sampling.py cannot rot: its main() on tiny models (UNet, Flux, SD3, one of the other transformer
families), one size, 4 steps, 1 repeat.

Four steps because dynamic masks give pixels their own timesteps only from step 2 on: every pixel
follows the last word at steps 0 and 1, and all reach the target together at the last step; while
all pixels share one timestep the model is called as KSampler calls it, without the per-pixel hooks.

Timings on CI machines mean nothing, so nothing here asserts a time: only that every variant ran,
the table was produced and every ratio, memory figure and profile entry is a finite number.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_sampling.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asyndm_bench_sampling", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here, as the benchmark itself runs: on a shared 2-core machine two threads
    wait on each other at every one of the tiny models' thousands of small ops while another process
    holds the other core (a 0.1 s KSampler run took 7 s that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_main_on_a_tiny_model_prints_a_table_with_finite_ratios(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    torch.set_num_threads(2)  # main() runs on one thread (its --threads default) and gives the caller's back
    try:
        run = bench.main(["--model", "tiny", "--sizes", "16", "--batch", "1", "--steps", "4", "--repeats", "1",
                          "--warmup", "0", "--memory", "inprocess", "--out", str(out),
                          "--json", str(tmp_path / "bench.json"), "--quiet"])
    finally:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    assert threads == 2, "main() must give back the caller's thread count"

    assert [r["case_label"] for r in run["results"]] == ["16x16 b1 s4"]
    result = run["results"][0]
    assert set(result["times"]) == {"ksampler", "dynamic", "fixed", "naive"}
    assert all(len(ts) == 1 and finite(ts[0]) and ts[0] > 0 for ts in result["times"].values())
    for name in ("dynamic", "fixed", "naive", "dynamic/naive"):
        ratios = result["ratios"][name]
        assert len(ratios) == 1 and finite(ratios[0]) and ratios[0] > 0, (name, ratios)
    assert finite(result["naive_vs_dynamic_max_abs"])

    for variant, piece_ms in result["profile"].items():
        assert all(finite(float(v)) for v in piece_ms.values()), variant
        assert piece_ms["total"] > 0 and piece_ms[bench.UNET_LABEL] > 0, variant
    assert result["profile"]["dynamic"]["attention observer (per-step mask capture)"] > 0
    assert result["profile"]["fixed"]["hooks: per-pixel selection"] > 0
    # The naive per-pixel path really ran (its own profile entry). Which variant is slower is the
    # benchmark's finding, not asserted here: with four steps the naive path runs at one step only
    # (steps 0, 1 and 3 share one timestep), so a time comparison would only measure machine noise.
    assert result["profile"]["naive"]["naive: time MLP on every pixel"] > 0
    for variant, mem in result["memory"].items():
        assert finite(float(mem["peak_mib"])) and mem["peak_mib"] > 0, variant

    text = run["markdown"]
    assert "| model | latent | batch | steps | KSampler |" in text
    assert "Time ratio vs KSampler" in text and "Peak memory" in text and "Profile, tiny 16x16 b1 s4" in text
    assert out.read_text().strip() == text.strip()
    assert (tmp_path / "bench.json").exists()
    assert "Time ratio vs KSampler" in capsys.readouterr().out


def test_naive_baseline_computes_what_the_pack_computes(bench):
    """The naive per-pixel hooks are a slower route to the same output (fixed masks: no mask feedback)."""
    bench.setup_comfyui()
    from asyndm.comfy_adapter.families import unet as unet_family

    model = bench.build_model("tiny")
    case = bench.Bench(model, bench.Case(16, 16, 2, 3))
    pack = case.run("fixed")
    with bench.patched(unet_family, "PerPixelTimesteps", bench.naive_hooks_class()):
        naive = case.run("fixed")
    assert unet_family.PerPixelTimesteps is not bench.naive_hooks_class()
    assert float((naive - pack).abs().max() / pack.abs().max()) < 1e-4
    stock = case.run("ksampler")
    assert float((pack - stock).abs().max()) > 1e-3, "the fixed masks did not make the run asynchronous"


def test_main_on_a_tiny_flux_gives_the_key_mask_row_and_the_modulation_cost(bench, tmp_path):
    """The Flux row: KSampler and the key-mask variant, the profile's per-token pieces, the forward alone."""
    run = bench.main(["--model", "flux-tiny", "--sizes", "16", "--batch", "1", "--steps", "4", "--repeats", "1",
                      "--warmup", "0", "--memory", "inprocess", "--forward-repeats", "1", "--text-tokens", "8",
                      "--out", "", "--json", str(tmp_path / "flux.json"), "--quiet"])
    assert run["cfg"] == 1.0 and run["scheduler"] == "simple"  # Flux's defaults
    assert run["models"]["flux-tiny"]["family"] == "flux" and run["models"]["flux-tiny"]["guidance_embed"]
    result = run["results"][0]
    assert set(result["times"]) == {"ksampler", "fixed"}
    assert all(len(ts) == 1 and finite(ts[0]) and ts[0] > 0 for ts in result["times"].values())
    assert finite(result["ratios"]["fixed"][0]) and result["ratios"]["fixed"][0] > 0
    assert result["fixed_vs_ksampler_max_abs"] > 1e-3, "the key mask did not make the Flux run asynchronous"
    fixed = result["profile"]["fixed"]
    assert all(finite(float(v)) for v in fixed.values())
    for piece in ("hooks: time-vector table (U rows)", "hooks: per-token gather", "set_map"):
        assert fixed[piece] > 0, piece
    assert set(result["forward"]) == {"stock", "hooks, no map", "per-token hooks", "naive per-token hooks"}
    assert all(finite(ts[0]) and ts[0] > 0 for ts in result["forward"].values())
    assert result["forward_pieces"]["per-token hooks"]["hooks: time-vector table (U rows)"] > 0
    assert result["forward_pieces"]["naive per-token hooks"]["naive: time MLP on every token"] > 0
    assert result["forward_shape"] == {"rows": 1, "image_tokens": 64, "text_tokens": 8}
    for variant, mem in result["memory"].items():
        assert finite(float(mem["peak_mib"])) and mem["peak_mib"] > 0, variant
    text = run["markdown"]
    assert "Flux transformer forward alone" in text and "Profile, flux-tiny 16x16 b1 s4" in text
    assert "hidden 64 (2 heads of 32)" in text


def test_main_on_a_tiny_sd3_gives_the_key_mask_row_and_the_modulation_cost(bench):
    run = bench.main(["--model", "sd3-tiny", "--sizes", "16", "--batch", "1", "--steps", "4", "--repeats", "1",
                      "--warmup", "0", "--memory", "off", "--forward-repeats", "1", "--text-tokens", "8",
                      "--out", "", "--quiet"])
    assert run["cfg"] == 4.5 and run["models"]["sd3-tiny"]["family"] == "mmdit"
    assert run["models"]["sd3-tiny"]["class"].endswith("OpenAISignatureMMDITWrapper)")
    result = run["results"][0]
    assert set(result["times"]) == {"ksampler", "fixed"} and finite(result["ratios"]["fixed"][0])
    assert result["fixed_vs_ksampler_max_abs"] > 1e-3, "the key mask did not make the SD3 run asynchronous"
    for piece in ("hooks: c table (U rows)", "hooks: per-token gather"):
        assert result["profile"]["fixed"][piece] > 0, piece
    assert all(finite(ts[0]) and ts[0] > 0 for ts in result["forward"].values())
    assert result["forward_shape"] == {"rows": 2, "image_tokens": 64, "text_tokens": 8}  # cfg 4.5: two rows
    assert result["forward_pieces"]["naive per-token hooks"]["naive: t_embedder on every token"] > 0
    assert "SD3 (MMDiT) transformer forward alone" in run["markdown"]


def test_a_tiny_transformer_family_row_gives_both_ratios_and_the_overhead_per_step(bench, tmp_path):
    """One of the other families' rows (Qwen-Image-Edit: a one-frame video latent and a reference latent) at
    the tests' size: no key items is ComfyUI's own run, the half-image key mask an asynchronous one."""
    assert bench.parse_families("all") == list(bench.DIT_MODELS)
    run = bench.main(["--families", "qwen-image-edit", "--dit-size", "tiny", "--repeats", "1", "--warmup", "0",
                      "--memory", "inprocess", "--out", "", "--json", str(tmp_path / "dit.json"), "--quiet"])
    info = run["models"]["qwen-image-edit"]
    assert info["family"] == "dit" and info["reference"] and info["size"] == "tiny" and run["cfg"] == "per model"
    result = run["results"][0]
    assert result["case_label"] == "16x16 b1 s4"  # the family's own tiny case
    assert set(result["times"]) == {"ksampler", "nokeys", "half"}
    for v in ("nokeys", "half"):
        assert finite(result["ratios"][v][0]) and result["ratios"][v][0] > 0, v
        assert finite(float(result["memory"][v]["peak_mib"])), v
    assert result["nokeys_vs_ksampler_max_abs"] == 0.0, "no key items must hand the run to ComfyUI's own sampler"
    assert result["half_vs_ksampler_max_abs"] > 1e-3, "the key mask did not make the run asynchronous"
    half = result["profile"]["half"]
    assert all(finite(float(v)) for v in half.values()) and half["set_map"] > 0
    text = run["markdown"]
    assert "| Qwen-Image-Edit (`qwen-image-edit`) | 16x16 | 64 + 64 ref + 64 | 4 | 2.5 |" in text
    assert "overhead, ms/step" in text and "Model `qwen-image-edit` (Qwen-Image-Edit, tiny size)" in text
    rendered = bench.main(["--render", str(tmp_path / "dit.json"), "--out", ""])
    assert "| Qwen-Image-Edit (`qwen-image-edit`) |" in rendered["markdown"]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_naive_per_token_hooks_compute_what_the_pack_computes(bench, family):
    """Per token without the table is a slower route to the same forward output."""
    bench.setup_comfyui()
    from asyndm.comfy_adapter.families.flux import PerTokenTimesteps
    from asyndm.comfy_adapter.families.mmdit import PerTokenTimestepsMMDiT

    if family == "flux":
        patcher = bench.build_model("flux-tiny")
        case = bench.FluxBench(patcher, bench.Case(16, 16, 1, 1), text_tokens=8)
        x, t, kwargs, t_map, _ = bench.flux_forward_inputs(case)
        classes = (PerTokenTimesteps, bench.naive_flux_hooks_class())
    else:
        patcher = bench.build_model("sd3-tiny")
        case = bench.SD3Bench(patcher, bench.Case(16, 16, 1, 1), cfg=4.5, text_tokens=8)
        x, t, kwargs, t_map, _ = bench.sd3_forward_inputs(case)
        classes = (PerTokenTimestepsMMDiT, bench.naive_mmdit_hooks_class())
    dm = patcher.model.diffusion_model
    outs = []
    with torch.no_grad():
        for cls in classes:
            with cls(dm) as hooks:
                hooks.set_map(t_map)
                outs.append(dm(x, t, **kwargs))
                hooks.set_map(None)
        stock = dm(x, t, **kwargs)
    pack, naive = outs
    assert float((naive - pack).abs().max() / pack.abs().max()) < 1e-5
    assert float((pack - stock).abs().max()) > 1e-4, "the two-timestep map did not reach the modulation"


def test_memory_is_measured_in_a_fresh_process(bench):
    spec = {"model": "tiny", "seed": 0, "sdxl_depth": 2, "device": "cpu", "threads": 1, "height": 16, "width": 16,
            "batch": 1, "steps": 1, "variant": "fixed", "cfg": 5.0, "sampler": "euler", "scheduler": "normal",
            "comfyui": None}
    mem = bench.measure_memory_subprocess(spec, timeout=600)
    assert finite(float(mem["peak_mib"])) and mem["peak_mib"] > 0
    assert finite(float(mem["delta_mib"]))


def test_switch_ab_alternates_the_values_and_restores_the_switch(bench, monkeypatch):
    """benchmarks/switch_ab.py's comparison: every profiled run sees the value it is filed under, the order of the
    values alternates from pair to pair, KSampler's run comes once per pair, and the switch is what it was after."""
    from bench import report, switch_ab

    from asyndm.comfy_adapter.sampler import AsynSampler

    seen: list[tuple[str, object]] = []

    def fake_profile(_bench, variant, _device, _runs=1):
        seen.append((variant, AsynSampler.pixel_steps))
        return {"total": 100.0, "hooks: per-pixel selection": 2.0 if AsynSampler.pixel_steps else 3.0}

    monkeypatch.setattr(report.FAMILY_ROWS["unet"], "profile_variant", fake_profile)
    owner, name = switch_ab.resolve_switch("asyndm.comfy_adapter.sampler:AsynSampler.pixel_steps")
    assert owner is AsynSampler and name == "pixel_steps"
    runs = switch_ab.compare(None, "unet", owner, name, [False, True], ["fixed"], pairs=2, warmup=0)
    assert seen == [("ksampler", True), ("fixed", False), ("fixed", True),
                    ("ksampler", True), ("fixed", True), ("fixed", False)]
    assert AsynSampler.pixel_steps is True and "pixel_steps" in vars(AsynSampler)
    assert [p["hooks: per-pixel selection"] for p in runs[("fixed", 0)]] == [3.0, 3.0]
    text = switch_ab.markdown(runs, "pixel_steps", [False, True], ["fixed"], ["per-pixel"], "unet")
    assert "| fixed | false | 3.00 | 3.00% | 3.00 |" in text and "| fixed | true | 2.00 | 2.00% | 2.00 |" in text
    assert "| ksampler | - | - | - | 2.00 |" in text  # KSampler's runs (the switch on for both) and its watched piece
    assert switch_ab.parse_value("0.5") == 0.5 and switch_ab.parse_value("euler") == "euler"
    with pytest.raises(ValueError, match="no attribute"):
        switch_ab.resolve_switch("asyndm.comfy_adapter.sampler:AsynSampler.no_such_switch")


def test_switch_ab_main_on_a_tiny_model():
    """The script end to end: a table with a finite row per variant and value."""
    spec = importlib.util.spec_from_file_location("asyndm_switch_ab", REPO_ROOT / "benchmarks" / "switch_ab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--switch", "asyndm.comfy_adapter.sampler:AsynSampler.pixel_steps", "--values", "true,false",
                        "--variants", "dynamic,fixed", "--model", "tiny", "--case", "16x16:1:4", "--pairs", "1",
                        "--warmup", "0", "--watch", "per-pixel"])
    rows = [line for line in text.splitlines() if line.startswith("| dynamic") or line.startswith("| fixed")]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert math.isfinite(float(cells[2])) and float(cells[2]) > 0, row


def test_piece_timer_counts_exclusive_time_and_calls(bench):
    """The profile's timer: a piece's time excludes the wrapped pieces it calls (which keep theirs), nested calls of
    one label add up, and an exception still closes the piece."""
    import time

    from bench.measure import PieceTimer

    timer = PieceTimer("cpu")

    def child() -> None:
        time.sleep(0.02)

    timed_child = timer.wrap("child", child)

    def parent(fail: bool) -> None:
        time.sleep(0.01)
        timed_child()
        timed_child()
        if fail:
            raise KeyError("boom")

    timed_parent = timer.wrap("parent", parent)
    timed_parent(False)
    with pytest.raises(KeyError):
        timed_parent(True)
    assert timer.calls == {"parent": 2, "child": 4}
    assert 0.08 <= timer.exclusive["child"] < 0.12, timer.exclusive
    assert 0.02 <= timer.exclusive["parent"] < 0.04, timer.exclusive  # the children's 80 ms are not the parent's
    assert timer._stack == []
