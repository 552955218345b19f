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
import time

import torch
from bench_common import REPO, kohya_lora, merged_against_freefuse, neo_bench_args, subject_deltas_of

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # forge_locator
sys.path.insert(0, str(REPO / "tests" / "forge"))  # forge_env

import forge_env

from lib_freefuse.core import MaskConfig, default_capture_step
from lib_freefuse.families import CHROMA
from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.hosts import for_unet

SCALED = dict(hidden=768, heads=6, depth=(4, 8), mlp=256, latent=32, tokens=(128, 64), context=256, steps=6)
SMOKE = dict(hidden=128, heads=2, depth=(2, 2), mlp=64, latent=16, tokens=(16, 8), context=32, steps=3)
WORDS = ((2, 3), (7, 8))
A, B = "(a) merged", "(b) FreeFuse"


def lora_layer(name: str) -> bool:
    """The Linears the bench's LoRAs touch: every one of the double and single blocks and (Chroma) of the global
    modulation MLP, whose per-token run is FreeFuse's extra work there."""
    return name.startswith(("double_blocks.", "single_blocks.", "distilled_guidance_layer."))


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


def conditions(tokens: int, context: int, seed: int):
    """T5 states alone, as Neo's Chroma engine gives them."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(1, tokens, context, generator=g))


class Bench:
    """Chroma's case runner; bench_forge_flux2.py's subclasses it (family, model, latent channels)."""

    family = CHROMA
    channels = 16  # latent channels
    cfg = 4.0

    def make_unet(self, size: dict, seed: int):
        """(constructor arguments, the model's UnetPatcher) at `size`."""
        config = chroma_config(size)
        return config, make_patcher(make_model(config, seed))

    def __init__(self, size: dict, seed: int):
        self.size = size
        self.config, self.unet = self.make_unet(size, seed)
        model = self.unet.model.diffusion_model
        tag = self.family.name.split()[-1].lower()
        sds = {f"{tag}_subject_{i}.safetensors": kohya_lora(model, 100 + i, lora_layer) for i in range(2)}
        self.lora_keys = len(sds[f"{tag}_subject_0.safetensors"]) // 3
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
        kwargs = dict(steps=self.size["steps"], cfg_scale=self.cfg, cond=self.cond, uncond=self.uncond)
        latent_hw = (self.size["latent"],) * 2
        return forge_env.sample(unet, latent_hw=latent_hw, timings=timings, channels=self.channels, **kwargs)

    def freefuse(self):
        """What processing.start_run does once the words and LoRAs are known."""
        deltas, merged = subject_deltas_of(self.host, self.merged, self.files)
        plan = JobPlan(
            word_positions=(WORDS,),
            text_length=self.size["tokens"][0],
            capture_step=default_capture_step(self.size["steps"]) - 1,
            mask_config=MaskConfig(),
        )
        job = FreeFuseJob(plan, decode=forge_env.decode, family=self.family)
        self.jobs.append(job)
        model = self.merged.model.diffusion_model
        return patch_unet(self.merged, job, deltas, self.family.default_capture_site(model), merged, self.host)


def main(bench_class=Bench, sizes=None, text="T5") -> None:
    """Run the bench of bench_class (Chroma's, or a subclass) at its SCALED or --smoke size (sizes: both)."""
    name = bench_class.family.name
    args = neo_bench_args(__doc__.split("\n", 1)[0], forge_env, name)
    smoke, scaled = sizes or (SMOKE, SCALED)
    size = smoke if args.smoke else scaled
    rounds = args.rounds
    bench = bench_class(size, args.seed)
    c = bench.config
    print(f"host: {forge_env.HOST}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(
        f"model: {name}, hidden {c['hidden_size']}, {c['depth']} double + {c['depth_single_blocks']} single blocks, "
        f"latent {size['latent']}x{size['latent']}, prompt {size['tokens'][0]} and negative {size['tokens'][1]} "
        f"{text} tokens x {size['context']}, {size['steps']} steps, CFG {bench.cfg:g}; "
        f"LoRA keys per subject {bench.lora_keys}"
    )
    merged_against_freefuse(bench, A, B, rounds)


if __name__ == "__main__":
    main()
