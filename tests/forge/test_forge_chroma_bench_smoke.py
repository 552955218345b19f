"""bench_forge_chroma.py runs at its --smoke size through Forge Neo's backend on the CPU: FreeFuse captured once,
made masks, and the ratio line is printed with its spread. Classic Forge has no Chroma: skipped there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
RATIO_LINE = re.compile(r"^ratio (.+): median (\d+\.\d+)x, min (\d+\.\d+)x, max (\d+\.\d+)x over (\d+) rounds$", re.M)


def test_forge_chroma_bench_smoke(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip("classic Forge has no Chroma (Forge Neo's backend/nn/chroma.py)")
    check_neo_bench_smoke(forge_root, "bench_forge_chroma.py", "model: Chroma, hidden 128")


def check_neo_bench_smoke(forge_root, script: str, model_line: str) -> None:
    """bench/<script> --smoke ran through, printed `model_line`, made masks once and its ratio line (2 rounds)."""
    command = [sys.executable, str(BENCH / script), "--smoke"]
    env = {**os.environ, "FORGE_DIR": str(forge_root)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    out = done.stdout
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{out[-4000:]}\n{done.stderr[-4000:]}"
    assert model_line in out
    assert re.search(r"\(b\) FreeFuse: finite True, failure None, captures 1, mask coverage \[\d", out)
    (label, median, low, high, rounds), *_ = RATIO_LINE.findall(out)
    assert label == "(b) FreeFuse / (a) merged, setup + sampler" and int(rounds) == 2
    assert float(low) <= float(median) <= float(high)
