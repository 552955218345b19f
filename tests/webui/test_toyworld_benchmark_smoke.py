"""The toy-world benchmark script (bench/toyworld/benchmark.py) at a smoke size: it starts its own webui with its
seam and runs FreeFuse and oracle rows end to end, then the same rows in the second world (bench/toyworld2), so that
neither the script nor its seam can rot unseen (both once did: a changed server helper, and the job's extract_masks
gaining an argument)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TOY_WORLD, find_forge_python
from forge_locator import find_forge

BENCHMARK = TOY_WORLD.parent / "benchmark.py"


def test_the_benchmark_runs_a_freefuse_and_an_oracle_row(tmp_path):
    forge_root, why = find_forge()
    if forge_root is None:
        pytest.skip(why)
    python, why = find_forge_python(forge_root)
    if python is None:
        pytest.skip(why)
    out = tmp_path / "rows.json"
    configs = "FreeFuse (paper defaults);attention bias 5;oracle masks (paper timing)"
    command = [sys.executable, str(BENCHMARK), "--seeds", "1", "--steps", "8", "--configs", configs, "--json", str(out)]
    env = {**os.environ, "FORGE_DIR": str(forge_root), "FORGE_PYTHON": python}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"FreeFuse (paper defaults)", "  attention bias 5", "oracle masks (paper timing)"}
    assert all(row["images"] == 2 for row in rows.values())  # one seed x both prompts, each scored
    assert "| FreeFuse (paper defaults) |" in done.stdout
    # the second world (bench/toyworld2) runs the same rows after the first, with the same Forge python
    second = json.loads((tmp_path / "rows_second_world.json").read_text())["rows"]
    assert set(second) == set(rows) and all(row["images"] == 2 for row in second.values())
    assert "second world: 1 seeds x 2 prompts, 8 Euler steps" in done.stdout
