"""The random-weight models of scripts/make_models.py load in a real ComfyUI and run.

ComfyUI is imported in-process (CPU). Models are written to a pytest temporary folder, or to
$ASYNDM_MODELS_DIR when set (make_models is idempotent there, so a warm folder costs ~nothing).
Timings and peak memory are printed (run with -s to see them).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, comfyui_path

LATENT = (1, 4, 8, 8)  # a 64x64 image


def _load_make_models():
    spec = importlib.util.spec_from_file_location("asyndm_make_models", REPO_ROOT / "scripts" / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mm = _load_make_models()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.fixture(scope="module")
def comfy():
    root = comfyui_path()
    if not (root / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI tree at {root}: run scripts/setup.sh or set COMFYUI_PATH.")
    mm.setup_comfyui(root)  # sys.path + CPU, before comfy.model_management is imported
    import comfy.model_base
    import comfy.sample
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    return comfy


@pytest.fixture(scope="module")
def models_dir(comfy, tmp_path_factory) -> Path:
    out = Path(os.environ["ASYNDM_MODELS_DIR"]) if os.environ.get("ASYNDM_MODELS_DIR") else tmp_path_factory.mktemp("models")
    t0 = time.perf_counter()
    mm.make_models(out, seed=0)
    print(f"\n[models] make_models {time.perf_counter() - t0:.1f} s into {out}, peak RSS {_peak_rss_mib():.0f} MiB")
    return out


@pytest.fixture(scope="module")
def loaded(comfy, models_dir):
    path = models_dir / mm.SD15_CHECKPOINT
    t0 = time.perf_counter()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    print(f"\n[models] load_checkpoint_guess_config {time.perf_counter() - t0:.1f} s, peak RSS {_peak_rss_mib():.0f} MiB")
    return model, clip, vae


def _encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def test_files_are_current_and_idempotent(models_dir):
    import torch
    from safetensors import safe_open

    names = [mm.SD15_CHECKPOINT, mm.TAESD_DECODER, mm.TAESD_ENCODER]
    for rel in names:
        path = models_dir / rel
        assert path.is_file(), rel
        meta = mm.read_metadata(path)  # header order, as written
        with safe_open(str(path), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert meta[mm.META_VERSION_KEY] == mm.CONTENT_VERSION and meta["seed"] == "0", meta
        assert meta["asyndm_kind"] == ("sd15" if rel == mm.SD15_CHECKPOINT else "taesd"), meta
        assert list(meta) == sorted(meta), "metadata keys are sorted (byte-identical files per seed)"
        assert dtypes == {"F16"}, (rel, dtypes)
        print(f"[models] {rel}: {path.stat().st_size / 2**20:.1f} MiB")
    assert not list(models_dir.rglob("*.tmp")), "temporary files left behind"

    # A second run keeps every file (same mtime) and says so.
    mtimes = {rel: (models_dir / rel).stat().st_mtime_ns for rel in names}
    lines: list[str] = []
    mm.make_models(models_dir, seed=0, log=lines.append)
    assert {rel: (models_dir / rel).stat().st_mtime_ns for rel in names} == mtimes
    assert sum("up to date" in line for line in lines) == len(names), lines

    # The preview TAESD is the checkpoint's VAE (same seed scheme, same values).
    from safetensors.torch import load_file

    ckpt = load_file(str(models_dir / mm.SD15_CHECKPOINT))
    dec = load_file(str(models_dir / mm.TAESD_DECODER))
    assert torch.equal(dec["1.weight"], ckpt["first_stage_model.taesd_decoder.1.weight"])


def test_detected_as_sd15(comfy, loaded):
    model, _, _ = loaded
    assert type(model.model) is comfy.model_base.BaseModel
    assert type(model.model.model_config) is comfy.supported_models.SD15
    unet_config = model.model.model_config.unet_config
    for key, value in mm.SD15_UNET_CONFIG.items():
        assert unet_config[key] == value, key
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"\n[models] UNet {params / 1e6:.2f}M params, weights {model.model.diffusion_model.dtype}")


def test_clip_encodes_finite(loaded):
    import torch

    _, clip, _ = loaded
    t0 = time.perf_counter()
    cond_a = _encode(clip, "a photo of a cat")
    cond_b = _encode(clip, "a watercolor of a lighthouse at night")
    print(f"\n[models] CLIP encode x2 {time.perf_counter() - t0:.2f} s")
    emb_a, extra_a = cond_a[0]
    emb_b, _ = cond_b[0]
    assert emb_a.shape == (1, 77, 768)
    assert torch.isfinite(emb_a).all() and torch.isfinite(emb_b).all()
    assert torch.isfinite(extra_a["pooled_output"]).all()
    assert not torch.allclose(emb_a, emb_b), "different prompts must give different conditioning"


def test_vae_is_taesd_and_decodes(comfy, loaded):
    import torch

    _, _, vae = loaded
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    image = vae.decode(latent)
    print(f"\n[models] TAESD decode 8x8 -> 64x64 {time.perf_counter() - t0:.2f} s, std {image.std():.3f}")
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1
    assert image.std() > 1e-3, "the random decoder should not give a flat image"
    back = vae.encode(image)
    assert back.shape == LATENT and torch.isfinite(back).all()


def _conds(clip):
    return _encode(clip, "a photo of a cat"), _encode(clip, "")


def _sample(comfy, model, conds, steps=4, seed=0):
    import torch

    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = conds
    return comfy.sample.sample(
        model, noise, steps, 7.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
    )


def test_sample_4_steps_finite(comfy, loaded):
    import torch

    model, clip, _ = loaded
    conds = _conds(clip)
    _sample(comfy, model, conds, steps=1)  # warm-up (loads the model onto the device)
    t0 = time.perf_counter()
    out = _sample(comfy, model, conds, steps=4)
    print(
        f"\n[models] sample 4 steps (cfg 7) on {LATENT}: {time.perf_counter() - t0:.2f} s, "
        f"out std {out.std():.1f}, peak RSS {_peak_rss_mib():.0f} MiB"
    )
    assert out.shape == LATENT
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


def test_attention_at_three_resolutions(comfy, loaded):
    """Cross-attention runs at 8x8, 4x4 and 2x2 for an 8x8 latent; record where."""
    model, clip, _ = loaded
    seen: dict[tuple[str, int], tuple[int, int]] = {}

    def attn2_probe(q, context, value, extra_options):
        shape = extra_options["activations_shape"]  # [B, C, H, W] entering the SpatialTransformer
        seen[tuple(extra_options["block"])] = (shape[2], shape[3])
        assert q.shape[1] == shape[2] * shape[3]
        return q, context, value

    patched = model.clone()
    patched.set_model_attn2_patch(attn2_probe)
    _sample(comfy, patched, _conds(clip), steps=1)

    by_size: dict[tuple[int, int], list[str]] = {}
    for (kind, index), size in sorted(seen.items()):
        by_size.setdefault(size, []).append(f"{kind}.{index}")
    print(f"\n[models] cross-attention blocks by size: {by_size}")
    assert by_size == {
        (8, 8): ["input.1", "output.4", "output.5"],
        (4, 4): ["input.3", "output.2", "output.3"],
        (2, 2): ["input.5", "middle.0", "output.0", "output.1"],
    }
