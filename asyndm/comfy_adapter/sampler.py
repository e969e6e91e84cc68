"""AsynSampler: a comfy.samplers.Sampler that denoises every latent pixel on its own schedule.

Pixels with the same priority history follow the same sequence of AsynDM states, a *track*
(track_model.py). ComfyUI's own sampler function (any of KSampler's list, or a SAMPLER from
KSamplerSelect or a sampler node, options kept) runs once per track on that track's sigmas, the
runs in lock step (lockstep.py): every model call is ONE call of ComfyUI's CFG guider for the whole
latent, with a carrier sigma per image (the user's scheduler, i.e. the background track), while
the per-pixel sigma map reaches the model through the APPLY_MODEL wrapper and the family's time
hooks. Each pixel's update is therefore its sampler's own update on its own sigmas. Every wrapper,
patch and hook is added for the run on cloned options or inside try/finally, so nothing outlives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import numpy as np
import torch
import torch.nn.functional as F

from ..masks import initial_item_masks, item_masks, priority_map
from ..schedule_spec import AsynSchedule
from ..schedule_table import table_step
from ..schedules import NUMPY_CURVES, history_states, numpy_curve_constants, numpy_history_states, numpy_state_step
from ..schedules import step as schedule_step
from ..sigma_map import SigmaInterpolator, TimestepTable, background_track, track_on_table
from ..timesteps import round_clamp
from .errors import SUPPORTED_FAMILIES, UnsupportedModelError
from .families import time_adapter
from .host import HostCopy, host_maths, to_device, to_host
from .lockstep import REFUSED, refusal, run_lockstep
from .map_steps import agrees_with_comfy, map_kind, run_on_maps
from .model_wrapper import WRAPPER_KEY, AreaRecorder, CallTable, PerPixelApplyModel, StepMaps
from .per_pixel import per_pixel
from .pixel_steps import NextStates, run_on_pixels
from .tokens import KEY as TOKENS_KEY
from .track_model import PixelModel, TrackSet, levels_of, retracked, tracks_from_host_history

__all__ = ["AsynSampler", "ETA_SAMPLERS", "REFUSED_SAMPLERS", "StepRecord", "check_inputs", "check_sampler_name",
           "sampler_names"]

# The names whose eta the nodes set: eta 0 is Euler, eta > 0 ancestral (DDIM(eta); eta 1 is DDPM-like).
ETA_SAMPLERS = ("euler", "ddim", "euler_ancestral")
# KSampler's names that asynchronous sampling refuses, and why (listed in the node descriptions and README).
REFUSED_SAMPLERS = (
    ("dpm_fast", REFUSED["sample_dpm_fast"]),
    ("dpm_adaptive", REFUSED["sample_dpm_adaptive"]),
    ("sa_solver_pece", "only where key pixels wait at the start (most schedulers; ddim_uniform runs it): it makes "
                       "no corrector call on a run's first step, so the waiting pixels' run would make fewer calls"),
)


def sampler_names() -> list[str]:
    """ComfyUI's own sampler list, read when asked (a newer ComfyUI's samplers appear without a release)."""
    return list(comfy.samplers.KSampler.SAMPLERS)


def check_sampler_name(name: str) -> None:
    """Refuse a name that is not one of ComfyUI's samplers."""
    if name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of ComfyUI's samplers ({', '.join(sampler_names())})")


def check_inputs(model_wrap: Any, noise: torch.Tensor, latent_image: torch.Tensor,
                 denoise_mask: torch.Tensor | None) -> None:
    """Refuse what would silently give a NaN image or drop prompts, naming the input to fix."""
    if not bool(torch.isfinite(latent_image).all()):
        raise ValueError(
            "the latent_image holds NaN or infinite values: fix the node that produced it (for example a "
            "latent math node or a VAE Encode of a broken image); asynchronous sampling needs a finite latent"
        )
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("the noise holds NaN or infinite values: fix the node that produced the noise")
    if denoise_mask is not None and not bool(torch.isfinite(denoise_mask).all()):
        raise ValueError("the latent's noise_mask holds NaN or infinite values: fix the node that set the mask")
    cfg = getattr(model_wrap, "cfg", None)  # CFGGuider's scale; NaN passes the server's min/max check
    if isinstance(cfg, (int, float)) and not math.isfinite(cfg):
        raise ValueError(f"cfg is {cfg}: set a finite guidance scale (for example 5.0)")
    batch = int(noise.shape[0])
    for name, conds in (getattr(model_wrap, "conds", None) or {}).items():
        for cond in conds or []:
            crossattn = (cond.get("model_conds") or {}).get("c_crossattn") if isinstance(cond, dict) else None
            text = getattr(crossattn, "cond", None)
            if not torch.is_tensor(text) or text.ndim == 0:
                continue
            n = int(text.shape[0])
            if n != 1 and (n > batch or batch % n):  # ComfyUI would silently drop or unevenly repeat prompts
                raise ValueError(
                    f"the {name} conditioning has batch {n} but the latent batch is {batch}: give a conditioning "
                    f"of batch 1 (shared by every image) or {batch} (one per image)"
                )


@dataclass
class StepRecord:
    """What happened at each step, for previews: states the model saw and the item priority map."""

    states: list[torch.Tensor] = field(default_factory=list)  # (B, H, W) timestep state per step
    priorities: list[torch.Tensor] = field(default_factory=list)  # (B, H, W) k per pixel, 0 = background
    num_train_timesteps: int = 1000
    offset: int = 1


def _progress(callback: Callable | None, half: int) -> Callable | None:
    """callback(step, x0, x, total) reporting one of two passes as half of a 2N-step bar."""
    if callback is None:
        return None

    def report(step: int, x0: torch.Tensor, x: torch.Tensor, total: int) -> Any:
        return callback(half * total + step, x0, x, 2 * total)

    return report


def patch_constant(k_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) priorities made constant on each patch of a transformer's token grid (the patch's
    largest k), so that a token's timestep and the updates of its pixels agree."""
    if patch_size == 1:
        return k_map
    h, w = k_map.shape[-2:]
    pooled = F.max_pool2d(k_map[:, None], kernel_size=patch_size, stride=patch_size, ceil_mode=True)[:, 0]
    return pooled.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)[..., :h, :w]


class OneFrame:
    """The CFG guider's model for one-frame latents of a video format (B, C, 1, H, W): the sampler
    works on (B, C, H, W) and the model is called with the frame axis put back. The post-CFG
    functions a sampler adds (CFG++ keeps the unconditional prediction) see the sampler's shapes."""

    def __init__(self, model_wrap: Any, guider_post_cfg: list[Callable]) -> None:
        self.model_wrap = model_wrap
        self.guider_post_cfg = guider_post_cfg

    def __getattr__(self, name: str) -> Any:  # inner_model, conds, cfg: the guider's own
        return getattr(self.model_wrap, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("model_options") or {}
        post = options.get("sampler_post_cfg_function") or []
        if any(all(fn is not g for g in self.guider_post_cfg) for fn in post):
            kwargs["model_options"] = {**options, "sampler_post_cfg_function": [
                fn if any(fn is g for g in self.guider_post_cfg) else _image_args(fn) for fn in post]}
        return self.model_wrap(x.unsqueeze(2), sigma, **kwargs).squeeze(2)

    @staticmethod
    def callback(callback: Callable | None) -> Callable | None:
        if callback is None:
            return None
        return lambda step, x0, x, total: callback(step, x0.unsqueeze(2), x.unsqueeze(2), total)


def _image_args(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """A post-CFG function of the sampler, called with one-frame tensors as images (and back)."""

    def run(args: dict) -> Any:
        out = fn({k: v.squeeze(2) if torch.is_tensor(v) and v.ndim == 5 and v.shape[2] == 1 else v
                  for k, v in args.items()})
        return out.unsqueeze(2) if torch.is_tensor(out) and out.ndim == 4 else out

    return run


class AsynSampler(comfy.samplers.Sampler):
    """Asynchronous sampling as a ComfyUI SAMPLER (usable by SamplerCustom / SamplerCustomAdvanced)."""

    # Where the sampler runs on sigma maps (map_steps.py), a model call's table has one row per distinct sigma of its
    # tracks (a re-partition leaves many tracks at one sigma: waiting at the top, or apart only in their future), and
    # a call whose pixels all sit at one sigma (before the first step every key pixel waits at the top with the
    # background; every track ends on the carrier's last sigma) runs as KSampler's own call. The lock step cannot see
    # either on the host and makes its table call of one row per track, so the two routes differ by the time
    # embedding's rounding at those calls (a row's bits can depend on its call's row count); with this off they
    # compute the same bits (the tests that compare the routes turn it off).
    distinct_sigma_calls: bool = True
    # With dynamic masks, euler (and ddim, its eta-0 name) steps every pixel's state on the host instead of
    # re-partitioning tracks at every reading (pixel_steps.py): the same sigma maps, less host work per step.
    # Needs distinct_sigma_calls (its tables are made that way); the tests that compare the routes turn it off.
    pixel_steps: bool = True

    def __init__(self, sampler_name: str, schedule: AsynSchedule | None, *, eta: float | None = None,
                 reference: bool = False, s_noise: float = 1.0, base: comfy.samplers.KSAMPLER | None = None) -> None:
        """sampler_name: one of ComfyUI's samplers; base: a SAMPLER to make asynchronous instead (options kept)."""
        if base is None:
            check_sampler_name(sampler_name)
        elif not isinstance(base, comfy.samplers.KSAMPLER):
            raise ValueError(
                f"the sampler input is a {type(base).__name__}, not one of ComfyUI's k-diffusion samplers: connect "
                "KSamplerSelect or a sampler node (SamplerEulerAncestral, SamplerDPMPP_2M_SDE, ...)"
            )
        self.sampler_name = sampler_name if base is None else getattr(base.sampler_function, "__name__", "sampler")
        self.base = base
        if eta is not None and (not math.isfinite(float(eta)) or eta < 0):
            raise ValueError(f"eta must be a finite number >= 0 (got {eta!r}): 0 is deterministic, 1 is DDPM-like noise")
        if not math.isfinite(float(s_noise)) or s_noise < 0:
            raise ValueError(f"s_noise must be a finite number >= 0 (got {s_noise!r}); the usual value is 1.0")
        if eta is not None and base is not None and eta != 0:
            raise ValueError("eta applies to the sampler_name list; with a SAMPLER connected set its noise on the "
                             "sampler node (for example SamplerEulerAncestral's eta) and leave eta at 0")
        if eta is not None and base is None and sampler_name not in ETA_SAMPLERS:
            if sampler_name == "ddpm" and eta != 1.0:
                raise ValueError("ddpm always adds the full noise (eta 1): for another eta use ddim or euler_ancestral")
            if sampler_name != "ddpm" and eta != 0.0:
                raise ValueError(f"eta applies to {', '.join(ETA_SAMPLERS)}, not to {sampler_name}: set eta to 0")
            eta = None
        self.eta = eta
        self.schedule = schedule or AsynSchedule()
        self.reference = reference
        self.s_noise = s_noise
        self.num_train_timesteps = 1000
        self.offset = 1
        self.record: StepRecord | None = None
        self.patch_size = 1
        self.model_calls = 0
        self._k_vectors: dict[torch.device, torch.Tensor] = {}
        self._map_checks: dict[tuple, bool] = {}  # (sampler function, options) -> map_steps agrees with it
        self._background_states: dict[tuple, torch.Tensor] = {}  # (steps, device, T, offset) -> its (1, N + 1) states

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, callback: Callable | None,
               noise: torch.Tensor, latent_image: torch.Tensor | None = None, denoise_mask: torch.Tensor | None = None,
               disable_pbar: bool = False) -> torch.Tensor:
        inner = model_wrap.inner_model
        ms = inner.model_sampling
        diffusion_model = inner.diffusion_model
        one_frame = noise.ndim == 5 and noise.shape[2] == 1  # a video format's one frame (Qwen-Image's latents)
        if noise.ndim != 4 and not one_frame:
            raise UnsupportedModelError(
                f"asynchronous sampling needs image latents (B, C, H, W); got shape {tuple(noise.shape)}. "
                f"Supported: {SUPPORTED_FAMILIES}."
            )
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        self.disable_pbar = disable_pbar
        check_inputs(model_wrap, noise, latent_image, denoise_mask)
        time_hooks = time_adapter(diffusion_model)  # an unsupported family is refused by name, key words or not
        self._check_family(time_hooks, ms)
        if self.schedule.is_synchronous and not self.reference:
            # No pixel can leave the background: ComfyUI's own sampler, untouched (no hook, no wrapper).
            self.record = self._synchronous_record(noise[:, :, 0] if one_frame else noise, len(sigmas) - 1)
            return self.stock_sampler().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                               denoise_mask, disable_pbar)
        if one_frame:  # sample the image (B, C, H, W); the model is called with the frame axis put back
            frame = OneFrame(model_wrap, list(extra_args["model_options"].get("sampler_post_cfg_function", [])))
            out = self.sample(frame, sigmas, extra_args, frame.callback(callback), noise[:, :, 0], latent_image[:, :, 0],
                              None if denoise_mask is None else denoise_mask[:, :, 0], disable_pbar)
            return out.unsqueeze(2)
        if self.reference:
            sigmas = self._reference_sigmas(ms, len(sigmas) - 1).to(sigmas.device)
        num_steps = len(sigmas) - 1
        self.record = StepRecord(num_train_timesteps=self.num_train_timesteps, offset=self.offset)
        if num_steps < 1:
            return ms.inverse_noise_scaling(sigmas[-1], ms.noise_scaling(sigmas[0], noise, latent_image))

        self.patch_size = int(time_hooks.patch_size)
        maps = StepMaps()
        wrapper = PerPixelApplyModel(maps, time_hooks)
        model_options = extra_args["model_options"]  # a per-run clone made by the CFG guider
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper, model_options, is_model_options=True
        )
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, AreaRecorder(maps), model_options,
            is_model_options=True,
        )
        observer = self._observer(model_wrap, time_hooks, noise)
        if observer is not None:
            observer.install(model_options)

        with time_hooks:
            try:
                fixed_k = self._fixed_priorities(noise)
                if fixed_k is None and observer is not None and not self.schedule.dynamic:
                    # The static mask's synchronous pre-pass is the first half of the progress bar.
                    fixed_k = self._static_priorities(model_wrap, sigmas, extra_args, noise, latent_image,
                                                      denoise_mask, maps, observer, _progress(callback, 0))
                    callback = _progress(callback, 1)
                return self._run(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                 maps, observer, fixed_k, record=True)
            finally:
                maps.clear()
                wrapper.close()

    def _check_family(self, adapter: Any, ms: Any) -> None:
        """What this family cannot do, refused by name before any step runs."""
        if adapter.family != "UNet" and self.reference:
            raise ValueError(f"reference mode reproduces the paper's DDIM sampler on SD's discrete-time UNets; "
                             f"turn it off for {adapter.family}")

    def stock_sampler(self) -> comfy.samplers.KSAMPLER:
        """ComfyUI's own sampler for this name and eta: what KSampler runs when no pixel is a key pixel."""
        if self.base is not None:
            return self.base
        name, eta = self.sampler_name, self.eta
        if eta is None and name == "euler_ancestral" and self.s_noise != 1.0:
            eta = 1.0  # ComfyUI's default eta, with this s_noise
        if eta is None or name not in ETA_SAMPLERS:
            return comfy.samplers.sampler_object(name)
        if eta > 0:  # DDIM(eta) / euler_ancestral with this eta ("ddim" keeps its random inpaint noise)
            inpaint = {"random": True} if name == "ddim" else {}
            return comfy.samplers.ksampler("euler_ancestral", {"eta": eta, "s_noise": self.s_noise},
                                           inpaint_options=inpaint)
        return comfy.samplers.sampler_object("ddim" if name == "ddim" else "euler")

    def _synchronous_record(self, noise: torch.Tensor, num_steps: int) -> StepRecord:
        """The previews of a run where every pixel stays on the background track."""
        record = StepRecord(num_train_timesteps=self.num_train_timesteps, offset=self.offset)
        if num_steps < 1:
            return record
        b, _, h, w = noise.shape
        track = background_track(num_steps, num_train_timesteps=self.num_train_timesteps, offset=self.offset)
        zeros = torch.zeros(()).expand(b, h, w)
        record.states = [value.expand(b, h, w) for value in track]
        record.priorities = [zeros] * num_steps
        return record

    # ----------------------------------------------------------------------------------------
    def _reference_sigmas(self, ms: Any, num_steps: int) -> torch.Tensor:
        """The paper's sampler: linear integer timesteps from T + offset, ending at t = 0 (not sigma 0)."""
        table = getattr(ms, "sigmas", None)
        if table is None or table.ndim != 1:
            raise UnsupportedModelError("reference mode needs a discrete-timestep model (SD1.x, SD2.x, SDXL)")
        self.num_train_timesteps = int(table.shape[0])
        track = background_track(num_steps, num_train_timesteps=self.num_train_timesteps, offset=self.offset)
        t = round_clamp(track, self.num_train_timesteps)
        return torch.cat([table[t.to(table.device)], table[:1]]).float()

    def _sigma_function(self, sigmas: torch.Tensor, ms: Any, sigma_top: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """state -> sigma for this run (built once; applied to the distinct states every step).

        Where the scheduler samples the paper's integer timesteps (ddim_uniform, reference), every
        pixel gets the model's sigma at its rounded timestep; otherwise states between the
        scheduler's sigmas are interpolated (sigma_map.py).
        """
        table = getattr(ms, "sigmas", None)
        table = to_host(table) if torch.is_tensor(table) else table
        if self.reference:
            return TimestepTable(table, final=table[0])
        if torch.is_tensor(table) and table.numel() == self.num_train_timesteps and track_on_table(
                sigmas, table, offset=self.offset):
            return TimestepTable(table, final=sigmas[-1])
        return SigmaInterpolator(sigmas.float(), sigma_top=sigma_top, num_train_timesteps=self.num_train_timesteps,
                                 offset=self.offset)

    def _starts_at_the_top(self, ms: Any, sigmas: torch.Tensor, max_denoise: bool) -> bool:
        """Does the scheduler start where the paper does (within one step of the top timestep)?

        Then states above the background's first one are the paper's noisier key pixels and may
        rise towards the model's largest sigma (ddim_uniform starts at t = 981 of 999, say). An
        img2img run starts lower on purpose; there no pixel goes above its first sigma.
        """
        if max_denoise:
            return True
        num_steps = len(sigmas) - 1
        first = float(background_track(num_steps, num_train_timesteps=self.num_train_timesteps, offset=self.offset)[0])
        step = self.num_train_timesteps / num_steps
        return float(ms.timestep(sigmas[:1].float())[0]) >= first - step

    def _next_state(self, s: torch.Tensor, k_map: torch.Tensor, remaining: int, num_steps: int,
                    any_key: bool | None = None) -> torch.Tensor:
        """any_key: whether some k of k_map is > 0 (read from k_map when not given)."""
        t, target = self.num_train_timesteps, float(self.offset)
        linear = schedule_step(s, remaining, curve="linear", k=0.0, num_steps=num_steps, num_train_timesteps=t,
                               target=target)
        if not (bool((k_map > 0).any()) if any_key is None else any_key):
            return linear
        if self.schedule.table is not None:
            curved = table_step(s, remaining, table=self.schedule.table, k=k_map, num_steps=num_steps,
                                num_train_timesteps=t, offset=target)
        else:
            curved = schedule_step(s, remaining, curve=self.schedule.curve, k=k_map, num_steps=num_steps,
                                   num_train_timesteps=t, target=target)
        return torch.where(k_map > 0, curved, linear)

    def _map_kind(self, base: comfy.samplers.KSAMPLER, ms: Any, noise: torch.Tensor, tracks: TrackSet) -> str | None:
        """Which sampler runs on per-pixel sigma maps (map_steps.py) instead of the lock step, or None: ComfyUI's
        own euler / euler_ancestral / dpmpp_2m, on a latent of the sigmas' dtype (the maps then do the
        instances' arithmetic exactly), whose maths the run-time check finds unchanged (checked once per sampler)."""
        kind = map_kind(base, ms)
        if kind is None or noise.dtype != tracks.sigmas.dtype:
            return None
        key = (base.sampler_function, tuple(sorted((k, repr(v)) for k, v in base.extra_options.items())))
        if key not in self._map_checks:
            self._map_checks[key] = agrees_with_comfy(kind, base)
        return kind if self._map_checks[key] else None

    def _k_vector(self, device: torch.device) -> torch.Tensor:
        """The items' priorities as a float32 tensor on `device` (made once per device: a copy to a GPU is an op)."""
        if device not in self._k_vectors:
            self._k_vectors[device] = to_device(torch.tensor(self.schedule.k, dtype=torch.float32), device)
        return self._k_vectors[device]

    def _fixed_priorities(self, noise: torch.Tensor) -> torch.Tensor | None:
        """k per pixel from user masks (mask_source 'masks'), resized to the latent; None otherwise."""
        sched = self.schedule
        b, _, h, w = noise.shape
        if sched.is_synchronous:
            return torch.zeros(b, h, w, device=noise.device)
        if sched.mask_source != "masks":
            return None
        masks = sched.masks
        assert masks is not None
        if masks.shape[0] not in (1, b):
            raise ValueError(f"the masks have batch {masks.shape[0]} but the latent batch is {b}: give 1 or {b} masks")
        m = masks.to(noise.device, torch.float32)
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = m.clamp(0.0, 1.0).expand(b, -1, -1, -1)
        k = self._k_vector(noise.device).view(1, -1, 1, 1)
        return patch_constant((m * k).amax(dim=1), self.patch_size)

    def _observer(self, model_wrap: Any, time_hooks: Any, noise: torch.Tensor) -> Any:
        """The family's observer of the key words' attention, or None when the schedule has no key words."""
        sched = self.schedule
        if sched.mask_source != "attention" or sched.is_synchronous:
            return None
        columns_by_uuid: dict[Any, list[list[int]]] = {}
        for cond in (getattr(model_wrap, "conds", {}) or {}).get("positive", []) or []:
            tokens = cond.get(TOKENS_KEY)
            if tokens is None:
                continue
            layout = time_hooks.text_layout(tokens)
            crossattn = (cond.get("model_conds") or {}).get("c_crossattn")
            context = getattr(crossattn, "cond", None)
            if torch.is_tensor(context) and context.ndim == 3 and context.shape[1] != tokens.context_length(layout):
                raise ValueError(
                    f"the positive prompt's text has {context.shape[1]} tokens but its recorded tokens fill "
                    f"{tokens.context_length(layout)} on {time_hooks.family}: the conditioning was changed after "
                    "'CLIP Text Encode (AsynDM)' (concatenated or combined?) or encoded for another model; encode the "
                    "prompt for this model with 'CLIP Text Encode (AsynDM)' and connect it directly"
                )
            columns_by_uuid[cond.get("uuid")] = [tokens.columns(word, layout) for word in sched.words]
        if not columns_by_uuid:
            raise ValueError(
                "key words need to know the prompt's tokens: encode the positive prompt with "
                "'CLIP Text Encode (AsynDM)' instead of 'CLIP Text Encode', or give masks instead of words"
            )
        self.token_positions = [max(cols) for cols in next(iter(columns_by_uuid.values()))]
        return time_hooks.attention_observer(tuple(noise.shape[-2:]), noise.shape[0], columns_by_uuid)

    def _priorities_from_attention(self, attn: torch.Tensor, size: tuple[int, int], grid: tuple[int, int],
                                   validate: bool = True, levels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W) priority map of the key words' attention. levels (unvalidated only): each item's index among
        the sorted priorities, given in place of its k, so that the map holds every pixel's level (the largest
        k is the largest level: the same pixels win) and the host needs no search to group the pixels."""
        k = self._k_vector(attn.device) if levels is None else levels
        if not validate:  # the dynamic masks' every-step map: the same values in fewer ops
            return patch_constant(priority_map(attn.float(), k, threshold=self.schedule.threshold, size=size,
                                               grid=grid), self.patch_size)
        masks = item_masks(attn.float(), k, threshold=self.schedule.threshold, size=size, grid=grid, validate=validate)
        return patch_constant((masks * k.view(1, -1, 1, 1)).amax(dim=1), self.patch_size)

    def _static_priorities(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, noise: torch.Tensor,
                           latent_image: torch.Tensor, denoise_mask: torch.Tensor | None, maps: StepMaps,
                           observer: Any, callback: Callable | None = None) -> torch.Tensor:
        """The paper's static mask: attention averaged over a synchronous pass, applied once."""
        b, _, h, w = noise.shape
        zeros = torch.zeros(b, h, w, device=noise.device)
        total = self._run(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, maps, observer,
                          zeros, record=False, collect_attention=True)
        if total is None:
            raise RuntimeError("AsynDM: the pre-pass saw no attention of the image to the key words (the model's "
                               "attention was replaced by another pack, or every forward ran on a crop)")
        return self._priorities_from_attention(total, (h, w), observer.grid)

    # ----------------------------------------------------------------------------------------
    def _state_rows(self, history: torch.Tensor, first: int = 0, start: torch.Tensor | None = None) -> torch.Tensor:
        """(U, N) priority histories -> (U, N + 1) AsynDM states: s_0 .. s_{N-1} by the schedule's
        recurrence (state i reached with priority history[:, i]), then 0. With `first` > 0, start: (U,)
        the states s_{first-1} already known, and only s_first .. (U, N + 1 - first) are computed."""
        n = int(history.shape[1])
        # The background's one row (k = 0 throughout): the linear track, the same every time it is asked for
        # (re-partitions that leave no pixel in the background still run its track).
        background = start is None and first == 0 and history.shape[0] == 1 and not bool(history.any())
        key = (n, history.device, self.num_train_timesteps, self.offset)
        if background and key in self._background_states:
            return self._background_states[key].clone()
        if start is None:
            start = torch.full((history.shape[0],), float(self.num_train_timesteps + self.offset),
                               device=history.device)
        states = self._state_rows_from(history, first, start)
        if background:
            self._background_states[key] = states.clone()
        return states

    def _state_rows_from(self, history: torch.Tensor, first: int, start: torch.Tensor) -> torch.Tensor:
        """_state_rows from known states `start` (U,) before column `first`."""
        n = int(history.shape[1])
        if self.schedule.table is None:
            return history_states(start, history, first=first, curve=self.schedule.curve, num_steps=n,
                                  num_train_timesteps=self.num_train_timesteps, target=float(self.offset))
        s = start
        keyed = (history > 0).any(dim=0).tolist()
        states = []
        for i in range(first, n):
            s = self._next_state(s, history[:, i], n - i, n, any_key=keyed[i])
            states.append(s)
        states.append(torch.zeros_like(s))
        return torch.stack(states, dim=1)

    def _numpy_state_rows(self, history: np.ndarray, first: int, start: np.ndarray) -> np.ndarray | None:
        """_state_rows_from on numpy rows, for the curves numpy_history_states runs (None for the others and for
        learned tables): a re-partition's rows come from checked ones, so they are not checked again."""
        curve = self.schedule.curve
        if self.schedule.table is not None or curve not in NUMPY_CURVES:
            return None
        return numpy_history_states(start, history.astype(start.dtype, copy=False), first, curve,
                                    n=int(history.shape[1]), t=self.num_train_timesteps, target=float(self.offset))

    def _pixel_next_states(self, num_steps: int) -> NextStates | None:
        """The state recurrence of _numpy_state_rows one column at a time, on the pixels' groups (pixel_steps.py), where
        this sampler runs there (pixel_steps on, distinct sigma calls, a numpy curve); else None."""
        curve = self.schedule.curve
        if not (self.pixel_steps and self.distinct_sigma_calls) or self.schedule.table is not None or (
                curve not in NUMPY_CURVES):
            return None
        t, target = self.num_train_timesteps, float(self.offset)
        constants: dict[np.dtype, tuple[np.floating, np.floating]] = {}  # the states' dtype -> (target, bend)

        def next_states(states: np.ndarray, k: np.ndarray, remaining: int) -> np.ndarray:
            kept = constants.get(states.dtype)
            if kept is None:
                kept = constants[states.dtype] = numpy_curve_constants(states.dtype, target, t=t, n=num_steps)
            tgt, bend = kept
            keyed = curve == "bin" and bool((k > 0).any())  # k = 0 adds an exact zero: the linear step
            return numpy_state_step(states, k * bend if keyed else None, remaining, tgt)
        return next_states

    def _to_sigma(self, model_wrap: Any, sigmas: torch.Tensor) -> tuple[_HostSigmas, bool]:
        """(state -> sigma for this run, KSampler's max_denoise for these sigmas). The function works on
        host (CPU) states: it is built from a CPU copy of the sigmas, read back once here."""
        ms = model_wrap.inner_model.model_sampling
        sigmas = to_host(sigmas)
        max_denoise = self.max_denoise(model_wrap, sigmas)
        sigma_top = float(ms.sigma_max) if self._starts_at_the_top(ms, sigmas, max_denoise) else float(sigmas[0])
        if math.isclose(sigma_top, float(sigmas[0]), rel_tol=1e-05):
            # The scheduler's first sigma is the model's largest (KSampler's max_denoise rule): the same noise
            # level, so key pixels wait there exactly (a sigma_max one float step above it would make their
            # samplers take a zero-length first step, which multistep ones divide by).
            sigma_top = float(sigmas[0])
        with host_maths():
            function = self._sigma_function(sigmas, ms, sigma_top)
        return _HostSigmas(function, sigmas), max_denoise

    def fixed_tracks(self, model_wrap: Any, sigmas: torch.Tensor, k_map: torch.Tensor) -> TrackSet:
        """The tracks this sampler runs for a fixed priority map (B, H, W) on these sigmas."""
        to_sigma, _ = self._to_sigma(model_wrap, sigmas)
        host_k = to_host(k_map, torch.float32)
        return self._tracks(host_k.expand(len(sigmas), *host_k.shape), sigmas, to_sigma)

    def _tracks(self, history: torch.Tensor, sigmas: torch.Tensor, to_sigma: _HostSigmas) -> TrackSet:
        """Tracks of a history (N or N + 1, B, H, W) of priorities on the host (the last map, for the
        preview, is not used)."""
        return tracks_from_host_history(history[:len(sigmas) - 1], sigmas, self._state_rows, to_sigma,
                                        to_sigma.host_carrier)

    def _run(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict, callback: Callable | None,
             noise: torch.Tensor, latent_image: torch.Tensor, denoise_mask: torch.Tensor | None, maps: StepMaps,
             observer: Any, fixed_k: torch.Tensor | None, *, record: bool,
             collect_attention: bool = False) -> Any:
        """One run of the sampler on every track, in lock step. fixed_k: the priority map (None: key words'
        dynamic masks). collect_attention: return the key words' attention summed over the model calls."""
        inner = model_wrap.inner_model
        ms = inner.model_sampling
        num_steps = len(sigmas) - 1
        b, _, h, w = noise.shape
        device = noise.device
        to_sigma, max_denoise = self._to_sigma(model_wrap, sigmas)
        base = self.stock_sampler()

        if fixed_k is not None:
            host_k = to_host(fixed_k, torch.float32)  # the priority map's one read, before the loop
        else:  # dynamic attention masks: before the first step every pixel follows the last-positioned item
            with host_maths():
                init = initial_item_masks(b, self.token_positions, (h, w))
                host_k = (init * self._k_vector(init.device).view(1, -1, 1, 1)).amax(dim=1)
        # history[i]: the priority map with which every pixel reaches its state i (i = 0 .. N; N is the
        # preview's), kept on the host: the tracks are computed from it there
        history = host_k.expand(num_steps + 1, *host_k.shape)
        tracks = self._tracks(history, sigmas, to_sigma)
        why = refusal(base.sampler_function, tracks)
        if why is not None:
            raise ValueError(f"asynchronous sampling cannot use {self.sampler_name}: {why}; choose another sampler")

        # Every pixel starts at its own sigma. The reference starts from the paper's x_T: unit noise in the
        # model's input scaling at every pixel (ComfyUI's max_denoise scaling).
        unit_start = max_denoise or self.reference

        def start(tr: TrackSet) -> torch.Tensor:
            if tr.count == 1:
                return ms.noise_scaling(sigmas[0], noise, latent_image, unit_start)
            return per_pixel(lambda sg, n, lat: ms.noise_scaling(sg, n, lat, unit_start), tr.sigma_map(0), noise,
                             latent_image)

        inpaint_noise = noise
        if denoise_mask is not None and base.inpaint_options.get("random", False):  # as KSAMPLER ("ddim")
            seed = extra_args.get("seed")
            generator = torch.manual_seed((seed if seed is not None else 41) + 1)
            inpaint_noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(device)
        observed = _ObservedModel(PixelModel(model_wrap, maps, latent_image, inpaint_noise, denoise_mask, sigmas),
                                  observer, collect_attention)
        retrack = None
        if fixed_k is None and not collect_attention:
            with host_maths():
                history = history.clone()  # re-read masks are written into it
            retrack = _DynamicMasks(self, history, observed, sigmas, to_sigma, (h, w))
        kind = self._map_kind(base, ms, noise, tracks)
        pixel_route = kind == "euler" and retrack is not None and tracks.sigmas.dtype in (torch.float32, torch.float64)
        next_states = self._pixel_next_states(num_steps) if pixel_route else None
        state_maps: list[torch.Tensor] | None = None
        try:
            if next_states is not None and retrack is not None:
                x, final_sigma, state_maps = run_on_pixels(tracks, retrack, next_states, to_sigma, extra_args,
                                                           callback, start, self.disable_pbar, observed)
            elif kind is not None:  # euler / euler_ancestral / dpmpp_2m: one element-wise update, no instance per track
                x, final_sigma = run_on_maps(kind, base, tracks, extra_args, callback, start, self.disable_pbar,
                                             observed, retrack, ms, self.distinct_sigma_calls)
            else:
                x, final_sigma = run_lockstep(base, model_wrap, tracks, extra_args, callback, start,
                                              self.disable_pbar, observed, retrack)
        finally:
            if observer is not None:
                observer.enabled = False
            maps.clear()
        self.model_calls = observed.calls
        if collect_attention:
            return observed.total
        if retrack is not None:
            tracks = retrack.tracks or tracks
        if record and self.record is not None:
            with host_maths():
                self.record.states = state_maps or [tracks.state_map(i) for i in range(num_steps)]
                if retrack is not None:
                    history = retrack.written()
                self.record.priorities = list(history[1:].unbind(0))
        if self.reference:  # the paper ends at t = 0 and returns x_0 in its own (variance-preserving) scaling
            return ms.calculate_input(sigmas[-1:].expand(b), x)
        return ms.inverse_noise_scaling(final_sigma, x)


class _HostSigmas:
    """A run's state -> sigma function, with the CPU copy of the run's sigmas it was built from (so
    that re-partitions do not read the device's sigmas again)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], host_carrier: torch.Tensor) -> None:
        self.function = function
        self.host_carrier = host_carrier

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return self.function(states)


class _ObservedModel:
    """The lock-step run's model: PixelModel, with the key words' attention observed at every call (the
    observer on for the call only) and ComfyUI's interrupt checked before it. The attention is scored
    when it is read (`last`, once per step by dynamic masks), not after every call: samplers that call
    the model more than once per step (heun, the SDE and multistage ones) would score each call."""

    def __init__(self, model: PixelModel, observer: Any, collect: bool) -> None:
        self.model = model
        self.observer = observer
        self.collect = collect
        self._last: torch.Tensor | None = None
        self._unscored = False  # the observer holds the latest call's q and k, not scored yet
        self.total: torch.Tensor | None = None  # summed over the calls (collect)

    @property
    def last(self) -> torch.Tensor | None:
        """The attention of the latest call (scored on the first read)."""
        if self._unscored:
            self._unscored = False
            self._last = self.observer.mean()
        return self._last

    @property
    def calls(self) -> int:
        return self.model.calls

    def __call__(self, x: torch.Tensor, sigma_map: torch.Tensor | None, carrier: torch.Tensor,
                 model_options: dict | None = None, seed: int | None = None,
                 table: CallTable | None = None) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.observer is None:
            return self.model(x, sigma_map, carrier, model_options, seed=seed, table=table)
        self.observer.enabled = True
        self.observer.reset()
        try:
            out = self.model(x, sigma_map, carrier, model_options, seed=seed, table=table)
        finally:
            self.observer.enabled = False
        self._unscored = True
        if self.collect:
            last = self.last
            if last is not None:
                self.total = last if self.total is None else self.total + last
        return out


class _DynamicMasks:
    """The paper's dynamic masks as a lock-step re-partition: the attention of the model call that
    begins step i decides the priorities with which every pixel reaches its states from i + 2 on (the
    states up to i + 1 are in use by then); the future is predicted with those priorities until the
    next reading. The call that begins step i + 1 still uses states up to i + 1 only, so it is queued
    first (`begin` starts the read of the new priorities, `finish` takes it once that call is
    queued): the one host read of a step is pipelined and never drains a GPU's launch queue.
    `finish` returns new tracks when some pixel's history changed (lockstep.py checks that no sigma
    already used moved)."""

    def __init__(self, sampler: AsynSampler, history: torch.Tensor, observed: _ObservedModel,
                 sigmas: torch.Tensor, to_sigma: _HostSigmas, size: tuple[int, int]) -> None:
        self.sampler = sampler
        self.history = history  # (N + 1, B, H, W) on the host, written by `written` (the readings kept till then)
        self.observed = observed
        self.sigmas = sigmas
        self.to_sigma = to_sigma
        self.size = size
        self.seen = 0
        self.tracks: TrackSet | None = None
        # every priority a pixel can take (0 and the items' k, as float32 like the maps), and each item's index among
        # them: the device's map holds every pixel's index (its level), which the host turns into priorities
        self.levels = np.unique(np.array([0.0, *sampler.schedule.k], dtype=np.float32))
        k = np.array(sampler.schedule.k, dtype=np.float32)
        self.item_level = torch.from_numpy(np.searchsorted(self.levels, k).astype(np.float32))  # (items,) on the CPU
        self._item_level_on: dict[torch.device, torch.Tensor] = {}  # the same, per device (uploaded once)
        # The latest prediction (every map from the last reading on is the one it wrote) as each pixel's level, and
        # the readings (first, level) still to be written into the history: a step compares levels only.
        found, level = levels_of(history[-1].numpy().reshape(-1), self.levels)
        self._level: np.ndarray | None = level if found is self.levels else None
        self._unwritten: list[tuple[int, np.ndarray]] = []

    def begin(self, begun: int) -> tuple[int, HostCopy] | None:
        """At a rendezvous (`begun` carrier steps begun): the priorities from the latest attention, on
        the device as every pixel's level (its index in `levels`), and their copy to the host started;
        None when there is nothing to re-read."""
        if begun <= self.seen:
            return None
        self.seen = begun
        first = begun + 1  # state (begun - 1) + 2
        observer = self.observed.observer
        if first >= self.history.shape[0] or observer is None:
            return None  # no map left that the reading could change
        attn = self.observed.last
        if attn is None:
            return None
        if attn.device not in self._item_level_on:
            self._item_level_on[attn.device] = to_device(self.item_level, attn.device)
        level_map = self.sampler._priorities_from_attention(attn, self.size, observer.grid, validate=False,
                                                            levels=self._item_level_on[attn.device])
        return first, HostCopy(level_map)

    def level_of(self, reading: tuple[int, HostCopy]) -> np.ndarray | None:
        """After the next model call was queued: every pixel's new level (flattened), or None when the reading
        predicts every pixel's priorities as they are. The reading is kept for the history (`written`)."""
        first, copy = reading
        level_map = copy.wait()
        with host_maths():
            level = level_map.numpy().astype(np.intp).reshape(-1)  # small whole numbers, exact in float32
            # Every reading writes its map to all later steps, so history[first:] is one map: the latest prediction.
            if self._level is not None and (level == self._level).all():
                return None  # the masks predicted every pixel's priorities as they are: same histories
            self._level = level
            self._unwritten.append((first, level))
        return level

    def finish(self, reading: tuple[int, HostCopy], tracks: TrackSet) -> TrackSet | None:
        """After the next model call was queued: the new partition, or None when it is unchanged."""
        first = reading[0]
        level = self.level_of(reading)
        if level is None or first >= len(self.sigmas) - 1:
            return None  # the same histories, or only the preview's last map changed
        new = retracked(tracks, first, None, self.sampler._state_rows, self.to_sigma, self.sigmas,
                        self.to_sigma.host_carrier, levels=self.levels, numpy_states=self.sampler._numpy_state_rows,
                        level=level)
        if new.same_partition(tracks):
            return None
        self.tracks = new
        return new

    def written(self) -> torch.Tensor:
        """The history (N + 1, B, H, W), every reading written: its priorities, from its first step on."""
        with host_maths():
            history = self.history.numpy()
            for first, level in self._unwritten:
                history[first:] = self.levels[level].reshape(history.shape[1:])
            self._unwritten = []
        return self.history
