#!/usr/bin/env python3
"""ComfyUI's KSampler against the Asynchronous KSampler, side by side on one loaded model.

The command line of the benchmark package in benchmarks/bench/ (its --help, and bench/cli.py,
describe the variants, models and options). benchmarks/run_all.sh runs it for results.md.

    .dev/venv/bin/python benchmarks/bench_sampling.py --model reduced --sizes 32,64 --batch 1 --steps 10
    .dev/venv/bin/python benchmarks/bench_sampling.py --model flux-dev,flux-schnell --cases 64x64:1:4
    .dev/venv/bin/python benchmarks/bench_sampling.py --model sd3.5-large,sd3.5-medium --cases 64x64:1:10
    .dev/venv/bin/python benchmarks/bench_sampling.py --families all --repeats 3 --memory inprocess --no-profile

The names below are re-exported for scripts and tests that load this file
(tests/inprocess/test_benchmark_smoke.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # run as a script, benchmarks/ is already there; loaded by file path, it is not
    sys.path.insert(0, _HERE)

from bench.cli import build_parser, main, memory_child  # noqa: E402
from bench.dit_models import parse_families  # noqa: E402
from bench.fixtures import DIT_MODELS, MODELS, Case, build_model, family_of, model_factory, patched, setup_comfyui  # noqa: E402
from bench.flux_rows import FluxBench  # noqa: E402
from bench.flux_rows import forward_inputs as flux_forward_inputs  # noqa: E402
from bench.measure import PieceTimer, measure_memory_here, measure_memory_subprocess, timed  # noqa: E402
from bench.mmdit_rows import SD3Bench  # noqa: E402
from bench.mmdit_rows import forward_inputs as sd3_forward_inputs  # noqa: E402
from bench.naive import naive_flux_hooks_class, naive_hooks_class, naive_mmdit_hooks_class  # noqa: E402
from bench.report import markdown, pack_pieces_ms  # noqa: E402
from bench.unet_rows import UNET_LABEL, Bench, unet_forward_overhead  # noqa: E402

__all__ = [
    "DIT_MODELS", "MODELS", "UNET_LABEL", "Bench", "Case", "FluxBench", "PieceTimer", "SD3Bench", "flux_forward_inputs", "build_model", "build_parser", "family_of",
    "main", "markdown", "measure_memory_here", "measure_memory_subprocess", "memory_child", "model_factory",
    "naive_flux_hooks_class", "naive_hooks_class", "naive_mmdit_hooks_class", "sd3_forward_inputs", "pack_pieces_ms",
    "parse_families", "patched", "setup_comfyui", "timed",
    "unet_forward_overhead",
]

if __name__ == "__main__":
    main()
