"""A tiny random Qwen-Image built from Forge Neo's own class (backend/nn/qwen.py), its UnetPatcher, its conditions,
and Neo's Qwen text engine with its real tokenizer and no encoder. Neo only: classic Forge has no Qwen-Image."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

QWEN_CONFIG = dict(
    patch_size=2,
    in_channels=64,  # 16 latent channels x a 2x2 patch
    out_channels=16,
    num_layers=3,
    attention_head_dim=32,  # = sum(axes_dims_rope)
    num_attention_heads=2,
    joint_attention_dim=32,  # the text encoder's width (Qwen2.5-VL-7B: 3584)
    axes_dims_rope=(8, 12, 12),
)
HIDDEN = QWEN_CONFIG["num_attention_heads"] * QWEN_CONFIG["attention_head_dim"]


def make_tiny_qwen_image(seed: int = 0, **overrides):
    """Neo's QwenImageTransformer2DModel with random weights (norm scales near 1, non-zero biases), loaded as
    backend/loader.py loads a checkpoint (ForgeOperations, then a state dict)."""
    from backend import memory_management
    from backend.nn.qwen import QwenImageTransformer2DModel
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    config = {**QWEN_CONFIG, **overrides}
    torch.manual_seed(seed)
    reference = QwenImageTransformer2DModel(**config)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))
            elif parameter.ndim == 1:  # RMS norm scales (QK-norm, txt_norm)
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=False):
        model = QwenImageTransformer2DModel(**config)
    load_state_dict(model, reference.state_dict())
    model.config = {**config, "image_model": "qwen_image"}
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_qwen_patcher(model):
    """UnetPatcher as backend/diffusion_engine/qwen.py builds it: model_list.QwenImage's model type is FLUX, so
    ForgeDiffusionEngine._get_predictor gives PredictionFlux (shift 1.15)."""
    from backend.modules.k_prediction import PredictionFlux
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    config = model_list.QwenImage(dict(model.config))
    return UnetPatcher.from_model(
        model=model, diffusers_scheduler=None, k_predictor=PredictionFlux(config), config=config
    )


def conditions(batch: int = 1, tokens: int = 8, seed: int = 1):
    """compile_conditions() of random Qwen2.5-VL states alone: Neo's Qwen engine returns a tensor (no pooled vector,
    no guidance, no attention mask)."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    return compile_conditions(torch.randn(batch, tokens, QWEN_CONFIG["joint_attention_dim"], generator=g))


def sample(forge, unet, *, batch: int = 1, tokens: int = 8, uncond_tokens: int = 8, latent_hw=(12, 16), **kwargs):
    """Forge's sampling path (forge_env.sample) for the tiny Qwen-Image: a (B, 16, 1, H, W) latent as Neo makes for
    its Wan-VAE models (is_wan), a prompt of `tokens` tokens and a negative prompt of `uncond_tokens` (Neo's engine
    pads neither)."""
    cond = conditions(batch, tokens)
    uncond = conditions(batch, uncond_tokens, seed=9)
    return forge.sample(unet, batch=batch, cond=cond, uncond=uncond, latent_hw=(1, *latent_hw), **kwargs)


class StandInEncoder:
    """What the engine asks of Qwen2.5-VL for a text prompt: input embeddings, and hidden states = those embeddings.
    As wide as the real encoder (3584), so that strip_template's width test runs as with the real model; a token's
    embedding is (id, 1, 0, ...), so that the context's ids can be read back after emphasis scaled the rows."""

    def __init__(self, width: int = 3584):
        self.width = width

    def get_input_embeddings(self):
        return _Embedding(self.width)

    def __call__(self, x=None, embeds=None, **_):
        return embeds, None


class _Embedding:
    """Token ids (B, T) -> (B, T, width): (id, 1, 0, ...)."""

    def __init__(self, width: int):
        self.embedding_dim = width

    def __call__(self, ids):
        out = torch.zeros(*ids.shape, self.embedding_dim)
        out[..., 0], out[..., 1] = ids.float(), 1.0
        return out


def context_ids(engine, prompt: str) -> list[int]:
    """The token ids of the context Neo's Qwen engine returns for `prompt` (its own call, through the stand-in)."""
    (z,) = engine([prompt])
    return (z[:, 0] / z[:, 1]).round().long().tolist()


def qwen_engine(forge_root: Path, width: int = 3584, emphasis: str = "Original"):
    """Neo's QwenTextProcessingEngine built as backend/diffusion_engine/qwen.py builds it, with Neo's own Qwen-Image
    tokenizer (backend/huggingface/Qwen/Qwen-Image/tokenizer) and a stand-in encoder. `modules.shared` (read when
    the engine is built and called) and backend.memory_management's text-encoder device are what Neo gives them."""
    from transformers import AutoTokenizer

    opts = SimpleNamespace(emphasis=emphasis)
    stubbed = "modules.shared" not in sys.modules
    if stubbed:
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=opts)
    try:
        from backend.text_processing.qwen_engine import QwenTextProcessingEngine

        tokenizer = AutoTokenizer.from_pretrained(str(forge_root / "backend/huggingface/Qwen/Qwen-Image/tokenizer"))
        return QwenTextProcessingEngine(text_encoder=StandInEncoder(width), tokenizer=tokenizer)
    finally:
        if stubbed:
            sys.modules.pop("modules.shared", None)
