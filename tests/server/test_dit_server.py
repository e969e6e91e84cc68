"""Flux and SD3 (MMDiT) through a real ComfyUI server: the pack's samplers against ComfyUI's own.

The models are the random-weight files of scripts/make_dit_models.py (built by scripts/setup.sh),
loaded by ComfyUI's own loaders and detected by its own model detection:

- Flux dev (guidance embedding), a diffusion-model-only file, through UNETLoader, with FluxGuidance;
- Flux schnell, a checkpoint with its VAE, through CheckpointLoaderSimple, cfg 1;
- SD3.5 large and medium layouts (MMDiT with RMS q/k norms; medium with self-attention x-blocks),
  checkpoints through CheckpointLoaderSimple, cfg above 1 (the negative prompt is used).

Their text encoders (T5-XXL, CLIP-G) cannot be built on these machines, so the text input comes from
the test-only node TestOnlyDiTConditioning (tests/server/comfy_nodes/asyndm_test_conditioning.py):
seeded tensors of the shapes those encoders give. The diffusion model's output is never faked.

Every check queues one prompt (POST /prompt) that holds both samplers on the same loaded model and
saves their latents with SaveLatent; the latents are compared as float32 tensors, the difference as
max |a - b| / max |a| (printed; run with -s to see). Latents are 16x16 (128x128 pixels), 3 steps.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.server.conftest import TEST_CONDITIONING

FLUX_DEV = "asyndm-random-flux-dev.safetensors"
FLUX_SCHNELL = "asyndm-random-flux-schnell.safetensors"
FLUX_VAE = "asyndm-random-flux-vae.safetensors"
SD35 = {"large": "asyndm-random-sd35-large.safetensors", "medium": "asyndm-random-sd35-medium.safetensors"}
SIZE, STEPS = 128, 3
TOL = 1e-4  # max relative difference allowed where the pack must give ComfyUI's result
MMDIT_ADAPTER = REPO_ROOT / "asyndm" / "comfy_adapter" / "families" / "mmdit.py"

_ids = itertools.count(100)
RESULTS: dict[str, float] = {}  # what the parity checks measured, printed at the end of the module


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


class Prompt:
    """An API prompt built node by node; add() returns the node id."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, **inputs: Any) -> str:
        node_id = str(next(_ids))
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def out(node_id: str, slot: int = 0) -> list[Any]:
    return [node_id, slot]


def async_inputs(**overrides: Any) -> dict[str, Any]:
    """The Asynchronous KSampler's / Sampler's own inputs, with no key items."""
    values: dict[str, Any] = {"key_words": "", "k": 0.7, "curve": "bin", "mask_threshold": 1.0, "mask_mode": "dynamic",
                              "eta": 0.0, "reference": False}
    values.update(overrides)
    return values


def half_mask_schedule(p: Prompt, k: float = 0.7) -> str:
    """A drawn key item: the left half of the image (SolidMask + MaskComposite) -> Attention Mask to Timestep Map."""
    black = p.add("SolidMask", value=0.0, width=SIZE, height=SIZE)
    white = p.add("SolidMask", value=1.0, width=SIZE // 2, height=SIZE)
    mask = p.add("MaskComposite", destination=out(black), source=out(white), x=0, y=0, operation="add")
    return p.add("AsynDMMaskToTimestepMap", mask=out(mask), k=k, curve="bin", threshold=0.5, feather=0,
                 preview_steps=STEPS, mask_batch="images")


def conditioning(p: Prompt, family: str, seed: int) -> str:
    return p.add(TEST_CONDITIONING, family=family, tokens=8, values_seed=seed)


def model_and_conds(p: Prompt, model: str, seed: int) -> tuple[list[Any], list[Any], list[Any], list[Any] | None]:
    """(model, positive, negative, vae or None) as a user wires each family."""
    if model == "flux-dev":
        unet = p.add("UNETLoader", unet_name=FLUX_DEV, weight_dtype="default")
        positive = p.add("FluxGuidance", conditioning=out(conditioning(p, "flux", seed)), guidance=3.5)
        negative = conditioning(p, "flux", seed + 1)
        vae = p.add("VAELoader", vae_name=FLUX_VAE)
        return out(unet), out(positive), out(negative), out(vae)
    family = "flux" if model == "flux-schnell" else "sd3"
    ckpt = p.add("CheckpointLoaderSimple", ckpt_name=FLUX_SCHNELL if model == "flux-schnell" else SD35[model.split("-")[1]])
    return out(ckpt, 0), out(conditioning(p, family, seed)), out(conditioning(p, family, seed + 1)), out(ckpt, 2)


CFG = {"flux-dev": 1.0, "flux-schnell": 1.0, "sd35-large": 4.5, "sd35-medium": 4.5}
SCHEDULER = {"flux-dev": "simple", "flux-schnell": "simple", "sd35-large": "sgm_uniform", "sd35-medium": "sgm_uniform"}


def ksampler_pair(model: str, seed: int, *, schedule: bool, sampler_name: str = "euler",
                  decode: bool = False) -> tuple[Prompt, dict[str, str]]:
    """KSampler and the Asynchronous KSampler on one loaded model, same inputs; {name: SaveLatent prefix}."""
    p = Prompt()
    m, pos, neg, vae = model_and_conds(p, model, seed)
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    common = dict(model=m, positive=pos, negative=neg, latent_image=out(latent), seed=seed, steps=STEPS,
                  cfg=CFG[model], sampler_name=sampler_name, scheduler=SCHEDULER[model], denoise=1.0)
    stock = p.add("KSampler", **common)
    extra = {"schedule": out(half_mask_schedule(p))} if schedule else {}
    asyn = p.add("AsynDMKSampler", **common, **async_inputs(), **extra)
    prefixes = {}
    for name, node in (("ksampler", stock), ("async", asyn)):
        prefixes[name] = f"dit/{model}_{name}_{seed}"
        p.add("SaveLatent", samples=out(node), filename_prefix=prefixes[name])
        if decode and vae is not None:
            image = p.add("VAEDecode", samples=out(node), vae=vae)
            p.add("SaveImage", images=out(image), filename_prefix=f"dit/{model}_{name}_{seed}")
    if schedule:  # the timestep-map strip of a run with a key item
        p.add("SaveImage", images=out(asyn, 1), filename_prefix=f"dit/{model}_strip_{seed}")
    return p, prefixes


def run(server, p: Prompt) -> dict[str, Any]:
    entry = server.run(p.nodes, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    return entry


def latents(server, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{SaveLatent filename prefix: the saved latent (float32)}."""
    found = {}
    for node_out in entry["outputs"].values():
        for item in node_out.get("latents", []):
            path = Path(server.run_dir) / "out" / item.get("subfolder", "") / item["filename"]
            prefix = f"{item.get('subfolder', '')}/{item['filename']}".rsplit("_", 2)[0]
            found[prefix] = load_file(str(path))["latent_tensor"].float()
    return found


def images(server, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    found = {}
    for node_out in entry["outputs"].values():
        for item in node_out.get("images", []):
            if item.get("type") != "output":
                continue
            path = Path(server.run_dir) / "out" / item.get("subfolder", "") / item["filename"]
            found[item["filename"]] = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return found


def sampled(server, p: Prompt, prefixes: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    entry = run(server, p)
    got = latents(server, entry)
    a, b = got[prefixes["ksampler"]], got[prefixes["async"]]
    assert a.shape == b.shape == (1, 16, SIZE // 8, SIZE // 8), (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.abs().max() > 0
    return a, b, entry


def record(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = rel_diff(a, b)
    RESULTS[name] = diff
    print(f"\n[dit] {name}: max relative difference {diff:.3g}{' (bit for bit)' if torch.equal(a, b) else ''}")
    return diff


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if RESULTS:
        print("\n[dit] max |a - b| / max |a| per check: " + ", ".join(f"{k} {v:.3g}" for k, v in RESULTS.items()))


# ------------------------------------------------------------------------------------------------
# The model files


def test_the_files_are_detected_as_their_families() -> None:
    """ComfyUI's own loaders (comfy.sd.load_diffusion_model, load_checkpoint_guess_config, comfy.sd.VAE) take
    each file for the family it stands for: Flux dev (guidance embedding) and schnell, SD3 with the SD3.5 large
    and medium options, 16-channel VAEs with their family's latent scale (make_dit_models.py --check-only)."""
    folder = REPO_ROOT / ".dev" / "dit-models"
    if not folder.is_dir():
        pytest.fail(f"no {folder}: run scripts/setup.sh first (scripts/test.sh does)")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_dit_models.py"), "--check-only",
                           "--out", str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("make_dit_models: ComfyUI loads "):
            rel, facts = line[len("make_dit_models: ComfyUI loads "):].split(" as ", 1)
            found[Path(rel).name] = json.loads(facts)
    assert found[FLUX_DEV]["config_class"] == "Flux" and found[FLUX_DEV]["guidance_embed"] is True
    assert found[FLUX_SCHNELL]["config_class"] == "FluxSchnell" and found[FLUX_SCHNELL]["guidance_embed"] is False
    assert found[FLUX_VAE]["latent_channels"] == 16
    for name in SD35.values():
        assert found[name]["config_class"] == "SD3" and found[name]["qk_norm"] == "rms"
    assert found[SD35["medium"]]["x_block_self_attn_layers"] == [0]
    assert found[SD35["large"]]["x_block_self_attn_layers"] == []
    tracked = subprocess.run(["git", "ls-files", "*.safetensors"], capture_output=True, text=True, cwd=REPO_ROOT).stdout
    assert not any(n in tracked for n in found), "a random-weight model file is committed"


# ------------------------------------------------------------------------------------------------
# Flux


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell"])
def test_flux_without_key_items_is_the_ksampler(server, model: str) -> None:
    """No key items: the Asynchronous KSampler gives KSampler's latent (the pack runs ComfyUI's own sampler);
    both decode (16-channel latents through the family's VAE) to non-flat images."""
    p, prefixes = ksampler_pair(model, seed=11, schedule=False, decode=True)
    a, b, entry = sampled(server, p, prefixes)
    assert record(f"{model} KSampler vs Asynchronous KSampler, no key items", a, b) <= TOL
    pictures = images(server, entry)
    assert len(pictures) == 2 and all(img.shape == (SIZE, SIZE, 3) and img.std() > 0.5 for img in pictures.values())


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell"])
def test_flux_with_a_key_mask_differs_from_the_ksampler(server, model: str) -> None:
    """A drawn key item (the left half) gives those tokens their own timesteps: the result changes, and the
    timestep-map strip is written."""
    p, prefixes = ksampler_pair(model, seed=21, schedule=True)
    a, b, entry = sampled(server, p, prefixes)
    diff = rel_diff(a, b)
    print(f"\n[dit] {model} with a key mask: relative difference from KSampler {diff:.3g}")
    assert diff > 1e-2, diff
    strips = [img for name, img in images(server, entry).items() if "_strip_" in name]
    assert len(strips) == 1 and min(strips[0].shape[:2]) >= 32


def custom_advanced(p: Prompt, model: list[Any], guider: str, sampler: str, sigmas: str, latent: str, seed: int) -> str:
    noise = p.add("RandomNoise", noise_seed=seed)
    return p.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                 sigmas=out(sigmas), latent_image=out(latent))


@pytest.mark.parametrize("key_mask", [False, True], ids=["no-key-items", "key-mask"])
def test_flux_asynchronous_sampler_through_sampler_custom_advanced(server, key_mask: bool) -> None:
    """The Asynchronous Sampler (SAMPLER) in SamplerCustomAdvanced on Flux dev (BasicGuider, FluxGuidance,
    BasicScheduler): with no key items it is KSamplerSelect's euler; with a key mask the result differs."""
    seed = 31 + key_mask
    p = Prompt()
    m, pos, _neg, _vae = model_and_conds(p, "flux-dev", seed)
    guider = p.add("BasicGuider", model=m, conditioning=pos)
    sigmas = p.add("BasicScheduler", model=m, scheduler="simple", steps=STEPS, denoise=1.0)
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    stock_sampler = p.add("KSamplerSelect", sampler_name="euler")
    extra = {"schedule": out(half_mask_schedule(p))} if key_mask else {}
    async_sampler = p.add("AsynDMSampler", sampler_name="euler", **async_inputs(), **extra)
    prefixes = {}
    for name, sampler in (("ksampler", stock_sampler), ("async", async_sampler)):
        node = custom_advanced(p, m, guider, sampler, sigmas, latent, seed)
        prefixes[name] = f"dit/custom_advanced_{name}_{seed}"
        p.add("SaveLatent", samples=out(node, 0), filename_prefix=prefixes[name])
    a, b, _ = sampled(server, p, prefixes)
    if key_mask:
        diff = rel_diff(a, b)
        print(f"\n[dit] flux-dev SamplerCustomAdvanced with a key mask: relative difference {diff:.3g}")
        assert diff > 1e-2, diff
    else:
        assert record("flux-dev SamplerCustomAdvanced, KSamplerSelect euler vs Asynchronous Sampler", a, b) <= TOL


# ------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (MMDiT)


@pytest.mark.parametrize("model", ["sd35-large", "sd35-medium"])
def test_sd3_without_key_items_is_the_ksampler(server, model: str) -> None:
    """SD3.5 layouts, cfg 4.5 (the negative is used): no key items gives KSampler's latent; both decode."""
    p, prefixes = ksampler_pair(model, seed=41, schedule=False, decode=True)
    a, b, entry = sampled(server, p, prefixes)
    assert record(f"{model} KSampler vs Asynchronous KSampler, no key items", a, b) <= TOL
    pictures = images(server, entry)
    assert len(pictures) == 2 and all(img.shape == (SIZE, SIZE, 3) and img.std() > 0.5 for img in pictures.values())


@pytest.mark.parametrize("model", ["sd35-large", "sd35-medium"])
def test_sd3_with_a_key_mask_differs_from_the_ksampler(server, model: str) -> None:
    p, prefixes = ksampler_pair(model, seed=51, schedule=True)
    a, b, _ = sampled(server, p, prefixes)
    diff = rel_diff(a, b)
    print(f"\n[dit] {model} with a key mask: relative difference from KSampler {diff:.3g}")
    assert diff > 1e-2, diff


def test_sd3_key_words_with_the_checkpoints_clip(server) -> None:
    """Key words as an SD3 user gives them: the SD3.5-large file carries a real SD3 CLIP (CLIP-L only;
    CLIP-G and T5 cannot be built here), CLIP Text Encode (AsynDM) records the prompt's tokens, the
    Asynchronous KSampler reads the words' joint attention (dynamic and static masks) and the
    Cross-Attention Mask node returns one mask per word. Without key words it is KSampler's latent."""
    p = Prompt()
    ckpt = p.add("CheckpointLoaderSimple", ckpt_name=SD35["large"])
    pos = p.add("AsynDMTextEncode", clip=out(ckpt, 1), text="a photo of a rabbit next to a teddy bear")
    neg = p.add("AsynDMTextEncode", clip=out(ckpt, 1), text="")
    latent = p.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    common = dict(model=out(ckpt, 0), positive=out(pos), negative=out(neg), latent_image=out(latent), seed=61,
                  steps=STEPS, cfg=4.5, sampler_name="euler", scheduler="sgm_uniform", denoise=1.0)
    nodes = {"ksampler": p.add("KSampler", **common), "none": p.add("AsynDMKSampler", **common, **async_inputs())}
    for mode in ("dynamic", "static"):
        nodes[mode] = p.add("AsynDMKSampler", **common, **async_inputs(key_words="rabbit, teddy bear", mask_mode=mode))
    for name, node in nodes.items():
        p.add("SaveLatent", samples=out(node), filename_prefix=f"dit/words_{name}")
    masks = p.add("AsynDMCrossAttentionMask", model=out(ckpt, 0), positive=out(pos), negative=out(neg),
                  latent_image=out(latent), seed=61, steps=STEPS, cfg=4.5, sampler_name="euler",
                  scheduler="sgm_uniform", key_words="rabbit, bear", threshold=1.0)
    p.add("SaveImage", images=out(p.add("MaskToImage", mask=out(masks))), filename_prefix="dit/words_masks")
    entry = run(server, p)
    got = latents(server, entry)
    plain = got["dit/words_ksampler"]
    assert record("sd35-large with CLIP-L, no key words", plain, got["dit/words_none"]) <= TOL
    for mode in ("dynamic", "static"):
        diff = rel_diff(plain, got[f"dit/words_{mode}"])
        print(f"\n[dit] sd35-large key words ({mode} masks): relative difference from KSampler {diff:.3g}")
        assert torch.isfinite(got[f"dit/words_{mode}"]).all() and diff > 1e-2, (mode, diff)
    pictures = [img for name, img in images(server, entry).items() if name.startswith("words_masks")]
    assert len(pictures) == 2  # one mask per word
    for img in pictures:
        assert img.shape == (SIZE, SIZE, 3) and set(np.unique(img)) <= {0.0, 255.0} and 0 < img.mean() < 255
