"""Qwen-Image (and -Edit), Lumina 2, Z-Image, HunyuanImage 2.1, AuraFlow and Chroma through a real ComfyUI
server: the pack's Asynchronous KSampler against ComfyUI's KSampler.

The models are the random-weight diffusion-model files of scripts/make_dit_models.py (built by
scripts/setup.sh), loaded by UNETLoader and detected by ComfyUI's own model detection; their text
input comes from the test-only node TestOnlyDiTConditioning (tests/server/comfy_nodes/
asyndm_test_conditioning.py) in each family's encoder shapes (see there). Each family is wired as
its users wire it: its latent node, ModelSamplingAuraFlow where the family's workflows use it, its
usual cfg and scheduler; the sampler is euler (every other sampler is checked on Flux in
test_dit_transformer_server.py and on every family's in-process model in test_every_sampler.py). Qwen-Image-Edit is the Qwen-Image file given a reference
latent through ReferenceLatent on the positive conditioning.

Every check queues one prompt that holds both samplers on the same loaded model (as
tests/server/test_dit_server.py's ksampler_pair does) and compares the saved latents:

- no key items: the Asynchronous KSampler gives KSampler's latent (max |a - b| / max |a| <= 1e-4);
- a drawn key mask (the left half of the image): the result differs from KSampler's (> 1e-2; Lumina 2,
  whose random-weight model hardly depends on the timestep, > 1e-3: see its entry in FAMILIES).

The two checks of a family run one after the other on one loaded model (the module-scoped
``family`` fixture groups them) and share the seed, so ComfyUI serves the second prompt's KSampler
from its cache. Latents are 16x16, 3 steps. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.server.conftest import TEST_CONDITIONING
from tests.server.test_dit_server import STEPS, TOL, Prompt, async_inputs, latents, out, rel_diff, run


@dataclass(frozen=True)
class Family:
    """How a user wires a family: its file (UNETLoader), conditioning shapes, latent node and sampling settings."""

    name: str
    unet: str
    conditioning: str  # TestOnlyDiTConditioning's family
    latent_node: str
    pixels: int  # image side: the latent is 16 x 16
    latent_shape: tuple[int, ...]  # what SaveLatent writes
    cfg: float
    scheduler: str
    shift: float | None = None  # ModelSamplingAuraFlow's shift, where the family's workflows set it
    reference: bool = False  # Qwen-Image-Edit: a reference latent on the positive conditioning
    mask_min: float = 1e-2  # the least relative difference a key mask must make
    facts: dict[str, Any] = field(default_factory=dict)  # what make_dit_models --check-only must report


QWEN_IMAGE = "asyndm-random-qwen-image.safetensors"
FAMILIES = {f.name: f for f in (
    # Qwen-Image: latents in the Wan 2.1 format (5-D once ComfyUI fixes the empty latent); shift 3.1, cfg 2.5.
    Family("qwen-image", QWEN_IMAGE, "qwen_image", "EmptySD3LatentImage", 128, (1, 16, 1, 16, 16), 2.5, "simple",
           shift=3.1, facts={"config_class": "QwenImage", "model_class": "QwenImage", "num_layers": 1,
                             "in_channels": 64, "latent_channels": 16}),
    Family("qwen-image-edit", QWEN_IMAGE, "qwen_image", "EmptySD3LatentImage", 128, (1, 16, 1, 16, 16), 2.5, "simple",
           shift=3.1, reference=True),
    # Lumina 2: shift 6, cfg 4. Its time scale is 1 (NextDiT embeds 1 - t for t in [0, 1], where Z-Image embeds
    # 1000 (1 - t)), so with random weights the velocity hardly depends on t (the output moves 0.11 between
    # t = 0.9 and 0.2; Z-Image's 0.87), and Euler steps of a t-independent velocity end where the synchronous
    # ones do: a key mask moves the result by 4e-3 to 9e-3 (seeds and k tried), not 1e-2. Without key items it
    # is KSampler's latent bit for bit, so 1e-3 still separates a mask that reached the model from none.
    Family("lumina2", "asyndm-random-lumina2.safetensors", "lumina2", "EmptySD3LatentImage", 128, (1, 16, 16, 16),
           4.0, "simple", shift=6.0, mask_min=1e-3,
           facts={"config_class": "Lumina2", "model_class": "Lumina2", "dim": 2304, "cap_feat_dim": 2304,
                  "n_layers": 1, "latent_channels": 16}),
    # Z-Image (Turbo): cfg 1, shift 3.
    Family("z-image", "asyndm-random-z-image.safetensors", "z_image", "EmptySD3LatentImage", 128, (1, 16, 16, 16),
           1.0, "simple", shift=3.0, facts={"config_class": "ZImage", "model_class": "Lumina2", "dim": 3840,
                                            "cap_feat_dim": 2560, "pad_tokens_multiple": 32, "latent_channels": 16}),
    # HunyuanImage 2.1: 64-channel latents at 1/32 of the image (EmptyHunyuanImageLatent), its own shift 5.
    Family("hunyuan-image21", "asyndm-random-hunyuan-image21.safetensors", "hunyuan_image", "EmptyHunyuanImageLatent",
           512, (1, 64, 16, 16), 3.5, "simple",
           facts={"config_class": "HunyuanImage21", "model_class": "HunyuanImage21", "patch_size": [1, 1],
                  "byt5": True, "guidance_embed": False, "latent_channels": 64, "shift": 5.0}),
    # AuraFlow: SDXL's 4-channel latents (EmptyLatentImage), shift 1.73, cfg 3.5, scheduler normal.
    Family("auraflow", "asyndm-random-auraflow.safetensors", "auraflow", "EmptyLatentImage", 128, (1, 4, 16, 16),
           3.5, "normal", shift=1.73, facts={"config_class": "AuraFlow", "model_class": "AuraFlow",
                                             "cond_seq_dim": 2048, "n_double_layers": 1, "n_layers": 2,
                                             "latent_channels": 4}),
    # Chroma: Flux's latent space, no guidance embedding (cfg 4), the beta scheduler.
    Family("chroma", "asyndm-random-chroma.safetensors", "chroma", "EmptySD3LatentImage", 128, (1, 16, 16, 16), 4.0,
           "beta", facts={"config_class": "Chroma", "model_class": "Chroma", "image_model": "chroma",
                          "hidden_size": 3072, "latent_channels": 16}),
)}
SEED = {name: 301 + 10 * i for i, name in enumerate(FAMILIES)}
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if RESULTS:
        print("\n[dit-families] max |a - b| / max |a| per check: " + ", ".join(f"{k} {v:.3g}" for k, v in RESULTS.items()))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    """Module-scoped, so pytest runs each family's checks together (its model stays loaded in the server)."""
    return FAMILIES[request.param]


def half_mask_schedule(p: Prompt, size: int, k: float = 0.7) -> str:
    """A drawn key item, the left half of a size x size image -> Attention Mask to Timestep Map
    (test_dit_server's, for any image size)."""
    black = p.add("SolidMask", value=0.0, width=size, height=size)
    white = p.add("SolidMask", value=1.0, width=size // 2, height=size)
    mask = p.add("MaskComposite", destination=out(black), source=out(white), x=0, y=0, operation="add")
    return p.add("AsynDMMaskToTimestepMap", mask=out(mask), k=k, curve="bin", threshold=0.5, feather=0,
                 preview_steps=STEPS, mask_batch="images")


def ksampler_pair(f: Family, *, schedule: bool) -> tuple[Prompt, dict[str, str]]:
    """KSampler and the Asynchronous KSampler on one loaded model of family f; {name: SaveLatent prefix}."""
    seed = SEED[f.name]
    p = Prompt()
    model = out(p.add("UNETLoader", unet_name=f.unet, weight_dtype="default"))
    if f.shift is not None:
        model = out(p.add("ModelSamplingAuraFlow", model=model, shift=f.shift))
    positive = out(p.add(TEST_CONDITIONING, family=f.conditioning, tokens=8, values_seed=seed))
    negative = out(p.add(TEST_CONDITIONING, family=f.conditioning, tokens=8, values_seed=seed + 1))
    if f.reference:  # Qwen-Image-Edit: a one-frame 16-channel (Wan 2.1 format) latent as the reference image
        ref = p.add("EmptyHunyuanLatentVideo", width=f.pixels, height=f.pixels, length=1, batch_size=1)
        positive = out(p.add("ReferenceLatent", conditioning=positive, latent=out(ref)))
    latent = p.add(f.latent_node, width=f.pixels, height=f.pixels, batch_size=1)
    common = dict(model=model, positive=positive, negative=negative, latent_image=out(latent), seed=seed, steps=STEPS,
                  cfg=f.cfg, sampler_name="euler", scheduler=f.scheduler, denoise=1.0)
    stock = p.add("KSampler", **common)
    extra = {"schedule": out(half_mask_schedule(p, f.pixels))} if schedule else {}
    asyn = p.add("AsynDMKSampler", **common, **async_inputs(), **extra)
    prefixes = {}
    for name, node in (("ksampler", stock), ("async", asyn)):
        prefixes[name] = f"dit_families/{f.name}_{name}_{'mask' if schedule else 'plain'}"
        p.add("SaveLatent", samples=out(node), filename_prefix=prefixes[name])
    return p, prefixes


def sampled(server: Any, f: Family, *, schedule: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p, prefixes = ksampler_pair(f, schedule=schedule)
    got = latents(server, run(server, p))
    a, b = got[prefixes["ksampler"]], got[prefixes["async"]]
    assert a.shape == b.shape == f.latent_shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.abs().max() > 0
    return a, b


# ------------------------------------------------------------------------------------------------


def test_the_files_are_detected_as_their_families() -> None:
    """ComfyUI's own loader (comfy.sd.load_diffusion_model, UNETLoader's path) takes each file for its family
    (make_dit_models.py --check-only --only ...): the supported_models class, model_base class and the
    config keys that select it, the latent space the samplers see."""
    folder = REPO_ROOT / ".dev" / "dit-models"
    if not folder.is_dir():
        pytest.fail(f"no {folder}: run scripts/setup.sh first (scripts/test.sh does)")
    files = sorted({f.unet for f in FAMILIES.values()})
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_dit_models.py"), "--check-only",
                           "--out", str(folder), "--only", *files], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("make_dit_models: ComfyUI loads "):
            rel, facts = line[len("make_dit_models: ComfyUI loads "):].split(" as ", 1)
            found[Path(rel).name] = json.loads(facts)
    assert sorted(found) == files
    for f in FAMILIES.values():
        wrong = {k: (v, found[f.unet].get(k)) for k, v in f.facts.items() if found[f.unet].get(k) != v}
        assert not wrong, (f.name, wrong)
    for name in files:
        print(f"\n[dit-families] ComfyUI loads {name} as {json.dumps(found[name], sort_keys=True)}")
    tracked = subprocess.run(["git", "ls-files", "*.safetensors"], capture_output=True, text=True, cwd=REPO_ROOT).stdout
    assert not any(n in tracked for n in found), "a random-weight model file is committed"


def test_without_key_items_is_the_ksampler(server: Any, family: Family) -> None:
    """No key items: the Asynchronous KSampler gives KSampler's latent (the pack runs ComfyUI's own sampler)."""
    a, b = sampled(server, family, schedule=False)
    diff = rel_diff(a, b)
    RESULTS[f"{family.name} no key items"] = diff
    print(f"\n[dit-families] {family.name} KSampler vs Asynchronous KSampler, no key items: max relative difference "
          f"{diff:.3g}{' (bit for bit)' if torch.equal(a, b) else ''}")
    assert diff <= TOL, diff


def test_with_a_key_mask_differs_from_the_ksampler(server: Any, family: Family) -> None:
    """A drawn key item (the left half) gives those tokens their own timesteps: the result changes."""
    a, b = sampled(server, family, schedule=True)
    diff = rel_diff(a, b)
    RESULTS[f"{family.name} key mask"] = diff
    print(f"\n[dit-families] {family.name} with a key mask: relative difference from KSampler {diff:.3g}")
    assert diff > family.mask_min, diff
