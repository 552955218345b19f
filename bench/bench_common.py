"""What the bench scripts share: which lib_freefuse they import, and how a ratio and its noise are printed."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lib_root(argv: list[str]) -> str:
    """--lib-root PATH imports lib_freefuse from PATH (a prototype copy) instead of this checkout."""
    for i, arg in enumerate(argv):
        if arg == "--lib-root" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--lib-root="):
            return arg.split("=", 1)[1]
    return str(REPO)


def spread(ratios: Sequence[float]) -> str:
    """A per-round ratio as "median [min - max]": the spread over the rounds is the noise of the figure."""
    return f"{statistics.median(ratios):.3f}x [{min(ratios):.3f} - {max(ratios):.3f}]"


def ratio_line(label: str, ratios: Sequence[float]) -> str:
    """The line every bench ends with, once per headline ratio (tests/core/test_bench_smoke.py looks for it):
    the ratio of two cases run back to back in each round, its median, min and max over the rounds."""
    if not ratios:
        raise ValueError(f"{label}: no rounds")
    return (
        f"ratio {label}: median {statistics.median(ratios):.3f}x, min {min(ratios):.3f}x, max {max(ratios):.3f}x "
        f"over {len(ratios)} rounds"
    )


def interleaved_rounds(run: Callable[[str, dict], object], cases: Sequence[str], rounds: int) -> dict[str, list[dict]]:
    """Every round runs each case once, the order reversed every other round; run(case, timings) fills its timings
    dict. Returns, per case, the timings of each of its runs in round order."""
    timed: dict[str, list[dict]] = {case: [] for case in cases}
    for r in range(rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            timings: dict = {}
            run(case, timings)
            timed[case].append(timings)
    return timed


def merged_against_freefuse(bench, merged: str, freefuse: str, rounds: int) -> None:
    """The family benches' measure: each case once untimed (the FreeFuse run must capture once and make masks, else
    the run exits with status 1), then `rounds` interleaved rounds; prints each case's median setup + sampler time
    and the per-round ratio. bench.run(case, timings) fills "sample" (and FreeFuse's "setup") seconds and returns the
    sampled latents; bench.jobs[-1] is its last FreeFuse job."""
    import torch

    from lib_freefuse.forge.job import coverage_percent

    outputs = {case: bench.run(case, {}) for case in (merged, freefuse)}
    job = bench.jobs[-1]
    coverage = coverage_percent(job.masks)[0] if job.masks is not None else None
    print(
        f"{freefuse}: finite {bool(torch.isfinite(outputs[freefuse]).all())}, failure {job.failure}, "
        f"captures {job.capture_count}, mask coverage {coverage}"
    )
    if job.failure is not None or job.capture_count != 1 or job.masks is None:
        raise SystemExit(1)
    timed = interleaved_rounds(bench.run, (merged, freefuse), rounds)
    times = {case: [t.get("setup", 0.0) + t["sample"] for t in runs] for case, runs in timed.items()}
    ratios = [b / a for a, b in zip(times[merged], times[freefuse], strict=True)]
    for case in (merged, freefuse):
        print(f"{case}: setup + sampler {statistics.median(times[case]):.2f} s (median of {rounds})")
    print(f"{freefuse} / {merged}: {spread(ratios)}")
    print(ratio_line("(b) FreeFuse / (a) merged, setup + sampler", ratios))


def kohya_lora(model, seed: int, keep: Callable[[str], bool], rank: int = 16) -> dict:
    """A kohya-format LoRA (lora_unet_<path>.lora_down/lora_up/alpha, float32) of `rank` on every Linear of `model`
    whose module path `keep` accepts; up ~ N(0, 0.5 / rank), down ~ N(0, 1 / d_in): a visible but bounded change."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in model.named_modules():
        if not keep(name) or not hasattr(module, "in_features"):
            continue
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
        sd[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * (0.5 / rank) ** 0.5
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    return sd


def neo_bench_args(description: str, forge_env, family: str):
    """The Neo-only family benches' command line (--smoke, --repeats, --seed) and Forge Neo set up from FORGE_DIR
    (forge_env: the test tier's helper module); exits with the reason when there is no Forge or it is classic."""
    import argparse

    from forge_locator import find_forge

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="seconds on a CPU: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --smoke 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root, why = find_forge()
    if root is None:
        raise SystemExit(why)
    forge_env.setup(root)
    if forge_env.HOST != "neo":
        raise SystemExit(f"classic Forge has no {family}: run this with Forge Neo (FORGE_DIR)")
    args.rounds = args.repeats or (2 if args.smoke else 5)
    return args


def subject_deltas_of(host, unet, files) -> tuple[dict[str, list], list]:
    """What processing.start_run takes out of the host's merge for the subject LoRA files (subject = index):
    ({module: [(subject, SubjectWeightDelta), ...]}, the host's merged patches of each file)."""
    from lib_freefuse.forge.lora_layers import subject_deltas

    base = host.base_weight(unet)
    deltas: dict[str, list] = {}
    merged = []
    for index, path in enumerate(files):
        patches = host.merged_lora(unet, path)
        merged.append(patches)
        for delta in subject_deltas(patches, base, host.merge)[0]:
            deltas.setdefault(delta.module, []).append((index, delta))
    return deltas, merged
