"""Time and peak memory of `extract_masks` at FLUX.1-dev's real 1024x1024 size, on CPU in fp32.

Run from the repository root:

    python bench/bench_extract_masks.py            # 24 heads x 128, 4096 image tokens (64x64) + 512 text tokens
    python bench/bench_extract_masks.py --smoke    # 4 heads x 32, 16x16 grid, 128 px image: checks that it runs
    python bench/bench_extract_masks.py --lib-root /tmp/copy   # measure a prototype copy of lib_freefuse

--smoke only checks that everything runs (seconds; the memory part measures one extraction): its ratios say nothing
about the goal.

Goals: one `extract_masks` call (default MaskConfig) costs <= 0.2x one `scaled_dot_product_attention` over the same
q, k, v of shape (1, heads, L_txt + N_img, head_dim), and needs <= 64 MiB beyond its inputs.

Time: every case runs once untimed, then `--repeats` rounds, each round running every case once (interleaved, so
that load from other processes hits all cases alike); the tables show medians, and each ratio to SDPA per round (the
ratio of two calls made back to back) as median [min - max] over the rounds: the spread is the noise of the figure.
The last lines ("ratio ...") repeat the goal's ratios.

Memory: torch's CPU allocations are invisible to tracemalloc, so each case runs in a fresh subprocess with
MALLOC_MMAP_THRESHOLD_=131072 (glibc hands every freed block of >= 128 KiB back at once, so RSS follows live memory)
that allocates and writes its inputs, runs the case once untimed (lazy imports, thread pools, code pages), frees the
heap (gc + malloc_trim), resets the peak resident size (`echo 5 > /proc/self/clear_refs`) and runs the case again:
extra = VmHWM after - VmRSS before. This sees every allocation, numpy's (SLIC) included. A second column is the
running peak of torch's CPU allocator from torch.profiler's memory events (torch tensors only), a third the RSS peak
under glibc's default (dynamic) mmap threshold. Calibration rows check the method against known 100 MiB allocations.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import lib_root, ratio_line, spread

sys.path.insert(0, lib_root(sys.argv))

from lib_freefuse.core import MaskConfig, extract_masks
from lib_freefuse.core import masks as masks_module

MIB = 2**20
WORDS_PER_SUBJECT = 3
SUBJECT_COUNTS = (2, 3, 4)


@dataclass(frozen=True)
class Size:
    heads: int
    head_dim: int
    grid: tuple[int, int]
    n_text: int
    image_px: int

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_text + self.n_img

    def describe(self) -> str:
        return (
            f"{self.heads} heads x head dim {self.head_dim}, {self.n_img} image tokens ({self.grid[0]}x{self.grid[1]})"
            f" + {self.n_text} text tokens, image {self.image_px}x{self.image_px}x3"
        )


FULL = Size(heads=24, head_dim=128, grid=(64, 64), n_text=512, image_px=1024)
SMOKE = Size(heads=4, head_dim=32, grid=(16, 16), n_text=64, image_px=128)


def subject_tokens(n_subjects: int) -> list[list[int]]:
    """~3 word tokens per subject, spread over the prompt like "a photo of <elf woman> and <red robot> ..."."""
    return [[10 + 12 * s + j for j in range(WORDS_PER_SUBJECT)] for s in range(n_subjects)]


def make_qk(size: Size, seed: int = 0, with_v: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shape = (size.heads, size.n_tokens, size.head_dim)
    count = 3 if with_v else 2
    return tuple(torch.randn(shape, generator=gen) for _ in range(count))


def make_image(size: Size) -> np.ndarray:
    """A real photo (skimage's astronaut) resized to the image size, float32 RGB in [0, 1]."""
    from skimage import data, transform

    photo = transform.resize(data.astronaut(), (size.image_px, size.image_px), anti_aliasing=True)
    return np.ascontiguousarray(photo, dtype=np.float32)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[None], k[None], v[None])


# ---------------------------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------------------------


def stage_cases(q, k, image, groups, grid) -> dict[str, Callable[[], object]]:
    """The stages of one extract_masks call, through the module's own helpers (skipped if they were renamed)."""
    from lib_freefuse.core import superpixel

    config = MaskConfig()
    n_text = q.shape[1] - grid[0] * grid[1]
    check = masks_module._check_inputs
    scores = masks_module.subject_score_maps
    vote = masks_module._vote_masks
    maps = scores(q, k, groups, grid, config, n_text=n_text).view(-1, *grid)
    img = masks_module._as_image(image)
    scale = superpixel.slic_scale(grid, tuple(img.shape[:2]), config.slic_max_side)
    small = superpixel.resize_image(img, (grid[0] * scale, grid[1] * scale))
    n_segments = min(round(math.sqrt(img.shape[0] * img.shape[1])), small.shape[0] * small.shape[1])
    return {
        "validate inputs": lambda: check(q, k, groups, grid, image, config),
        "score maps (Eq. 5-10)": lambda: scores(q, k, groups, grid, config, n_text=n_text),
        "resize+SLIC+vote (Eq. 11-13)": lambda: vote(maps, img, grid, config),
        f"of which SLIC alone ({small.shape[0]}x{small.shape[1]} px, {n_segments} segments)": (
            lambda: superpixel.slic_segments(small, n_segments, config.compactness)
        ),
    }


def run_timing(size: Size, repeats: int) -> tuple[dict[str, list[float]], list[str]]:
    q, k, v = make_qk(size, with_v=True)
    image = make_image(size)
    cases: dict[str, Callable[[], object]] = {"sdpa": lambda: sdpa(q, k, v)}
    notes = []
    for n in SUBJECT_COUNTS:
        groups = subject_tokens(n)
        cases[f"full/{n}"] = lambda g=groups: extract_masks(q, k, g, size.grid, image)
        cases[f"attn/{n}"] = lambda g=groups: extract_masks(
            q, k, g, size.grid, image, MaskConfig(superpixel_vote=False)
        )
        try:
            for name, fn in stage_cases(q, k, image, groups, size.grid).items():
                cases[f"stage/{n}/{name}"] = fn
        except (AttributeError, TypeError) as error:  # the private helpers changed: no stage breakdown
            notes.append(f"stage breakdown skipped: {error!r}")
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples, notes


def print_timing(samples: dict[str, list[float]], repeats: int) -> list[str]:
    """Print the time tables; return the goal's ratio lines (extract_masks / SDPA per round, per subject count)."""
    med = {name: statistics.median(s) for name, s in samples.items()}

    def per_round(name: str) -> list[float]:
        return [s / b for s, b in zip(samples[name], samples["sdpa"], strict=True)]

    base = med["sdpa"]
    print(f"\n== Time: {repeats} interleaved rounds; ratios per round, median [min - max] ==")
    best = min(samples["sdpa"])
    print(f"one SDPA call, (1, H, L_txt + N_img, D) fp32: median {base * 1e3:.1f} ms, best {best * 1e3:.1f} ms")
    header = (
        f"{'subjects':>8} | {'extract_masks':>13} | {'/SDPA per round':>24} | {'goal <=0.20x':>12} | "
        f"{'attention part':>14} | {'/SDPA per round':>24} | {'SLIC+vote (diff)':>16}"
    )
    print(header)
    print("-" * len(header))
    lines = []
    for n in SUBJECT_COUNTS:
        full, attn = med[f"full/{n}"], med[f"attn/{n}"]
        ratios = per_round(f"full/{n}")
        verdict = "met" if statistics.median(ratios) <= 0.2 else "NOT met"
        print(
            f"{n:>8} | {full * 1e3:10.1f} ms | {spread(ratios):>24} | {verdict:>12} | {attn * 1e3:11.1f} ms | "
            f"{spread(per_round(f'attn/{n}')):>24} | {(full - attn) * 1e3:13.1f} ms"
        )
        lines.append(ratio_line(f"extract_masks / SDPA, {n} subjects", ratios))
    print("attention part = extract_masks(..., MaskConfig(superpixel_vote=False)): validation, Eq. 5-10 and an argmax")
    stages = [name for name in med if name.startswith("stage/")]
    if stages:
        print("\nStages of one default call, timed separately (median ms, /SDPA per round):")
        for n in SUBJECT_COUNTS:
            print(f"  {n} subjects:")
            for name in stages:
                if name.startswith(f"stage/{n}/"):
                    print(f"    {name.split('/', 2)[2]:<60} {med[name] * 1e3:8.1f} ms  {spread(per_round(name))}")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Memory (each case in a fresh subprocess)
# ---------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _calib_torch() -> object:
    block = torch.ones(100 * MIB // 4)  # one transient 100 MiB tensor
    return float(block.sum())


def _calib_torch_blocks() -> object:
    blocks = [torch.ones(4 * MIB // 4) for _ in range(25)]  # 25 x 4 MiB, from the heap rather than mmap
    return sum(float(b.sum()) for b in blocks)


def _calib_numpy() -> object:
    block = np.ones(100 * MIB // 8)  # numpy: invisible to torch.profiler
    return float(block.sum())


def worker_case(case: str, size: Size) -> Callable[[], object]:
    """Build the inputs of one memory case (allocated and written now) and return the call to measure."""
    with_v = case == "sdpa"
    q, k, *rest = make_qk(size, with_v=with_v)
    image = make_image(size)
    if case == "sdpa":
        return lambda: sdpa(q, k, rest[0])
    if case.startswith("extract/") or case.startswith("attn/"):
        kind, n = case.split("/")
        config = MaskConfig(superpixel_vote=kind == "extract")
        return lambda: extract_masks(q, k, subject_tokens(int(n)), size.grid, image, config)
    return {"calib/torch": _calib_torch, "calib/torch-blocks": _calib_torch_blocks, "calib/numpy": _calib_numpy}[case]


def worker(case: str, size: Size, threads: int, with_profiler: bool) -> dict[str, float | None]:
    """Peak RSS of the second call, then (if asked) torch's allocator peak of a third call under torch.profiler."""
    torch.set_num_threads(threads)
    fn = worker_case(case, size)
    fn()  # warm-up: lazy imports, thread pools, code pages of the kernels used
    _release_heap()
    if not _reset_peak_rss():
        raise RuntimeError("resetting the peak RSS (echo 5 > /proc/self/clear_refs) is not supported here")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    measured: dict[str, float | None] = {"rss_mib": (peak - before) / 1024, "torch_mib": None}
    if with_profiler:
        from torch.profiler import ProfilerActivity, profile

        _release_heap()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = top = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            current += event.nbytes()
            top = max(top, current)
        measured["torch_mib"] = top / MIB
    return measured


def measure_in_subprocess(case: str, args: argparse.Namespace, fixed_mmap: bool = True) -> dict[str, float | None]:
    """Run `worker` in a fresh interpreter. fixed_mmap: glibc returns every block >= 128 KiB to the OS on free."""
    command = [sys.executable, __file__, "--worker", case, "--threads", str(args.threads)]
    if args.lib_root:
        command += ["--lib-root", args.lib_root]
    if args.smoke:
        command.append("--smoke")
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    else:
        command.append("--no-profiler")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"  [{case}] worker failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"rss_mib": None, "torch_mib": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def run_memory(size: Size, args: argparse.Namespace) -> int:
    """Print the memory table; return how many cases failed to measure."""
    rows = [
        ("calibration: one transient 100 MiB torch tensor", "calib/torch", "~100 / ~100"),
        ("calibration: 25 x 4 MiB torch tensors at once", "calib/torch-blocks", "~100 / ~100"),
        ("calibration: one transient 100 MiB numpy array", "calib/numpy", "~100 / 0"),
    ]
    rows += [(f"extract_masks, {n} subjects (default config)", f"extract/{n}", "<= 64") for n in SUBJECT_COUNTS]
    rows.append(("extract_masks, 4 subjects, superpixel_vote=False", "attn/4", "<= 64"))
    rows.append(("reference: one SDPA call (output included)", "sdpa", ""))
    if args.smoke:  # each case is a fresh interpreter (seconds): one extraction
        rows = [row for row in rows if row[1] == "extract/2"]
    print("\n== Peak memory beyond the inputs, MiB (fresh subprocess per case) ==")
    header = (
        f"{'case':<50} | {'peak RSS':>8} | {'torch allocator':>15} | {'RSS, default malloc':>19} | {'expect/goal':>11}"
    )
    print(header)
    print("-" * len(header))
    failed = 0
    for label, case, goal in rows:
        fixed = measure_in_subprocess(case, args)
        with_default = case.startswith("extract/") and not args.smoke
        default = measure_in_subprocess(case, args, fixed_mmap=False) if with_default else {}
        rss = fixed["rss_mib"]
        failed += rss is None or (with_default and default["rss_mib"] is None)
        verdict = goal
        if goal.startswith("<=") and rss is not None:
            verdict = f"{goal} {'met' if rss <= 64 else 'NOT met'}"
        print(
            f"{label:<50} | {_mib(rss):>8} | {_mib(fixed['torch_mib']):>15} | "
            f"{_mib(default.get('rss_mib')) if default else '':>19} | {verdict:>11}"
        )
    print(
        "peak RSS: every allocation (torch, numpy/SLIC, MKL), with MALLOC_MMAP_THRESHOLD_=131072 so that freed blocks\n"
        "leave the process at once and the peak is the peak of live memory. torch allocator: torch tensors only.\n"
        "RSS, default malloc: the same with glibc's dynamic mmap threshold, which keeps freed blocks of up to 32 MiB\n"
        "in the heap; varies from run to run (one run shown) and over-states the live peak."
    )
    return failed


def print_naive(size: Size) -> None:
    h, n, t = size.heads, size.n_img, size.n_text
    rows_needed = SUBJECT_COUNTS[-1] * max(1, math.floor(n * MaskConfig().self_attention_top_fraction))
    text_rows = SUBJECT_COUNTS[-1] * WORDS_PER_SUBJECT
    cases = [
        ("inputs q + k (for scale)", 2 * h * size.n_tokens * size.head_dim),
        (f"text x image softmax, all {t} text rows, all heads", h * t * n),
        (f"image x image self-attention ({n} x {n}), one head", n * n),
        ("image x image self-attention, all heads", h * n * n),
        (f"full joint attention ({size.n_tokens}^2), all heads", h * size.n_tokens**2),
        (f"rows used, {rows_needed} self + {text_rows} text, all heads at once", h * (rows_needed + text_rows) * n),
    ]
    print("\n== Naive alternatives, arithmetic (fp32, one materialised matrix, before softmax temporaries) ==")
    for label, elements in cases:
        print(f"  {label:<62} {elements * 4 / MIB:10.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny size and 3 rounds: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --smoke 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-time", action="store_true", help="skip the time measurement")
    parser.add_argument("--lib-root", help="import lib_freefuse from this folder instead (to measure a prototype)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-profiler", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SMOKE if args.smoke else FULL
    if args.worker:
        print(json.dumps(worker(args.worker, size, args.threads, not args.no_profiler)))
        return
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.smoke else 5)
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"lib_freefuse: {Path(masks_module.__file__).parents[2]}")
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}; fp32 on CPU")
    print(f"size: {size.describe()}; subjects: {', '.join(map(str, SUBJECT_COUNTS))} x {WORDS_PER_SUBJECT} tokens")
    started = time.perf_counter()
    lines, failed = [], 0
    if not args.no_time:
        samples, notes = run_timing(size, repeats)
        lines = print_timing(samples, repeats)
        for note in notes:
            print(note)
    if not args.no_memory:
        failed = run_memory(size, args)
    print_naive(size)
    print()
    print("\n".join(lines))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if failed:
        raise SystemExit(f"{failed} memory case(s) failed to measure (their worker's error is above)")


if __name__ == "__main__":
    main()
