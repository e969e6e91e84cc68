"""benchmarks/gpu_check.py cannot rot while no GPU is lent: its CPU dry run (--device cpu --small) runs every part
the CUDA check runs (equivalence in float16 and bfloat16, syncs per step, a timing row per family on the test
factories' sizes) in a process of its own, as the script is run on a card, and must finish with every equivalence
bit-identical. Timings on a CPU mean nothing: none is asserted, only that each row printed finite ratios."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT, comfyui_path

FAMILIES = ("sd1.5", "sdxl", "flux-dev", "sd3.5-large", "chroma", "qwen-image", "hunyuan-image", "lumina2", "z-image",
            "hidream", "auraflow", "flux2", "chroma-radiance")


def test_the_cuda_check_runs_dry_on_the_cpu() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                           "--steps", "2", "--comfyui", str(comfyui_path())],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert out.rstrip().endswith("] done"), out[-2000:]
    equivalence = [line for line in out.splitlines() if "] equivalence " in line]
    assert len(equivalence) == 4, out  # SD1.5 and Flux dev, float16 and bfloat16
    for line in equivalence:
        assert "no key items bit-identical, one shared track bit-identical; a drawn key item changes the result" in line
    syncs = [line for line in out.splitlines() if "] syncs per step" in line]
    assert len(syncs) == 3 and all("0.00 the pack's" in line for line in syncs), syncs
    for name in FAMILIES:
        rows = [line for line in out.splitlines() if f"] timing {name}:" in line]
        assert len(rows) == 1, (name, out[-3000:])
        ratios = re.findall(r"ratio ([0-9.]+|nan|inf)x", rows[0])
        assert len(ratios) == 2 and all(math.isfinite(float(r)) for r in ratios), rows[0]
