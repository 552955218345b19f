"""bench_forge_zimage.py runs at its --smoke size through Forge Neo's backend on the CPU: FreeFuse captured once,
made masks, and the ratio line is printed with its spread. Classic Forge has no Z-Image: skipped there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_forge_zimage.py"
RATIO_LINE = re.compile(r"^ratio (.+): median (\d+\.\d+)x, min (\d+\.\d+)x, max (\d+\.\d+)x over (\d+) rounds$", re.M)


def test_forge_zimage_bench_smoke(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip("classic Forge has no Z-Image (Forge Neo's backend/nn/lumina.py)")
    command = [sys.executable, str(SCRIPT), "--smoke"]
    env = {**os.environ, "FORGE_DIR": str(forge_root)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    out = done.stdout
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{out[-4000:]}\n{done.stderr[-4000:]}"
    assert "model: Z-Image, dim 256" in out
    assert re.search(r"\(b\) FreeFuse: finite True, failure None, captures 1, mask coverage \[\d", out)
    (label, median, low, high, rounds), *_ = RATIO_LINE.findall(out)
    assert label == "(b) FreeFuse / (a) merged, setup + sampler" and int(rounds) == 2
    assert float(low) <= float(median) <= float(high)
