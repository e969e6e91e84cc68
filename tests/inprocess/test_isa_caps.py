"""The precision and bit-identity tests under each oneDNN ISA cap this CPU supports.

oneDNN (and ATen's vectorised kernels) pick their code for the CPU at hand: AMX tiles on newer
Xeons, AVX-512 with or without bfloat16/float16 instructions, AVX2 elsewhere. Kernels of
different generations block and round a product differently, and a float16 tolerance measured
on one CPU once failed on another. Running tests/inprocess/test_precision.py again with the ISA
capped (``ONEDNN_MAX_CPU_ISA``, read once when a process starts, hence a subprocess per cap)
shows such a test failing on any machine that can emulate the older CPU, not only on the one
that happens to have it. The uncapped run is the main test session itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PRECISION_TESTS = "tests/inprocess/test_precision.py"

# cap -> (CPU flags it needs, ATen capability of the same generation, kernel names it forbids)
CAPS = {
    "AVX2": ({"avx2"}, "avx2", ("avx512", "amx")),
    "AVX512_CORE": ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512", ("avx512_core_bf16", "avx512_core_fp16",
                                                                             "amx")),
}


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def capped_env(cap: str) -> dict[str, str]:
    env = dict(os.environ)
    env["ONEDNN_MAX_CPU_ISA"] = cap
    env["ATEN_CPU_CAPABILITY"] = CAPS[cap][1]
    env.pop("ONEDNN_VERBOSE", None)
    return env


PROBE = """
import torch
x = torch.randn(1, 64, 32, 32, dtype=torch.bfloat16)
torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3, dtype=torch.bfloat16), padding=1)
print("aten capability", torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", list(CAPS))
def test_precision_tests_pass_under_the_isa_cap(cap: str) -> None:
    needed, aten, forbidden = CAPS[cap]
    missing = needed - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}: {cap} is its own default or beyond it")
    env = capped_env(cap)
    # The cap must really reach the kernels, or this test would only repeat the uncapped run.
    probe = subprocess.run([sys.executable, "-c", PROBE], env={**env, "ONEDNN_VERBOSE": "1"}, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    kernels = [line for line in probe.stdout.splitlines() if ",exec,cpu," in line]
    assert f"aten capability {aten.upper()}" in probe.stdout, probe.stdout[-500:]
    assert not any(name in line for line in kernels for name in forbidden), kernels
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", PRECISION_TESTS],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = run.stdout.strip().splitlines()[-1:] or ["(no output)"]
    print(f"\n[{cap}] {summary[0]}")
    assert run.returncode == 0, f"{PRECISION_TESTS} fails with ONEDNN_MAX_CPU_ISA={cap}:\n{run.stdout[-6000:]}"
    assert " passed" in summary[0] and "skipped" not in summary[0], summary
