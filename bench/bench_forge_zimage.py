"""Time of a whole Z-Image (Turbo) generation through Forge Neo's own NextDiT, UnetPatcher and sampling, with two
subject LoRAs: merged by Neo as usual (a), against FreeFuse as the extension runs it (b).

Run from the repository root with Neo's Python (classic Forge has no Z-Image):

    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_zimage.py            # scaled Z-Image, CPU
    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_zimage.py --smoke    # checks that it runs

Model: Neo's NextDiT with Z-Image's modulation, scaled: dim 768 (Z-Image's 3840 / 5) with heads of 128 and RoPE axes
32/48/48 as Z-Image, 6 joint layers (Z-Image: 30) and 2 + 2 refiners (as Z-Image), caption features 256 wide (Qwen3
4B: 2560), pad tokens to a multiple of 32, a 36x36 latent (288 px; 18x18 = 324 image tokens, padded to 352), a prompt
of 100 Qwen3 tokens (padded to 128), float32, Euler, 8 steps at CFG 1 as Turbo runs. Two LoRAs: rank 16 on every
attention and feed-forward Linear of the joint layers and refiners, in kohya format, loaded as Neo's LoRA extension
does. (b) reads them through the host adapter, takes them out of the merge, captures the default layer (the last of
6) at the default step (2 of 8), makes masks (superpixel vote on a cheap decode of x0) and applies the masked deltas
in rank space. Every case runs once untimed, then rounds run (a) and (b) back to back, the order reversed every other
round; the figure is (b)/(a) of setup + sampler per round, median [min - max]. Goal <= 1.10x.
"""

from __future__ import annotations

import sys

from bench_common import REPO, FamilyBench, neo_bench_args, run_family_bench, sized, text_states

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env, zimage_env

import forge_env
import zimage_env

from lib_freefuse.families import Z_IMAGE

SCALED = dict(dim=768, heads=6, axes=[32, 48, 48], layers=6, refiners=2, latent=36, tokens=100, context=256, steps=8)
SMOKE = dict(dim=256, heads=4, axes=[16, 24, 24], layers=2, refiners=1, latent=16, tokens=16, context=64, steps=3)


def zimage_config(size: dict) -> dict:
    """NextDiT's constructor arguments for Z-Image at a scaled size (huggingface_guess's Z-Image config)."""
    return {
        **zimage_env.ZIMAGE_CONFIG,
        "dim": size["dim"],
        "n_heads": size["heads"],
        "n_kv_heads": size["heads"],
        "axes_dims": size["axes"],
        "n_layers": size["layers"],
        "n_refiner_layers": size["refiners"],
        "cap_feat_dim": size["context"],
        "multiple_of": 256,
    }


class Bench(FamilyBench):
    family = Z_IMAGE
    words = ((5, 6), (11, 12))

    def make_unet(self, size: dict, seed: int):
        config = zimage_config(size)
        return config, zimage_env.make_zimage_patcher(zimage_env.make_tiny_zimage(seed, **config))

    def lora_layer(self, name: str) -> bool:
        """Attention and feed-forward of the joint layers and refiners."""
        return name.startswith(("layers.", "noise_refiner.", "context_refiner.")) and "adaLN" not in name

    def conditions(self, size: dict) -> tuple:
        """Qwen3 states alone, as Neo's Z-Image engine gives them (the negative unused at CFG 1)."""
        return text_states(size["tokens"], size["context"], 1), text_states(size["tokens"], size["context"], 2)

    def text_length(self, size: dict) -> int:
        return size["tokens"]


def main() -> None:
    args = neo_bench_args(__doc__.split("\n", 1)[0], forge_env, "Z-Image")
    size = sized(SMOKE if args.smoke else SCALED, args.size)
    bench = Bench(size, args.seed)
    c = bench.config
    model = (
        f"model: Z-Image, dim {c['dim']}, {c['n_layers']} joint layers + {c['n_refiner_layers']} + "
        f"{c['n_refiner_layers']} refiners, latent {size['latent']}x{size['latent']}, prompt {size['tokens']} Qwen3 "
        f"tokens x {size['context']}, {size['steps']} steps, CFG 1"
    )
    run_family_bench(bench, model, args.rounds)


if __name__ == "__main__":
    main()
