"""A tiny random Z-Image built from Forge Neo's own class (backend/nn/lumina.py's NextDiT with Z-Image's modulation),
its UnetPatcher, its conditions, and Neo's Z-Image text engine (Qwen3) without its encoder. Neo only: classic Forge
has no Z-Image."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

# What huggingface_guess's detection gives Z-Image (dim 3840 -> 30 heads, axes 32/48/48, rope 256, time scale 1000,
# pad tokens to a multiple of 32, FFN 8/3), at a tiny size: the adaLN input is min(dim, 256) wide and the timestep
# embedder's output 256, so dim must be at least 256.
ZIMAGE_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    dim=256,
    n_layers=3,
    n_refiner_layers=1,
    n_heads=4,
    n_kv_heads=4,
    multiple_of=32,
    ffn_dim_multiplier=8.0 / 3.0,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=64,  # Qwen3 hidden states
    axes_dims=[16, 24, 24],  # sums to the head dim, 64
    axes_lens=[1536, 512, 512],
    rope_theta=256.0,
    z_image_modulation=True,
    time_scale=1000.0,
    pad_tokens_multiple=32,
)


def make_tiny_zimage(seed: int = 0, **overrides):
    """Neo's NextDiT with random weights (norm scales near 1, non-zero biases, random pad tokens), loaded as
    backend/loader.py loads a checkpoint (ForgeOperations, then a state dict)."""
    from backend import memory_management
    from backend.nn.lumina import NextDiT
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    config = {**ZIMAGE_CONFIG, **overrides}
    torch.manual_seed(seed)
    reference = NextDiT(**config)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))
            elif name.endswith("pad_token"):
                parameter.copy_(torch.randn_like(parameter))
            elif parameter.ndim == 1:  # RMS norm scales (QK-norm, block norms, the caption embedder's norm)
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(parameter / 2 + 0.02 * torch.randn_like(parameter))
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=False):
        model = NextDiT(**config)
    load_state_dict(model, reference.state_dict())
    model.config = {**config, "image_model": "lumina2"}  # what the LoRA key map reads (n_layers, dim, refiners)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_zimage_patcher(model):
    """UnetPatcher as backend/diffusion_engine/zimage.py builds it (Z-Image is a FLOW model, shift 3)."""
    from backend.modules.k_prediction import PredictionDiscreteFlow
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    config = model_list.ZImage(dict(model.config))
    predictor = PredictionDiscreteFlow(config)
    return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=predictor, config=config)


def conditions(batch: int = 1, tokens: int = 8, seed: int = 1):
    """compile_conditions() of random Qwen3 states alone: Neo's Z-Image engine returns a tensor, nothing else."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(batch, tokens, ZIMAGE_CONFIG["cap_feat_dim"], generator=g))


def sample(forge, unet, *, batch: int = 1, tokens: int = 8, uncond_tokens: int = 8, **kwargs):
    """Forge's sampling path (forge_env.sample) for the tiny Z-Image: a prompt of `tokens` Qwen3 tokens and a negative
    prompt of `uncond_tokens` (Neo's Qwen3 engine pads neither)."""
    cond = conditions(batch, tokens)
    uncond = conditions(batch, uncond_tokens, seed=9)
    return forge.sample(unet, batch=batch, cond=cond, uncond=uncond, **kwargs)


def qwen3_engine(forge_root: Path):
    """Neo's Qwen3TextProcessingEngine built as backend/diffusion_engine/zimage.py builds it, with Z-Image-Turbo's
    own tokenizer from Neo's tree and no text encoder: only tokenize_line runs. `modules.shared` (read when an
    engine is built and when it parses a prompt) is stubbed while the engine is built."""
    from transformers import AutoTokenizer

    stubbed = "modules.shared" not in sys.modules
    if stubbed:
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=SimpleNamespace(emphasis="Original"))
    try:
        from backend.text_processing.qwen3_engine import Qwen3TextProcessingEngine

        folder = forge_root / "backend/huggingface/Tongyi-MAI/Z-Image-Turbo/tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return Qwen3TextProcessingEngine(text_encoder=None, tokenizer=tokenizer)
    finally:
        if stubbed:
            sys.modules.pop("modules.shared", None)
