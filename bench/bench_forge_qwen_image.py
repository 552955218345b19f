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

from bench_common import REPO, FamilyBench, neo_bench_args, run_family_bench, sized, text_states

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env, qwen_image_env

import forge_env
import qwen_image_env

from lib_freefuse.families import QWEN_IMAGE

SCALED = dict(hidden=768, heads=6, depth=8, latent=32, tokens=(128, 64), context=256, steps=6)
SMOKE = dict(hidden=128, heads=2, depth=3, latent=16, tokens=(16, 8), context=32, steps=3)


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


class Bench(FamilyBench):
    family = QWEN_IMAGE
    cfg = 4.0

    def make_unet(self, size: dict, seed: int):
        config = qwen_config(size)
        return config, qwen_image_env.make_qwen_patcher(qwen_image_env.make_tiny_qwen_image(seed, **config))

    def lora_layer(self, name: str) -> bool:
        """Every Linear of the transformer blocks."""
        return name.startswith("transformer_blocks.")

    def conditions(self, size: dict) -> tuple:
        """Qwen2.5-VL states alone, as Neo's Qwen engine gives them (the prompt, the negative prompt)."""
        prompt, negative = size["tokens"]
        return text_states(prompt, size["context"], 1), text_states(negative, size["context"], 2)

    def latent_hw(self, size: dict) -> tuple[int, ...]:
        return (1, size["latent"], size["latent"])  # Neo samples Qwen-Image's 5-D Wan latent

    def decode(self, x0):
        return forge_env.decode(x0.squeeze(2))


def main() -> None:
    args = neo_bench_args(__doc__.split("\n", 1)[0], forge_env, "Qwen-Image")
    size = sized(SMOKE if args.smoke else SCALED, args.size)
    bench = Bench(size, args.seed)
    model = (
        f"model: Qwen-Image, hidden {size['hidden']}, {bench.config['num_layers']} blocks, "
        f"latent {size['latent']}x{size['latent']}, prompt {size['tokens'][0]} and negative {size['tokens'][1]} "
        f"text tokens x {size['context']}, {size['steps']} steps, CFG {bench.cfg:g}"
    )
    run_family_bench(bench, model, args.rounds)


if __name__ == "__main__":
    main()
