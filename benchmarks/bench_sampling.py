#!/usr/bin/env python3
"""ComfyUI's KSampler against the Asynchronous KSampler, side by side on one loaded model.

For every case (latent size, batch, steps) the same model, conditioning, noise and seed are run
through four variants, interleaved (A B C D, D C B A, A B C D, ...) so that load drifts on a
shared machine hit every variant alike:

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    dynamic   comfy.sample.sample_custom with the pack's AsynSampler, two key words whose
              cross-attention is re-read every step (the pack's default mode)
    fixed     the same with two fixed item masks (mask_source="masks": no attention capture)
    naive     'dynamic' with the per-pixel time embedding computed the way the paper's reference
              does it: the time MLP on every pixel's timestep and every ResBlock's emb_layers on
              every pixel of its resolution (no table of distinct timesteps). Second baseline.

Printed and written (--out, markdown; --json): wall time per image (median, min-max over the
repeats after the warm-up), the ratio of each variant to the KSampler run of the same repeat
(median, min-max of those paired ratios), peak memory (CPU: peak RSS of a fresh subprocess per
variant, and its increase over the loaded model; GPU: torch.cuda.max_memory_allocated), and a
profile of where the asynchronous run spends its time beyond the UNet (perf_counter around the
pack's pieces, in a separate run so that the timed runs carry no instrumentation).

Models are random-weight instances of ComfyUI's own classes built by tests/model_factory.py:

    full      SD1.5's UNet layout (320 channels, mult 1/2/4/4, 2 res blocks, 8 heads, attention
              at latent /1, /2, /4, none at /8): 860M parameters
    reduced   SD1.5 class, 128 channels, 3 levels, 1 res block, attention at /2 and /4 only
              (SDXL's layout: no attention at full resolution, so large latents stay affordable
              on a CPU, and the per-pixel overhead is a larger share of the work than with
              full-resolution attention: the conservative case)
    reduced-attn  the same with attention at all three levels (the test suite's default model)
    sdxl      SDXL's layout (320 channels, mult 1/2/4, 2 res blocks, 64-channel heads, context 2048,
              label_emb), with --sdxl-depth transformer blocks at /4 and in the middle instead of
              10 (10 gives the real 2.6B-parameter UNet; the default 2 fits a laptop)
    tiny      32 channels, 3 levels: for the CI smoke test only

Examples:

    .dev/venv/bin/python benchmarks/bench_sampling.py --model reduced --sizes 32,64 --batch 1 --steps 10
    .dev/venv/bin/python benchmarks/bench_sampling.py --model full --cases 32x32:1:10,64x64:1:10 --repeats 5
    .dev/venv/bin/python benchmarks/bench_sampling.py --model reduced --sizes 32 --batch 1,4 --steps 10,30 \
        --out benchmarks/last_run.md --append

torch runs with one thread unless --threads says otherwise (timings on a shared machine are
steadier that way). This is a script, not a test: tests/inprocess/test_benchmark_smoke.py runs
main() on the tiny model so that it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = REPO_ROOT / ".dev" / "ComfyUI"
VARIANTS = ("ksampler", "dynamic", "fixed", "naive")
VARIANT_TITLES = {
    "ksampler": "KSampler",
    "dynamic": "async, 2 key words (dynamic)",
    "fixed": "async, fixed masks",
    "naive": "naive per-pixel (2 key words)",
}
TARGETS = {"dynamic": 1.05, "fixed": 1.03}  # the limits on the time ratio vs KSampler
MEMORY_TARGET = 1.05
MODELS = ("full", "reduced", "reduced-attn", "sdxl", "tiny")
MEMORY_TAG = "ASYNDM_BENCH_MEMORY "

# A prompt whose two key words are rabbit and basketball, as CLIP-L tokenizes it (start, words, end, padding).
PROMPT = "a rabbit playing basketball"
PROMPT_IDS = [49406, 320, 10274, 1629, 3835, 49407] + [49407] * 71
WORD_IDS = {"a": [320], "rabbit": [10274], "playing": [1629], "basketball": [3835]}
KEY_WORDS = ("rabbit", "basketball")
PRIORITIES = (0.8, 0.6)


# ------------------------------------------------------------------------------------------------
# ComfyUI and the project's model factory


def setup_comfyui(path: str | os.PathLike[str] | None = None, device: str = "cpu") -> Path:
    """Make ComfyUI and this repository importable (idempotent); CPU unless device is cuda.

    ComfyUI goes first on sys.path, as in tests/inprocess/conftest.py (ComfyUI's own ``nodes``
    module must win over this repository's ``nodes`` package); the repository is appended for
    ``asyndm``. tests/model_factory.py is loaded by file path (ComfyUI also has a ``tests`` package).
    """
    root = Path(path or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"bench_sampling: no ComfyUI tree at {root} (pass --comfyui or set COMFYUI_PATH)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    if "comfy.model_management" not in sys.modules and device == "cpu":
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    return root


def model_factory() -> ModuleType:
    name = "asyndm_bench_model_factory"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / "model_factory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(name: str, *, seed: int = 0, sdxl_depth: int = 2, device: str = "cpu") -> Any:
    """A ModelPatcher of the named layout with random weights (see the module docstring)."""
    mf = model_factory()
    if name == "full":
        patcher = mf.build_sd15(320, seed=seed, channel_mult=(1, 2, 4, 4), num_res_blocks=2, num_heads=8,
                                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    elif name == "reduced":
        patcher = mf.build_sd15(128, seed=seed, channel_mult=(1, 1, 1), num_res_blocks=1, num_heads=4,
                                transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1])
    elif name == "reduced-attn":
        patcher = mf.build_sd15(128, seed=seed, channel_mult=(1, 1, 1), num_res_blocks=1, num_heads=4)
    elif name == "sdxl":
        d = int(sdxl_depth)
        patcher = mf.build_sdxl(320, seed=seed, channel_mult=(1, 2, 4), num_res_blocks=2, num_heads=-1,
                                num_head_channels=64, transformer_depth=[0, 0, 2, 2, d, d],
                                transformer_depth_output=[0, 0, 0, 2, 2, 2, d, d, d], transformer_depth_middle=d)
    elif name == "tiny":
        patcher = mf.build_sd15(32, seed=seed, channel_mult=(1, 1, 1), num_res_blocks=1, num_heads=2)
    else:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    if device != "cpu":
        import comfy.model_patcher
        import torch

        dev = torch.device(device)
        patcher = comfy.model_patcher.ModelPatcher(patcher.model, load_device=dev, offload_device=torch.device("cpu"))
    return patcher


def describe_model(patcher: Any) -> dict[str, Any]:
    dm = patcher.model.diffusion_model
    cfg = patcher.model.model_config.unet_config
    return {
        "class": type(patcher.model).__name__,
        "params_m": round(sum(p.numel() for p in dm.parameters()) / 1e6, 1),
        "model_channels": cfg["model_channels"],
        "channel_mult": list(cfg["channel_mult"]),
        "num_res_blocks": list(cfg["num_res_blocks"]),
        "transformer_depth": list(cfg["transformer_depth"]),
        "context_dim": cfg["context_dim"],
    }


# ------------------------------------------------------------------------------------------------
# The naive per-pixel baseline


_NAIVE_CLASS: list[type] = []


def naive_hooks_class() -> type:
    """The NaivePerPixelTimesteps class (made once, after ComfyUI is importable)."""
    if not _NAIVE_CLASS:
        _NAIVE_CLASS.append(_make_naive_hooks_class())
    return _NAIVE_CLASS[0]


def _make_naive_hooks_class() -> type:
    """PerPixelTimesteps computing the time embedding for every pixel, as the paper's reference does.

    The pack builds a table over the U distinct timesteps (U rows of the time MLP and of every
    ResBlock's emb_layers) and gathers it per pixel. This baseline runs the time MLP on all
    B' x H x W pixel timesteps once per forward, and every ResBlock's emb_layers on all pixels of
    that block's resolution (B' x h x w rows), giving the same (B', C, h, w) result.
    """
    import torch
    from comfy.ldm.modules.diffusionmodules import openaimodel

    from asyndm.comfy_adapter.families import unet as unet_time

    class NaivePerPixelTimesteps(unet_time.PerPixelTimesteps):
        def _unet_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            super()._unet_pre(module, args, kwargs)
            self._pixel_emb: torch.Tensor | None = None

        def _emb_pre(self, i: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
                if self._inverse is None:
                    return None
                if not self._in_forward or self._sizes[i] is None:
                    raise RuntimeError("naive hooks: a ResBlock ran outside a UNet forward while a map was set")
                emb = args[0]
                full = self._pixel_embedding(emb)  # (B', H*W, E)
                h, w = self._sizes[i]
                pos = self._positions((h, w), emb.device)
                pixels = full if pos is None else full[:, pos]  # (B', h*w, E)
                return (pixels.reshape(full.shape[0] * h * w, -1),)  # emb_layers runs on every pixel

            return hook

        def _emb_post(self, i: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
                if self._inverse is None:
                    return None
                h, w = self._sizes[i]
                self._fired[i] += 1
                return output.view(self._rows, h, w, -1).permute(0, 3, 1, 2).contiguous()

            return hook

        def _pixel_embedding(self, emb: torch.Tensor) -> torch.Tensor:
            if self._pixel_emb is None:
                if self._emb_patches:
                    raise NotImplementedError("the naive baseline does not apply emb_patch")
                t = self.t_map().to(emb.device)
                rows = t.shape[0]
                sinusoid = openaimodel.timestep_embedding(t.reshape(-1), self.unet.model_channels, repeat_only=False)
                e = self.unet.time_embed(sinusoid.to(self._x_dtype))  # time MLP on B' x H x W rows
                e = e.view(rows, -1, e.shape[-1])
                if self._label is not None:
                    e = e + self._label[:, None]
                self._pixel_emb = e.to(emb.dtype)
            return self._pixel_emb

        def _positions(self, size: tuple[int, int], device: torch.device) -> torch.Tensor | None:
            big_h, big_w = self._inverse.shape[-2:]
            if tuple(size) == (big_h, big_w):
                return None
            key = ("naive-positions", tuple(size), device)
            pos = self._index_cache.get(key)
            if pos is None:
                grid = torch.arange(big_h * big_w, device=device).view(1, big_h, big_w)
                pos = unet_time.block_index_map(grid, size).reshape(-1)
                self._index_cache[key] = pos
            return pos

    return NaivePerPixelTimesteps


@contextlib.contextmanager
def patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    """Set obj.attr (a module, class or instance attribute) for the duration; restore it exactly."""
    own = vars(obj)
    had = attr in own
    old = own.get(attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


# ------------------------------------------------------------------------------------------------
# One case: model, inputs, variants


@dataclass(frozen=True)
class Case:
    height: int
    width: int
    batch: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} b{self.batch} s{self.steps}"


class Bench:
    """The inputs of one case and a runner per variant (same model, conditioning, noise and seed)."""

    def __init__(self, patcher: Any, case: Case, *, seed: int = 0, cfg: float = 5.0, sampler: str = "euler",
                 scheduler: str = "normal") -> None:
        import comfy.sample
        import torch

        from asyndm.comfy_adapter.tokens import KEY, PromptTokens
        from asyndm.schedule_spec import AsynSchedule

        mf = model_factory()
        self.patcher = patcher
        self.case = case
        self.seed, self.cfg, self.sampler, self.scheduler = seed, cfg, sampler, scheduler
        positive = mf.make_conditioning(patcher, seed=1, width=case.width * 8, height=case.height * 8)
        tokens = PromptTokens(PROMPT, chunks=[list(PROMPT_IDS)], word_ids={k: list(v) for k, v in WORD_IDS.items()})
        positive[0][1][KEY] = tokens  # what 'CLIP Text Encode (AsynDM)' attaches
        self.positive = positive
        self.negative = mf.make_conditioning(patcher, seed=2, width=case.width * 8, height=case.height * 8)
        self.latent = torch.zeros(case.batch, 4, case.height, case.width)
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        h, w = case.height, case.width
        masks = torch.zeros(1, 2, h, w)
        masks[:, 0, h // 4 : 3 * h // 4, : w // 2] = 1.0
        masks[:, 1, h // 2 :, w // 2 :] = 1.0
        self.schedules = {
            "dynamic": AsynSchedule(curve="bin", k=PRIORITIES, mask_source="attention", words=KEY_WORDS, dynamic=True),
            "fixed": AsynSchedule(curve="bin", k=PRIORITIES, mask_source="masks", masks=masks),
        }
        self.last_sampler: Any = None

    def run(self, variant: str) -> Any:
        import comfy.sample
        import comfy.samplers

        from asyndm.comfy_adapter import sampler as asyn_sampler

        p = self.patcher
        if variant == "ksampler":
            return comfy.sample.sample(p, self.noise, self.case.steps, self.cfg, self.sampler, self.scheduler,
                                       self.positive, self.negative, self.latent, denoise=1.0, seed=self.seed,
                                       disable_pbar=True)
        schedule = self.schedules["fixed" if variant == "fixed" else "dynamic"]
        with contextlib.ExitStack() as stack:
            if variant == "naive":
                from asyndm.comfy_adapter.families import unet as unet_family

                stack.enter_context(patched(unet_family, "PerPixelTimesteps", naive_hooks_class()))
            elif variant not in ("dynamic", "fixed"):
                raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
            # As the Asynchronous KSampler node does: the user's scheduler gives the background sigmas.
            sigmas = comfy.samplers.KSampler(p, steps=self.case.steps, device=p.load_device, sampler=self.sampler,
                                             scheduler=self.scheduler, denoise=1.0,
                                             model_options=p.model_options).sigmas
            sampler = asyn_sampler.AsynSampler(self.sampler, schedule)
            out = comfy.sample.sample_custom(p, self.noise, self.cfg, sampler, sigmas, self.positive, self.negative,
                                             self.latent, seed=self.seed, disable_pbar=True)
        self.last_sampler = sampler
        return out


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


def measure_memory_here(bench: Bench, variant: str, device: str) -> dict[str, Any]:
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


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh interpreter: build the model, run one variant once, report peak memory."""
    import torch

    setup_comfyui(spec.get("comfyui"), spec["device"])
    torch.set_num_threads(int(spec["threads"]))
    patcher = build_model(spec["model"], seed=spec["seed"], sdxl_depth=spec["sdxl_depth"], device=spec["device"])
    case = Case(spec["height"], spec["width"], spec["batch"], spec["steps"])
    bench = Bench(patcher, case, seed=spec["seed"], cfg=spec["cfg"], sampler=spec["sampler"],
                  scheduler=spec["scheduler"])
    return measure_memory_here(bench, spec["variant"], spec["device"])


def measure_memory_subprocess(spec: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
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
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                dt = time.perf_counter() - t0
                children = self._stack.pop()
                self.exclusive[label] += dt - children
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1] += dt

        return timed_call


UNET_LABEL = "UNet compute (without the pack's hooks)"
EMB_LAYERS_LABEL = "ResBlock emb_layers (stock: B' rows; pack: U-row table; naive: every pixel)"
EMB_LABEL = "hooks: emb_layers pre/post (table in, per-pixel out)"
PIECES = [  # (label, what) in report order; the pieces are exclusive of each other
    (UNET_LABEL, "diffusion_model.forward minus the hooks and emb_layers that run inside it"),
    (EMB_LAYERS_LABEL, "every ResBlock's emb_layers module; the stock model runs it too, so it is not a pack piece"),
    ("attention observer (per-step mask capture)", "AttentionObserver.__call__ (attn2_patch on every attn2)"),
    ("item masks from attention", "AsynSampler._priorities_from_attention"),
    ("StepMaps.set + model timesteps", "distinct model timesteps of the distinct sigmas, per step"),
    ("set_map", "PerPixelTimesteps.set_map"),
    ("hooks: UNet/block pre/post", "PerPixelTimesteps._unet_pre/_unet_post/_block_pre"),
    ("hooks: time-MLP table", "PerPixelTimesteps._embedding_table (U rows)"),
    (EMB_LABEL, "rest of the emb_layers hooks"),
    ("hooks: index maps", "PerPixelTimesteps._index (block_index_map, cached per forward)"),
    ("hooks: per-pixel selection", "PerPixelTimesteps._per_pixel ((B', C, h, w) per ResBlock: one gather per image)"),
    ("naive: time MLP on every pixel", "naive baseline only"),
    ("naive: index positions", "naive baseline only"),
    ("apply-model wrapper (rescale, rows, t map)", "PerPixelApplyModel.__call__ minus its children"),
    ("per-pixel calculate_input/denoised", "model_wrapper.per_pixel"),
    ("per-pixel noise_scaling", "sampler.per_pixel (once per run)"),
    ("schedule: track grouping", "PixelTracks.from_map / pair_tracks / full (dynamic masks regroup per step)"),
    ("schedule: next state", "AsynSampler._advance/_next_state on the distinct (state, k) pairs"),
    ("schedule: state to sigma", "SigmaInterpolator on the distinct states"),
    ("sampler step math (per-pixel Euler)", "steps.ancestral_step / dpmpp_2m_step"),
]
OTHER_LABEL = "rest (ComfyUI sampling, CFG, conds, setup)"


@contextlib.contextmanager
def profiling(bench: Bench, timer: PieceTimer) -> Iterator[None]:
    """Install the timing wrappers for one run (restored afterwards)."""
    from asyndm import pixel_tracks, sigma_map
    from asyndm.comfy_adapter import attention, model_wrapper
    from asyndm.comfy_adapter import sampler as asyn_sampler
    from asyndm.comfy_adapter.families import unet as unet_time

    dm = bench.patcher.model.diffusion_model
    naive = naive_hooks_class()

    def wrap_factory(label: str, factory: Callable[..., Any]) -> Callable[..., Any]:
        def make(self: Any, i: int) -> Any:
            return timer.wrap(label, factory(self, i))

        return make

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(dm, "forward", timer.wrap(UNET_LABEL, dm.forward)))
        ppt = unet_time.PerPixelTimesteps
        for cls in (ppt, naive):
            for attr, label in (("_unet_pre", "hooks: UNet/block pre/post"), ("_unet_post", "hooks: UNet/block pre/post"),
                                ("set_map", "set_map"), ("_embedding_table", "hooks: time-MLP table"),
                                ("_index", "hooks: index maps"),
                                ("_per_pixel", "hooks: per-pixel selection"),
                                ("_pixel_embedding", "naive: time MLP on every pixel"),
                                ("_positions", "naive: index positions")):
                if attr in cls.__dict__:
                    stack.enter_context(patched(cls, attr, timer.wrap(label, cls.__dict__[attr])))
            for attr in ("_emb_pre", "_emb_post"):
                if attr in cls.__dict__:
                    stack.enter_context(patched(cls, attr, wrap_factory(EMB_LABEL, cls.__dict__[attr])))
            if "_block_pre" in cls.__dict__:
                stack.enter_context(patched(cls, "_block_pre", wrap_factory("hooks: UNet/block pre/post",
                                                                            cls.__dict__["_block_pre"])))
        for block in unet_time.unet_resblocks(dm):
            emb_layers = block.emb_layers
            stack.enter_context(patched(emb_layers, "forward", timer.wrap(EMB_LAYERS_LABEL, emb_layers.forward)))
        sm = model_wrapper.StepMaps
        stack.enter_context(patched(sm, "set", timer.wrap("StepMaps.set + model timesteps", sm.__dict__["set"])))
        stack.enter_context(patched(asyn_sampler, "model_timesteps", timer.wrap("StepMaps.set + model timesteps",
                                                                                 asyn_sampler.model_timesteps)))
        pam = model_wrapper.PerPixelApplyModel
        stack.enter_context(patched(pam, "__call__", timer.wrap("apply-model wrapper (rescale, rows, t map)",
                                                                pam.__dict__["__call__"])))
        stack.enter_context(patched(model_wrapper, "per_pixel", timer.wrap("per-pixel calculate_input/denoised",
                                                                           model_wrapper.per_pixel)))
        stack.enter_context(patched(asyn_sampler, "per_pixel", timer.wrap("per-pixel noise_scaling",
                                                                          asyn_sampler.per_pixel)))
        stack.enter_context(patched(asyn_sampler, "pair_tracks", timer.wrap("schedule: track grouping",
                                                                            asyn_sampler.pair_tracks)))
        tracks = pixel_tracks.PixelTracks
        stack.enter_context(patched(tracks, "full", timer.wrap("schedule: track grouping", tracks.__dict__["full"])))
        stack.enter_context(patched(tracks, "from_map", staticmethod(timer.wrap(
            "schedule: track grouping", tracks.__dict__["from_map"].__func__))))
        interp = sigma_map.SigmaInterpolator
        stack.enter_context(patched(interp, "__call__", timer.wrap("schedule: state to sigma",
                                                                   interp.__dict__["__call__"])))
        ao = attention.AttentionObserver
        stack.enter_context(patched(ao, "__call__", timer.wrap("attention observer (per-step mask capture)",
                                                               ao.__dict__["__call__"])))
        asn = asyn_sampler.AsynSampler
        for attr, label in (("_priorities_from_attention", "item masks from attention"),
                            ("_advance", "schedule: next state"), ("_next_state", "schedule: next state")):
            stack.enter_context(patched(asn, attr, timer.wrap(label, asn.__dict__[attr])))
        for attr in ("ancestral_step", "dpmpp_2m_step"):
            stack.enter_context(patched(asyn_sampler, attr, timer.wrap("sampler step math (per-pixel Euler)",
                                                                       getattr(asyn_sampler, attr))))
        yield


def profile_variant(bench: Bench, variant: str, device: str, runs: int = 1) -> dict[str, float]:
    """ms per run of each piece (exclusive), the run's total, and the rest; plus the preview strip."""
    from asyndm.preview import timestep_strip

    totals: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        timer = PieceTimer(device)
        with profiling(bench, timer):
            dt, _ = timed(lambda: bench.run(variant), device)
        totals["total"] += dt
        for label, value in timer.exclusive.items():
            totals[label] += value
        if variant != "ksampler" and bench.last_sampler is not None and bench.last_sampler.record is not None:
            rec = bench.last_sampler.record
            t0 = time.perf_counter()
            timestep_strip(rec.states, rec.priorities, start_value=float(rec.num_train_timesteps + rec.offset))
            totals["node extra: timestep preview strip (after sampling)"] += time.perf_counter() - t0
    out = {k: 1000.0 * v / runs for k, v in totals.items()}
    known = sum(v for k, v in out.items() if k in dict(PIECES))
    out[OTHER_LABEL] = out["total"] - known
    return out


# ------------------------------------------------------------------------------------------------
# The UNet forward alone: what the hooks cost inside the model


UNET_VARIANTS = ("stock", "hooks, no map", "pack hooks", "naive hooks")


def unet_forward_overhead(bench: Bench, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per UNet forward of the CFG rows (2 x batch), interleaved: no hooks; the pack's hooks
    installed but no map (pass-through); the pack's hooks with a two-track map (U = 2, half the
    pixels at another timestep); the naive hooks with the same map. Hooks are installed and
    removed outside the timed call, as a sampling run installs them once for all its steps."""
    import comfy.model_management
    import torch

    from asyndm.comfy_adapter.families.unet import PerPixelTimesteps

    comfy.model_management.load_models_gpu([bench.patcher])
    dm = bench.patcher.model.diffusion_model
    dev = next(dm.parameters()).device
    dtype = bench.patcher.model.get_dtype()
    case = bench.case
    rows, h, w = 2 * case.batch, case.height, case.width
    kwargs = {k: v.to(dev, dtype) for k, v in model_factory().diffusion_kwargs(bench.patcher, rows).items()}
    gen = torch.Generator().manual_seed(bench.seed)
    x = torch.randn(rows, 4, h, w, generator=gen).to(dev, dtype)
    t = torch.full((rows,), 500.0, device=dev)
    t_map = torch.full((rows, h, w), 500.0, device=dev)
    t_map[:, : h // 2, : w // 2] = 700.0
    hook_classes = {"hooks, no map": PerPixelTimesteps, "pack hooks": PerPixelTimesteps, "naive hooks": naive_hooks_class()}
    times: dict[str, list[float]] = {v: [] for v in UNET_VARIANTS}
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round is a warm-up
            for v in UNET_VARIANTS if rep % 2 == 0 else UNET_VARIANTS[::-1]:
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
# Statistics and tables


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def spread(xs: Sequence[float]) -> tuple[float, float]:
    return (min(xs), max(xs)) if xs else (math.nan, math.nan)


def fmt_time(xs: Sequence[float]) -> str:
    lo, hi = spread(xs)
    return f"{median(xs):.3f} ({lo:.3f}-{hi:.3f})"


def fmt_ratio(xs: Sequence[float], target: float | None = None) -> str:
    if not xs:
        return "-"
    lo, hi = spread(xs)
    text = f"{median(xs):.3f}x ({lo:.3f}-{hi:.3f})"
    if target is not None:
        text += " ok" if median(xs) <= target else " OVER"
    return text


def case_ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per repeat, each variant's time over the KSampler time of the same repeat."""
    base = times.get("ksampler", [])
    out: dict[str, list[float]] = {}
    for v, ts in times.items():
        if v == "ksampler" or not base:
            continue
        out[v] = [t / b for t, b in zip(ts, base, strict=False) if b > 0]
    if "dynamic" in times and "naive" in times:
        out["dynamic/naive"] = [a / b for a, b in zip(times["dynamic"], times["naive"], strict=False) if b > 0]
    return out


def markdown(run: dict[str, Any]) -> str:
    env, results = run["environment"], run["results"]
    variants = run["variants"]
    lines = [f"## `{run['command']}`", ""]
    lines.append(
        f"Machine: {env['cpu']} ({env['cpus']} logical CPUs), {env['device']}, torch {env['torch']} with "
        f"{env['threads']} thread(s), Python {env['python']}, {env['platform']}. Load average at start "
        f"{env['load_start']}, at end {env.get('load_end', '?')}. Sampler {run['sampler']}/{run['scheduler']}, "
        f"cfg {run['cfg']}, seed {run['seed']}; warm-up {run['warmup']}, repeats {run['repeats']}, interleaved "
        f"(order reversed every other repeat). Total wall time {run.get('wall_s', 0):.0f} s."
    )
    lines.append("")
    for name, info in run["models"].items():
        lines.append(f"Model `{name}`: {info['class']}, {info['params_m']}M UNet parameters, channels "
                     f"{info['model_channels']} x {info['channel_mult']}, res blocks {info['num_res_blocks']}, "
                     f"transformer depth {info['transformer_depth']}, context {info['context_dim']}.")
    lines.append("")
    timed_results = [r for r in results if any(r["times"].values())]
    if timed_results:
        lines.append("Wall time per image, seconds: median (min-max) over the repeats.")
        lines.append("")
        lines.append("| model | latent | batch | steps | " + " | ".join(VARIANT_TITLES[v] for v in variants) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(variants))
        for r in timed_results:
            c = r["case"]
            cells = [fmt_time([t / c["batch"] for t in r["times"][v]]) for v in variants]
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | {c['steps']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Time ratio vs KSampler: median (min-max) of the per-repeat ratios (each variant over the KSampler "
                     "run of the same repeat); targets: 2 key words <= 1.05x, fixed masks <= 1.03x.")
        lines.append("")
        others = [v for v in variants if v != "ksampler"]
        head = [VARIANT_TITLES[v] for v in others] + (["pack / naive (2 key words)"] if "naive" in others and "dynamic" in others else [])
        lines.append("| model | latent | batch | steps | " + " | ".join(head) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(head))
        for r in timed_results:
            c = r["case"]
            cells = [fmt_ratio(r["ratios"].get(v, []), TARGETS.get(v)) for v in others]
            if "naive" in others and "dynamic" in others:
                cells.append(fmt_ratio(r["ratios"].get("dynamic/naive", [])))
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | {c['steps']} | " + " | ".join(cells) + " |")
    if any(r.get("naive_vs_dynamic_max_abs") is not None for r in results):
        diffs = ", ".join(f"{r['case_label']}: {r['naive_vs_dynamic_max_abs']:.2e}" for r in results
                          if r.get("naive_vs_dynamic_max_abs") is not None)
        lines.append("")
        lines.append(f"Naive baseline check, max |naive - pack| over the latent of the same run: {diffs}.")
    unet_rows = [r for r in results if r.get("unet")]
    if unet_rows:
        lines.append("")
        lines.append("UNet forward alone (the 2 x batch CFG rows, hooks installed outside the timed call), ms: median "
                     "(min-max); ratio vs the stock forward of the same repeat. 'pack hooks' has a two-track map "
                     "(half the pixels at another timestep).")
        lines.append("")
        lines.append("| model | latent | batch | " + " | ".join(UNET_VARIANTS) + " |")
        lines.append("|---|---|---|" + "---|" * len(UNET_VARIANTS))
        for r in unet_rows:
            c, u = r["case"], r["unet"]
            cells = []
            for v in UNET_VARIANTS:
                ms = [1000.0 * x for x in u[v]]
                cell = f"{median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})"
                if v != "stock":
                    cell += " " + fmt_ratio([a / b for a, b in zip(u[v], u["stock"], strict=False)])
                cells.append(cell)
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | " + " | ".join(cells) + " |")
    mem_rows = [r for r in results if r.get("memory")]
    if mem_rows:
        kind = next(iter(mem_rows[0]["memory"].values()))["kind"]
        lines.append("")
        lines.append(f"Peak memory, MiB ({kind}; a fresh process per variant on the CPU, min(steps, {run['memory_steps']}) steps): "
                     "peak / increase over the loaded model; ratio of the peaks and of the increases vs KSampler "
                     f"(target <= {MEMORY_TARGET}x).")
        lines.append("")
        mv = [v for v in variants if v in mem_rows[0]["memory"]]
        lines.append("| model | latent | batch | " + " | ".join(VARIANT_TITLES[v] for v in mv) + " |")
        lines.append("|---|---|---|" + "---|" * len(mv))
        for r in mem_rows:
            c, m = r["case"], r["memory"]
            base = m.get("ksampler")
            cells = []
            for v in mv:
                cell = f"{m[v]['peak_mib']:.0f} / +{m[v]['delta_mib']:.0f}"
                if base and v != "ksampler":
                    rp = m[v]["peak_mib"] / base["peak_mib"]
                    rd = m[v]["delta_mib"] / base["delta_mib"] if base["delta_mib"] > 0 else math.nan
                    cell += f" ({rp:.3f}x / {rd:.2f}x)"
                cells.append(cell)
            lines.append(f"| {r['model']} | {c['height']}x{c['width']} | {c['batch']} | " + " | ".join(cells) + " |")
    prof_rows = [r for r in results if r.get("profile")]
    for r in prof_rows:
        prof = r["profile"]
        pv = [v for v in variants if v in prof]
        base_total = prof.get("ksampler", {}).get("total")
        lines.append("")
        lines.append(f"Profile, {r['model']} {r['case_label']}: ms per run (one instrumented run each, exclusive "
                     "times, so the rows add up to the total); last column: the dynamic run's piece as % of the "
                     "KSampler run.")
        lines.append("")
        lines.append("| piece | " + " | ".join(VARIANT_TITLES[v] for v in pv) + " | dynamic, % of KSampler |")
        lines.append("|---|" + "---|" * (len(pv) + 1))
        labels = ["total", *[p for p, _ in PIECES], OTHER_LABEL, "node extra: timestep preview strip (after sampling)"]
        for label in labels:
            if not any(abs(prof[v].get(label, 0.0)) > 0.0005 for v in pv):
                continue
            cells = [f"{prof[v][label]:.1f}" if label in prof[v] else "-" for v in pv]
            pct = "-"
            if base_total and "dynamic" in prof and label in prof["dynamic"]:
                pct = f"{100.0 * prof['dynamic'][label] / base_total:.2f}%"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {pct} |")
        sums = {v: pack_pieces_ms(prof[v], prof.get("ksampler")) for v in pv}
        cells = [f"{sums[v]:.1f}" + (f" ({100.0 * sums[v] / base_total:.2f}%)" if base_total else "") for v in pv]
        lines.append("| **sum of the pack's pieces** (rows between the UNet and the rest, plus emb_layers over the "
                     "KSampler's; % of the KSampler total) | "
                     + " | ".join(cells) + " | - |")
    lines.append("")
    return "\n".join(lines)


def pack_pieces_ms(piece_ms: dict[str, float], baseline: dict[str, float] | None = None) -> float:
    """What the pack adds, measured piece by piece: every profiled piece except the UNet's own compute,
    plus what its emb_layers calls cost over the stock ones (the KSampler run's, when given; never less than 0)."""
    pieces = sum(v for k, v in piece_ms.items() if k in dict(PIECES) and k not in (UNET_LABEL, EMB_LAYERS_LABEL))
    if baseline is not None and EMB_LAYERS_LABEL in piece_ms and EMB_LAYERS_LABEL in baseline:
        pieces += max(0.0, piece_ms[EMB_LAYERS_LABEL] - baseline[EMB_LAYERS_LABEL])  # a saving there is noise
    return pieces


def environment(device: str, threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = "CPU"
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(torch.device(device))
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "device": dev,
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------
# Command line


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_cases(args: argparse.Namespace) -> list[Case]:
    if args.cases:
        cases = []
        for item in args.cases.split(","):
            size, batch, steps = item.strip().split(":")
            h, _, w = size.partition("x")
            cases.append(Case(int(h), int(w or h), int(batch), int(steps)))
        return cases
    return [Case(s, s, b, n) for s, b, n in itertools.product(parse_ints(args.sizes), parse_ints(args.batch),
                                                              parse_ints(args.steps))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reduced", help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--sizes", default="32,64", help="latent sizes (square), comma-separated")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--steps", default="10", help="step counts, comma-separated")
    p.add_argument("--cases", default="", help="explicit cases HxW:batch:steps,... (replaces sizes x batch x steps)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant first")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the model is moved there by ComfyUI)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdxl-depth", type=int, default=2, help="transformer blocks at /4 and in the middle (SDXL: 10)")
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess",
                   help="peak memory: a fresh process per variant (default), this process, or not at all")
    p.add_argument("--memory-steps", type=int, default=2, help="steps of the memory runs (peaks repeat every step)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="one instrumented run per variant (after the timed runs)")
    p.add_argument("--profile-runs", type=int, default=1)
    p.add_argument("--unet-repeats", type=int, default=0,
                   help="also time the UNet forward alone with and without the hooks, this many times (0 = off)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "last_run.md"), help="markdown file ('' = none)")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--json", default="", help="also write the raw results as JSON here")
    p.add_argument("--comfyui", default=None, help="ComfyUI tree (default $COMFYUI_PATH or .dev/ComfyUI)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="only print (and write to --out) the tables of earlier --json files")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns {'markdown': str, 'results': [...], ...} and writes --out / --json."""
    args = build_parser().parse_args(argv)
    if args.memory_child is not None:
        result = memory_child(json.loads(args.memory_child))
        print(MEMORY_TAG + json.dumps(result), flush=True)
        return result
    if args.render:
        runs = [json.loads(Path(p).read_text()) for p in args.render]
        text = "\n".join(markdown(r) for r in runs)
        print(text, flush=True)
        if args.out:
            with Path(args.out).open("a" if args.append else "w") as f:
                f.write(text + "\n")
        return {"markdown": text, "runs": runs}

    setup_comfyui(args.comfyui, args.device)
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(previous_threads)  # main() is also called in-process (the smoke test)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    started = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    if "ksampler" not in variants:
        variants.insert(0, "ksampler")
    variants = [v for v in VARIANTS if v in variants]
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    cases = parse_cases(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    run: dict[str, Any] = {
        "command": "python benchmarks/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(args.device, args.threads),
        "variants": variants, "warmup": args.warmup, "repeats": args.repeats, "sampler": args.sampler,
        "scheduler": args.scheduler, "cfg": args.cfg, "seed": args.seed, "memory_steps": args.memory_steps,
        "models": {}, "results": [],
    }
    for model_name in models:
        t0 = time.perf_counter()
        patcher = build_model(model_name, seed=args.seed, sdxl_depth=args.sdxl_depth, device=args.device)
        run["models"][model_name] = info = describe_model(patcher)
        say(f"[{model_name}] built in {time.perf_counter() - t0:.1f} s: {info}")
        for case in cases:
            bench = Bench(patcher, case, seed=args.seed, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler)
            times: dict[str, list[float]] = {v: [] for v in variants}
            outputs: dict[str, Any] = {}
            for rep in range(args.warmup + args.repeats):
                order = variants if rep % 2 == 0 else variants[::-1]
                for v in order:
                    gc.collect()
                    dt, out = timed(lambda v=v, bench=bench: bench.run(v), args.device)
                    if rep >= args.warmup:
                        times[v].append(dt)
                    outputs[v] = out
                    say(f"[{model_name} {case.label}] {'warm-up' if rep < args.warmup else f'repeat {rep - args.warmup + 1}'} "
                        f"{v}: {dt:.3f} s")
            result: dict[str, Any] = {"model": model_name, "case": case.__dict__, "case_label": case.label,
                                      "times": times, "ratios": case_ratios(times)}
            if "naive" in outputs and "dynamic" in outputs:
                result["naive_vs_dynamic_max_abs"] = float((outputs["naive"] - outputs["dynamic"]).abs().max())
            del outputs
            if args.profile:
                result["profile"] = {v: profile_variant(bench, v, args.device, args.profile_runs) for v in variants}
                say(f"[{model_name} {case.label}] profile: " + json.dumps(
                    {v: {k: round(x, 1) for k, x in p.items()} for v, p in result["profile"].items()}))
            if args.unet_repeats > 0:
                result["unet"] = unet_forward_overhead(bench, args.unet_repeats, args.device)
                say(f"[{model_name} {case.label}] UNet forward: " + ", ".join(
                    f"{k} {median(x):.4f} s" for k, x in result["unet"].items()))
            if args.memory != "off":
                mem = {}
                for v in variants:
                    if args.memory == "inprocess" or args.device.startswith("cuda"):
                        mem_case = Case(case.height, case.width, case.batch, min(case.steps, args.memory_steps))
                        mem_bench = Bench(patcher, mem_case, seed=args.seed, cfg=args.cfg, sampler=args.sampler,
                                          scheduler=args.scheduler)
                        mem[v] = measure_memory_here(mem_bench, v, args.device)
                    else:
                        spec = {"model": model_name, "seed": args.seed, "sdxl_depth": args.sdxl_depth,
                                "device": args.device, "threads": args.threads, "height": case.height,
                                "width": case.width, "batch": case.batch, "steps": min(case.steps, args.memory_steps),
                                "variant": v, "cfg": args.cfg, "sampler": args.sampler, "scheduler": args.scheduler,
                                "comfyui": args.comfyui}
                        mem[v] = measure_memory_subprocess(spec)
                    say(f"[{model_name} {case.label}] memory {v}: {mem[v]}")
                result["memory"] = mem
            run["results"].append(result)
            say(f"[{model_name} {case.label}] ratios: " + ", ".join(
                f"{k} {median(x):.3f}" for k, x in result["ratios"].items()))
        del patcher
        gc.collect()
    run["environment"]["load_end"] = _loadavg()
    run["wall_s"] = time.perf_counter() - started
    text = markdown(run)
    run["markdown"] = text
    print(text, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a" if args.append else "w") as f:
            f.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in run.items() if k != "markdown"}, indent=1))
    return run


if __name__ == "__main__":
    main()
