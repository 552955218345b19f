"""bench_forge_generation.py runs at its --smoke size through Forge's backend, at the default size's and at --full's
(the GPU figure's) code path, on the CPU, and prints its ratios with their spread.

A subprocess of this Python (Forge's), through the script's own argument parsing and printing; tests/core/
test_bench_smoke.py does the same for the pure benches.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_forge_generation.py"
RATIO_LINE = re.compile(r"^ratio (.+): median (\d+\.\d+)x, min (\d+\.\d+)x, max (\d+\.\d+)x over (\d+) rounds$", re.M)


@pytest.mark.parametrize(
    ("flags", "shape"),
    [
        ((), "hidden 128, 2 heads x 64, 1 double + 2 single blocks"),
        (("--full",), "hidden 128, 2 heads x 64, 18 double + 2 single blocks"),
    ],
    ids=["default", "full"],
)
def test_forge_generation_smoke(forge_root, flags, shape):
    command = [sys.executable, str(SCRIPT), "--smoke", *flags]
    env = {**os.environ, "FORGE_DIR": str(forge_root)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    out = done.stdout
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{out[-4000:]}\n{done.stderr[-4000:]}"
    assert f"model: {shape}" in out
    if flags == ("--full",):
        assert "context 4096, vec 768" in out and "double_blocks.17" in out and "bfloat16" in out
    # both FreeFuse cases captured once and made masks in their warm-up run (the script exits 1 otherwise)
    assert re.search(r"\(b\) paper: finite True, .*failure None, captures 1, passes 1, mask coverage \d", out)
    assert re.search(r"\(c\) restart: finite True, .*failure None, captures 1, passes 2, mask coverage \d", out)
    assert "where the time goes" in out  # the breakdown (in the timed rounds, or in separate runs with --full)
    found = {label: (float(low), float(median), float(high)) for label, median, low, high, _ in RATIO_LINE.findall(out)}
    measures = ("setup + sampler", "thread CPU time of setup + sampler")
    assert re.search(r"\(d\) defaults: finite True, .*failure None, captures 1, passes 1, mask coverage \d", out)
    cases = ("(b) paper", "(c) restart", "(d) defaults")
    assert set(found) == {f"{case} / (a) merged, {what}" for case in cases for what in measures}
    assert all(0 < low <= median <= high for low, median, high in found.values())
