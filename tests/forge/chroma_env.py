"""A tiny random Chroma built from Forge Neo's own class (backend/nn/chroma.py), its UnetPatcher, its conditions,
and Neo's Chroma text engine without its encoder. Neo only: classic Forge has no Chroma."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

CHROMA_CONFIG = dict(
    in_channels=64,  # 16 latent channels x a 2x2 patch: Chroma's img_in takes the patchified latent
    out_channels=64,
    context_in_dim=64,  # T5 hidden states
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=2,
    depth=3,
    depth_single_blocks=2,
    axes_dim=[16, 24, 24],  # sums to the head dim, 64
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    in_dim=64,  # the modulation MLP's rows: 16 + 16 (timestep, guidance) + 32 (slot index)
    out_dim=128,  # one modulation vector per slot: hidden_size wide
    hidden_dim=64,
    n_layers=2,
    txt_ids_dims=[],
    vec_in_dim=None,
)


def make_tiny_chroma(seed: int = 0):
    """Neo's IntegratedChromaTransformer2DModel with random weights (norm scales near 1, non-zero biases), loaded as
    backend/loader.py loads a checkpoint (ForgeOperations, then a state dict)."""
    from backend import memory_management
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    torch.manual_seed(seed)
    reference = IntegratedChromaTransformer2DModel(**CHROMA_CONFIG)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))
            elif parameter.ndim == 1:  # RMS norm scales (QK-norm, the modulation MLP's norms)
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=False):
        model = IntegratedChromaTransformer2DModel(**CHROMA_CONFIG)
    load_state_dict(model, reference.state_dict())
    model.config = {**CHROMA_CONFIG, "image_model": "chroma"}  # what the LoRA key map reads (depth, hidden_size)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_chroma_patcher(model):
    """UnetPatcher as backend/diffusion_engine/chroma.py builds it (Chroma is a FLOW model: discrete flow)."""
    from backend.modules.k_prediction import PredictionDiscreteFlow
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    config = model_list.Chroma(dict(model.config))
    predictor = PredictionDiscreteFlow(config)
    return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=predictor, config=config)


def conditions(batch: int = 1, tokens: int = 8, seed: int = 1):
    """compile_conditions() of random T5 states alone: Neo's Chroma engine returns a tensor, no pooled vector and
    no guidance."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(batch, tokens, CHROMA_CONFIG["context_in_dim"], generator=g))


def sample(forge, unet, *, batch: int = 1, tokens: int = 8, uncond_tokens: int = 8, **kwargs):
    """Forge's sampling path (forge_env.sample) for the tiny Chroma: a prompt of `tokens` T5 tokens and a negative
    prompt of `uncond_tokens` (Neo's Chroma engine pads neither, so they differ as the prompts do)."""
    cond = conditions(batch, tokens)
    uncond = conditions(batch, uncond_tokens, seed=9)
    return forge.sample(unet, batch=batch, cond=cond, uncond=uncond, **kwargs)


def t5_engine(forge_root: Path):
    """Neo's T5TextProcessingEngine built as backend/diffusion_engine/chroma.py builds it (min_length 1, no
    padding), without a text encoder: only tokenize_line runs. Its tokenizer: FLUX.1-schnell's T5 tokenizer, whose
    config is Chroma's own; this Neo tree's Chroma tokenizer folder has its config but no vocabulary file.
    `modules.shared` (read only when an engine is constructed) is stubbed while the engine is built."""
    from transformers import T5TokenizerFast

    stubbed = "modules.shared" not in sys.modules
    if stubbed:
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=SimpleNamespace(emphasis="Original"))
    try:
        from backend.text_processing.t5_engine import T5TextProcessingEngine

        folder = forge_root / "backend/huggingface/black-forest-labs/FLUX.1-schnell/tokenizer_2"
        tokenizer = T5TokenizerFast.from_pretrained(str(folder))
        encoder = SimpleNamespace(transformer=None)
        return T5TextProcessingEngine(text_encoder=encoder, tokenizer=tokenizer, min_length=1, min_padding=0)
    finally:
        if stubbed:
            sys.modules.pop("modules.shared", None)
