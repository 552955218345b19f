"""Time of the masked LoRA delta (stage 2) on one FLUX-sized linear layer, on CPU.

Run from the repository root:

    python bench/bench_masked_lora.py              # 3072 -> 9216, x (1, 4608, 3072), 2 subjects of rank 16, fp32 + bf16
    python bench/bench_masked_lora.py --smoke      # 256 tokens, 3 rounds: checks that it runs (seconds)

Cases, all on the same x, LoRA factors and (1, T, L) masks:
  (i)   masked_lora_delta(x, downs, ups, scales, masks)    stacks the factors on every call
  (ii)  StackedLoRA(downs, ups, scales)(x, masks)          stacked once, outside the timing
  (iii) (x @ A_all.T) @ B_all.T                            the same stacked low-rank product, no masks: the floor
  (iv)  sum_l masks[..., l, None] * s_l * (x @ downs[l].T @ ups[l].T)   naive per-subject loop
Goals: (ii) <= 1.05x (iii), and (ii) faster than (iv).

Every case runs once untimed, then `--repeats` rounds run every case once each (interleaved, the order reversed
every other round, so that load from other processes and cache effects hit all cases alike); the table shows each
case's median time and its per-round ratio to (iii) (the ratio of two calls made back to back) as median [min - max]
over the rounds: the spread is the noise of the figure. The last lines ("ratio ...") repeat the goals' ratios. The run
fails (exit status 1) if a masked case does not give the naive loop's result.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_common import lib_root, ratio_line, spread

sys.path.insert(0, lib_root(sys.argv))

from lib_freefuse.core import StackedLoRA, masked_lora_delta

D_IN, D_OUT, RANK, N_SUBJECTS = 3072, 9216, 16, 2
GRID, N_TEXT = (64, 64), 512


def make_masks(n_tokens: int, n_subjects: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, T, L) disjoint 0/1 masks: text tokens first (no subject), then the image grid cut into vertical bands with
    a gap of background between neighbours, as a 2- or 3-person picture would be."""
    masks = torch.zeros(1, n_tokens, n_subjects, dtype=dtype)
    n_img = n_tokens - min(N_TEXT, n_tokens // 9)
    width = max(1, round(n_img**0.5))
    cols = torch.arange(n_img) % width
    band = width / n_subjects
    for s in range(n_subjects):
        inside = (cols >= s * band + band * 0.1) & (cols < (s + 1) * band - band * 0.1)
        masks[0, n_tokens - n_img :, s] = inside.to(dtype)
    return masks


def make_case(n_tokens: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n_tokens, D_IN, generator=gen).to(dtype)
    downs = [(torch.randn(RANK, D_IN, generator=gen) / D_IN**0.5).to(dtype) for _ in range(N_SUBJECTS)]
    ups = [(torch.randn(D_OUT, RANK, generator=gen) / RANK**0.5).to(dtype) for _ in range(N_SUBJECTS)]
    scales = [1.0 - 0.2 * s for s in range(N_SUBJECTS)]  # strength * alpha / rank
    masks = make_masks(n_tokens, N_SUBJECTS, dtype)
    return x, downs, ups, scales, masks


def build_cases(x, downs, ups, scales, masks) -> dict[str, Callable[[], torch.Tensor]]:
    stacked = StackedLoRA(downs, ups, scales)
    a_all = torch.cat(downs)  # (R, d_in)
    b_all = torch.cat(ups, dim=1)  # (d_out, R)
    base_out = torch.zeros(*x.shape[:2], D_OUT, dtype=x.dtype)  # stands for the base layer's output

    def naive() -> torch.Tensor:
        total = None
        for index, (down, up, scale) in enumerate(zip(downs, ups, scales, strict=True)):
            term = masks[..., index, None] * scale * (x @ down.T @ up.T)
            total = term if total is None else total + term
        return total

    return {
        "(i) masked_lora_delta": lambda: masked_lora_delta(x, downs, ups, scales, masks),
        STACKED: lambda: stacked(x, masks),
        FLOOR: lambda: (x @ a_all.T) @ b_all.T,
        "(iv) naive per-subject loop": naive,
        # The Forge integration adds the delta into the base layer's output: no d_out-wide temporary at all.
        IN_PLACE: lambda: stacked.add_to(base_out, x, masks),
        IN_PLACE_FLOOR: lambda: base_out.view(-1, D_OUT).addmm_((x @ a_all.T).view(-1, a_all.shape[0]), b_all.T),
    }


STACKED = "(ii) StackedLoRA, prepared"
FLOOR = "(iii) (x @ A_all.T) @ B_all.T, no masks"
NAIVE = "(iv) naive per-subject loop"
IN_PLACE = "(v) StackedLoRA.add_to(y, x, masks)"
IN_PLACE_FLOOR = "(vi) y += (x @ A_all.T) @ B_all.T, addmm_"
ACCUMULATING = (IN_PLACE, IN_PLACE_FLOOR)


def run(n_tokens: int, dtype: torch.dtype, repeats: int, time_limit: float) -> tuple[list[str], list[str]]:
    """Time every case; print the table; return the cases that disagree with the naive loop and the goals' ratio
    lines."""
    x, downs, ups, scales, masks = make_case(n_tokens, dtype)
    cases = build_cases(x, downs, ups, scales, masks)
    reference = cases[NAIVE]().float()
    mismatches = []
    for name, fn in cases.items():  # warm-up, and every masked case must agree with the naive loop
        out = fn().float()
        if name not in (FLOOR, NAIVE, *ACCUMULATING):
            error = float((out - reference).abs().max() / reference.abs().max())
            tolerance = 1e-5 if dtype == torch.float32 else 3e-2
            status = "ok" if error <= tolerance else "MISMATCH"
            if status != "ok":
                mismatches.append(f"{name}, {dtype}")
            print(f"  check {name:<42} max rel. error vs (iv): {error:.1e} {status}")
        del out
    del reference
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    started = time.perf_counter()
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            result = cases[name]()
            samples[name].append(time.perf_counter() - start)
            del result
        if time.perf_counter() - started > time_limit:
            break
    rounds = len(samples[FLOOR])
    med = {name: statistics.median(s) for name, s in samples.items()}

    def per_round(name: str, over: str = FLOOR) -> list[float]:
        return [s / f for s, f in zip(samples[name], samples[over], strict=True)]

    print(f"\n{dtype}, x {tuple(x.shape)}: {rounds} interleaved rounds")
    header = f"{'case':<42} | {'median':>10} | {'/ (iii) per round: median [min - max]':>37} | {'best':>9} | goal"
    print(header)
    print("-" * len(header))
    for name in names:
        goal = ""
        if name.startswith("(ii)"):
            met = statistics.median(per_round(name)) <= 1.05 and med[name] < med[NAIVE]
            goal = f"<= 1.05x (iii), < (iv): {'met' if met else 'NOT met'}"
        elif name == IN_PLACE:
            goal = f"{spread(per_round(IN_PLACE, IN_PLACE_FLOOR))} of (vi)"
        print(
            f"{name:<42} | {med[name] * 1e3:7.1f} ms | {spread(per_round(name)):>37} | "
            f"{min(samples[name]) * 1e3:6.1f} ms | {goal}"
        )
    out_mib = x.shape[0] * x.shape[1] * D_OUT * x.element_size() / 2**20
    print(f"(the (1, {x.shape[1]}, {D_OUT}) output is {out_mib:.0f} MiB: each case writes it once, (iv) several times)")
    kind = str(dtype).removeprefix("torch.")
    return mismatches, [
        ratio_line(f"StackedLoRA (ii) / unmasked (iii), {kind}", per_round(STACKED)),
        ratio_line(f"add_to (v) / unmasked addmm_ (vi), {kind}", per_round(IN_PLACE, IN_PLACE_FLOOR)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="256 tokens, 3 rounds: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30, --smoke 3)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--time-limit", type=float, default=60.0, help="stop adding rounds after this many s/dtype")
    parser.add_argument("--lib-root", help="import lib_freefuse from this folder instead (to measure a prototype)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_tokens = 256 if args.smoke else GRID[0] * GRID[1] + N_TEXT
    repeats = args.repeats or (3 if args.smoke else 30)
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"layer {D_IN} -> {D_OUT}, {n_tokens} tokens, {N_SUBJECTS} subjects of rank {RANK}")
    started = time.perf_counter()
    lines, mismatches = [], []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        wrong, ratios = run(n_tokens, dtype, repeats, args.time_limit)
        lines += ratios
        mismatches += wrong
    print()
    print("\n".join(lines))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if mismatches:
        raise SystemExit(f"{'; '.join(mismatches)}: not the naive loop's result (MISMATCH above)")


if __name__ == "__main__":
    main()
