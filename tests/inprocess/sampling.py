"""Shared helpers: stock ComfyUI sampling vs the asynchronous sampler on the same inputs."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch

from asyndm.comfy_adapter.sampler import AsynSampler
from asyndm.schedule_spec import AsynSchedule


def stock(model, positive, negative, latent, *, seed=0, steps=4, cfg=4.0, sampler="euler", scheduler="normal",
          denoise=1.0, noise_mask=None, callback=None):
    """ComfyUI's own KSampler path (comfy.sample.sample)."""
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, noise_mask=noise_mask, callback=callback, seed=seed)


def asyn(model, positive, negative, latent, *, schedule=None, seed=0, steps=4, cfg=4.0, sampler="euler",
         scheduler="normal", denoise=1.0, callback=None, noise_mask=None):
    """The same inputs through AsynSampler (sigmas computed as the KSampler computes them)."""
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
    return comfy.sample.sample_custom(model, noise, cfg, AsynSampler(sampler, schedule), sigmas, positive, negative,
                                      latent, noise_mask=noise_mask, callback=callback, seed=seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to max(|b|, 1)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def fixed_masks(b: int, h: int, w: int) -> AsynSchedule:
    """A schedule whose top half is one key item (bin, k = 0.8)."""
    masks = torch.zeros(b, 1, h, w)
    masks[:, :, : h // 2] = 1.0
    return AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=masks)


def empty_mask(b: int, h: int, w: int) -> AsynSchedule:
    """A key item whose mask covers no pixel: the per-pixel machinery runs with every pixel on one track."""
    return AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=torch.zeros(b, 1, h, w))


# No key items (ComfyUI's own sampler runs) and one shared track (the pack's machinery runs):
# both must give KSampler's result bit for bit (see test_precision.py for why and how).
SAME_AS_KSAMPLER = {"no key items": lambda b, h, w: None, "empty mask": empty_mask}


def hook_state(module: torch.nn.Module) -> list[tuple[str, int, int]]:
    """Forward hook and pre-hook counts of every submodule (to prove nothing was left behind)."""
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in module.named_modules()]


class TokenTimesteps:
    """The timestep of every image token at each forward of a transformer (patches of `patch` latent pixels a
    side): the adapter's token map while one is set, else the stock row's (a run's calls with every pixel at
    one sigma are KSampler's own). Remove .handle when done."""

    def __init__(self, monkeypatch, model, adapter_class: type, patch: int = 2) -> None:
        self.steps: list[torch.Tensor] = []
        self.patch = patch
        self.adapter: list = []
        original = adapter_class.set_map

        def set_map(adapter, *args, **kwargs):
            self.adapter[:] = [adapter]
            return original(adapter, *args, **kwargs)

        monkeypatch.setattr(adapter_class, "set_map", set_map)
        self.handle = model.model.diffusion_model.register_forward_pre_hook(self._record)

    def _record(self, _module, args) -> None:
        x, timesteps = args[0], args[1]
        per_token = self.adapter[0].token_timesteps() if self.adapter else None
        if per_token is None:
            p = self.patch
            per_token = timesteps.float()[:, None].expand(-1, (-(-x.shape[-2] // p)) * (-(-x.shape[-1] // p)))
        self.steps.append(per_token.clone())


def keep_samplers(monkeypatch, adapter) -> list:
    """Every AsynSampler the code under test builds (to read its record afterwards), in order."""
    made: list = []
    init = adapter.AsynSampler.__init__

    def keep(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(adapter.AsynSampler, "__init__", keep)
    return made


def unet_hooks_class() -> type:
    """The UNet family's time hooks as the pack loaded by ComfyUI uses them (to spy on set_map)."""
    import importlib

    from tests.inprocess.conftest import PACK_MODULE, load_pack

    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.families.unet").PerPixelTimesteps
