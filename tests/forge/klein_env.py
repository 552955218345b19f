"""A tiny random FLUX.2 Klein built from Forge Neo's own class (backend/nn/flux.py with the flags Neo's detection
sets for FLUX.2), its UnetPatcher and conditions, and Neo's Klein text engine with its Qwen3 tokenizer and no
encoder. Neo only: classic Forge has no FLUX.2."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

CHANNELS = 128  # Klein's latent: 32 VAE channels x a 2x2 pixel patch, at 1/16 of the image
KLEIN_CONFIG = dict(  # huggingface_guess/detection.py's FLUX.2 flags, at a tiny size
    image_model="flux2",
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    vec_in_dim=None,  # no pooled text
    context_in_dim=96,  # three Qwen3 hidden layers side by side (3 x 32 here)
    hidden_size=256,  # Neo's detection: num_heads = hidden_size // 128, so a multiple of 128
    mlp_ratio=3.0,
    num_heads=2,
    depth=3,
    depth_single_blocks=2,
    axes_dim=[32, 32, 32, 32],  # sums to the head dim, 128
    theta=2000,
    patch_size=1,
    qkv_bias=False,
    guidance_embed=False,
    txt_ids_dims=[3],
    global_modulation=True,
    mlp_silu_act=True,
    ops_bias=False,
    default_ref_method="index",
    ref_index_scale=10.0,
    yak_mlp=False,
    txt_norm=False,
)


def klein_config(**overrides) -> dict:
    return {**KLEIN_CONFIG, **overrides}


def make_tiny_klein(seed: int = 0, **overrides):
    """Neo's IntegratedFluxTransformer2DModel with FLUX.2's flags and random weights (weights ~ N(0, 1/fan_in),
    QK-norm scales near 1), loaded as backend/loader.py loads a checkpoint (ForgeOperations, then a state dict)."""
    import forge_env
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    config = klein_config(**overrides)
    model = forge_env.make_flux(config, seed=seed)  # Neo's class, built as the loader builds it
    assert isinstance(model, IntegratedFluxTransformer2DModel) and model.global_modulation
    return model


def make_klein_patcher(model):
    """UnetPatcher as backend/diffusion_engine/flux2.py builds it (Flux2K4B's FLUX prediction, shift 2.02)."""
    from backend.modules.k_prediction import PredictionFlux
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    config = model_list.Flux2K4B(dict(model.config))
    return UnetPatcher.from_model(
        model=model, diffusers_scheduler=None, k_predictor=PredictionFlux(config), config=config
    )


def conditions(batch: int = 1, tokens: int = 8, seed: int = 1):
    """compile_conditions() of random Qwen3 states alone: Neo's Klein engine returns a tensor (no pooled vector, no
    guidance)."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(batch, tokens, KLEIN_CONFIG["context_in_dim"], generator=g))


def sample(forge, unet, *, batch: int = 1, tokens: int = 8, uncond_tokens: int = 8, **kwargs):
    """Forge's sampling path (forge_env.sample) for the tiny Klein on its 128-channel latent."""
    cond = conditions(batch, tokens)
    uncond = conditions(batch, uncond_tokens, seed=9)
    return forge.sample(unet, batch=batch, cond=cond, uncond=uncond, channels=CHANNELS, **kwargs)


class StandInEncoder:
    """Qwen3's place in the engine: embeddings of ones, and three 'hidden layers' of ones (B, 3, T, 4)."""

    def get_input_embeddings(self):
        return lambda ids: torch.ones(*ids.shape, 4)

    def __call__(self, _, *, embeds, **kwargs):
        return None, embeds[:, None].expand(-1, 3, -1, -1)


def klein_engine(forge_root: Path, size: str = "4B"):
    """Neo's KleinTextProcessingEngine built as backend/diffusion_engine/flux2.py builds it, with the Qwen3 tokenizer
    the Klein pipeline folder names (Qwen2TokenizerFast) and a stand-in encoder. `modules.shared` (read when the
    engine module is imported and an engine built) is stubbed meanwhile."""
    from transformers import Qwen2TokenizerFast

    stubbed = "modules.shared" not in sys.modules
    if stubbed:
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=SimpleNamespace(emphasis="Original"))
    try:
        from backend.text_processing.klein_engine import KleinTextProcessingEngine

        folder = forge_root / f"backend/huggingface/black-forest-labs/FLUX.2-klein-{size}/tokenizer"
        tokenizer = Qwen2TokenizerFast.from_pretrained(str(folder))
        return KleinTextProcessingEngine(text_encoder=StandInEncoder(), tokenizer=tokenizer)
    finally:
        if stubbed:
            sys.modules.pop("modules.shared", None)
