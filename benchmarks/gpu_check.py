"""The prepared CUDA check (issue 18): run it whenever a CUDA machine is at hand, record what it prints.

Three parts, each printed as it finishes (benchmarks/gpu_check.sh sets up and calls this):

1. equivalence: with no key items, and with one shared track (a key mask that covers no pixel),
   the Asynchronous KSampler's sampler gives ComfyUI's KSampler result bit for bit, on CUDA, in
   float16 and bfloat16 (an SD1.5-class UNet and a Flux-class transformer, small random weights).
2. syncs: the host syncs per step with CUDA sync debugging on (torch.cuda.set_sync_debug_mode:
   every synchronizing call warns, the warnings are counted), and the pack's own host reads per
   step from the op counter (bench/dispatch_count.py), for KSampler, a drawn key mask and key words.
3. timing: time ratio and peak-memory ratio (torch.cuda.max_memory_allocated) of the Asynchronous
   KSampler (a drawn key item over the image's top half, k 0.8) to KSampler, same model, seed and
   sigmas, 20 steps, alternating order (K A A K), for SD1.5 at 512 px, SDXL at 1024 px and each
   transformer family at 1024 px, at full size with random weights (built on the GPU; the text
   input widths are the test factories', a small part of the model). Families run in order until
   the time budget (--budget-s) is spent; the rest are printed as not measured.

All pictures are noise (random weights): only equality and ratios mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def setup(comfyui: str | None, device: str) -> None:
    path = Path(comfyui or os.environ.get("COMFYUI_PATH") or REPO / ".dev" / "ComfyUI").resolve()
    if not (path / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI tree at {path}: set COMFYUI_PATH (see benchmarks/gpu_check.sh)")
    sys.path.insert(0, str(path))
    sys.path.insert(0, str(REPO))  # the pack's tests package before ComfyUI's own
    from comfy.cli_args import args

    args.cpu = device == "cpu"


# ------------------------------------------------------------------------------------------------
# Models built on the device in the dtype asked for (the factories build on the CPU in float32)


@contextlib.contextmanager
def on_device(device: str, dtype: Any) -> Iterator[None]:
    """Factories run under this build their model on `device` in `dtype`, filled there from per-parameter
    seeds (the same scale rule as tests/model_factory._fill), and return a ModelPatcher for `device`."""
    import comfy.model_patcher
    import comfy.supported_models_base
    import torch

    from tests import model_factory as mf

    original_dtype = comfy.supported_models_base.BASE.set_inference_dtype
    original_patcher = mf._patcher

    def set_dtype(self: Any, _dtype: Any, manual_cast: Any) -> None:
        original_dtype(self, dtype, None)

    def patcher(model: Any, seed: int) -> Any:
        fill(model, seed)
        model.eval()
        dev = torch.device(device)
        return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("tests.") and hasattr(m, "_patcher")]
    comfy.supported_models_base.BASE.set_inference_dtype = set_dtype
    for m in modules:
        m._patcher = patcher
    try:
        with torch.device(device):
            yield
    finally:
        comfy.supported_models_base.BASE.set_inference_dtype = original_dtype
        for m in modules:
            m._patcher = original_patcher


def fill(module: Any, seed: int) -> None:
    import torch

    if any(p.is_meta for p in module.parameters()):
        return  # a size check: nothing to fill
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            gen = torch.Generator(device=param.device).manual_seed(
                int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1)
            if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                param.normal_(0.0, 0.02, generator=gen)
            elif param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(math.prod(param.shape[1:])), generator=gen)
            else:
                param.normal_(0.0, 1.0, generator=gen)


# ------------------------------------------------------------------------------------------------
# The families: (name, image px, latent channels, latent spatial divisor, one frame axis, cfg,
# scheduler, builder, conditioning)


def families(full: bool) -> list[dict[str, Any]]:
    """Each family's model builder and conditioning; full: the real model's transformer size."""
    from benchmarks.bench import fixtures
    from tests import factory_auraflow as fa
    from tests import factory_flux_family as ff
    from tests import factory_hidream as fh
    from tests import factory_lumina as fl
    from tests import factory_qwen_image as fq
    from tests import model_factory as mf

    def unet_cond(model: Any, px: int) -> Callable[[int], Any]:
        return lambda seed: mf.make_conditioning(model, seed=seed, width=px, height=px)

    big = full
    rows = [
        dict(name="sd1.5", px=512, channels=4, cfg=5.0, scheduler="normal",
             build=lambda: fixtures.build_model("full" if big else "tiny"), cond=None),
        dict(name="sdxl", px=1024, channels=4, cfg=5.0, scheduler="normal",
             build=lambda: fixtures.build_model("sdxl", sdxl_depth=10) if big else mf.build_sdxl(model_channels=32),
             cond=None),
        dict(name="flux-dev", px=1024, channels=16, cfg=1.0, scheduler="simple",
             build=lambda: fixtures.build_flux(True, hidden=3072, double=19, single=38) if big else mf.build_flux(True),
             cond=lambda seed: mf.make_flux_conditioning(tokens=256, seed=seed, guidance=3.5)),
        dict(name="sd3.5-large", px=1024, channels=16, cfg=4.5, scheduler="simple",
             build=lambda: fixtures.build_sd3(False, depth=38) if big else mf.build_sd3("large"),
             cond=lambda seed: mf.make_sd3_conditioning(tokens=333, seed=seed)),
        dict(name="chroma", px=1024, channels=16, cfg=4.0, scheduler="simple",
             build=lambda: ff.build_chroma(depth=19, depth_single=38, hidden_size=3072, num_heads=24, mlp_ratio=4.0,
                                           axes_dim=[16, 56, 56], out_dim=3072, hidden_dim=5120, n_layers=5)
             if big else ff.build_chroma(), cond=lambda seed: ff.make_chroma_conditioning(tokens=256, seed=seed)),
        dict(name="qwen-image", px=1024, channels=16, frame=True, cfg=2.5, scheduler="simple",
             build=lambda: fq.build_qwen_image(depth=60, attention_head_dim=128, num_attention_heads=24,
                                               axes_dims_rope=(16, 56, 56)) if big else fq.build_qwen_image(),
             cond=lambda seed: fq.make_qwen_conditioning(tokens=256, seed=seed)),
        dict(name="hunyuan-image", px=1024, channels=64, divisor=32, cfg=3.5, scheduler="simple",
             build=lambda: ff.build_hunyuan_image(depth=20, depth_single=40, hidden_size=3584, num_heads=28,
                                                  axes_dim=[64, 64]) if big else ff.build_hunyuan_image(),
             cond=lambda seed: ff.make_hunyuan_image_conditioning(tokens=256, seed=seed)),
        dict(name="lumina2", px=1024, channels=16, cfg=4.0, scheduler="simple",
             build=lambda: fl.build_lumina2(dim=2304, n_heads=24, n_kv_heads=8, n_layers=26, n_refiner_layers=2,
                                            axes_dims=[32, 32, 32]) if big else fl.build_lumina2(),
             cond=lambda seed: fl.make_lumina_conditioning(tokens=256, seed=seed)),
        dict(name="z-image", px=1024, channels=16, cfg=1.0, scheduler="simple",
             build=lambda: fl.build_z_image(dim=3840, n_heads=30, n_kv_heads=30, n_layers=30, n_refiner_layers=2,
                                            axes_dims=[32, 48, 48]) if big else fl.build_z_image(),
             cond=lambda seed: fl.make_lumina_conditioning(tokens=256, seed=seed)),
        dict(name="hidream", px=1024, channels=16, cfg=5.0, scheduler="simple",
             build=lambda: fh.build_hidream(n_double=16, n_single=32, attention_head_dim=128, num_attention_heads=20,
                                            axes_dims_rope=[64, 32, 32], max_resolution=[128, 128])
             if big else fh.build_hidream(),
             cond=lambda seed: fh.make_hidream_conditioning(t5=128, llama=128, layers=48 if big else 4, seed=seed)),
        dict(name="auraflow", px=1024, channels=4, cfg=3.5, scheduler="simple",
             build=lambda: fa.build_auraflow(dim=3072, n_double=4, n_single=32, heads=12) if big else fa.build_auraflow(),
             cond=lambda seed: fa.make_auraflow_conditioning(tokens=256, seed=seed)),
        dict(name="flux2", px=1024, channels=128, divisor=16, cfg=4.0, scheduler="simple",
             build=lambda: ff.build_flux2(depth=8, depth_single=48, hidden_size=6144, num_heads=48,
                                          axes_dim=[32, 32, 32, 32]) if big else ff.build_flux2(),
             cond=lambda seed: ff.make_flux2_conditioning(tokens=256, seed=seed)),
        dict(name="chroma-radiance", px=1024, channels=3, divisor=1, cfg=4.0, scheduler="simple",
             build=lambda: ff.build_chroma_radiance(depth=19, depth_single=38, hidden_size=3072, num_heads=24,
                                                    mlp_ratio=4.0, axes_dim=[16, 56, 56], out_dim=3072,
                                                    hidden_dim=5120, n_layers=5, nerf_hidden_size=64)
             if big else ff.build_chroma_radiance(), cond=lambda seed: ff.make_chroma_conditioning(tokens=256, seed=seed)),
    ]
    for row in rows:
        row.setdefault("divisor", 8)
        row.setdefault("frame", False)
        if row["cond"] is None:
            row["unet"] = True
    return rows


def latent_for(row: dict[str, Any], px: int, batch: int = 1) -> Any:
    import torch

    side = max(2, px // row["divisor"])
    shape = (batch, row["channels"], 1, side, side) if row["frame"] else (batch, row["channels"], side, side)
    return torch.zeros(shape)


def top_half(latent: Any) -> Any:
    import torch

    from asyndm.schedule_spec import AsynSchedule

    b, h, w = latent.shape[0], latent.shape[-2], latent.shape[-1]
    masks = torch.zeros(b, 1, h, w)
    masks[..., : h // 2, :] = 1.0
    return AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=masks)


def empty_mask(latent: Any) -> Any:
    import torch

    from asyndm.schedule_spec import AsynSchedule

    b, h, w = latent.shape[0], latent.shape[-2], latent.shape[-1]
    return AsynSchedule(curve="bin", k=(0.8,), mask_source="masks", masks=torch.zeros(b, 1, h, w))


class Runner:
    """One model, conditioning and latent: KSampler and the asynchronous sampler on the same sigmas."""

    def __init__(self, model: Any, pos: Any, neg: Any, latent: Any, cfg: float, scheduler: str, steps: int,
                 seed: int = 3) -> None:
        self.model, self.pos, self.neg, self.latent = model, pos, neg, latent
        self.cfg, self.scheduler, self.steps, self.seed = cfg, scheduler, steps, seed

    def sigmas(self, steps: int) -> Any:
        import comfy.samplers

        return comfy.samplers.KSampler(self.model, steps=steps, device=self.model.load_device, sampler="euler",
                                       scheduler=self.scheduler, model_options=self.model.model_options).sigmas

    def run(self, schedule: Any | None, steps: int | None = None) -> Any:
        """schedule None: ComfyUI's KSampler; else the AsynSampler with it."""
        import comfy.sample
        import torch

        from asyndm.comfy_adapter.sampler import AsynSampler

        steps = steps or self.steps
        noise = comfy.sample.prepare_noise(self.latent, self.seed)
        with torch.inference_mode():
            if schedule is None:
                return comfy.sample.sample(self.model, noise, steps, self.cfg, "euler", self.scheduler, self.pos,
                                           self.neg, self.latent, disable_pbar=True, seed=self.seed)
            return comfy.sample.sample_custom(self.model, noise, self.cfg, AsynSampler("euler", schedule),
                                              self.sigmas(steps), self.pos, self.neg, self.latent, disable_pbar=True,
                                              seed=self.seed)


def conditioning(row: dict[str, Any], model: Any) -> tuple[Any, Any]:
    from tests import model_factory as mf

    if row.get("unet"):
        return (mf.make_conditioning(model, seed=1, width=row["px"], height=row["px"]),
                mf.make_conditioning(model, seed=2, width=row["px"], height=row["px"]))
    return row["cond"](1), row["cond"](2)


# ------------------------------------------------------------------------------------------------
# 1. equivalence


def check_equivalence(device: str, say: Callable[[str], None]) -> bool:
    import torch

    from asyndm.schedule_spec import AsynSchedule

    ok = True
    for name in ("sd1.5", "flux-dev"):
        row = next(r for r in families(False) if r["name"] == name)
        for dtype in (torch.float16, torch.bfloat16):
            with on_device(device, dtype):
                model = row["build"]()
            pos, neg = conditioning(row, model)
            latent = latent_for(row, 256 if name == "sd1.5" else 128)
            runner = Runner(model, pos, neg, latent, row["cfg"], row["scheduler"], 6)
            stock = runner.run(None)
            same = {"no key items": torch.equal(runner.run(AsynSchedule()), stock),
                    "one shared track": torch.equal(runner.run(empty_mask(latent)), stock)}
            differs = not torch.equal(runner.run(top_half(latent)), stock)
            ok = ok and all(same.values()) and differs
            say(f"equivalence {name} {str(dtype).replace('torch.', '')} on {device}: " + ", ".join(
                f"{k} {'bit-identical' if v else 'DIFFERENT'}" for k, v in same.items())
                + f"; a drawn key item {'changes' if differs else 'does NOT change'} the result")
            del model
            gc.collect()
    return ok


# ------------------------------------------------------------------------------------------------
# 2. syncs


def count_sync_warnings(fn: Callable[[], Any], cuda: bool) -> int:
    import torch

    if not cuda:
        fn()
        return 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in seen if "synchroniz" in str(w.message).lower())


def check_syncs(device: str, say: Callable[[str], None]) -> None:
    import comfy.text_encoders.flux
    import torch

    from asyndm.comfy_adapter.tokens import KEY, prompt_tokens
    from asyndm.schedule_spec import AsynSchedule
    from benchmarks.bench.dispatch_count import count_run, per_step
    from tests.model_factory import TokenizerOnly

    row = next(r for r in families(False) if r["name"] == "flux-dev")
    with on_device(device, torch.bfloat16):
        model = row["build"]()
    tokens = prompt_tokens(TokenizerOnly(comfy.text_encoders.flux.FluxTokenizer(), ("l", "t5xxl")),
                           "a photo of a rabbit wearing sunglasses, next to a teddy bear")
    from tests.model_factory import make_flux_conditioning

    pos = make_flux_conditioning(tokens=tokens.context_length(["t5xxl"]), seed=1)
    pos[0][1][KEY] = tokens
    latent = latent_for(row, 256)
    runner = Runner(model, pos, pos, latent, 1.0, "simple", 8)
    words = AsynSchedule(curve="bin", k=(0.7,), mask_source="attention", words=("rabbit",), threshold=1.0)
    for label, schedule in (("KSampler", None), ("drawn key mask", top_half(latent)), ("key words (dynamic)", words)):
        runner.run(schedule, 4)  # warm-up
        warn = [count_sync_warnings(lambda s=steps, sc=schedule: runner.run(sc, s), device.startswith("cuda"))
                for steps in (4, 8)]
        counts = [count_run(lambda s=steps, sc=schedule: runner.run(sc, s))[0] for steps in (4, 8)]
        slope = per_step(counts[0], counts[1], 4)
        say(f"syncs per step, Flux-class (small) bf16, {label}: {(warn[1] - warn[0]) / 4:.2f} with "
            f"torch.cuda.set_sync_debug_mode('warn') (runs of 4 / 8 steps: {warn[0]} / {warn[1]}); "
            f"op counter: {slope['syncs']:.2f} in all, {slope['pack_syncs']:.2f} the pack's, {slope['ops']:.0f} ops, "
            f"{slope['pipelined_reads']:.2f} pipelined reads ({slope['early_waits']} taken early)")
    del model
    gc.collect()


# ------------------------------------------------------------------------------------------------
# 3. timing and memory


def time_family(row: dict[str, Any], device: str, steps: int, say: Callable[[str], None], px: int | None = None) -> None:
    import torch

    dtype = torch.float16 if row.get("unet") else torch.bfloat16
    t0 = time.perf_counter()
    with on_device(device, dtype):
        model = row["build"]()
    params = sum(p.numel() for p in model.model.parameters())
    pos, neg = conditioning(row, model)
    px = px or row["px"]
    latent = latent_for(row, px)
    runner = Runner(model, pos, neg, latent, row["cfg"], row["scheduler"], steps)
    half = top_half(latent)
    built = time.perf_counter() - t0
    runner.run(None, 2)
    runner.run(half, 2)  # warm-up of both paths
    times: dict[str, list[float]] = {"K": [], "A": []}
    peaks: dict[str, int] = {"K": 0, "A": 0}
    cuda = device.startswith("cuda")
    for variant in ("K", "A", "A", "K"):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        runner.run(None if variant == "K" else half)
        if cuda:
            torch.cuda.synchronize()
        times[variant].append(time.perf_counter() - start)
        peaks[variant] = max(peaks[variant], torch.cuda.max_memory_allocated() if cuda else 1)
    k, a = sum(times["K"]) / 2, sum(times["A"]) / 2
    say(f"timing {row['name']}: {params / 1e9:.2f}B parameters {str(dtype).replace('torch.', '')}, {px} px "
        f"latent {tuple(latent.shape[1:])}, cfg {row['cfg']}, {steps} steps: KSampler {k:.2f} s "
        f"({1000 * k / steps:.1f} ms/step), async half-image key mask {a:.2f} s: time ratio {a / k:.3f}x; peak "
        f"memory {peaks['K'] / 2**30:.2f} / {peaks['A'] / 2**30:.2f} GiB: ratio {peaks['A'] / peaks['K']:.3f}x "
        f"(built in {built:.0f} s)")
    del model, runner
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def check_sizes(say: Callable[[str], None]) -> None:
    """Build every full-size family on the meta device (no memory): the configs are accepted, and their sizes."""
    import torch

    for row in families(True):
        with on_device("meta", torch.bfloat16):
            model = row["build"]()
        params = sum(p.numel() for p in model.model.parameters())
        say(f"size {row['name']}: {params / 1e9:.2f}B parameters ({type(model.model.diffusion_model).__name__})")
        del model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--comfyui", default=None)
    p.add_argument("--parts", default="equivalence,syncs,timing",
                   help="comma-separated: equivalence, syncs, timing, and sizes (the full-size models on the meta device)")
    p.add_argument("--families", default="all", help="timing: 'all' or comma-separated names (in this order)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting timing rows after this many seconds")
    p.add_argument("--small", action="store_true", help="timing on the test factories' sizes (a dry run)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    setup(args.comfyui, args.device)
    import torch

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this check needs one (--device cpu only for a dry run of the script)")
        say(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    parts = {x.strip() for x in args.parts.split(",")}
    failed = False
    if "sizes" in parts:
        check_sizes(say)
    if "equivalence" in parts:
        failed |= not check_equivalence(args.device, say)
    if "syncs" in parts:
        check_syncs(args.device, say)
    if "timing" in parts:
        rows = families(not args.small)
        if args.families != "all":
            wanted = [x.strip() for x in args.families.split(",")]
            rows = [r for name in wanted for r in rows if r["name"] == name]
        for row in rows:
            if time.perf_counter() - started > args.budget_s:
                say(f"timing {row['name']}: not measured (the {args.budget_s:.0f} s budget is spent; run again with "
                    f"--parts timing --families {row['name']})")
                continue
            if not args.device.startswith("cuda") and not args.small:
                say(f"timing {row['name']}: full size is for a GPU (on the CPU add --small for a dry run)")
                continue
            try:
                time_family(row, args.device, args.steps, say, px=128 if args.small else None)
            except torch.cuda.OutOfMemoryError as e:
                say(f"timing {row['name']}: out of memory on this card ({str(e).splitlines()[0]})")
                gc.collect()
                torch.cuda.empty_cache()
    say("done" + (" (an equivalence check FAILED)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
