"""Compare one switch of the pack on and off, in one process (see bench/switch_ab.py).

Example: the pixel route of euler with dynamic masks, six pairs, on the benchmark's reduced model:

    .dev/venv/bin/python benchmarks/switch_ab.py \\
        --switch asyndm.comfy_adapter.sampler:AsynSampler.pixel_steps --values true,false \\
        --variants dynamic --pairs 6 --watch "track grouping,state to sigma"

Prints a markdown table of the pack's pieces (the profile's sum, as bench_sampling.py reports it) per variant and
switch value. Timings are single-thread CPU times unless --device cuda.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from bench.fixtures import build_model, family_of, setup_comfyui  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switch_ab.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", required=True, help="package.module:Class.attribute to set")
    p.add_argument("--values", default="true,false", help="the two (or more) values, comma-separated, JSON each")
    p.add_argument("--variants", default="fixed,dynamic", help="the pack's variants to profile")
    p.add_argument("--model", default="reduced")
    p.add_argument("--case", dest="cases", default="32x32:1:10", help="one case: latent HxW : batch : steps")
    p.add_argument("--pairs", type=int, default=6, help="profiled runs per variant and value")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--watch", default="", help="comma-separated texts: the pieces whose labels contain them")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: COMFYUI_PATH or .dev/ComfyUI)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    setup_comfyui(args.comfyui, args.device)
    import torch
    from bench import cli, switch_ab

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        owner, name = switch_ab.resolve_switch(args.switch)
        values = [switch_ab.parse_value(v.strip()) for v in args.values.split(",")]
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        (case,) = cli.parse_cases(args)
        family = family_of(args.model)
        spec = {"seed": 0, "sampler": "euler", "device": args.device, **cli.FAMILY_DEFAULTS[family]}
        patcher = build_model(args.model, **cli.model_kwargs(spec))
        bench = cli.make_bench(args.model, patcher, case, spec)
        runs = switch_ab.compare(bench, family, owner, name, values, variants, args.pairs, args.device, args.warmup)
        watch = [t.strip() for t in args.watch.split(",") if t.strip()]
        text = switch_ab.markdown(runs, args.switch, values, variants, watch, family)
    finally:
        torch.set_num_threads(threads)
    print(text)
    return text


if __name__ == "__main__":
    main()
