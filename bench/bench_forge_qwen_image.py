"""Time of a whole Qwen-Image generation through Forge Neo's own Qwen-Image transformer, UnetPatcher and sampling,
with two subject LoRAs: merged by Neo as usual (a), against FreeFuse as the extension runs it (b).

Run from the repository root with Neo's Python (classic Forge has no Qwen-Image):

    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_qwen_image.py            # scaled, CPU
    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_qwen_image.py --smoke    # checks that it runs

Model: Neo's QwenImageTransformer2DModel, scaled: hidden 768 (Qwen-Image's 3072 / 4) with heads of 128 as
Qwen-Image, 8 double-stream blocks (Qwen-Image: 60), a 32x32 latent (256 px; 16x16 image tokens, the 5-D Wan latent
Neo samples), a prompt of 128 text tokens of width 256 (Qwen2.5-VL: 3584) and a negative prompt of 64 (brought to
128 by repetition, one batch), float32, Euler, 6 steps, CFG 4. Two LoRAs: rank 16 on every Linear of the blocks
(image, text and modulation layers), in kohya format, loaded as Neo's LoRA extension does. (b) reads them through
the host adapter, takes them out of the merge, captures the default block (0.6 of the depth) at the default step,
makes masks (superpixel vote on a cheap decode of x0) and applies the masked deltas in rank space. Every case runs
once untimed, then rounds run (a) and (b) back to back, the order reversed every other round; the figure is (b)/(a)
of setup + sampler per round, median [min - max]. Goal <= 1.10x.
"""

from __future__ import annotations

import sys
import time

import torch
from bench_common import REPO, kohya_lora, merged_against_freefuse, neo_bench_args, subject_deltas_of

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env, qwen_image_env

import forge_env
import qwen_image_env

from lib_freefuse.core import MaskConfig, default_capture_step
from lib_freefuse.families import QWEN_IMAGE
from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.hosts import for_unet

SCALED = dict(hidden=768, heads=6, depth=8, latent=32, tokens=(128, 64), context=256, steps=6)
SMOKE = dict(hidden=128, heads=2, depth=3, latent=16, tokens=(16, 8), context=32, steps=3)
WORDS = ((2, 3), (7, 8))
A, B = "(a) merged", "(b) FreeFuse"


def lora_layer(name: str) -> bool:
    """The Linears the bench's LoRAs touch: every one of the transformer blocks."""
    return name.startswith("transformer_blocks.")


def qwen_config(size: dict) -> dict:
    """Qwen-Image's constructor arguments at a scaled size (Neo's backend/nn/qwen.py; RoPE axes in its 1:3.5:3.5)."""
    head = size["hidden"] // size["heads"]
    first = head // 8
    return dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=size["depth"],
        attention_head_dim=head,
        num_attention_heads=size["heads"],
        joint_attention_dim=size["context"],
        axes_dims_rope=(first, (head - first) // 2, head - first - (head - first) // 2),
    )


def conditions(tokens: int, context: int, seed: int):
    """Qwen2.5-VL states alone, as Neo's Qwen engine gives them."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(1, tokens, context, generator=g))


class Bench:
    def __init__(self, size: dict, seed: int):
        self.size = size
        self.config = qwen_config(size)
        model = qwen_image_env.make_tiny_qwen_image(seed, **self.config)
        self.unet = qwen_image_env.make_qwen_patcher(model)
        sds = {f"qwen_subject_{i}.safetensors": kohya_lora(model, 100 + i, lora_layer) for i in range(2)}
        self.lora_keys = len(sds["qwen_subject_0.safetensors"]) // 3
        self.merged, self.files, unmatched = forge_env.with_loras(self.unet, sds, 1.0)
        if unmatched:
            raise SystemExit(f"{len(unmatched)} LoRA keys matched no model key, e.g. {sorted(unmatched)[:3]}")
        self.host = for_unet(self.merged)
        prompt, negative = size["tokens"]
        self.cond, self.uncond = conditions(prompt, size["context"], 1), conditions(negative, size["context"], 2)
        self.jobs: list[FreeFuseJob] = []

    def run(self, case: str, timings: dict) -> torch.Tensor:
        unet = self.merged
        if case == B:
            started = time.perf_counter()
            unet = self.freefuse()
            timings["setup"] = timings.get("setup", 0.0) + time.perf_counter() - started
        kwargs = dict(steps=self.size["steps"], cfg_scale=4.0, cond=self.cond, uncond=self.uncond)
        return forge_env.sample(unet, latent_hw=(1, *(self.size["latent"],) * 2), timings=timings, **kwargs)

    def freefuse(self):
        """What processing.start_run does once the words and LoRAs are known."""
        deltas, merged = subject_deltas_of(self.host, self.merged, self.files)
        plan = JobPlan(
            word_positions=(WORDS,),
            text_length=self.size["tokens"][0],
            capture_step=default_capture_step(self.size["steps"]) - 1,
            mask_config=MaskConfig(),
        )
        job = FreeFuseJob(plan, decode=lambda x0: forge_env.decode(x0.squeeze(2)), family=QWEN_IMAGE)  # 5-D latent
        self.jobs.append(job)
        model = self.merged.model.diffusion_model
        return patch_unet(self.merged, job, deltas, QWEN_IMAGE.default_capture_site(model), merged, self.host)


def main() -> None:
    args = neo_bench_args(__doc__.split("\n", 1)[0], forge_env, "Qwen-Image")
    size = SMOKE if args.smoke else SCALED
    rounds = args.rounds
    bench = Bench(size, args.seed)
    c = bench.config
    print(f"host: {forge_env.HOST}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(
        f"model: Qwen-Image, hidden {size['hidden']}, {c['num_layers']} blocks, "
        f"latent {size['latent']}x{size['latent']}, prompt {size['tokens'][0]} and negative {size['tokens'][1]} "
        f"text tokens x {size['context']}, {size['steps']} steps, CFG 4; LoRA keys per subject {bench.lora_keys}"
    )
    merged_against_freefuse(bench, A, B, rounds)


if __name__ == "__main__":
    main()
