"""SD2 (v-prediction) and SDXL shapes, area conditioning, LoRA, and nothing left behind after a run.

Models are small random-weight instances of ComfyUI's own classes (tests/model_factory.py) with
128 channels, so a per-pixel timestep really changes the output.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter.sampler import AsynSampler
from tests.inprocess.sampling import SAME_AS_KSAMPLER, asyn, fixed_masks, hook_state, rel_err, stock
from tests.model_factory import build_sd2v, build_sd15, build_sdxl, make_conditioning

BUILDERS = {"sd15": build_sd15, "sd2v": build_sd2v, "sdxl": build_sdxl}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("sampler", ["euler", "ddim", "euler_ancestral", "ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("case", list(SAME_AS_KSAMPLER))
def test_constant_map_equals_ksampler_on_each_family(models, family, sampler, case):
    model = models[family]
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    a = stock(model, pos, neg, latent, seed=4, sampler=sampler)
    b = asyn(model, pos, neg, latent, seed=4, sampler=sampler, schedule=SAME_AS_KSAMPLER[case](1, 16, 16))
    assert torch.equal(b, a), rel_err(b, a)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_asynchronous_map_changes_only_through_the_schedule(models, family):
    """A real asynchronous run differs from the synchronous one, is finite, and is deterministic."""
    model = models[family]
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    sync = asyn(model, pos, neg, latent, seed=4)
    a = asyn(model, pos, neg, latent, seed=4, schedule=fixed_masks(1, 16, 16))
    b = asyn(model, pos, neg, latent, seed=4, schedule=fixed_masks(1, 16, 16))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert rel_err(a, sync) > 1e-3


def test_area_conditioning_and_several_conds(models):
    model = models["sd15"]
    pos = make_conditioning(model, seed=1)
    area = make_conditioning(model, seed=3)
    area[0][1] = {**area[0][1], "area": (8, 8, 0, 8), "strength": 1.0, "set_area_to_bounds": False}
    positive = pos + area
    neg = make_conditioning(model, seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    a = stock(model, positive, neg, latent, seed=9)
    for case, schedule in SAME_AS_KSAMPLER.items():
        b = asyn(model, positive, neg, latent, seed=9, schedule=schedule(1, 16, 16))
        assert torch.equal(b, a), (case, rel_err(b, a))
    c = asyn(model, positive, neg, latent, seed=9, schedule=fixed_masks(1, 16, 16))
    assert torch.isfinite(c).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_deep_shrink_changes_block_sizes_between_calls(models, family):
    """Kohya Deep Shrink (PatchModelAddDownscale) downscales inside the UNet for the early sigmas only, so a
    ResBlock's size changes between calls at the same latent size: every call's per-pixel embedding must take
    the block's size of that call (a size remembered from an earlier call fails in the block's add)."""
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    model = models[family]
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    patched = PatchModelAddDownscale.execute(model, 1, 2.0, 0.0, 0.5, True, "bicubic", "bicubic").args[0]
    downscaled: list[bool] = []
    patch = patched.model_options["transformer_options"]["patches"]["input_block_patch_after_skip"][0]

    def watched(h, transformer_options):
        out = patch(h, transformer_options)
        if transformer_options["block"][1] == 1:
            downscaled.append(out.shape[-1] != h.shape[-1])
        return out

    patched.model_options["transformer_options"]["patches"]["input_block_patch_after_skip"] = [watched]
    shrunk = asyn(patched, pos, neg, latent, seed=6, steps=6, schedule=fixed_masks(1, 16, 16))
    assert True in downscaled and False in downscaled  # both regimes ran, in one run
    plain = asyn(model, pos, neg, latent, seed=6, steps=6, schedule=fixed_masks(1, 16, 16))
    assert torch.isfinite(shrunk).all() and rel_err(shrunk, plain) > 1e-3  # the patch took part


def test_lora_patched_model_still_matches(models):
    import comfy.lora
    import comfy.sd

    base = models["sd15"]
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    sd = base.model.state_dict()
    lora_sd = {}
    g = torch.Generator().manual_seed(0)
    for lora_key, weight_key in key_map.items():
        if isinstance(weight_key, str) and lora_key.startswith("lora_unet_") and weight_key.endswith("attn2.to_q.weight"):
            out_f, in_f = sd[weight_key].shape
            lora_sd[f"{lora_key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
            lora_sd[f"{lora_key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.2
    assert lora_sd, "no LoRA keys for the test model"
    model, _ = comfy.sd.load_lora_for_models(base, None, lora_sd, 1.0, 0.0)
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    plain = stock(models["sd15"], pos, neg, latent, seed=5)
    a = stock(model, pos, neg, latent, seed=5)
    assert rel_err(a, plain) > 1e-4, "the LoRA did not change the output"
    for case, schedule in SAME_AS_KSAMPLER.items():
        b = asyn(model, pos, neg, latent, seed=5, schedule=schedule(1, 16, 16))
        assert torch.equal(b, a), (case, rel_err(b, a))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("how", ["callback", "unet", "interrupt"])
def test_nothing_outlives_a_failed_run(models, how, monkeypatch):
    model = models["sdxl"]
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    latent = torch.zeros(1, 4, 16, 16)
    before = stock(model, pos, neg, latent, seed=6)
    hooks_before = hook_state(model.model)
    options_before = repr(model.model_options)

    callback = None
    if how == "callback":
        def callback(step, x0, x, total):  # noqa: F811
            if step == 1:
                raise Boom("stop")
        expected: type[BaseException] = Boom
    elif how == "interrupt":
        def callback(step, x0, x, total):  # noqa: F811
            if step == 1:
                comfy.model_management.interrupt_current_processing(True)
        expected = comfy.model_management.InterruptProcessingException
    else:
        block = next(m for m in model.model.diffusion_model.modules() if type(m).__name__ == "ResBlock")
        calls = {"n": 0}
        original = block.forward

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Boom("inside the UNet")
            return original(*args, **kwargs)

        monkeypatch.setattr(block, "forward", failing)
        expected = Boom

    with pytest.raises(expected):
        asyn(model, pos, neg, latent, seed=6, schedule=fixed_masks(1, 16, 16), callback=callback)
    monkeypatch.undo()
    comfy.model_management.interrupt_current_processing(False)
    assert hook_state(model.model) == hooks_before
    assert repr(model.model_options) == options_before
    after = stock(model, pos, neg, latent, seed=6)
    assert torch.equal(after, before)


def test_sampler_custom_advanced_with_the_sampler_node(models, pack_nodes):
    """AsynDMSampler's SAMPLER drives ComfyUI's SamplerCustomAdvanced like KSampler drives its own."""
    import importlib

    custom = importlib.import_module("comfy_extras.nodes_custom_sampler")
    model = models["sd15"]
    pos, neg = make_conditioning(model, seed=1), make_conditioning(model, seed=2)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    sampler = pack_nodes.AsynDMSampler.execute("euler_ancestral", "", 0.7, "bin", 1.0, "dynamic", 0.0, False).args[0]
    noise = custom.RandomNoise.execute(7).args[0]
    guider = custom.CFGGuider.execute(model, pos, neg, 4.0).args[0]
    sigmas = custom.BasicScheduler.execute(model, "karras", 5, 1.0).args[0]
    out = custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).args[0]["samples"]
    a = stock(model, pos, neg, latent["samples"], seed=7, steps=5, sampler="euler_ancestral", scheduler="karras")
    assert torch.equal(out, a), rel_err(out, a)


def test_unknown_sampler_and_misplaced_eta_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'not_a_sampler': use one of ComfyUI's samplers.*euler"):
        AsynSampler("not_a_sampler", None)
    with pytest.raises(ValueError, match="eta applies to euler, ddim, euler_ancestral, not to dpmpp_2m"):
        AsynSampler("dpmpp_2m", None, eta=0.5)
    AsynSampler("lms", None)  # every one of ComfyUI's names


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_bad_eta_and_s_noise_are_refused_up_front(bad: float) -> None:
    """JSON NaN passes the server's min/max check; refuse it before any model patch, naming the input."""
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0 \(got"):
        AsynSampler("ddim", None, eta=bad)
    with pytest.raises(ValueError, match=r"s_noise must be a finite number >= 0"):
        AsynSampler("euler_ancestral", None, s_noise=bad)
