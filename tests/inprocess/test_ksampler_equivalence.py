"""With no key items the Asynchronous KSampler is ComfyUI's KSampler, bit for bit.

Both run in the same process on the default random-weight SD1.5 checkpoint, same seed, sampler,
scheduler, steps and cfg. With no key items (or only k = 0) the node runs ComfyUI's own sampler,
so the results are equal by construction; test_precision.py and test_families_and_hygiene.py
also hold the per-pixel machinery with one shared track to bit-identity.
"""

from __future__ import annotations

import importlib

import comfy.samplers
import pytest
import torch

from tests.inprocess.sampling import SAME_AS_KSAMPLER

SAMPLERS = ["euler", "ddim", "euler_ancestral", "ddpm", "dpmpp_2m"]


@pytest.fixture(scope="module")
def comfy_nodes():
    mod = importlib.import_module("nodes")
    assert hasattr(mod, "common_ksampler"), "imported the pack's nodes/ instead of ComfyUI's nodes.py"
    return mod


def stock(comfy_nodes, model, positive, negative, latent, *, seed, steps, cfg, sampler, scheduler, denoise=1.0):
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                       denoise=denoise)[0]["samples"]


def asyn(pack_nodes, model, positive, negative, latent, *, seed, steps, cfg, sampler, scheduler, denoise=1.0,
         key_words="", k=0.7, eta=0.0):
    out = pack_nodes.AsynDMKSampler.execute(model, positive, negative, latent, seed, steps, cfg, sampler, scheduler,
                                            denoise, key_words, k, "bin", 1.0, "dynamic", eta, False)
    return out.args[0]["samples"], out.args[1]


def assert_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit (the difference is printed only to help when it is not)."""
    assert torch.equal(a, b), f"max abs diff {float((a - b).abs().max()):.3g}"


CASES = [(sampler, "normal") for sampler in SAMPLERS] + [
    ("dpmpp_2m", "karras"), ("euler_ancestral", "karras"), ("ddim", "ddim_uniform"), ("ddpm", "ddim_uniform"),
]


@pytest.mark.parametrize("sampler, scheduler", CASES)
def test_constant_map_equals_ksampler(comfy_nodes, pack_nodes, sd15_checkpoint, conds, sampler, scheduler):
    model = sd15_checkpoint[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    kw = dict(seed=3, steps=4, cfg=5.0, sampler=sampler, scheduler=scheduler)
    a = stock(comfy_nodes, model, *conds, latent, **kw)
    b, strip = asyn(pack_nodes, model, *conds, latent, **kw)
    assert_equal(b, a)
    assert strip.ndim == 4 and strip.shape[-1] == 3


def test_zero_priority_words_are_synchronous(comfy_nodes, pack_nodes, sd15_checkpoint, conds):
    model = sd15_checkpoint[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    kw = dict(seed=5, steps=4, cfg=5.0, sampler="euler", scheduler="normal")
    a = stock(comfy_nodes, model, *conds, latent, **kw)
    b, _ = asyn(pack_nodes, model, *conds, latent, key_words="rabbit, basketball", k=0.0, **kw)
    assert_equal(b, a)


def test_batch_img2img_and_inpainting_match(comfy_nodes, pack_nodes, sd15_checkpoint, conds):
    model = sd15_checkpoint[0]
    g = torch.Generator().manual_seed(0)
    init = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0
    for latent, denoise in (({"samples": init}, 0.6), ({"samples": init, "noise_mask": mask}, 1.0)):
        kw = dict(seed=11, steps=5, cfg=4.0, sampler="euler_ancestral", scheduler="normal", denoise=denoise)
        a = stock(comfy_nodes, model, *conds, latent, **kw)
        b, _ = asyn(pack_nodes, model, *conds, latent, **kw)
        assert_equal(b, a)


@pytest.mark.parametrize("scheduler", list(comfy.samplers.KSampler.SCHEDULERS))
@pytest.mark.parametrize("sampler", ["euler", "ddpm", "dpmpp_2m"])
def test_every_scheduler_matches_with_no_key_pixels(comfy_nodes, pack_nodes, sd15_checkpoint, conds, sampler,
                                                    scheduler):
    """No key items, and a key item with an empty mask (the per-pixel machinery with one track,
    whose sigmas come from the paper-timestep table on ddim_uniform and from the interpolator
    elsewhere): the scheduler's own sigmas, bit for bit."""
    model = sd15_checkpoint[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    kw = dict(seed=8, steps=4, cfg=5.0, sampler=sampler, scheduler=scheduler)
    a = stock(comfy_nodes, model, *conds, latent, **kw)
    for case, schedule in SAME_AS_KSAMPLER.items():
        out = pack_nodes.AsynDMKSampler.execute(model, *conds, latent, 8, 4, 5.0, sampler, scheduler, 1.0, "", 0.7,
                                                "bin", 1.0, "dynamic", 0.0, False, schedule(1, 8, 8))
        assert torch.equal(out.args[0]["samples"], a), case
