"""Every bench script runs at its --smoke size and prints its ratios with their spread, so none can rot unseen.

Each script runs as a subprocess of this Python, through its own argument parsing and printing. The pure benches
run here; the benches that need Forge's backend run in the forge tier (tests/forge/test_forge_bench_smoke.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Every top-level bench script and the tier whose imports it needs. bench/toyworld/ holds the toy world's pipeline and
# its experiments, not timings: their parts are tested in test_toyworld.py, the world itself through a real webui
# (tests/webui/test_toyworld_quality.py); here each of its scripts parses its arguments.
TIERS = {
    "bench_extract_masks.py": "core",
    "bench_masked_lora.py": "core",
    "bench_slic_size.py": "core",
    "bench_forge_generation.py": "forge",
    "bench_forge_sdxl.py": "forge",  # tests/forge/test_forge_sdxl_bench_smoke.py
    "bench_forge_chroma.py": "forge",
    "bench_forge_flux2.py": "forge",  # tests/forge/test_forge_flux2_bench_smoke.py
    "bench_forge_qwen_image.py": "forge",  # tests/forge/test_forge_qwen_image_bench_smoke.py
    "bench_forge_zimage.py": "forge",  # tests/forge/test_forge_zimage_bench_smoke.py
}

# The line bench_common.ratio_line prints for each headline ratio.
RATIO_LINE = re.compile(r"^ratio (.+): median (\d+\.\d+)x, min (\d+\.\d+)x, max (\d+\.\d+)x over (\d+) rounds$", re.M)


def run_smoke(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> str:
    """Run bench/<script> --smoke with this Python; its stdout, after checking that it ended well."""
    command = [sys.executable, str(BENCH / script), "--smoke", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr}"
    return done.stdout


def ratios(stdout: str) -> dict[str, tuple[float, float, float, int]]:
    """label -> (min, median, max, rounds) of every ratio line, each checked for min <= median <= max."""
    found = {}
    for label, median, low, high, rounds in RATIO_LINE.findall(stdout):
        low, median, high = float(low), float(median), float(high)
        assert 0 < low <= median <= high, f"ratio {label}: min {low}, median {median}, max {high}"
        found[label] = (low, median, high, int(rounds))
    return found


def test_every_bench_script_has_a_smoke_run():
    scripts = {path.name for path in BENCH.glob("bench_*.py")} - {"bench_common.py"}
    assert scripts == set(TIERS), "a bench script without a smoke run in the test suite (TIERS)"


def test_toyworld_scripts_parse_their_arguments():
    """Every bench/toyworld and bench/toyworld2 script with a command line imports with the core tier's packages and
    answers --help (one interpreter runs them all as __main__: their runs need a GPU, Forge's Python or a webui)."""
    scripts = sorted(
        p
        for folder in ("toyworld", "toyworld2")
        for p in (BENCH / folder).glob("*.py")
        if "__main__" in p.read_text(encoding="utf-8")
    )
    assert {p.name for p in scripts} >= {"benchmark.py", "train.py", "assemble.py", "make_text.py", "train2.py",
                                         "benchmark2.py"}  # fmt: skip
    program = textwrap.dedent(
        """
        import contextlib, io, os, runpy, sys
        sys.path.insert(0, sys.argv[1])
        for path in sys.argv[2:]:
            sys.path.insert(0, os.path.dirname(path))
            sys.argv, out = [path, "--help"], io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                runpy.run_path(path, run_name="__main__")
            print(path, "usage:" in out.getvalue())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(BENCH / "toyworld"), *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [word for p in scripts for word in (str(p), "True")]


def test_extract_masks_smoke():
    found = ratios(run_smoke("bench_extract_masks.py"))
    assert set(found) == {f"extract_masks / SDPA, {n} subjects" for n in (2, 3, 4)}
    assert all(rounds == 3 for *_, rounds in found.values())


def test_masked_lora_smoke():
    stdout = run_smoke("bench_masked_lora.py")
    assert "MISMATCH" not in stdout
    found = ratios(stdout)
    assert set(found) == {
        f"{name}, {dtype}"
        for name in ("StackedLoRA (ii) / unmasked (iii)", "add_to (v) / unmasked addmm_ (vi)")
        for dtype in ("float32", "bfloat16")
    }


def test_slic_size_smoke():
    stdout = run_smoke("bench_slic_size.py")
    found = ratios(stdout)
    assert set(found) == {"extraction at slic_max_side 64 / 512"}
    rows = re.findall(r"^\s+(\d+)\s+(\d\.\d{3})\s+(\d\.\d{3})\s", stdout, re.M)
    assert [size for size, *_ in rows] == ["64", "512"]
    assert all(0.5 < float(iou) <= 1.0 for _, iou, _ in rows)  # masks that find the planted regions at both sizes


def test_precision_note_says_when_the_benchs_dtype_is_emulated():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_common
    finally:
        sys.path.remove(str(BENCH))
    emulated = bench_common.precision_note("bfloat16", 0.028, 0.0036)
    assert "7.8x float32's" in emulated and "emulated" in emulated and "--dtype float32" in emulated
    native = bench_common.precision_note("bfloat16", 0.0019, 0.0036)
    assert "0.5x float32's" in native and "emulated" not in native
    assert "emulated" not in bench_common.precision_note("float32", 0.0036, 0.0036)
    import torch

    assert bench_common.matmul_seconds(torch.float32, size=8, rounds=1) > 0
