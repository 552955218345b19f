"""Time of a whole SDXL generation through Forge's own UNet, UnetPatcher and sampling, with two subject LoRAs:
merged by Forge as usual (a), against FreeFuse as the extension runs it (b).

Run from the repository root with Forge's Python:

    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_sdxl.py            # scaled SDXL, CPU
    FORGE_DIR=... python bench/bench_forge_sdxl.py --smoke                              # checks that it runs

Model: Forge's IntegratedUNet2DConditionModel in SDXL's layout, scaled: SDXL's three levels, two resnets per level,
no transformers at the first, model_channels 160 (half of SDXL's 320, so that a LoRA's rank is to the layer widths
about what it is in SDXL), transformer depths 1 and 2 (SDXL: 2 and 10), heads of 64, a 32x32 latent (256 px; SDXL's
1024 px is 128x128), 77 CLIP tokens of width 256, float32, Euler, 6 steps, CFG 5 with a negative prompt (cond and
uncond in one batch). Two LoRAs: rank 16 on every Linear of the transformer
blocks (attn1, attn2 with to_k/to_v, ff, proj_in/out) and LoCon rank 8 on every resnet convolution, in kohya format,
loaded as Forge's LoRA extension does. (b) reads them through the host adapter and takes them out of the merge,
captures the middle block's last transformer block at the default step, makes masks (superpixel vote on a cheap
decode of x0) and applies the masked deltas (linear in rank space, LoCon convolutions in rank space, attn2 keys and
values routed per mask row). Every case runs once untimed, then rounds run (a) and (b) back to back, the order
reversed every other round; the figure is (b)/(a) of setup + sampler per round, median [min - max], in wall time and in
the thread CPU time of its one torch thread (the work itself, without the time it waited for a core on a shared
machine). Goal <= 1.10x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_common import REPO, add_size_option, interleaved_rounds, ratio_line, sized, spread, subject_deltas_of

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env, sdxl_env

import forge_env
import sdxl_env
from forge_locator import find_forge

from lib_freefuse.core import MaskConfig, default_capture_step
from lib_freefuse.families import SDXL_FAMILY
from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan, coverage_percent
from lib_freefuse.hosts import for_unet

SCALED = dict(channels=160, depth=(1, 2), latent=32, context=256, steps=6)
SMOKE = dict(channels=32, depth=(1, 1), latent=16, context=32, steps=3)
WORDS = ((2, 3), (7, 8))
A, B = "(a) merged", "(b) FreeFuse"


def unet_config(size: dict) -> dict:
    """SDXL's UNet layout at a scaled width and depth."""
    d1, d2 = size["depth"]
    return dict(
        in_channels=4,
        model_channels=size["channels"],
        out_channels=4,
        num_res_blocks=[2, 2, 2],
        channel_mult=(1, 2, 4),
        num_head_channels=64 if size["channels"] >= 64 else 16,
        use_spatial_transformer=True,
        transformer_depth=[0, 0, d1, d1, d2, d2],
        transformer_depth_output=[0, 0, 0, d1, d1, d1, d2, d2, d2],
        transformer_depth_middle=d2,
        context_dim=size["context"],
        use_linear_in_transformer=True,
        num_classes="sequential",
        adm_in_channels=size["context"],
    )


def make_model(config: dict, seed: int):
    from backend.nn.unet import IntegratedUNet2DConditionModel

    torch.manual_seed(seed)
    return sdxl_env.load_unet(config, IntegratedUNet2DConditionModel(**config).state_dict())


def make_patcher(model, config: dict):
    from backend.modules.k_prediction import Prediction
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    if forge_env.HOST == "neo":
        schedule = dict(sigma_data=1.0, beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
        predictor = Prediction(prediction_type="epsilon", timesteps=1000, **schedule)
    else:
        predictor = Prediction(prediction_type="epsilon")
    return UnetPatcher.from_model(
        model=model, diffusers_scheduler=None, k_predictor=predictor, config=model_list.SDXL(dict(config))
    )


def kohya_lora(model, seed: int, rank: int = 16, conv_rank: int = 8) -> dict[str, torch.Tensor]:
    """Rank-16 LoRA on the transformer blocks' Linears, LoCon rank 8 on the resnets' convolutions."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in model.named_modules():
        stem = "lora_unet_" + name.replace(".", "_")
        if ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")):
            if not hasattr(module, "in_features"):
                continue
            sd[f"{stem}.lora_down.weight"] = (
                torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            )
            sd[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * (0.5 / rank) ** 0.5
            sd[f"{stem}.alpha"] = torch.tensor(float(rank))
        elif name.endswith(("in_layers.2", "out_layers.3")) and isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels * 9
            sd[f"{stem}.lora_down.weight"] = torch.randn(conv_rank, module.in_channels, 3, 3, generator=g) / fan_in**0.5
            sd[f"{stem}.lora_up.weight"] = (
                torch.randn(module.out_channels, conv_rank, 1, 1, generator=g) * (0.5 / conv_rank) ** 0.5
            )
            sd[f"{stem}.alpha"] = torch.tensor(float(conv_rank))
    return sd


def conditions(context: int, seed: int):
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(
        {"crossattn": torch.randn(1, 77, context, generator=g), "vector": torch.randn(1, context, generator=g)}
    )


class Bench:
    def __init__(self, size: dict, seed: int):
        self.size = size
        self.config = unet_config(size)
        model = make_model(self.config, seed)
        self.unet = make_patcher(model, self.config)
        sds = {f"sdxl_subject_{i}.safetensors": kohya_lora(model, 100 + i) for i in range(2)}
        self.lora_keys = len(sds["sdxl_subject_0.safetensors"]) // 3
        self.merged, self.files, unmatched = forge_env.with_loras(self.unet, sds, 1.0)
        if unmatched:
            raise SystemExit(f"{len(unmatched)} LoRA keys matched no model key, e.g. {sorted(unmatched)[:3]}")
        self.host = for_unet(self.merged)
        self.cond, self.uncond = conditions(size["context"], 1), conditions(size["context"], 2)
        self.jobs: list[FreeFuseJob] = []

    def run(self, case: str, timings: dict) -> torch.Tensor:
        unet = self.merged
        if case == B:
            started, started_cpu = time.perf_counter(), time.thread_time()
            unet = self.freefuse()
            timings["setup"] = timings.get("setup", 0.0) + time.perf_counter() - started
            timings["setup cpu"] = timings.get("setup cpu", 0.0) + time.thread_time() - started_cpu
        kwargs = dict(steps=self.size["steps"], cfg_scale=5.0, cond=self.cond, uncond=self.uncond, channels=4)
        return forge_env.sample(unet, latent_hw=(self.size["latent"],) * 2, timings=timings, **kwargs)

    def freefuse(self):
        """What processing.start_run does once the words and LoRAs are known."""
        deltas, merged = subject_deltas_of(self.host, self.merged, self.files)
        plan = JobPlan(
            word_positions=(WORDS,),
            text_length=77,
            capture_step=default_capture_step(self.size["steps"]) - 1,
            mask_config=MaskConfig(),
        )
        job = FreeFuseJob(plan, decode=forge_env.decode, family=SDXL_FAMILY)
        self.jobs.append(job)
        model = self.merged.model.diffusion_model
        return patch_unet(self.merged, job, deltas, SDXL_FAMILY.default_capture_site(model), merged, self.host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="seconds on a CPU: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --smoke 2)")
    parser.add_argument("--seed", type=int, default=0)
    add_size_option(parser)
    args = parser.parse_args()
    root, why = find_forge()
    if root is None:
        raise SystemExit(why)
    forge_env.setup(root)
    size = sized(SMOKE if args.smoke else SCALED, args.size)
    rounds = args.repeats or (2 if args.smoke else 5)
    bench = Bench(size, args.seed)
    c = bench.config
    print(f"host: {forge_env.HOST}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(
        f"model: SDXL layout, model_channels {c['model_channels']}, transformer depths {size['depth']}, "
        f"latent {size['latent']}x{size['latent']}, context 77 x {size['context']}, {size['steps']} steps, CFG 5; "
        f"LoRA keys per subject {bench.lora_keys}"
    )
    outputs = {case: bench.run(case, {}) for case in (A, B)}
    job = bench.jobs[-1]
    coverage = coverage_percent(job.masks)[0] if job.masks is not None else None
    print(
        f"{B}: finite {bool(torch.isfinite(outputs[B]).all())}, failure {job.failure}, captures {job.capture_count}, "
        f"mask coverage {coverage}"
    )
    if job.failure is not None or job.capture_count != 1 or job.masks is None:
        raise SystemExit(1)
    timed = interleaved_rounds(bench.run, (A, B), rounds)
    times = {case: [t.get("setup", 0.0) + t["sample"] for t in runs] for case, runs in timed.items()}
    cpu = {case: [t.get("setup cpu", 0.0) + t["sample cpu"] for t in runs] for case, runs in timed.items()}
    ratios = [b / a for a, b in zip(times[A], times[B], strict=True)]
    cpu_ratios = [b / a for a, b in zip(cpu[A], cpu[B], strict=True)]
    for case in (A, B):
        print(
            f"{case}: setup + sampler {statistics.median(times[case]):.2f} s wall, "
            f"{statistics.median(cpu[case]):.2f} s thread CPU (medians of {rounds})"
        )
    print(f"{B} / {A}: wall {spread(ratios)}; thread CPU {spread(cpu_ratios)}")
    print(ratio_line("(b) FreeFuse / (a) merged, setup + sampler", ratios))
    print(ratio_line("(b) FreeFuse / (a) merged, thread CPU of setup + sampler", cpu_ratios))


if __name__ == "__main__":
    main()
