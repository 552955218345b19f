"""Time of a whole FLUX generation through Forge's own FLUX, UnetPatcher and sampling, with two subject LoRAs:
merged by Forge as usual, against FreeFuse (paper mode and restart mode), and where FreeFuse's time goes.

Run from the repository root with Forge's Python:

    FORGE_DIR=/work/forge /work/forge-venv/bin/python bench/bench_forge_generation.py   # scaled-down FLUX, CPU
    FORGE_DIR=... python bench/bench_forge_generation.py --full --device cuda           # FLUX.1-dev's size, GPU
    FORGE_DIR=... python bench/bench_forge_generation.py --lib-root /tmp/copy           # a prototype lib_freefuse
    FORGE_DIR=... python bench/bench_forge_generation.py --smoke [--full]               # checks that it runs (seconds)

Model: Forge's IntegratedFluxTransformer2DModel with random weights (tests/forge/forge_env.make_flux), wrapped in
Forge's UnetPatcher, sampled with Forge's k-diffusion Euler over sampling_function_inner, cfg 1 (FLUX.1-dev's
distilled guidance: one model call per step). Default: hidden 1536 (12 heads of 128), 1 double + 2 single blocks
(FLUX's 1 : 2), a 64x64 latent (32x32 = 1024 image tokens), 64 text tokens (FLUX's 1 : 16 with the image's), bf16,
8 steps: about 4-10 s a run on one core of a CPU with native bf16 products (AVX-512 BF16, AMX). One without them
emulates bf16 at about 8x float32's time, which swamps the ratios; the run's first lines say so (precision_note):
there, --dtype float32 measures the CPU's native precision (about 20 s a run). --full: FLUX.1-dev's dimensions
(hidden 3072, 24 heads, 19 double + 38 single blocks), a 128x128 latent (1024 px), 256 text tokens, bf16, 28 steps.
--smoke shrinks either to seconds on a CPU (2 heads of 64, a 16x16 latent, 16 text tokens, 4 steps, 3 rounds; with
--full 18 double + 2 single blocks, so the capture stays at double_blocks.17) and runs the same code otherwise: the
test suite runs both on the CPU (tests/forge/test_forge_bench_smoke.py), so the GPU figure's path is known to run.

Two subject LoRAs of rank 16 in kohya format on every Linear of the double and single blocks (modulation included),
loaded as Forge's LoRA extension does (the key map, load_lora, add_patches; forge_env.with_loras). Cases, same seed,
steps and sampler:
  (a) merged   the two LoRAs merged into the weights by Forge: the baseline
  (b) paper    FreeFuse as the extension runs it: the subject LoRAs read through the host adapter and taken out of
               the merge (Host.merged_lora, subject_deltas, FreeFuseJob, patch_unet), attention captured at
               double_blocks[min(17, last)] at the default capture step, masks made (Eq. 5-13, superpixel vote on
               a cheap decode of x0: a fixed linear latent->RGB projection upsampled 8x to the VAE's size), then
               masked LoRA deltas and per-token modulation
  (c) restart  the same with JobPlan(restart=True) and job.run: sampling starts again from step 0 with the masks
  (d) defaults (b) with the extension's own defaults (FreeFuseArgs(): own words, attention bias 5, the blocks'
               average, seeds where each subject leads): what a user runs without touching the settings
--diagnose adds (b) with modulation "global" and "off" (where per-token modulation's cost lands in the block).

Time: every case runs once untimed (warm-up, checks), then `--repeats` rounds run every case once each, interleaved,
the order reversed every other round; medians, and each case's ratio to (a) per round (two runs made back to back) as
median [min - max] over the rounds: the spread is the figure's noise. "sampler" is the k-diffusion loop (every model
call, mask capture and extraction included); "setup" is FreeFuse's per-generation work before it (the host's merged
LoRAs read, subject_deltas, the job, patch_unet); "prepare" is Forge's sampling_prepare (model load, and the LoRA
merge or its undoing, which Forge redoes only when the set of merged LoRAs changes: interleaving the cases makes it do
so every run, which a user who keeps FreeFuse on does not see), reported apart. The goal: (b) <= 1.10x (a) in setup +
sampler.
The last lines ("ratio ...") repeat the ratios; the run fails (exit status 1) if a FreeFuse case did not capture
once and make masks in its warm-up run.

Breakdown: runs of (b) and (c) with every FreeFuse patch wrapped by timers (in this script, not in the library): on
the CPU the timed runs themselves; on CUDA (each timer synchronises) and with --full, --breakdown-runs separate runs
after the timed rounds. It shows the capture (the extra RoPE and the store), decode, Eq. 5-10 score maps,
SLIC + vote, masked layer deltas (time inside MaskedLinearPatch beyond the base Linear), per-token modulation (time
inside PerTokenModulation beyond the base `lin`), mask lookups and per-call mask construction.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import REPO, lib_root, matmul_seconds, precision_note, ratio_line, spread

sys.path.insert(0, lib_root(sys.argv))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env

import forge_env
from forge_locator import find_forge

import lib_freefuse
from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.core import MaskConfig, default_capture_step
from lib_freefuse.core import masks as masks_module
from lib_freefuse.forge.host import CaptureBlock, PerTokenModulation, layer_stream, patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan, coverage_percent
from lib_freefuse.forge.lora_layers import MaskedLinearPatch, subject_deltas
from lib_freefuse.hosts import for_unet

FLUX_DEV = dict(
    in_channels=16,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,
)
SMALL = dict(hidden=1536, heads=12, double=1, single=2, latent=64, text=64, steps=8, context_dim=512, vec_dim=256)
FULL = dict(hidden=3072, heads=24, double=19, single=38, latent=128, text=256, steps=28, context_dim=4096, vec_dim=768)
# --smoke: seconds on a CPU: narrow (2 heads of 64), 64 image tokens, 4 steps; the input widths kept, and with --full
# the fewest double blocks that keep its capture block (17, the extension's default) and 2 single blocks
SMOKE = dict(hidden=128, heads=2, latent=16, text=16, steps=4)
SMOKE_FULL_DEPTH = dict(double=18, single=2)
WORDS = ((2, 3), (7, 8))  # activation-word positions of the two subjects in the prompt
BLOCK_LINEAR = re.compile(r"^(double_blocks|single_blocks)\.\d+\.")

A, B, C, D = "(a) merged", "(b) paper", "(c) restart", "(d) defaults"
B_GLOBAL, B_OFF = "(b) modulation global", "(b) modulation off"


# -- the model and the LoRAs --------------------------------------------------------------------------------------
def flux_config(size: dict) -> dict:
    """FLUX.1-dev's config with the given width and depth; RoPE axes keep FLUX's 16 : 56 : 56 split of the head."""
    heads = size["heads"]
    dim = size["hidden"] // heads
    if dim * heads != size["hidden"] or dim % 8:
        raise SystemExit(f"hidden {size['hidden']} / heads {heads}: the head dim must be a whole multiple of 8")
    first = max(2, round(dim * 16 / 128 / 2) * 2)
    rest = (dim - first) // 2 // 2 * 2
    axes = [dim - 2 * rest, rest, rest]
    return {
        **FLUX_DEV,
        "hidden_size": size["hidden"],
        "num_heads": heads,
        "depth": size["double"],
        "depth_single_blocks": size["single"],
        "axes_dim": axes,
        "context_in_dim": size["context_dim"],
        "vec_in_dim": size["vec_dim"],
    }


def kohya_lora(model, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (lora_unet_<path>.lora_down/lora_up/alpha) on every Linear of the double and single
    blocks, modulation included; up ~ N(0, 0.5/rank), down ~ N(0, 1/d_in): a visible but bounded change."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in model.named_modules():
        if not BLOCK_LINEAR.match(name) or not hasattr(module, "in_features"):
            continue
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = (
            torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
        ).to(torch.bfloat16)
        sd[f"{stem}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=g) * (0.5 / rank) ** 0.5).to(
            torch.bfloat16
        )
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    return sd


# -- the cases ----------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, size: dict, config: dict):
        self.args = args
        self.size = size
        self.steps = size["steps"]
        self.latent = (size["latent"], size["latent"])
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        started = time.perf_counter()
        model = forge_env.make_flux(config, seed=args.seed, dtype=self.dtype, device=self.device)
        self.unet = forge_env.make_unet_patcher(model)
        self.build_s = time.perf_counter() - started
        sds = {f"subject_{i}.safetensors": kohya_lora(model, args.rank, seed=100 + i) for i in range(2)}
        self.lora_keys = len(sds["subject_0.safetensors"]) // 3
        # what the host's LoRA extension does for the prompt's tags (key map, load_lora, add_patches), one file each
        self.merged, self.files, unmatched = forge_env.with_loras(self.unet, sds, args.strength)
        if unmatched:
            raise SystemExit(f"{len(unmatched)} LoRA keys matched no model key, e.g. {sorted(unmatched)[:3]}")
        self.host = for_unet(self.merged)
        if reason := self.host.missing(self.merged):
            raise SystemExit(f"{self.host.name}: {reason}")
        self.cond = forge_env.conditions(
            1, size["text"], seed=1, context_dim=config["context_in_dim"], vec_dim=config["vec_in_dim"]
        )
        self.uncond = forge_env.conditions(
            1, size["text"], seed=1, zero=True, context_dim=config["context_in_dim"], vec_dim=config["vec_in_dim"]
        )
        self.capture_step = default_capture_step(self.steps) - 1  # 0-based, as processing.start_run makes it
        self.capture_block = min(17, config["depth"] - 1)  # the extension's default 17, else the last (as it warns)
        self.jobs: dict[str, FreeFuseJob] = {}
        self.pass_times: dict[str, list[float]] = {}
        self.delta_kinds = defaultdict(int)  # what subject_deltas makes of the two LoRAs: "low-rank" or "dense"
        for subject in self.subject_patches():
            if len(subject) != self.lora_keys:
                raise SystemExit(f"{len(subject)} of a LoRA's {self.lora_keys} layers are merged in the host")
            for delta in subject_deltas(subject, self.host.base_weight(self.merged), self.host.merge)[0]:
                self.delta_kinds["low-rank" if delta.low_rank else "dense"] += 1

    def sample(self, unet, timings: dict, on_sigmas=None) -> torch.Tensor:
        return forge_env.sample(
            unet,
            steps=self.steps,
            latent_hw=self.latent,
            seed=self.args.seed,
            cond=self.cond,
            uncond=self.uncond,
            on_sigmas=on_sigmas,
            device=self.device,
            timings=timings,
        )

    def subject_patches(self) -> list:
        """The two LoRAs as the host merged them from the prompt's tags (Host.merged_lora)."""
        return [self.host.merged_lora(self.merged, path) for path in self.files]

    def freefuse(
        self,
        timings: dict,
        *,
        restart: bool = False,
        modulation: str = "per_token",
        defaults: bool = False,
        instrument=None,
    ):
        """A FreeFuse clone of the merged patcher, built as processing.start_run builds it for one sampling call."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        deltas: dict[str, list] = defaultdict(list)
        merged = self.subject_patches()
        base_weight = self.host.base_weight(self.merged)
        for index, patches in enumerate(merged):
            for delta in subject_deltas(patches, base_weight, self.host.merge)[0]:
                deltas[delta.module].append((index, delta))
        extension = FreeFuseArgs()  # (d): every setting beyond the paper at the extension's default
        beyond_the_paper = dict(
            mask_config=extension.mask,
            text_loras=extension.text_loras,
            attention_bias=extension.attention_bias,
            average_steps=extension.average_steps,
            average_blocks=extension.average_blocks,
        )
        plan = JobPlan(
            word_positions=(WORDS,),
            text_length=self.size["text"],
            capture_step=self.capture_step,
            **(beyond_the_paper if defaults else dict(mask_config=MaskConfig())),
            modulation=modulation,
            restart=restart,
        )
        job = FreeFuseJob(plan, forge_env.decode)
        unet = patch_unet(self.merged, job, deltas, self.capture_block, merged, self.host)
        timings["setup"] = timings.get("setup", 0.0) + time.perf_counter() - started
        timings["setup cpu"] = timings.get("setup cpu", 0.0) + time.thread_time() - started_cpu
        if instrument is not None:
            instrument(unet, job)
        return unet, job

    def run(self, case: str, timings: dict, instrument=None) -> torch.Tensor:
        if case == A:
            return self.sample(self.merged, timings)
        restart = case == C
        modulation = {B_GLOBAL: "global", B_OFF: "off"}.get(case, "per_token")
        unet, job = self.freefuse(
            timings, restart=restart, modulation=modulation, defaults=case == D, instrument=instrument
        )
        self.jobs[case] = job
        passes = self.pass_times[case] = []

        def one_pass():
            before = timings.get("sample", 0.0)
            try:
                return self.sample(unet, timings, on_sigmas=job.steps.use_schedule)
            finally:
                passes.append(timings.get("sample", 0.0) - before)

        return job.run(one_pass)


# -- instrumentation (breakdown) -----------------------------------------------------------------------------------
class Profile:
    """Seconds and call counts per key, from timers wrapped around FreeFuse's patches and functions."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] += seconds
        self.calls[key] += 1

    def wrap(self, fn: Callable, key: str | Callable[[], str]) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.add(key() if callable(key) else key, time.perf_counter() - start)

        return timed


class TimedCapture:
    """The capture block's forward: in the capture call, times FreeFuse's extra RoPE (the capture's own
    apply_rope, the first of the two that block makes) and the store of q and k."""

    def __init__(self, block: CaptureBlock, job: FreeFuseJob, profile: Profile):
        self.block, self.job, self.profile = block, job, profile

    def __call__(self, *args, **kwargs):  # the host's block arguments (Neo adds attn_mask, transformer_options)
        if not self.job.capturing:
            return self.block(*args, **kwargs)
        import backend.nn.flux as flux

        original, calls = flux.apply_rope, []

        def apply_rope(*rope_args):
            self.profile.sync()
            start = time.perf_counter()
            out = original(*rope_args)
            self.profile.sync()
            calls.append(time.perf_counter() - start)
            return out

        flux.apply_rope = apply_rope
        try:
            return self.block(*args, **kwargs)
        finally:
            flux.apply_rope = original
            if calls:
                self.profile.add("capture: extra RoPE", calls[0])


def instrumenter(profile: Profile):
    def instrument(unet, job: FreeFuseJob) -> None:
        def phase() -> str:
            return "masked" if job.masks is not None and job.failure is None else "pre-mask"

        for name, patch in list(unet.object_patches.items()):
            module = name.removeprefix("diffusion_model.").removesuffix(".forward")
            if isinstance(patch, MaskedLinearPatch):
                stream = layer_stream(module)
                patch.original_forward = profile.wrap(
                    patch.original_forward, lambda s=stream: f"lin base|{s}|{phase()}"
                )
                unet.object_patches[name] = profile.wrap(patch, lambda s=stream: f"lin total|{s}|{phase()}")
            elif isinstance(patch, PerTokenModulation):
                patch.lin_forward = profile.wrap(patch.lin_forward, lambda s=patch.stream: f"mod base|{s}|{phase()}")
                unet.object_patches[name] = profile.wrap(patch, lambda s=patch.stream: f"mod total|{s}|{phase()}")
            elif isinstance(patch, CaptureBlock):
                unet.object_patches[name] = TimedCapture(patch, job, profile)
        job.store_attention = profile.wrap(job.store_attention, "capture: store q, k")
        job.decode = profile.wrap(job.decode, "decode")
        job._make_masks = profile.wrap(job._make_masks, "extraction total")
        job._call_masks = profile.wrap(job._call_masks, "mask construction")
        job.masks_for = profile.wrap(job.masks_for, "mask lookup")
        job.modulation_masks = profile.wrap(job.modulation_masks, "mask lookup")

    return instrument


@contextlib.contextmanager
def _nothing():
    yield


@contextlib.contextmanager
def timed_extraction(profile: Profile):
    """extract_masks' stages, timed through the names it calls them by (lib_freefuse.core.masks' globals)."""
    names = ("subject_score_maps", "_vote_masks", "slic_segments")
    saved = {name: getattr(masks_module, name) for name in names}
    keys = {"subject_score_maps": "Eq. 5-10 score maps", "_vote_masks": "SLIC + vote", "slic_segments": "SLIC"}
    for name in names:
        setattr(masks_module, name, profile.wrap(saved[name], keys[name]))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(masks_module, name, fn)


# -- reporting ------------------------------------------------------------------------------------------------------
def fmt(seconds: float) -> str:
    """12 characters: milliseconds below 10 s, else seconds."""
    return f"{seconds * 1e3:9.1f} ms" if abs(seconds) < 10 else f"{seconds:9.2f} s "


class Run:
    """One run of a FreeFuse case: its timings, its profile (None when not instrumented) and its passes."""

    def __init__(self, timings: dict, profile: Profile | None, passes: list[float], job: FreeFuseJob):
        self.timings, self.profile, self.passes, self.job = timings, profile, passes, job


def breakdown_rows(run: Run) -> list[tuple[str, float, str]]:
    """(label, seconds, note) of where one run's time went beyond the merged baseline's work."""
    s, n = run.profile.seconds, run.profile.calls
    rows: list[tuple[str, float, str]] = []
    rows.append(("FreeFuse setup (subject_deltas, job, patch_unet)", run.timings.get("setup", 0.0), "before sampling"))
    capture = s["capture: extra RoPE"] + s["capture: store q, k"]
    rows.append(("mask capture (extra RoPE + store q, k)", capture, f"{n['capture: store q, k']} capture call"))
    extraction = s["extraction total"]
    rows.append(("mask extraction, all (Eq. 5-13 + decode)", extraction, f"{n['extraction total']} time"))
    rows.append(("  decode of x0 (cheap linear, 8x)", s["decode"], ""))
    rows.append(("  Eq. 5-10 score maps", s["Eq. 5-10 score maps"], ""))
    rows.append(("  SLIC + vote (Eq. 11-13)", s["SLIC + vote"], ""))
    rows.append(("    of which SLIC itself (skimage)", s["SLIC"], ""))
    rest = extraction - s["decode"] - s["Eq. 5-10 score maps"] - s["SLIC + vote"]
    rows.append(("  the rest (input checks, stacking)", rest, ""))
    streams = ("image", "text", "joint", "vector")
    deltas = {}
    for phase in ("pre-mask", "masked"):
        parts, phase_sum = [], 0.0
        for stream in streams:
            if n[f"lin total|{stream}|{phase}"]:
                extra = s[f"lin total|{stream}|{phase}"] - s[f"lin base|{stream}|{phase}"]
                parts.append(f"{stream} {fmt(extra).strip()}")
                phase_sum += extra
        calls = sum(n[f"lin total|{st}|{phase}"] for st in streams)
        deltas[phase] = phase_sum
        rows.append((f"masked layer deltas, {phase}", phase_sum, f"{calls} calls: " + ", ".join(parts)))
    modulation = {}
    for phase in ("pre-mask", "masked"):
        extra = sum(s[f"mod total|{st}|{phase}"] - s[f"mod base|{st}|{phase}"] for st in streams)
        calls = sum(n[f"mod total|{st}|{phase}"] for st in streams)
        mode = "global" if phase == "pre-mask" else run.job.plan.modulation
        modulation[phase] = extra
        rows.append((f"modulation deltas, {phase} ({mode})", extra, f"{calls} calls"))
    rows.append(("  of the four above: mask lookups", s["mask lookup"], f"{n['mask lookup']} calls"))
    rows.append(("  of the four above: mask construction", s["mask construction"], f"{n['mask construction']} calls"))
    accounted = capture + extraction + sum(deltas.values()) + sum(modulation.values())
    if len(run.passes) == 2:  # the first pass holds the capture, the extraction and the pre-mask deltas
        rows.append(("restart: the first, discarded pass, all", run.passes[0], "its capture, extraction, deltas too"))
        accounted = run.passes[0] + deltas["masked"] + modulation["masked"]
    rows.append((SUM, accounted, "nothing counted twice"))
    return rows


SUM = "sum of FreeFuse's parts above (in the sampler)"


def print_breakdown(case: str, runs: list[Run], baseline: float) -> None:
    """Per row, the median over the instrumented runs; the residual from the medians."""
    per_row: dict[str, list[float]] = defaultdict(list)
    notes: dict[str, str] = {}
    for run in runs:
        for label, seconds, note in breakdown_rows(run):
            per_row[label].append(seconds)
            notes.setdefault(label, note)
    sampler = statistics.median(run.timings["sample"] for run in runs)
    print(
        f"\n{case}: where the time goes, median of {len(runs)} instrumented run(s): sampler {fmt(sampler).strip()}, "
        f"(a)'s {fmt(baseline).strip()}, difference {fmt(sampler - baseline).strip()} "
        f"({(sampler / baseline - 1) * 100:+.2f}%)"
    )
    rows = [(label, statistics.median(values), notes[label]) for label, values in per_row.items()]
    rows.append(
        (
            "sampler - (a)'s sampler - that sum",
            sampler - baseline - dict((r[0], r[1]) for r in rows)[SUM],
            "outside the patches (e.g. broadcasting (B, T, D) modulation in the blocks) + noise",
        )
    )
    width = max(len(r[0]) for r in rows)
    for label, seconds, note in rows:
        print(f"  {label:<{width}} {fmt(seconds)} {seconds / baseline * 100:6.2f}% of (a)  {note}")


def check(bench: Bench, outputs: dict[str, torch.Tensor]) -> list[str]:
    """Print what each case's warm-up run did; return the cases that did not run FreeFuse's whole path."""
    reference = outputs[A].float()
    broken = []
    print(f"\nchecks: (a) finite {bool(torch.isfinite(reference).all())}, |x| mean {float(reference.abs().mean()):.3f}")
    for case, out in outputs.items():
        if case == A:
            continue
        job = bench.jobs[case]
        diff = float((out.float() - reference).abs().max())
        coverage = None if job.masks is None else coverage_percent(job.masks)
        cover = "none" if coverage is None else ", ".join(f"{c:.0f}%" for c in coverage[0])
        print(
            f"  {case}: finite {bool(torch.isfinite(out).all())}, max |out - (a)| {diff:.3f}, failure {job.failure}, "
            f"captures {job.capture_count}, passes {len(bench.pass_times[case])}, mask coverage {cover}"
        )
        if job.failure is not None or job.capture_count != 1 or coverage is None:
            print("  WARNING: this case did not run FreeFuse's whole path; its timing says little")
            broken.append(case)
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--full", action="store_true", help="FLUX.1-dev's dimensions, 1024 px, 28 steps")
    parser.add_argument(
        "--smoke", action="store_true", help="a narrow model, 64 image tokens, 4 steps, 3 rounds: checks that it runs"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the output)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --full and --smoke 3)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="stop adding rounds after this many s")
    for name in ("hidden", "heads", "double", "single", "latent", "text", "steps"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the size's {name}")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagnose", action="store_true", help="also time (b) with modulation global and off")
    parser.add_argument("--no-breakdown", action="store_true", help="no timers in (b) and (c)")
    parser.add_argument("--breakdown-runs", type=int, default=1, help="instrumented runs per case (CUDA, --full)")
    parser.add_argument("--lib-root", help="import lib_freefuse from this folder instead (to measure a prototype)")
    args = parser.parse_args()

    size = dict(FULL if args.full else SMALL)
    if args.smoke:
        size.update(SMOKE, **(SMOKE_FULL_DEPTH if args.full else {}))
    for name in ("hidden", "heads", "double", "single", "latent", "text", "steps"):
        if getattr(args, name) is not None:
            size[name] = getattr(args, name)
    config = flux_config(size)
    root, why = find_forge()
    if root is None:
        raise SystemExit(why)
    forge_env.setup(root, device=args.device)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    repeats = args.repeats or (3 if args.full or args.smoke else 5)
    cuda = args.device == "cuda"

    print(f"command: {shlex.join(['FORGE_DIR=' + str(root), os.path.basename(sys.executable), *sys.argv])}")
    print(f"lib_freefuse: {Path(lib_freefuse.__file__).parent}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(
        f"torch {torch.__version__}, device {args.device} ({device_name}), {args.threads} CPU thread(s), {args.dtype}"
    )
    if not cuda:
        dtype = getattr(torch, args.dtype)
        print(precision_note(args.dtype, matmul_seconds(dtype), matmul_seconds(torch.float32)))
    n_img = (size["latent"] // 2) ** 2
    print(
        f"model: hidden {size['hidden']}, {size['heads']} heads x {size['hidden'] // size['heads']}, "
        f"{size['double']} double + {size['single']} single blocks, mlp x4, axes {config['axes_dim']}, "
        f"context {config['context_in_dim']}, vec {config['vec_in_dim']}"
    )
    started = time.perf_counter()
    bench = Bench(args, size, config)
    print(
        f"run: {size['latent']}x{size['latent']} latent ({n_img} image tokens, {size['latent'] * 8} px), "
        f"{size['text']} text tokens, {size['steps']} steps Euler/Simple, cfg 1, seed {args.seed}; "
        f"capture at step {bench.capture_step + 1} (1-based, default_capture_step), "
        f"double_blocks.{bench.capture_block}"
    )
    print(
        f"LoRAs: 2 x rank {args.rank}, alpha {args.rank}, strength {args.strength}, kohya keys on {bench.lora_keys} "
        f"Linears each ({dict(bench.delta_kinds)} subject deltas); subject words at {WORDS}; (b), (c): the paper's "
        "masks (MaskConfig(): sink filter, self-attention, SLIC vote); (d): FreeFuseArgs()'s"
    )
    print(f"model built in {bench.build_s:.1f} s")
    print(
        "threads: 1 (the default): the 2 CPU cores are shared with other work, and with a second thread every op "
        "waits for the busier core, so runs swing several-fold under outside load; 1 thread keeps them steady"
        if not cuda and args.threads == 1
        else f"threads: {args.threads}"
    )

    cases = [A, B, C, D] + ([B_GLOBAL, B_OFF] if args.diagnose else [])
    # On the CPU the timers cost microseconds a call (a few hundred calls a run): the timed runs of (b) and (c) are
    # instrumented themselves. On CUDA each timer synchronises: separate instrumented runs after the timed rounds; and
    # so with --full on any device, which keeps the GPU figure's code path whole in a --full --smoke run on a CPU.
    instrument_rounds = not (cuda or args.full) and not args.no_breakdown

    def run_case(case: str, timings: dict, instrumented: bool = False):
        profile = Profile(cuda) if instrumented and case in (B, C) else None
        with contextlib.redirect_stdout(io.StringIO()), timed_extraction(profile) if profile else _nothing():
            out = bench.run(case, timings, instrument=instrumenter(profile) if profile else None)
        job = bench.jobs.get(case) if case != A else None
        return out, Run(timings, profile, list(bench.pass_times.get(case, [])), job)

    outputs = {}
    for case in cases:  # warm-up: lazy imports, first loads, caches; and the outputs for the checks
        warm: dict = {}
        outputs[case], _ = run_case(case, warm)
        print(f"  warm-up {case:<22} sampler {fmt(warm['sample'])}, prepare {fmt(warm['prepare'])}")
    broken = check(bench, outputs)

    samples: dict[str, list[Run]] = {case: [] for case in cases}
    timed_start = time.perf_counter()
    for round_index in range(repeats):
        for case in cases if round_index % 2 == 0 else reversed(cases):
            _, run = run_case(case, {}, instrumented=instrument_rounds)
            samples[case].append(run)
        if time.perf_counter() - timed_start > args.time_limit:
            break
    rounds = len(samples[A])

    def total(t: dict) -> float:
        return t.get("setup", 0.0) + t["sample"]

    base = [total(r.timings) for r in samples[A]]
    print(
        f"\ntimes: median of {rounds} interleaved rounds; / (a): the ratio of two runs made back to back, per round, "
        "as median [min - max] over the rounds"
    )
    header = (
        f"{'case':<22} | {'setup':>12} | {'sampler':>12} | {'setup+sampler':>13} | {'/ (a) per round':>24} |"
        f" {'prepare':>12} | goal"
    )
    print(header)
    print("-" * len(header))
    per_round = {}
    for case in cases:
        runs = [r.timings for r in samples[case]]
        per_round[case] = [total(t) / b for t, b in zip(runs, base, strict=True)]
        ratio = statistics.median(per_round[case])
        goal = f"<= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'}" if case in (B, D) else ""
        setup, sampler = (statistics.median(t.get(key, 0.0) for t in runs) for key in ("setup", "sample"))
        print(
            f"{case:<22} | {fmt(setup)} | {fmt(sampler)} | {fmt(statistics.median(total(t) for t in runs)):>13} | "
            f"{spread(per_round[case]):>24} | {fmt(statistics.median(t['prepare'] for t in runs))} | {goal}"
        )
    print(
        f"(a)'s own runs spread {(max(base) - min(base)) / statistics.median(base) * 100:.1f}% (max - min over median)"
    )

    def cpu(t: dict) -> float:
        return t.get("setup cpu", 0.0) + t["sample cpu"]

    base_cpu = [cpu(r.timings) for r in samples[A]]
    per_round_cpu = {
        case: [cpu(r.timings) / b for r, b in zip(samples[case], base_cpu, strict=True)] for case in cases[1:]
    }
    print(
        "thread CPU time (setup + sampler) / (a), per round: "
        + "; ".join(f"{case} {spread(per_round_cpu[case])}" for case in cases[1:])
        + f"; (a)'s own CPU times spread {(max(base_cpu) - min(base_cpu)) / statistics.median(base_cpu) * 100:.1f}%"
        " (one torch thread: the work itself, without the time it waited for a core on a shared machine)"
    )
    print(
        "prepare: Forge's sampling_prepare; (a) merges the two LoRAs again after every FreeFuse run and (b)/(c) undo "
        "the merge, because the interleaved cases change the set of merged LoRAs each time (not in the totals)"
    )

    if not args.no_breakdown:
        baseline_sampler = statistics.median(r.timings["sample"] for r in samples[A])
        for case in (B, C):
            if instrument_rounds:
                runs = samples[case]
            else:
                runs = [run_case(case, {}, instrumented=True)[1] for _ in range(args.breakdown_runs)]
            print_breakdown(case, runs, baseline_sampler)
        print("  (percentages: of (a)'s median sampler time)")
    print()
    for case in cases[1:]:
        print(ratio_line(f"{case} / (a) merged, setup + sampler", per_round[case]))
        print(ratio_line(f"{case} / (a) merged, thread CPU time of setup + sampler", per_round_cpu[case]))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if broken:
        raise SystemExit(f"{', '.join(broken)}: did not run FreeFuse's whole path (see the checks above)")


if __name__ == "__main__":
    main()
