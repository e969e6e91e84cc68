"""What a Flux or SD3 user relies on keeps working under asynchronous sampling: a batch, img2img
(denoise < 1), an inpainting noise mask, and LoRA weights on the layers the adapters reuse.

Random-weight models of ComfyUI's own classes (tests/model_factory.py); the checks are equality
with KSampler where no pixel is a key pixel, and, with a drawn mask, a finite result that differs.
"""

from __future__ import annotations

import pytest
import torch

from tests.inprocess.sampling import SAME_AS_KSAMPLER, asyn, fixed_masks, rel_err, stock
from tests.model_factory import build_flux, build_sd3, make_flux_conditioning, make_sd3_conditioning

SIZE = 16


@pytest.fixture(scope="module")
def families():
    return {
        "flux": (build_flux(True), make_flux_conditioning(seed=1), make_flux_conditioning(seed=2), 1.0),
        "sd3": (build_sd3("medium"), make_sd3_conditioning(seed=1), make_sd3_conditioning(seed=2), 4.5),
    }


def start_latent(batch: int) -> torch.Tensor:
    return torch.randn(batch, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 0.5


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("setting", ["batch 2", "img2img 0.6", "inpaint mask"])
def test_batch_img2img_and_inpainting(families, family, setting):
    model, pos, neg, cfg = families[family]
    batch = 2 if setting == "batch 2" else 1
    lat = start_latent(batch)
    kw = dict(seed=5, cfg=cfg, scheduler="simple", steps=4)
    if setting.startswith("img2img"):
        kw["denoise"] = 0.6
    if setting == "inpaint mask":
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., :, SIZE // 2:] = 1.0
        kw["noise_mask"] = mask
    plain = stock(model, pos, neg, lat, **kw)
    for case, make in SAME_AS_KSAMPLER.items():
        assert torch.equal(asyn(model, pos, neg, lat, schedule=make(batch, SIZE, SIZE), **kw), plain), case
    out = asyn(model, pos, neg, lat, schedule=fixed_masks(batch, SIZE, SIZE), **kw)
    assert out.shape == plain.shape and torch.isfinite(out).all() and rel_err(out, plain) > 1e-3
    if setting == "inpaint mask":  # kept pixels stay the input latent's (to rounding, as with KSampler)
        kept = (..., slice(None), slice(0, SIZE // 2))
        assert torch.allclose(out[kept], lat[kept], atol=1e-5) and torch.allclose(plain[kept], lat[kept], atol=1e-5)


def lora_on_modulation(model, family: str):
    """A clone with a weight patch (as a LoRA applies) on the first block's image modulation layer."""
    dm = model.model.diffusion_model
    key, weight = (("diffusion_model.double_blocks.0.img_mod.lin.weight", dm.double_blocks[0].img_mod.lin.weight)
                   if family == "flux" else
                   ("diffusion_model.joint_blocks.0.x_block.adaLN_modulation.1.weight",
                    dm.joint_blocks[0].x_block.adaLN_modulation[1].weight))
    diff = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5 * weight.std()
    patched = model.clone()
    patched.add_patches({key: (diff,)}, 1.0)
    return patched


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lora_on_the_modulation_layers(families, family):
    """A weight patch (LoRA) on a modulation layer the per-token path re-runs: it changes the
    asynchronous result, with no key pixels the patched model is still KSampler's, and the unpatched
    model afterwards gives its old result (the patch did not stay)."""
    model, pos, neg, cfg = families[family]
    lat = torch.zeros(1, 16, SIZE, SIZE)
    kw = dict(seed=2, cfg=cfg, scheduler="simple", steps=4)
    before = asyn(model, pos, neg, lat, schedule=fixed_masks(1, SIZE, SIZE), **kw)
    patched = lora_on_modulation(model, family)
    with_lora = asyn(patched, pos, neg, lat, schedule=fixed_masks(1, SIZE, SIZE), **kw)
    assert rel_err(with_lora, before) > 1e-3
    assert torch.equal(asyn(patched, pos, neg, lat, schedule=SAME_AS_KSAMPLER["empty mask"](1, SIZE, SIZE), **kw),
                       stock(patched, pos, neg, lat, **kw))
    assert torch.equal(asyn(model, pos, neg, lat, schedule=fixed_masks(1, SIZE, SIZE), **kw), before)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_skip_layer_guidance(families, family, monkeypatch):
    """ComfyUI's SkipLayerGuidanceDiT replaces a block with the identity in an extra pass: that
    forward uses the map in the blocks that run (and the final layer), and is not refused. With no
    key pixels the result is KSampler's with the same node."""
    import importlib

    slg = importlib.import_module("comfy_extras.nodes_slg").SkipLayerGuidanceDiT
    model, pos, neg, cfg = families[family]
    layers = {"double_layers": "1"} if family == "flux" else {"double_layers": "1"}
    guided = slg.execute(model, 3.0, 0.0, 1.0, rescaling_scale=0.0, **layers).args[0]
    lat = torch.zeros(1, 16, SIZE, SIZE)
    kw = dict(seed=2, cfg=max(cfg, 2.0), scheduler="simple", steps=4)
    plain = stock(guided, pos, neg, lat, **kw)
    assert rel_err(plain, stock(model, pos, neg, lat, **kw)) > 1e-4  # the guidance did something
    assert torch.equal(asyn(guided, pos, neg, lat, schedule=SAME_AS_KSAMPLER["empty mask"](1, SIZE, SIZE), **kw), plain)
    out = asyn(guided, pos, neg, lat, schedule=fixed_masks(1, SIZE, SIZE), **kw)
    assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3
