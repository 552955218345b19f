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


def matmul_seconds(dtype, size: int = 512, rounds: int = 3) -> float:
    """Best of `rounds` timings of one Linear's product, (size, size) tokens by a (size, size) weight, in dtype on the
    CPU (torch's threads)."""
    import time

    import torch

    x = torch.randn(size, size).to(dtype)
    weight = torch.randn(size, size).to(dtype)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - started)
    return best


def precision_note(dtype_name: str, seconds: float, float32_seconds: float) -> str:
    """One line on how fast the CPU multiplies in the bench's dtype against float32. Without native bf16/fp16
    kernels (AVX2-only CPUs) torch emulates them several times slower than float32, and the model's products then
    swamp everything else: a ratio measured so says little about the same run on hardware that has them."""
    times = seconds / float32_seconds
    line = (
        f"CPU Linear of 512 x 512 tokens and features: {dtype_name} {seconds * 1e3:.1f} ms, "
        f"float32 {float32_seconds * 1e3:.1f} ms ({times:.1f}x float32's)"
    )
    if dtype_name != "float32" and times > 2.0:
        line += (
            f"; no native {dtype_name} products on this CPU: they are emulated, so this run's ratios are set by the "
            "emulation. --dtype float32 measures this CPU's native precision"
        )
    return line


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


class FamilyBench:
    """One family's cases on a scaled model of the host's own classes, for merged_against_freefuse: (a) two subject
    LoRAs merged by the host, (b) FreeFuse as processing.start_run sets it up. A subclass says how its model,
    conditioning and latent are made; forge_env (tests/forge) must be importable."""

    family = None  # the lib_freefuse Family
    channels = 16  # latent channels
    cfg = 1.0
    words = ((2, 3), (7, 8))  # the two subjects' text-token positions
    merged_case, freefuse_case = "(a) merged", "(b) FreeFuse"

    def make_unet(self, size: dict, seed: int):
        """(constructor arguments, the model's UnetPatcher) at `size`."""
        raise NotImplementedError

    def lora_layer(self, name: str) -> bool:
        """Whether the bench's LoRAs touch the Linear at module path `name`."""
        raise NotImplementedError

    def conditions(self, size: dict) -> tuple:
        """(cond, uncond) as the family's text engine gives them."""
        raise NotImplementedError

    def latent_hw(self, size: dict) -> tuple[int, ...]:
        return (size["latent"],) * 2

    def text_length(self, size: dict) -> int:
        return size["tokens"][0]

    def decode(self, x0):
        import forge_env

        return forge_env.decode(x0)

    def __init__(self, size: dict, seed: int):
        import forge_env

        from lib_freefuse.hosts import for_unet

        self.size = size
        self.config, self.unet = self.make_unet(size, seed)
        model = self.unet.model.diffusion_model
        tag = self.family.name.split()[-1].lower().replace("-", "_")
        sds = {f"{tag}_subject_{i}.safetensors": kohya_lora(model, 100 + i, self.lora_layer) for i in range(2)}
        self.lora_keys = len(sds[f"{tag}_subject_0.safetensors"]) // 3
        self.merged, self.files, unmatched = forge_env.with_loras(self.unet, sds, 1.0)
        if unmatched:
            raise SystemExit(f"{len(unmatched)} LoRA keys matched no model key, e.g. {sorted(unmatched)[:3]}")
        self.host = for_unet(self.merged)
        self.cond, self.uncond = self.conditions(size)
        self.jobs: list = []

    def run(self, case: str, timings: dict):
        """One sampling run of `case`, its setup and sampler seconds in timings; the sampled latents."""
        import time

        import forge_env

        unet = self.merged
        if case == self.freefuse_case:
            started = time.perf_counter()
            unet = self.freefuse()
            timings["setup"] = timings.get("setup", 0.0) + time.perf_counter() - started
        kwargs = dict(steps=self.size["steps"], cfg_scale=self.cfg, cond=self.cond, uncond=self.uncond)
        latent = self.latent_hw(self.size)
        return forge_env.sample(unet, latent_hw=latent, timings=timings, channels=self.channels, **kwargs)

    def freefuse(self):
        """What processing.start_run does once the words and LoRAs are known: the patched clone."""
        from lib_freefuse.core import MaskConfig, default_capture_step
        from lib_freefuse.forge.host import patch_unet
        from lib_freefuse.forge.job import FreeFuseJob, JobPlan

        deltas, merged = subject_deltas_of(self.host, self.merged, self.files)
        plan = JobPlan(
            word_positions=(self.words,),
            text_length=self.text_length(self.size),
            capture_step=default_capture_step(self.size["steps"]) - 1,
            mask_config=MaskConfig(),
        )
        job = FreeFuseJob(plan, decode=self.decode, family=self.family)
        self.jobs.append(job)
        model = self.merged.model.diffusion_model
        return patch_unet(self.merged, job, deltas, self.family.default_capture_site(model), merged, self.host)


def text_states(tokens: int, context: int, seed: int):
    """A text engine's states alone (T5, Qwen3, Qwen2.5-VL as Neo's engines give them), random: compiled conditions."""
    import torch
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(1, tokens, context, generator=g))


def run_family_bench(bench, description: str, rounds: int) -> None:
    """Print the host, torch and the model line `description`, then merged_against_freefuse over `rounds`."""
    import forge_env
    import torch

    print(f"host: {forge_env.HOST}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{description}; LoRA keys per subject {bench.lora_keys}")
    merged_against_freefuse(bench, bench.merged_case, bench.freefuse_case, rounds)


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


def add_size_option(parser) -> None:
    """--size KEY=N (repeatable): one number of the bench's size changed, e.g. --size hidden=3072 --size heads=24."""
    parser.add_argument("--size", action="append", default=[], metavar="KEY=N", help="change one size entry")


def sized(size: dict, changes: list[str]) -> dict:
    """`size` with the --size KEY=N changes applied (whole numbers only); an unknown key or a bad number exits."""
    size = dict(size)
    for change in changes:
        key, _, value = change.partition("=")
        if key not in size or not isinstance(size[key], int) or not value.strip().isdigit():
            numbers = ", ".join(k for k, v in size.items() if isinstance(v, int))
            raise SystemExit(f"--size {change!r}: expected KEY=N with KEY one of {numbers}")
        size[key] = int(value)
    return size


def neo_bench_args(description: str, forge_env, family: str):
    """The Neo-only family benches' command line (--smoke, --repeats, --seed, --size) and Forge Neo set up from
    FORGE_DIR (forge_env: the test tier's helper module); exits with the reason when there is no Forge or it is
    classic."""
    import argparse

    from forge_locator import find_forge

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="seconds on a CPU: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --smoke 2)")
    parser.add_argument("--seed", type=int, default=0)
    add_size_option(parser)
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
