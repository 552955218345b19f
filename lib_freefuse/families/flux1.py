"""FLUX.1 (dev, schnell, Krea, Kontext): a joint-attention transformer on 2x2 latent patches, T5 text.

Masks are read from one double-stream block's joint attention (text tokens first, QK-norm and RoPE applied);
image-stream, text-stream and single-block layers see their tokens, the modulation layers one vector per image
(made per token), the embedders one vector per image."""

from __future__ import annotations

import math
import re

from .base import Family, LayerRole

_STREAMS = (
    (re.compile(r"^(double_blocks\.\d+\.img_(attn\.(qkv|proj)|mlp\.[02])|img_in|final_layer\.linear)$"), "image"),
    (re.compile(r"^(double_blocks\.\d+\.txt_(attn\.(qkv|proj)|mlp\.[02])|txt_in)$"), "text"),
    (re.compile(r"^single_blocks\.\d+\.linear[12]$"), "joint"),
)
_MODULATIONS = (
    (re.compile(r"^(double_blocks\.\d+\.img_mod)\.lin$"), "image"),
    (re.compile(r"^(double_blocks\.\d+\.txt_mod)\.lin$"), "text"),
    (re.compile(r"^(single_blocks\.\d+\.modulation)\.lin$"), "joint"),
)
PAPER_BLOCK = 17


class Flux1(Family):
    name = "FLUX.1"
    attention = "joint"
    text_engine = "text_processing_engine_t5"
    first_chunk_only = True  # Forge's FLUX conditions on the first T5 chunk alone
    end_of_text = True  # T5's </s> follows the prompt's pieces in both Forges (classic pads after it)
    attention_bias = True  # every block calls backend.nn.flux.attention (Chroma's and FLUX.2 Klein's too)
    default_reason = "the paper's choice for FLUX.1-dev's 19 double blocks (the last block where the model has one)"

    @staticmethod
    def matches(model) -> bool:
        return model is not None and hasattr(model, "double_blocks") and hasattr(model, "single_blocks")

    def layer_role(self, module: str) -> LayerRole:
        for pattern, stream in _STREAMS:
            if pattern.match(module):
                return LayerRole(stream)
        for pattern, stream in _MODULATIONS:
            if pattern.match(module):
                return LayerRole(stream, modulation=True, parent=module.rsplit(".", 1)[0])
        return LayerRole("vector")

    def capture_sites(self, model) -> list[str]:
        return [f"double_blocks.{i}" for i in range(len(model.double_blocks))]

    def default_capture_site(self, model) -> int:
        return min(PAPER_BLOCK, len(model.double_blocks) - 1)

    def mask_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(latent_hw[0] / 2), math.ceil(latent_hw[1] / 2)  # 2x2 patches, padded
