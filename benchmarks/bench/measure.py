"""Measuring: wall time, peak memory, and the piece timer with the sampler-side pieces every family shares."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .fixtures import CLI_SCRIPT, REPO_ROOT, patched

MEMORY_TAG = "ASYNDM_BENCH_MEMORY "


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def interleaved_forward_times(dm: Any, x: Any, t: Any, kwargs: dict, t_map: Any, variants: list[str],
                              hook_classes: dict[str, Any], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per forward of each variant, interleaved (order reversed every other round; round 0 is a
    warm-up): "stock" without hooks, "hooks, no map" with the hooks installed and no map (pass-through),
    every other variant with its hooks and t_map. Hooks go in and out outside the timed call, as a
    sampling run installs them once for all its steps."""
    import torch

    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for v in variants if rep % 2 == 0 else variants[::-1]:
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


# ------------------------------------------------------------------------------------------------
# Memory


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(bench: Any, variant: str, device: str) -> dict[str, Any]:
    """Peak memory of one run of `variant` in this process: GPU allocator peak, or peak RSS."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        bench.run(variant)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "cuda max_memory_allocated", "peak_mib": peak / 2**20, "delta_mib": (peak - base) / 2**20}
    import resource

    base = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    bench.run(variant)
    hwm = _proc_status_kib("VmHWM") if reset else None
    if hwm is None:  # no /proc: the process's lifetime peak (fine in a fresh subprocess)
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kind = "ru_maxrss"
    else:
        kind = "VmHWM"
    base = base or 0
    return {"kind": f"peak RSS ({kind})", "peak_mib": hwm / 1024, "delta_mib": (hwm - base) / 1024}


def measure_memory_subprocess(spec: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """Run one variant in a fresh interpreter (benchmarks/bench_sampling.py --memory-child SPEC)."""
    cmd = [sys.executable, str(CLI_SCRIPT), "--memory-child", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG) :])
    raise RuntimeError(f"memory subprocess failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------------
# Profile: perf_counter around the pack's pieces


class PieceTimer:
    """Inclusive and exclusive (children subtracted) time per label of wrapped callables."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn, timed under label. The wrapper's own work lands in the pieces it wraps and in their callers, so it is
        kept small: the timer's state bound to locals once, and on the CPU no device-sync call."""
        exclusive, calls, stack, clock = self.exclusive, self.calls, self._stack, time.perf_counter
        device = self.device
        synced = device.startswith("cuda")

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            if synced:
                _sync(device)
            t0 = clock()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                if synced:
                    _sync(device)
                dt = clock() - t0
                exclusive[label] += dt - stack.pop()
                calls[label] += 1
                if stack:
                    stack[-1] += dt

        return timed_call

    def wrap_factory(self, label: str, factory: Callable[..., Any]) -> Callable[..., Any]:
        """A method that makes a hook (``self._emb_pre(i)``): the hooks it makes are timed under label."""
        def make(obj: Any, *args: Any) -> Any:
            return self.wrap(label, factory(obj, *args))

        return make


# The sampler-side pieces: the same on every family (labels shared by the families' piece lists).
SET_MAP_LABEL = "set_map"
STEP_MAPS_LABEL = "StepMaps.set + model timesteps"
WRAPPER_LABEL = "apply-model wrapper (rescale, rows, t map)"
PER_PIXEL_LABEL = "per-pixel calculate_input/denoised"
NOISE_SCALING_LABEL = "per-pixel noise_scaling"
GROUPING_LABEL = "schedule: track grouping"
NEXT_STATE_LABEL = "schedule: next state"
STATE_SIGMA_LABEL = "schedule: state to sigma"
STEP_MATH_LABEL = "lock step: the samplers' own steps per track + hand-offs"  # also the map steps (euler family)
OBSERVER_LABEL = "attention observer (per-step mask capture)"
ITEM_MASKS_LABEL = "item masks from attention"
OTHER_LABEL = "rest (ComfyUI sampling, CFG, conds, setup)"
PREVIEW_LABEL = "node extra: timestep preview strip (after sampling)"
STOCK_APPLY_LABEL = "ComfyUI's apply_model around the model (stock: input scaling, conds, output)"
STOCK_GUIDER_LABEL = "ComfyUI's CFG guider per model call (stock: cond batches, cfg)"
SAMPLER_LOOP_LABEL = "sampler set-up and loop (KSampler: its k-diffusion sampler; pack: AsynSampler.sample)"
# ComfyUI's own per-call work, the same in every variant and never counted as the pack's. A KSampler run
# calls it from its sampler, the pack from its sampler and wrapper: timed apart, so the pack's pieces
# that call it (the apply-model wrapper, the sampler) do not take it in. Then the sampler itself, which
# both runs have: the pack's work is what the variant's costs over the KSampler run's.
STOCK_PIECES = [
    (STOCK_GUIDER_LABEL, "comfy.samplers.CFGGuider.predict_noise minus the model call"),
    (STOCK_APPLY_LABEL, "comfy.model_base.BaseModel._apply_model minus the diffusion model's forward"),
]
LOOP_PIECES = [
    (SAMPLER_LOOP_LABEL, "KSAMPLER.sample / AsynSampler.sample minus everything timed inside: set-up, the step "
                         "loop, the per-call glue; the pack's counts where it exceeds the KSampler run's"),
]
STOCK_LABELS = frozenset(label for label, _ in STOCK_PIECES)
OVER_KSAMPLER_LABELS = frozenset(label for label, _ in LOOP_PIECES)
# (label, what) of the sampler-side pieces in the transformer families' report order: the per-step
# maps before the family's hook pieces, the rest after them (bench/dit.py pieces()).
STEP_PIECES = [
    (STEP_MAPS_LABEL, "distinct model timesteps of the distinct sigmas, per step (with dynamic masks on euler: each "
                      "call's sigma map and table, pixel_steps._call)"),
    (SET_MAP_LABEL, "TimeHooks.set_map"),
]
SAMPLER_PIECES = [
    (WRAPPER_LABEL, "PerPixelApplyModel.__call__ minus its children"),
    (PER_PIXEL_LABEL, "model_wrapper.per_pixel"),
    (NOISE_SCALING_LABEL, "sampler.per_pixel (once per run)"),
    (GROUPING_LABEL, "track_model.tracks_from_host_history / retracked, dynamic masks' begin / finish / level_of, "
                     "lockstep compose, map_steps tables, pixel_steps' group splits"),
    (NEXT_STATE_LABEL, "AsynSampler._state_rows / _next_state on the distinct priority histories"),
    (STATE_SIGMA_LABEL, "SigmaInterpolator on the tracks' states"),
    (STEP_MATH_LABEL, "lockstep _Instance.resume/start (ComfyUI's sampler between model calls), or "
                      "map_steps.euler_update / dpmpp_2m_update (euler, euler_ancestral, dpmpp_2m on sigma maps; "
                      "pixel_steps' euler step)"),
]


def wrap_sampler_pieces(stack: contextlib.ExitStack, timer: PieceTimer) -> None:
    """Time the pack's sampler-side pieces for one run (restored when stack closes)."""
    import comfy.model_base
    import comfy.samplers

    from asyndm import sigma_map
    from asyndm.comfy_adapter import attention, lockstep, map_steps, model_wrapper, pixel_steps, track_model
    from asyndm.comfy_adapter import sampler as asyn_sampler
    from asyndm.comfy_adapter.families import base

    bm = comfy.model_base.BaseModel
    stack.enter_context(patched(bm, "_apply_model", timer.wrap(STOCK_APPLY_LABEL, bm.__dict__["_apply_model"])))
    guider = comfy.samplers.CFGGuider
    stack.enter_context(patched(guider, "predict_noise", timer.wrap(STOCK_GUIDER_LABEL, guider.__dict__["predict_noise"])))
    for cls in (comfy.samplers.KSAMPLER, asyn_sampler.AsynSampler):
        stack.enter_context(patched(cls, "sample", timer.wrap(SAMPLER_LOOP_LABEL, cls.__dict__["sample"])))
    hooks = base.TimeHooks  # every family's set_map lives in the shared base
    stack.enter_context(patched(hooks, "set_map", timer.wrap(SET_MAP_LABEL, hooks.__dict__["set_map"])))
    sm = model_wrapper.StepMaps
    stack.enter_context(patched(sm, "set", timer.wrap(STEP_MAPS_LABEL, sm.__dict__["set"])))
    stack.enter_context(patched(track_model, "model_timesteps", timer.wrap(STEP_MAPS_LABEL,
                                                                           track_model.model_timesteps)))
    pam = model_wrapper.PerPixelApplyModel
    stack.enter_context(patched(pam, "__call__", timer.wrap(WRAPPER_LABEL, pam.__dict__["__call__"])))
    stack.enter_context(patched(model_wrapper, "per_pixel", timer.wrap(PER_PIXEL_LABEL, model_wrapper.per_pixel)))
    stack.enter_context(patched(asyn_sampler, "per_pixel", timer.wrap(NOISE_SCALING_LABEL, asyn_sampler.per_pixel)))
    stack.enter_context(patched(asyn_sampler, "tracks_from_host_history", timer.wrap(
        GROUPING_LABEL, asyn_sampler.tracks_from_host_history)))
    stack.enter_context(patched(asyn_sampler, "retracked", timer.wrap(GROUPING_LABEL, asyn_sampler.retracked)))
    dyn = asyn_sampler._DynamicMasks  # dynamic masks' per-step bookkeeping (the read, the comparison, the history)
    for attr in ("begin", "finish", "level_of"):
        stack.enter_context(patched(dyn, attr, timer.wrap(GROUPING_LABEL, dyn.__dict__[attr])))
    groups = pixel_steps._Groups  # euler with dynamic masks: the pixels' groups split by a reading, each call's maps
    stack.enter_context(patched(groups, "split", timer.wrap(GROUPING_LABEL, groups.__dict__["split"])))
    stack.enter_context(patched(pixel_steps, "_call", timer.wrap(STEP_MAPS_LABEL, pixel_steps._call)))
    stack.enter_context(patched(lockstep, "_compose", timer.wrap(GROUPING_LABEL, lockstep._compose)))
    tables = map_steps._Tables
    stack.enter_context(patched(tables, "__init__", timer.wrap(GROUPING_LABEL, tables.__dict__["__init__"])))
    stack.enter_context(patched(map_steps, "euler_update", timer.wrap(STEP_MATH_LABEL, map_steps.euler_update)))
    stack.enter_context(patched(pixel_steps, "euler_step", timer.wrap(STEP_MATH_LABEL, pixel_steps.euler_step)))
    stack.enter_context(patched(map_steps, "dpmpp_2m_update", timer.wrap(STEP_MATH_LABEL, map_steps.dpmpp_2m_update)))
    stack.enter_context(patched(map_steps, "dpmpp_2m_tables", timer.wrap(GROUPING_LABEL, map_steps.dpmpp_2m_tables)))
    stack.enter_context(patched(map_steps, "call_sigmas", timer.wrap(STEP_MAPS_LABEL, map_steps.call_sigmas)))
    interp = sigma_map.SigmaInterpolator
    stack.enter_context(patched(interp, "__call__", timer.wrap(STATE_SIGMA_LABEL, interp.__dict__["__call__"])))
    ao = attention.AttentionObserver
    # the patch, keeping a layer's q and k (or, on ComfyUI's sub-quadratic attention, its own attention's column
    # averages: the attention itself is the model's, timed apart by the UNet's rows), and scoring them
    for attr in ("__call__", "_score", "_own_sub_quad", "mean"):
        stack.enter_context(patched(ao, attr, timer.wrap(OBSERVER_LABEL, ao.__dict__[attr])))
    asn = asyn_sampler.AsynSampler
    for attr, label in (("_priorities_from_attention", ITEM_MASKS_LABEL), ("_next_state", NEXT_STATE_LABEL),
                        ("_state_rows", NEXT_STATE_LABEL)):
        stack.enter_context(patched(asn, attr, timer.wrap(label, asn.__dict__[attr])))
    inst = lockstep._Instance
    for attr in ("start", "resume"):
        stack.enter_context(patched(inst, attr, timer.wrap(STEP_MATH_LABEL, inst.__dict__[attr])))


def profile_runs(bench: Any, variant: str, device: str, runs: int,
                 install: Callable[[contextlib.ExitStack, PieceTimer], None],
                 pieces: list[tuple[str, str]]) -> dict[str, float]:
    """ms per run of each piece (exclusive), the run's total, and the rest; plus the preview strip.

    install(stack, timer) puts the family's and the sampler's timing wrappers in place for one run."""
    from asyndm.preview import timestep_strip

    totals: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        timer = PieceTimer(device)
        with contextlib.ExitStack() as stack:
            install(stack, timer)
            dt, _ = timed(lambda: bench.run(variant), device)
        totals["total"] += dt
        for label, value in timer.exclusive.items():
            totals[label] += value
        if variant != "ksampler" and bench.last_sampler is not None and bench.last_sampler.record is not None:
            rec = bench.last_sampler.record
            t0 = time.perf_counter()
            timestep_strip(rec.states, rec.priorities, start_value=float(rec.num_train_timesteps + rec.offset))
            totals[PREVIEW_LABEL] += time.perf_counter() - t0
    out = {k: 1000.0 * v / runs for k, v in totals.items()}
    known = sum(v for k, v in out.items() if k in dict(pieces))
    out[OTHER_LABEL] = out["total"] - known
    return out


def dispatch_per_step(make_bench: Callable[[Any], Any], case: Any, variants: list[str]) -> dict[str, dict[str, float]]:
    """Aten ops and host syncs per step of each variant (dispatch_count.py): the slope between a run
    of half the case's steps and one of all of them, so set-up cancels. 'extra_ops' is beyond the
    KSampler's ops per step; 'pack_syncs' counts only the pack's own host reads; 'pipelined_reads' the
    dynamic masks' reads that wait only after the next model call was queued (not syncs)."""
    from .dispatch_count import count_run, per_step
    from .fixtures import Case

    long_steps = max(case.steps, 2)
    short_steps = max(1, long_steps // 2)
    out: dict[str, dict[str, float]] = {}
    for v in variants:
        counts = []
        for steps in (short_steps, long_steps):
            bench = make_bench(Case(case.height, case.width, case.batch, steps))
            count, _ = count_run(lambda bench=bench, v=v: bench.run(v))
            counts.append(count)
        slope = per_step(counts[0], counts[1], long_steps - short_steps)
        out[v] = {"ops": slope["ops"], "syncs": slope["syncs"], "pack_syncs": slope["pack_syncs"],
                  "pipelined_reads": slope["pipelined_reads"], "early_waits": slope["early_waits"],
                  "host_violations": slope["host_violations"]}
    base = out.get("ksampler", {}).get("ops")
    for v in out:
        out[v]["extra_ops"] = out[v]["ops"] - base if base is not None else float("nan")
    return out
