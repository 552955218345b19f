"""Time of a whole FLUX.2 Klein generation through Forge Neo's own FLUX class (FLUX.2's flags), UnetPatcher and
sampling, with two subject LoRAs: merged by Neo as usual (a), against FreeFuse as the extension runs it (b).

Run from the repository root with Neo's Python (classic Forge has no FLUX.2):

    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_flux2.py            # scaled Klein, CPU
    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_flux2.py --smoke    # checks that it runs

Model: Neo's IntegratedFluxTransformer2DModel with huggingface_guess's FLUX.2 flags (shared modulation, SwiGLU, no
biases, 1x1 patches, 4 RoPE axes), scaled from Klein 4B: hidden 768 (3072 / 4) with heads of 128 as Klein, 2 double
and 8 single blocks (Klein 4B: 5 and 20), a 16x16 latent of 128 channels (256 image tokens: 256 px), the Klein
engine's 512 text tokens (the prompt padded) of width 384 (Klein 4B: 3 x 2560), float32, Euler, 4 steps, CFG 1
(Neo's Klein preset). Two LoRAs: rank 16 on every Linear of the double and single blocks, kohya format, loaded as
Neo's LoRA extension does. (b) captures the second-to-last double block at the default step (1 of 4), makes masks
(superpixel vote on a cheap decode of x0) and applies the masked deltas in rank space for steps 2-4. Rounds as
bench_forge_chroma.py's (whose runner this subclasses): (b)/(a) of setup + sampler, median [min - max]. Goal <= 1.10x.
"""

from __future__ import annotations

import bench_forge_chroma
import forge_env
import klein_env

from lib_freefuse.families import FLUX2_KLEIN

SCALED = dict(hidden=768, heads=6, depth=(2, 8), latent=16, tokens=(512, 512), context=384, steps=4)
SMOKE = dict(hidden=256, heads=2, depth=(2, 2), latent=8, tokens=(16, 16), context=48, steps=3)


class KleinBench(bench_forge_chroma.Bench):
    family = FLUX2_KLEIN
    channels = klein_env.CHANNELS
    cfg = 1.0

    def make_unet(self, size: dict, seed: int):
        config = klein_env.klein_config(
            hidden_size=size["hidden"],
            num_heads=size["heads"],
            depth=size["depth"][0],
            depth_single_blocks=size["depth"][1],
            context_in_dim=size["context"],
        )
        model = forge_env.make_flux(config, seed=seed)
        return config, klein_env.make_klein_patcher(model)


if __name__ == "__main__":
    bench_forge_chroma.main(KleinBench, (SMOKE, SCALED), text="Qwen3")
