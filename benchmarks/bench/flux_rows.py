"""The Flux rows (dev with the guidance embedding, schnell without): sampling and the forward alone.

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    fixed     comfy.sample.sample_custom with the pack's AsynSampler and two fixed key items as
              masks (what Attention Mask to Timestep Map gives it; key words are not supported on
              Flux yet), the same masks and priorities as the UNet rows

The per-token modulation's own cost is measured on the transformer forward alone
(flux_forward_overhead): the stock forward, the pack's hooks installed without a map, the hooks
with a two-timestep map, and the naive per-token hooks (bench/naive.py); then instrumented
forwards give each hook piece's time per forward (the time-vector table build among them).
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from typing import Any

from . import measure
from .fixtures import PRIORITIES, Case, SamplingBench, model_factory, patched, two_item_masks
from .measure import PieceTimer, timed
from .naive import naive_flux_hooks_class

FAMILY = "flux"
VARIANTS = ("ksampler", "fixed")
VARIANT_TITLES = {"ksampler": "KSampler", "fixed": "async, fixed masks"}
GUIDANCE = 3.5  # FluxGuidance's default; schnell has no guidance embedding
LATENT_CHANNELS = 16


class FluxBench(SamplingBench):
    """A Flux case: T5-like context and CLIP-like pooled vector (model_factory widths), 16-channel latent."""

    variants = VARIANTS

    def __init__(self, patcher: Any, case: Case, *, seed: int = 0, cfg: float = 1.0, sampler: str = "euler",
                 scheduler: str = "simple", text_tokens: int = 128) -> None:
        import comfy.sample
        import torch

        from asyndm.schedule_spec import AsynSchedule

        super().__init__(patcher, case, seed=seed, cfg=cfg, sampler=sampler, scheduler=scheduler)
        mf = model_factory()
        self.guidance = GUIDANCE if has_guidance(patcher) else None
        self.text_tokens = text_tokens
        self.positive = mf.make_flux_conditioning(tokens=text_tokens, seed=1, guidance=self.guidance)
        self.negative = mf.make_flux_conditioning(tokens=text_tokens, seed=2, guidance=self.guidance)
        self.latent = torch.zeros(case.batch, LATENT_CHANNELS, case.height, case.width)
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        self.schedules = {"fixed": AsynSchedule(curve="bin", k=PRIORITIES, mask_source="masks",
                                                masks=two_item_masks(case.height, case.width))}

    def _prepare(self, variant: str, stack: contextlib.ExitStack) -> Any:
        if variant != "fixed":
            raise ValueError(f"unknown variant {variant!r} for Flux: use one of {', '.join(VARIANTS)}")
        return self.schedules["fixed"]


def make_bench(patcher: Any, case: Case, **kwargs: Any) -> FluxBench:
    return FluxBench(patcher, case, **kwargs)


def has_guidance(patcher: Any) -> bool:
    return bool(getattr(patcher.model.diffusion_model.params, "guidance_embed", False))


def describe(patcher: Any) -> dict[str, Any]:
    dm = patcher.model.diffusion_model
    p = dm.params
    return {
        "family": FAMILY,
        "class": f"{type(patcher.model).__name__} ({type(dm).__module__}.{type(dm).__name__})",
        "config": type(patcher.model.model_config).__name__,
        "params_m": round(sum(q.numel() for q in dm.parameters()) / 1e6, 1),
        "hidden_size": p.hidden_size,
        "num_heads": p.num_heads,
        "head_dim": p.hidden_size // p.num_heads,
        "mlp_ratio": p.mlp_ratio,
        "double_blocks": p.depth,
        "single_blocks": p.depth_single_blocks,
        "context_in_dim": p.context_in_dim,
        "vec_in_dim": p.vec_in_dim,
        "guidance_embed": bool(p.guidance_embed),
        "patch_size": p.patch_size,
        "shift": float(getattr(patcher.model.model_sampling, "shift", float("nan"))),
    }


def model_line(name: str, info: dict[str, Any]) -> str:
    guidance = f"guidance embedding (guidance {GUIDANCE})" if info["guidance_embed"] else "no guidance embedding"
    return (f"Model `{name}`: {info['class']}, config {info['config']} (shift {info['shift']:g}), "
            f"{info['params_m']}M transformer parameters, hidden {info['hidden_size']} ({info['num_heads']} heads of "
            f"{info['head_dim']}), MLP ratio {info['mlp_ratio']:g}, {info['double_blocks']} double + "
            f"{info['single_blocks']} single blocks, text context {info['context_in_dim']} wide, pooled "
            f"{info['vec_in_dim']}, {guidance}, {info['patch_size']}x{info['patch_size']} patches.")


# ------------------------------------------------------------------------------------------------
# Profile


FLUX_LABEL = "Flux compute (without the pack's hooks)"
MODEL_LABEL = FLUX_LABEL
NOT_PACK = (FLUX_LABEL,)
STOCK_MODULE_LABEL = None
HOOKS_PRE_POST = "hooks: forward pre/post, capture"
TABLE_LABEL = "hooks: time-vector table (U rows)"
MODULATION_LABEL = "hooks: block modulation on the U rows (SiLU + Linear)"
GATHER_LABEL = "hooks: per-token gather"
POST_LABEL = "hooks: modulation hooks (final layer on the U rows, concat, split)"
NAIVE_TABLE_LABEL = "naive: time MLP on every token"
PIECES = [  # (label, what) in report order; the pieces are exclusive of each other
    (FLUX_LABEL, "diffusion_model.forward minus the hooks that run inside it (stock modulation included)"),
    (measure.STEP_MAPS_LABEL, "distinct model timesteps of the distinct sigmas, per step"),
    (measure.SET_MAP_LABEL, "TimeHooks.set_map"),
    (HOOKS_PRE_POST, "PerTokenTimesteps._model_pre/_model_post/_first_block_pre and the time/guidance/vector captures"),
    (TABLE_LABEL, "PerTokenTimesteps._table: time_in on the U distinct timesteps, plus guidance and pooled terms"),
    (MODULATION_LABEL, "PerTokenTimesteps._modulated minus the table and the gather: every block's Linear on U rows"),
    (GATHER_LABEL, "PerTokenTimesteps._per_token: one (B', L, C) gather per modulation layer"),
    (POST_LABEL, "the rest of the img_mod / modulation / final-layer hooks"),
    (NAIVE_TABLE_LABEL, "naive baseline only: time_in on B' x L rows"),
    (measure.WRAPPER_LABEL, "PerPixelApplyModel.__call__ minus its children"),
    (measure.PER_PIXEL_LABEL, "model_wrapper.per_pixel"),
    (measure.NOISE_SCALING_LABEL, "sampler.per_pixel (once per run)"),
    (measure.GROUPING_LABEL, "PixelTracks.from_map / pair_tracks / full"),
    (measure.NEXT_STATE_LABEL, "AsynSampler._advance/_next_state on the distinct (state, k) pairs"),
    (measure.STATE_SIGMA_LABEL, "SigmaInterpolator on the distinct states"),
    (measure.STEP_MATH_LABEL, "steps.ancestral_step / dpmpp_2m_step"),
]
HOOK_PIECES = (HOOKS_PRE_POST, TABLE_LABEL, MODULATION_LABEL, GATHER_LABEL, POST_LABEL, NAIVE_TABLE_LABEL)
PACK_SUM_TITLE = ("**sum of the pack's pieces** (rows between the Flux compute and the rest; % of the KSampler "
                  "total)")


def install_hook_timers(stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """Time the Flux hooks' pieces (the pack's class and the naive one) while stack is open."""
    from asyndm.comfy_adapter.families import flux as flux_time

    for cls in (flux_time.PerTokenTimesteps, naive_flux_hooks_class()):
        for attr, label in (("_model_pre", HOOKS_PRE_POST), ("_model_post", HOOKS_PRE_POST),
                            ("_first_block_pre", HOOKS_PRE_POST), ("_modulated", MODULATION_LABEL),
                            ("_per_token", GATHER_LABEL),
                            ("_table", NAIVE_TABLE_LABEL if cls is not flux_time.PerTokenTimesteps else TABLE_LABEL)):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap(label, cls.__dict__[attr])))
        for attr, label in (("_capture", HOOKS_PRE_POST), ("_double_post", POST_LABEL), ("_single_post", POST_LABEL),
                            ("_final_post", POST_LABEL)):
            if attr in cls.__dict__:
                stack.enter_context(patched(cls, attr, timer.wrap_factory(label, cls.__dict__[attr])))


def install_profile(bench: FluxBench, stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """Flux's timing wrappers for one run (restored when stack closes), then the sampler's."""
    dm = bench.patcher.model.diffusion_model
    stack.enter_context(patched(dm, "forward", timer.wrap(FLUX_LABEL, dm.forward)))
    install_hook_timers(stack, timer)
    measure.wrap_sampler_pieces(stack, timer)


def profile_variant(bench: FluxBench, variant: str, device: str, runs: int = 1) -> dict[str, float]:
    """ms per run of each piece (exclusive), the run's total, and the rest; plus the preview strip."""
    return measure.profile_runs(bench, variant, device, runs, lambda stack, timer: install_profile(bench, stack, timer),
                                PIECES)


# ------------------------------------------------------------------------------------------------
# The transformer forward alone: what the per-token modulation costs inside the model


FORWARD_VARIANTS = ("stock", "hooks, no map", "per-token hooks", "naive per-token hooks")
TIMESTEPS = (0.5, 0.7)  # Flux's model timestep is sigma; the key quarter sits at the second


def forward_inputs(bench: FluxBench) -> tuple[Any, Any, dict[str, Any], Any, int]:
    """x, t, kwargs and the two-timestep map of the forward the sampler makes (its CFG rows)."""
    import torch

    dm = bench.patcher.model.diffusion_model
    dev = next(dm.parameters()).device
    dtype = bench.patcher.model.get_dtype()
    case = bench.case
    rows = case.batch * (2 if bench.cfg > 1.0 else 1)  # cfg 1: ComfyUI skips the uncond rows
    cond = model_factory().make_flux_conditioning(rows, bench.text_tokens, seed=1, guidance=bench.guidance)
    context, extra = cond[0]
    kwargs: dict[str, Any] = {"context": context.to(dev, dtype), "y": extra["pooled_output"].to(dev, dtype)}
    if bench.guidance is not None:
        kwargs["guidance"] = torch.full((rows,), float(bench.guidance), device=dev)
    gen = torch.Generator().manual_seed(bench.seed)
    h, w = case.height, case.width
    x = torch.randn(rows, LATENT_CHANNELS, h, w, generator=gen).to(dev, dtype)
    t = torch.full((rows,), TIMESTEPS[0], device=dev)
    t_map = torch.full((rows, h, w), TIMESTEPS[0], device=dev)
    t_map[:, : h // 2, : w // 2] = TIMESTEPS[1]
    return x, t, kwargs, t_map, rows


def flux_forward_overhead(bench: FluxBench, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per transformer forward of the sampler's rows, interleaved: no hooks; the pack's hooks
    installed but no map (pass-through); the pack's hooks with a two-timestep map (U = 2, a quarter
    of the image tokens at another timestep); the naive per-token hooks with the same map. Hooks are
    installed and removed outside the timed call, as a sampling run installs them once."""
    import comfy.model_management
    import torch

    from asyndm.comfy_adapter.families.flux import PerTokenTimesteps

    comfy.model_management.load_models_gpu([bench.patcher])
    dm = bench.patcher.model.diffusion_model
    x, t, kwargs, t_map, _ = forward_inputs(bench)
    hook_classes = {"hooks, no map": PerTokenTimesteps, "per-token hooks": PerTokenTimesteps,
                    "naive per-token hooks": naive_flux_hooks_class()}
    times: dict[str, list[float]] = {v: [] for v in FORWARD_VARIANTS}
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round is a warm-up
            for v in FORWARD_VARIANTS if rep % 2 == 0 else FORWARD_VARIANTS[::-1]:
                with contextlib.ExitStack() as stack:
                    if v != "stock":
                        hooks = stack.enter_context(hook_classes[v](dm))
                        if v != "hooks, no map":
                            hooks.set_map(t_map)
                    dt, _ = timed(lambda: dm(x, t, **kwargs), device)
                    if v not in ("stock", "hooks, no map"):
                        hooks.set_map(None)
                if rep > 0:
                    times[v].append(dt)
    return times


def flux_forward_pieces(bench: FluxBench, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """ms per forward of each hook piece (exclusive), median over `repeats` instrumented forwards,
    for the pack's hooks and the naive ones, with the same map as flux_forward_overhead."""
    import torch

    from asyndm.comfy_adapter.families.flux import PerTokenTimesteps

    dm = bench.patcher.model.diffusion_model
    x, t, kwargs, t_map, _ = forward_inputs(bench)
    out: dict[str, dict[str, float]] = {}
    for v, cls in (("per-token hooks", PerTokenTimesteps), ("naive per-token hooks", naive_flux_hooks_class())):
        per_piece: dict[str, list[float]] = defaultdict(list)
        with torch.no_grad():
            for rep in range(max(1, repeats) + 1):  # the first forward is a warm-up
                timer = PieceTimer(device)
                with contextlib.ExitStack() as stack:
                    install_hook_timers(stack, timer)
                    hooks = stack.enter_context(cls(dm))
                    hooks.set_map(t_map)
                    dm(x, t, **kwargs)
                    hooks.set_map(None)
                if rep == 0:
                    continue
                for label in HOOK_PIECES:
                    per_piece[label].append(1000.0 * timer.exclusive.get(label, 0.0))
                per_piece["total hooks"].append(1000.0 * sum(timer.exclusive.get(k, 0.0) for k in HOOK_PIECES))
        out[v] = {k: float(statistics.median(xs)) for k, xs in per_piece.items() if any(x > 0 for x in xs)}
    return out


def forward_overhead(bench: FluxBench, repeats: int, device: str) -> dict[str, Any]:
    """The run's JSON entries for the forward alone: times per variant, hook pieces, rows."""
    times = flux_forward_overhead(bench, repeats, device)
    pieces = flux_forward_pieces(bench, repeats, device)
    rows = bench.case.batch * (2 if bench.cfg > 1.0 else 1)
    return {"forward": times, "forward_pieces": pieces,
            "forward_shape": {"rows": rows, "image_tokens": -(-bench.case.height // 2) * -(-bench.case.width // 2),
                              "text_tokens": bench.text_tokens}}
