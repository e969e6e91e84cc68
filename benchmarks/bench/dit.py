"""What the transformer families' rows (Flux, SD3) share: the case's inputs and the forward alone.

Their sampling rows have the same two variants, ksampler and fixed (two key items as masks, the
same masks and priorities as the UNet rows; key words are not supported on these families yet),
on a 16-channel latent. The forward alone is timed in four interleaved variants: the stock
forward, the pack's hooks installed without a map, the hooks with a two-timestep map (the
top-left quarter of the image tokens at the second timestep), and the naive per-token hooks
(bench/naive.py); then instrumented forwards give each hook piece's time per forward.

The profile is the same on every transformer family: the model's forward timed whole (minus the
hook pieces the family times inside it), the family's hook pieces, and the sampler's pieces.

A family module provides: ``conditioning(bench, batch, seed)``, ``install_hook_timers(stack, timer)``,
``MODEL_LABEL`` and ``PIECES`` (made by pieces()); for the forward alone also ``hook_classes()`` (the
pack's adapter class and the naive one), ``forward_kwargs(bench, cond, rows, device, dtype)``,
``HOOK_PIECES`` and ``TIMESTEPS``.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from types import ModuleType
from typing import Any

from . import measure
from .fixtures import PRIORITIES, Case, SamplingBench, patched, two_item_masks
from .measure import PieceTimer

VARIANTS = ("ksampler", "fixed")
VARIANT_TITLES = {"ksampler": "KSampler", "fixed": "async, fixed masks"}
FORWARD_VARIANTS = ("stock", "hooks, no map", "per-token hooks", "naive per-token hooks")
LATENT_CHANNELS = 16
PATCH = 2


class TokenBench(SamplingBench):
    """A transformer case: the family's text conditioning (text_tokens long), a 16-channel latent,
    the fixed two-item schedule."""

    variants = VARIANTS
    family: ModuleType

    def __init__(self, patcher: Any, case: Case, *, seed: int = 0, cfg: float = 1.0, sampler: str = "euler",
                 scheduler: str = "simple", text_tokens: int = 128) -> None:
        import comfy.sample
        import torch

        super().__init__(patcher, case, seed=seed, cfg=cfg, sampler=sampler, scheduler=scheduler)
        self.text_tokens = text_tokens
        self.positive = self.family.conditioning(self, 1, seed=1)
        self.negative = self.family.conditioning(self, 1, seed=2)
        self.latent = torch.zeros(self.latent_shape())
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        self.schedules = self.key_schedules()

    def latent_shape(self) -> tuple[int, ...]:
        return (self.case.batch, LATENT_CHANNELS, self.case.height, self.case.width)

    def key_schedules(self) -> dict[str, Any]:
        """The schedule of each asynchronous variant (None: no key items)."""
        from asyndm.schedule_spec import AsynSchedule

        return {"fixed": AsynSchedule(curve="bin", k=PRIORITIES, mask_source="masks",
                                      masks=two_item_masks(self.case.height, self.case.width))}

    def _prepare(self, variant: str, stack: contextlib.ExitStack) -> Any:
        if variant not in self.schedules:
            raise ValueError(f"unknown variant {variant!r} for {type(self).__name__}: use one of "
                             f"{', '.join(self.variants)}")
        return self.schedules[variant]

    @property
    def rows(self) -> int:
        """The rows of one model call: the batch, twice under cfg > 1 (cfg 1 skips the uncond rows)."""
        return self.case.batch * (2 if self.cfg > 1.0 else 1)


def pieces(model: tuple[str, str], hooks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A family's profile pieces, (label, what) in report order: its model compute, the per-step maps,
    its hook pieces, then the sampler's (its set-up and loop last), then ComfyUI's own work around the model."""
    return [model, *measure.STEP_PIECES, *hooks, *measure.SAMPLER_PIECES, *measure.LOOP_PIECES, *measure.STOCK_PIECES]


def install_profile(bench: TokenBench, stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """The family's timing wrappers for one run (restored when stack closes), then the sampler's."""
    dm = bench.patcher.model.diffusion_model
    stack.enter_context(patched(dm, "forward", timer.wrap(bench.family.MODEL_LABEL, dm.forward)))
    bench.family.install_hook_timers(stack, timer)
    measure.wrap_sampler_pieces(stack, timer)


def profile_variant(bench: TokenBench, variant: str, device: str, runs: int = 1) -> dict[str, float]:
    """ms per run of each piece (exclusive), the run's total, and the rest; plus the preview strip."""
    return measure.profile_runs(bench, variant, device, runs, lambda stack, timer: install_profile(bench, stack, timer),
                                bench.family.PIECES)


# ------------------------------------------------------------------------------------------------
# The transformer forward alone


def forward_inputs(bench: TokenBench) -> tuple[Any, Any, dict[str, Any], Any, int]:
    """x, t, kwargs and the two-timestep map of the forward the sampler makes (its rows)."""
    import torch

    family = bench.family
    dm = bench.patcher.model.diffusion_model
    dev = next(dm.parameters()).device
    dtype = bench.patcher.model.get_dtype()
    rows, h, w = bench.rows, bench.case.height, bench.case.width
    kwargs = family.forward_kwargs(bench, family.conditioning(bench, rows, seed=1), rows, dev, dtype)
    gen = torch.Generator().manual_seed(bench.seed)
    x = torch.randn(rows, LATENT_CHANNELS, h, w, generator=gen).to(dev, dtype)
    low, high = family.TIMESTEPS
    t = torch.full((rows,), low, device=dev)
    t_map = torch.full((rows, h, w), low, device=dev)
    t_map[:, : h // 2, : w // 2] = high
    return x, t, kwargs, t_map, rows


def forward_times(bench: TokenBench, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per transformer forward of the sampler's rows, the four variants interleaved. Hooks
    are installed and removed outside the timed call, as a sampling run installs them once."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([bench.patcher])
    dm = bench.patcher.model.diffusion_model
    x, t, kwargs, t_map, _ = forward_inputs(bench)
    pack, naive = bench.family.hook_classes()
    hook_classes = {"hooks, no map": pack, "per-token hooks": pack, "naive per-token hooks": naive}
    return measure.interleaved_forward_times(dm, x, t, kwargs, t_map, FORWARD_VARIANTS, hook_classes, repeats, device)


def forward_pieces(bench: TokenBench, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """ms per forward of each hook piece (exclusive), median over `repeats` instrumented forwards
    after one warm-up, for the pack's hooks and the naive ones, with the map of forward_times."""
    import torch

    family = bench.family
    dm = bench.patcher.model.diffusion_model
    x, t, kwargs, t_map, _ = forward_inputs(bench)
    out: dict[str, dict[str, float]] = {}
    for v, cls in zip(("per-token hooks", "naive per-token hooks"), family.hook_classes(), strict=True):
        per_piece: dict[str, list[float]] = defaultdict(list)
        with torch.no_grad():
            for rep in range(max(1, repeats) + 1):  # the first forward is a warm-up
                timer = PieceTimer(device)
                with contextlib.ExitStack() as stack:
                    family.install_hook_timers(stack, timer)
                    hooks = stack.enter_context(cls(dm))
                    hooks.set_map(t_map)
                    dm(x, t, **kwargs)
                    hooks.set_map(None)
                if rep == 0:
                    continue
                for label in family.HOOK_PIECES:
                    per_piece[label].append(1000.0 * timer.exclusive.get(label, 0.0))
                per_piece["total hooks"].append(1000.0 * sum(timer.exclusive.get(k, 0.0) for k in family.HOOK_PIECES))
        out[v] = {k: float(statistics.median(xs)) for k, xs in per_piece.items() if any(x > 0 for x in xs)}
    return out


def forward_overhead(bench: TokenBench, repeats: int, device: str) -> dict[str, Any]:
    """The run's JSON entries for the forward alone: times per variant, hook pieces, shapes."""
    return {"forward": forward_times(bench, repeats, device), "forward_pieces": forward_pieces(bench, repeats, device),
            "forward_shape": {"rows": bench.rows,
                              "image_tokens": -(-bench.case.height // PATCH) * -(-bench.case.width // PATCH),
                              "text_tokens": bench.text_tokens}}
