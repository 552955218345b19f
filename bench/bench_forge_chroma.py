"""Time of a whole Chroma generation through Forge Neo's own Chroma transformer, UnetPatcher and sampling, with two
subject LoRAs: merged by Neo as usual (a), against FreeFuse as the extension runs it (b).

Run from the repository root with Neo's Python (classic Forge has no Chroma):

    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_chroma.py            # scaled Chroma, CPU
    FORGE_DIR=/work/neo /work/neo-venv/bin/python bench/bench_forge_chroma.py --smoke    # checks that it runs

Model: Neo's IntegratedChromaTransformer2DModel, scaled: hidden 768 (Chroma's 3072 / 4) with heads of 128 as Chroma,
4 double and 8 single blocks (Chroma: 19 and 38), the global modulation MLP 2 layers of 256 (Chroma: 5 of 5120),
a 32x32 latent (256 px; 16x16 image tokens), a prompt of 128 T5 tokens of width 256 and a negative prompt of 64
(brought to 128 by repetition, one batch), float32, Euler, 6 steps, CFG 4. Two LoRAs: rank 16 on every Linear of
the double and single blocks and of the modulation MLP (the worst case: most Chroma LoRAs leave the MLP alone, and
then FreeFuse does not run it per mask row), in kohya format, loaded as Neo's LoRA extension does. (b) reads them
through the host adapter, takes them out of the merge, captures the last double block at the default step, makes
masks (superpixel vote on a cheap decode of x0) and applies the masked deltas in rank space. Every case runs once
untimed, then rounds run (a) and (b) back to back, the order reversed every other round; the figure is (b)/(a) of
setup + sampler per round, median [min - max]. Goal <= 1.10x.
"""

from __future__ import annotations

import sys

import torch
from bench_common import REPO, FamilyBench, neo_bench_args, run_family_bench, sized, text_states

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env

import forge_env

from lib_freefuse.families import CHROMA

SCALED = dict(hidden=768, heads=6, depth=(4, 8), mlp=256, latent=32, tokens=(128, 64), context=256, steps=6)
SMOKE = dict(hidden=128, heads=2, depth=(2, 2), mlp=64, latent=16, tokens=(16, 8), context=32, steps=3)


def chroma_config(size: dict) -> dict:
    """Chroma's constructor arguments at a scaled size (Neo's backend/nn/chroma.py ChromaParams)."""
    head = size["hidden"] // size["heads"]
    first = head // 8
    return dict(
        in_channels=64,
        out_channels=64,
        context_in_dim=size["context"],
        hidden_size=size["hidden"],
        mlp_ratio=4.0,
        num_heads=size["heads"],
        depth=size["depth"][0],
        depth_single_blocks=size["depth"][1],
        axes_dim=[first, (head - first) // 2, head - first - (head - first) // 2],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        in_dim=64,
        out_dim=size["hidden"],
        hidden_dim=size["mlp"],
        n_layers=2,
        txt_ids_dims=[],
        vec_in_dim=None,
    )


def make_model(config: dict, seed: int):
    from backend import memory_management
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    torch.manual_seed(seed)
    state_dict = IntegratedChromaTransformer2DModel(**config).state_dict()
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=False):
        model = IntegratedChromaTransformer2DModel(**config)
    load_state_dict(model, state_dict)
    model.config = {**config, "image_model": "chroma"}
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_patcher(model):
    from backend.modules.k_prediction import PredictionDiscreteFlow
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    config = model_list.Chroma(dict(model.config))
    return UnetPatcher.from_model(
        model=model, diffusers_scheduler=None, k_predictor=PredictionDiscreteFlow(config), config=config
    )


class Bench(FamilyBench):
    """Chroma's cases; bench_forge_flux2.py's subclasses it (family, model, latent channels)."""

    family = CHROMA
    channels = 16
    cfg = 4.0

    def make_unet(self, size: dict, seed: int):
        config = chroma_config(size)
        return config, make_patcher(make_model(config, seed))

    def lora_layer(self, name: str) -> bool:
        """Every Linear of the double and single blocks and (Chroma) of the global modulation MLP, whose per-token
        run is FreeFuse's extra work there."""
        return name.startswith(("double_blocks.", "single_blocks.", "distilled_guidance_layer."))

    def conditions(self, size: dict) -> tuple:
        """T5 states alone, as Neo's Chroma engine gives them (the prompt, the negative prompt)."""
        prompt, negative = size["tokens"]
        return text_states(prompt, size["context"], 1), text_states(negative, size["context"], 2)


def main(bench_class=Bench, sizes=None, text="T5") -> None:
    """Run the bench of bench_class (Chroma's, or a subclass) at its SCALED or --smoke size (sizes: both)."""
    name = bench_class.family.name
    args = neo_bench_args(__doc__.split("\n", 1)[0], forge_env, name)
    smoke, scaled = sizes or (SMOKE, SCALED)
    size = sized(smoke if args.smoke else scaled, args.size)
    bench = bench_class(size, args.seed)
    c = bench.config
    model = (
        f"model: {name}, hidden {c['hidden_size']}, {c['depth']} double + {c['depth_single_blocks']} single blocks, "
        f"latent {size['latent']}x{size['latent']}, prompt {size['tokens'][0]} and negative {size['tokens'][1]} "
        f"{text} tokens x {size['context']}, {size['steps']} steps, CFG {bench.cfg:g}"
    )
    run_family_bench(bench, model, args.rounds)


if __name__ == "__main__":
    main()
