"""Transformer families through a real ComfyUI server that the Flux / SD3 files do not cover.

- Flux Kontext: the Flux dev file of scripts/make_dit_models.py (Kontext is Flux with reference latents in
  ComfyUI): an image encoded by the Flux VAE, given to the positive prompt by ReferenceLatent, as
  ComfyUI's Kontext workflows wire it;
- Flux.2 (text to image and edit with a reference latent), HiDream and Chroma Radiance: ComfyUI's own classes
  built small in the server by the test-only node TestOnlyRandomTransformer
  (tests/server/comfy_nodes/asyndm_test_models.py), because ComfyUI detects their files only at full size
  (HiDream 17B, Flux.2 2.3B parameters at one block of each kind).

Each check queues one prompt holding KSampler and the Asynchronous KSampler (with no key items, and with a
drawn key mask) on the same model, and compares the saved latents as float32: max |a - b| / max |a|.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.server.conftest import TEST_TRANSFORMER
from tests.server.test_dit_server import (
    FLUX_VAE,
    SIZE,
    STEPS,
    TOL,
    Prompt,
    async_inputs,
    half_mask_schedule,
    latents,
    model_and_conds,
    out,
    record,
    rel_diff,
    run,
)

# family: (cfg, scheduler, edit with a reference latent)
IN_SERVER = {
    "flux2": (1.0, "simple", False),
    "flux2-edit": (1.0, "simple", True),
    "hidream": (3.0, "simple", False),
    "chroma_radiance": (3.0, "simple", False),
}


def three_samplers(p: Prompt, tag: str, common: dict[str, Any]) -> dict[str, str]:
    """KSampler, the Asynchronous KSampler with no key items and with a drawn key mask; {name: SaveLatent prefix}."""
    nodes = {"ksampler": p.add("KSampler", **common),
             "none": p.add("AsynDMKSampler", **common, **async_inputs()),
             "mask": p.add("AsynDMKSampler", **common, **async_inputs(), schedule=out(half_mask_schedule(p)))}
    prefixes = {}
    for name, node in nodes.items():
        prefixes[name] = f"dit_more/{tag}_{name}"
        p.add("SaveLatent", samples=out(node), filename_prefix=prefixes[name])
    return prefixes


def check(server, p: Prompt, prefixes: dict[str, str], tag: str) -> None:
    got = latents(server, run(server, p))
    plain, none, masked = (got[prefixes[k]] for k in ("ksampler", "none", "mask"))
    assert plain.shape == none.shape == masked.shape
    assert all(torch.isfinite(t).all() for t in (plain, none, masked)) and plain.abs().max() > 0
    assert record(f"{tag} KSampler vs Asynchronous KSampler, no key items", plain, none) <= TOL
    diff = rel_diff(plain, masked)
    print(f"\n[dit] {tag} with a key mask: relative difference from KSampler {diff:.3g}")
    assert diff > 1e-2, diff


def test_flux_kontext_edit_through_the_server(server) -> None:
    """Flux Kontext as its users wire it: an image (another aspect ratio) through VAEEncode and ReferenceLatent
    on the positive prompt, FluxGuidance, cfg 1. The reference tokens keep the background's timestep; a drawn
    key mask on the output changes the result, no key items gives KSampler's latent."""
    seed = 71
    p = Prompt()
    model, positive, negative, _ = model_and_conds(p, "flux-dev", seed)
    vae = p.add("VAELoader", vae_name=FLUX_VAE)
    image = p.add("EmptyImage", width=SIZE, height=SIZE * 3 // 4, batch_size=1, color=0x3366CC)
    reference = p.add("VAEEncode", pixels=out(image), vae=out(vae))
    edited = p.add("ReferenceLatent", conditioning=positive, latent=out(reference))
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    common = dict(model=model, positive=out(edited), negative=negative, latent_image=out(latent), seed=seed,
                  steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    check(server, p, three_samplers(p, "flux-kontext", common), "flux-kontext")


@pytest.mark.parametrize("family", list(IN_SERVER))
def test_families_built_in_the_server(server, family: str) -> None:
    """Flux.2 (also editing with a reference latent), HiDream and Chroma Radiance: ComfyUI's classes, small, in
    the server; no key items is KSampler's latent, a drawn key mask changes it."""
    cfg, scheduler, edit = IN_SERVER[family]
    p = Prompt()
    built = p.add(TEST_TRANSFORMER, family=family.removesuffix("-edit"), seed=5, side=0)
    positive, negative = out(built, 1), out(built, 2)
    if edit:  # ReferenceLatent on both prompts, as ComfyUI's Flux.2 edit workflows do
        positive = out(p.add("ReferenceLatent", conditioning=positive, latent=out(built, 4)))
        negative = out(p.add("ReferenceLatent", conditioning=negative, latent=out(built, 4)))
    common = dict(model=out(built, 0), positive=positive, negative=negative, latent_image=out(built, 3), seed=81,
                  steps=STEPS, cfg=cfg, sampler_name="euler", scheduler=scheduler, denoise=1.0)
    check(server, p, three_samplers(p, family, common), family)


# ------------------------------------------------------------------------------------------------
# Every sampler: a SAMPLER made asynchronous, and names from KSampler's list


@pytest.mark.parametrize("key_mask", [False, True], ids=["no-key-items", "key-mask"])
def test_a_ksamplerselect_sampler_made_asynchronous_in_sampler_custom_advanced(server, key_mask: bool) -> None:
    """KSamplerSelect(dpmpp_2m_sde) into the Asynchronous Sampler's `sampler` input, in SamplerCustomAdvanced on
    Flux dev (the SDE sampler's flow variant): with no key items it is the plain sampler's latent, with a drawn
    key mask the result differs."""
    seed = 91 + key_mask
    p = Prompt()
    model, positive, _negative, _ = model_and_conds(p, "flux-dev", seed)
    guider = p.add("BasicGuider", model=model, conditioning=positive)
    sigmas = p.add("BasicScheduler", model=model, scheduler="simple", steps=STEPS, denoise=1.0)
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    select = p.add("KSamplerSelect", sampler_name="dpmpp_2m_sde")
    extra = {"schedule": out(half_mask_schedule(p))} if key_mask else {}
    wrapped = p.add("AsynDMSampler", sampler_name="euler", **async_inputs(), **extra, sampler=out(select))
    prefixes = {}
    for name, sampler in (("plain", select), ("async", wrapped)):
        noise = p.add("RandomNoise", noise_seed=seed)
        node = p.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                     sigmas=out(sigmas), latent_image=out(latent))
        prefixes[name] = f"dit_more/select_{name}_{seed}"
        p.add("SaveLatent", samples=out(node, 0), filename_prefix=prefixes[name])
    got = latents(server, run(server, p))
    plain, asyn = got[prefixes["plain"]], got[prefixes["async"]]
    assert torch.isfinite(asyn).all() and plain.abs().max() > 0
    if key_mask:
        diff = rel_diff(plain, asyn)
        print(f"\n[dit] dpmpp_2m_sde SAMPLER made asynchronous, key mask: relative difference {diff:.3g}")
        assert diff > 1e-2, diff
    else:
        assert record("flux-dev KSamplerSelect(dpmpp_2m_sde) vs the Asynchronous Sampler around it", plain, asyn) <= TOL


@pytest.mark.parametrize("sampler_name", ["dpmpp_2m_sde", "uni_pc", "heun", "res_multistep"])
def test_samplers_from_ksamplers_list_on_the_asynchronous_ksampler(server, sampler_name: str) -> None:
    """A user picks any sampler on the Asynchronous KSampler as on KSampler (Flux schnell here)."""
    p = Prompt()
    model, positive, negative, _ = model_and_conds(p, "flux-schnell", 101)
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    common = dict(model=model, positive=positive, negative=negative, latent_image=out(latent), seed=101,
                  steps=STEPS, cfg=1.0, sampler_name=sampler_name, scheduler="simple", denoise=1.0)
    check(server, p, three_samplers(p, f"schnell-{sampler_name}", common), f"flux-schnell {sampler_name}")
