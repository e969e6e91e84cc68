"""ComfyUI's KSampler against the Asynchronous KSampler, side by side on one loaded model.

For every case (latent size, batch, steps) the same model, conditioning, noise and seed are run
through the variants of the model's family, interleaved (A B C D, D C B A, A B C D, ...) so that
load drifts on a shared machine hit every variant alike.

UNets (SD1.x/SD2.x/SDXL shapes):

    ksampler  comfy.sample.sample, ComfyUI's KSampler path (the baseline)
    dynamic   comfy.sample.sample_custom with the pack's AsynSampler, two key words whose
              cross-attention is re-read every step (the pack's default mode)
    fixed     the same with two fixed item masks (mask_source="masks": no attention capture)
    naive     'dynamic' with the per-pixel time embedding computed the way the paper's reference
              does it: the time MLP on every pixel's timestep and every ResBlock's emb_layers on
              every pixel of its resolution (no table of distinct timesteps). Second baseline.

Flux (dev, schnell) and SD3 (SD3.5 large and medium shapes): ksampler, and fixed (the same two key
items as masks; key words are not supported on these families yet). The simple scheduler, and cfg 1
on Flux (its guidance embedding, no uncond rows) and 4.5 on SD3, unless --cfg / --scheduler say
otherwise.

Printed and written (--out, markdown; --json): wall time per image (median, min-max over the
repeats after the warm-up), aten ops and host syncs per step of each variant (a TorchDispatchMode
over a half-length and a full-length run: their slope; the pack's own syncs apart from ComfyUI's,
see bench/dispatch_count.py), the ratio of each variant to the KSampler run of the same repeat
(median, min-max of those paired ratios), peak memory (CPU: peak RSS of a fresh subprocess per
variant, and its increase over the loaded model; GPU: torch.cuda.max_memory_allocated), and a
profile of where the asynchronous run spends its time beyond the model (perf_counter around the
pack's pieces, in a separate run so that the timed runs carry no instrumentation). With
--forward-repeats, the model's forward alone with and without the pack's hooks (for Flux also the
per-token modulation's pieces per forward).

Models are random-weight instances of ComfyUI's own classes built through tests/model_factory.py:

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
    flux-dev      ComfyUI's Flux class and supported_models.Flux config (guidance embedding, shift
                  1.15), --flux-hidden wide in heads of 128 (Flux's head width, rotary axes 16/56/56,
                  MLP ratio 4), --flux-double double-stream and --flux-single single-stream blocks
                  (Flux: 3072 wide, 19 + 38 blocks)
    flux-schnell  the same with supported_models.FluxSchnell (no guidance embedding)
    flux-tiny     tests/model_factory.py build_flux (width 64, 2 + 2 blocks, dev): CI smoke only
    sd3.5-large   ComfyUI's SD3 config (shift 3) and MMDiT class (OpenAISignatureMMDITWrapper), RMS q/k
                  norm, --sd3-depth joint blocks, width 64 x depth in heads of 64 (SD3.5 large: 38)
    sd3.5-medium  the same with image self-attention in the first half of the blocks (SD3.5 medium:
                  24 blocks, 13 of them with it)
    sd3-tiny      tests/model_factory.py build_sd3 ("large", width 128, 2 blocks): CI smoke only

The other transformer families the pack samples in-process (--families all, or some of them; one
run, one row each, at each family's own latent size and cfg; bench/dit_models.py): flux-kontext,
flux2, chroma, chroma-radiance, hunyuan-image, qwen-image, qwen-image-edit, lumina2, z-image,
hidream, auraflow. ComfyUI's own classes with random weights from the test factories, at hidden
512 (4 heads of 128) and a few blocks (--dit-size tiny: the tests' sizes). Variants: ksampler,
nokeys (the pack's sampler with no key items) and half (one key item, the image's top half, k 0.8);
the summary table gives both ratios and the overhead per step in ms.

Examples:

    .dev/venv/bin/python benchmarks/bench_sampling.py --model reduced --sizes 32,64 --batch 1 --steps 10
    .dev/venv/bin/python benchmarks/bench_sampling.py --model full --cases 32x32:1:10,64x64:1:10 --repeats 5
    .dev/venv/bin/python benchmarks/bench_sampling.py --model flux-dev,flux-schnell --cases 64x64:1:4 \\
        --flux-hidden 512 --forward-repeats 9
    .dev/venv/bin/python benchmarks/bench_sampling.py --model reduced --sizes 32 --batch 1,4 --steps 10,30 \\
        --out benchmarks/last_run.md --append
    .dev/venv/bin/python benchmarks/bench_sampling.py --families all --repeats 3 --memory inprocess
    .dev/venv/bin/python benchmarks/bench_sampling.py --families chroma,qwen-image-edit --dit-size tiny

torch runs with one thread unless --threads says otherwise (timings on a shared machine are
steadier that way). This is a script, not a test: tests/inprocess/test_benchmark_smoke.py runs
main() on the tiny models so that it cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import dit_models, family_rows, report
from .fixtures import DIT_MODELS, MODELS, REPO_ROOT, Case, build_model, family_of, setup_comfyui
from .measure import MEMORY_TAG, dispatch_per_step, measure_memory_here, measure_memory_subprocess, timed
from .report import case_ratios, environment, loadavg, markdown, median

ALL_VARIANTS = ("ksampler", "dynamic", "fixed", "naive", "nokeys", "half")
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"cfg": 5.0, "scheduler": "normal"}, "flux": {"cfg": 1.0, "scheduler": "simple"},
    "mmdit": {"cfg": 4.5, "scheduler": "simple"},
    "dit": {"cfg": None, "scheduler": "simple"},  # cfg None: each family's own (bench/dit_models.py)
}


def model_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """build_model's keyword arguments from a run's settings (the memory child's spec included)."""
    return {"seed": spec["seed"], "sdxl_depth": spec.get("sdxl_depth", 2), "device": spec["device"],
            "flux_hidden": spec.get("flux_hidden", 512), "flux_double": spec.get("flux_double", 2),
            "flux_single": spec.get("flux_single", 4), "sd3_depth": spec.get("sd3_depth", 6),
            "dit_size": spec.get("dit_size", "bench")}


def make_bench(model_name: str, patcher: Any, case: Case, spec: dict[str, Any]) -> Any:
    rows = report.FAMILY_ROWS[family_of(model_name)]
    return rows.make_bench(patcher, case, model=model_name, seed=spec["seed"], cfg=spec["cfg"], sampler=spec["sampler"],
                           scheduler=spec["scheduler"], text_tokens=spec.get("text_tokens"))


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh interpreter: build the model, run one variant once, report peak memory."""
    setup_comfyui(spec.get("comfyui"), spec["device"])
    import torch

    torch.set_num_threads(int(spec["threads"]))
    patcher = build_model(spec["model"], **model_kwargs(spec))
    case = Case(spec["height"], spec["width"], spec["batch"], spec["steps"])
    bench = make_bench(spec["model"], patcher, case, spec)
    return measure_memory_here(bench, spec["variant"], spec["device"])


# ------------------------------------------------------------------------------------------------
# Command line


def interleaved_profile(rows: Any, bench: Any, variants: list[str], device: str, runs: int) -> dict[str, dict[str, float]]:
    """Each variant's profile: the median, piece by piece, of `runs` single-run profiles taken in turn with
    the other variants' (order reversed every other round), so that a slow spell of the machine falls on
    every variant alike and one outlier run does not move a piece."""
    parts: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(max(1, runs)):
        for v in variants if r % 2 == 0 else variants[::-1]:
            parts[v].append(rows.profile_variant(bench, v, device, 1))
    return {v: {label: median(p.get(label, 0.0) for p in ps) for label in {k for p in ps for k in p}}
            for v, ps in parts.items()}


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
    return [Case(s, s, b, n) for s, b, n in itertools.product(parse_ints(args.sizes or "32,64"), parse_ints(args.batch),
                                                              parse_ints(args.steps))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_sampling.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reduced", help=f"comma-separated, one family per run, from: {', '.join(MODELS)}")
    p.add_argument("--families", default="", metavar="NAMES",
                   help="the other transformer families' rows instead of --model: 'all' or comma-separated, from: "
                        + ", ".join(DIT_MODELS) + " (each at its own latent size unless --cases says otherwise)")
    p.add_argument("--dit-size", choices=("bench", "tiny"), default="bench",
                   help="those families' model size: bench (hidden 512, a few blocks) or tiny (the tests')")
    p.add_argument("--sizes", default=None, help="latent sizes (square), comma-separated (default 32,64)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--steps", default="10", help="step counts, comma-separated")
    p.add_argument("--cases", default="", help="explicit cases HxW:batch:steps,... (replaces sizes x batch x steps)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant first")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help="comma-separated, from: " + ", ".join(ALL_VARIANTS) + " (those the family has)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the model is moved there by ComfyUI)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default=None, help="default: normal on UNets, simple on Flux and SD3")
    p.add_argument("--cfg", type=float, default=None, help="default: 5 on UNets, 1 on Flux (no uncond rows), 4.5 on SD3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdxl-depth", type=int, default=2, help="transformer blocks at /4 and in the middle (SDXL: 10)")
    p.add_argument("--flux-hidden", type=int, default=512, help="Flux width, a multiple of 128 (Flux: 3072)")
    p.add_argument("--flux-double", type=int, default=2, help="Flux double-stream blocks (Flux: 19)")
    p.add_argument("--flux-single", type=int, default=4, help="Flux single-stream blocks (Flux: 38)")
    p.add_argument("--sd3-depth", type=int, default=6, help="SD3 joint blocks, width 64 x depth (SD3.5 large: 38)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text context length: default 128 on Flux / SD3 (Flux's T5: 256 or 512; SD3: 77 CLIP + 256 T5), "
                        "64 on the other families")
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess",
                   help="peak memory: a fresh process per variant (default), this process, or not at all")
    p.add_argument("--memory-steps", type=int, default=2, help="steps of the memory runs (peaks repeat every step)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="instrumented runs per variant (after the timed runs; see --profile-runs)")
    p.add_argument("--profile-runs", type=int, default=1,
                   help="instrumented runs per variant, taken in turn with the other variants'; each piece is the median")
    p.add_argument("--dispatch", action=argparse.BooleanOptionalAction, default=True,
                   help="count aten ops and host syncs per step of every variant (two extra untimed runs each)")
    p.add_argument("--forward-repeats", "--unet-repeats", dest="unet_repeats", type=int, default=0,
                   help="also time the model's forward alone with and without the hooks, this many times (0 = off)")
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
    try:
        models = dit_models.parse_families(args.families) if args.families else [
            m.strip() for m in args.model.split(",") if m.strip()]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        families = {family_of(m) for m in models}
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if len(families) != 1:
        raise SystemExit(f"one model family per run: {', '.join(models)} mixes {', '.join(sorted(families))}")
    family = families.pop()
    rows = report.FAMILY_ROWS[family]
    requested = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in requested:
        if v not in ALL_VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: use {', '.join(ALL_VARIANTS)}")
    if "ksampler" not in requested:
        requested.insert(0, "ksampler")
    variants = [v for v in rows.VARIANTS if v in requested]  # the family's own, in its order
    if family == "dit" and args.unet_repeats > 0:
        raise SystemExit("--forward-repeats: not on the other transformer families' rows (their hooks' cost is "
                         "the per-step overhead of the sampling runs)")
    cases = parse_cases(args)
    own_cases = family == "dit" and not args.cases and args.sizes is None  # each family's own case
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    defaults = FAMILY_DEFAULTS[family]
    cfg = defaults["cfg"] if args.cfg is None else args.cfg
    text_tokens = (128 if family in ("flux", "mmdit") else None) if args.text_tokens is None else args.text_tokens
    scheduler = defaults["scheduler"] if args.scheduler is None else args.scheduler
    spec = {"seed": args.seed, "sdxl_depth": args.sdxl_depth, "device": args.device, "threads": args.threads,
            "cfg": cfg, "sampler": args.sampler, "scheduler": scheduler, "comfyui": args.comfyui}
    if family == "flux":
        spec.update(flux_hidden=args.flux_hidden, flux_double=args.flux_double, flux_single=args.flux_single,
                    text_tokens=text_tokens)
    elif family == "mmdit":
        spec.update(sd3_depth=args.sd3_depth, text_tokens=text_tokens)
    elif family == "dit":
        spec.update(dit_size=args.dit_size, text_tokens=text_tokens)

    run: dict[str, Any] = {
        "command": "python benchmarks/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(args.device, args.threads),
        "variants": variants, "warmup": args.warmup, "repeats": args.repeats, "sampler": args.sampler,
        "scheduler": scheduler, "cfg": "per model" if cfg is None else cfg, "seed": args.seed, "memory_steps": args.memory_steps,
        "models": {}, "results": [],
    }
    if family in ("flux", "mmdit", "dit"):
        run["text_tokens"] = family_rows.TEXT_TOKENS if text_tokens is None else text_tokens
    for model_name in models:
        t0 = time.perf_counter()
        patcher = build_model(model_name, **model_kwargs(spec))
        run["models"][model_name] = info = rows.describe(patcher, model=model_name, size=args.dit_size)
        say(f"[{model_name}] built in {time.perf_counter() - t0:.1f} s: {info}")
        for case in [dit_models.family(model_name).cases[args.dit_size]] if own_cases else cases:
            bench = make_bench(model_name, patcher, case, spec)
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
            for v in ("fixed", "half", "nokeys"):
                if v in outputs and "ksampler" in outputs and family != "unet":
                    # a key mask changed the result (the run was asynchronous); no key items did not
                    result[f"{v}_vs_ksampler_max_abs"] = float((outputs[v] - outputs["ksampler"]).abs().max())
            del outputs
            if args.profile:
                result["profile"] = interleaved_profile(rows, bench, variants, args.device, args.profile_runs)
                say(f"[{model_name} {case.label}] profile: " + json.dumps(
                    {v: {k: round(x, 1) for k, x in p.items()} for v, p in result["profile"].items()}))
            if args.dispatch:
                result["dispatch"] = dispatch_per_step(
                    lambda c, model_name=model_name, patcher=patcher: make_bench(model_name, patcher, c, spec), case,
                    variants)
                say(f"[{model_name} {case.label}] per step: " + ", ".join(
                    f"{v} {d['ops']:.0f} ops ({d['extra_ops']:+.0f}), {d['syncs']:.2f} syncs ({d['pack_syncs']:.2f} "
                    "the pack's)" for v, d in result["dispatch"].items()))
            if args.unet_repeats > 0:
                result.update(rows.forward_overhead(bench, args.unet_repeats, args.device))
                forward = result.get("unet") or result.get("forward") or {}
                say(f"[{model_name} {case.label}] forward: " + ", ".join(
                    f"{k} {median(x):.4f} s" for k, x in forward.items()))
            if args.memory != "off":
                mem = {}
                for v in variants:
                    if args.memory == "inprocess" or args.device.startswith("cuda"):
                        mem_case = Case(case.height, case.width, case.batch, min(case.steps, args.memory_steps))
                        mem[v] = measure_memory_here(make_bench(model_name, patcher, mem_case, spec), v, args.device)
                    else:
                        child = {**spec, "model": model_name, "height": case.height, "width": case.width,
                                 "batch": case.batch, "steps": min(case.steps, args.memory_steps), "variant": v}
                        mem[v] = measure_memory_subprocess(child)
                    say(f"[{model_name} {case.label}] memory {v}: {mem[v]}")
                result["memory"] = mem
            run["results"].append(result)
            say(f"[{model_name} {case.label}] ratios: " + ", ".join(
                f"{k} {median(x):.3f}" for k, x in result["ratios"].items()))
        del patcher
        gc.collect()
    run["environment"]["load_end"] = loadavg()
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
