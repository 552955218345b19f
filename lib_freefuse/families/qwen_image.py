"""Qwen-Image (Forge Neo only): an MMDiT of 60 double-stream blocks on 2x2 latent patches, Qwen2.5-VL text.

Masks are read from one block's joint attention: text tokens first, then the image's 2x2-patch tokens (row-major,
as FLUX.1), q and k after the per-stream QK RMS-norm and after the joint 3-D RoPE (text ids on the diagonal, image
ids centred on the grid). Every block has separate projections per stream: attn.to_q/to_k/to_v/to_out.0 and
img_mlp see the image tokens (masked per token); attn.add_q/k/v_proj, to_add_out and txt_mlp the text tokens
(FLUX.1's text-stream rule); img_in/proj_out image, txt_in text. img_mod.1/txt_mod.1 (each block's shift/scale/gate
from the timestep embedding) are modulation layers of the image / text stream, made per token as FLUX.1's
(forge/qwen_image.py); norm_out.linear and the timestep embedder, one vector per image, follow FLUX.1's rule for
vector layers (job.vector_masks). Text: the prompt in Qwen's chat template, with the template's leading tokens
dropped by Neo's engine (forge/qwen_image.py finds the words in what is left)."""

from __future__ import annotations

import math
import re

from .base import Family, LayerRole

_BLOCK = r"^transformer_blocks\.\d+\."
_STREAMS = (
    (re.compile(_BLOCK + r"(attn\.(to_[qkv]|to_out\.0)|img_mlp\.net\.(0\.proj|2))$"), "image"),
    (re.compile(r"^(img_in|proj_out)$"), "image"),
    (re.compile(_BLOCK + r"(attn\.(add_[qkv]_proj|to_add_out)|txt_mlp\.net\.(0\.proj|2))$"), "text"),
    (re.compile(r"^txt_in$"), "text"),
)
_MODULATIONS = (
    (re.compile(r"^(transformer_blocks\.\d+\.img_mod)\.1$"), "image"),
    (re.compile(r"^(transformer_blocks\.\d+\.txt_mod)\.1$"), "text"),
)
AUTHORS_DEPTH = 0.6  # the authors' Z-Image default: layer 18 of 30 ("a block in the second half: deep features")


class QwenImage(Family):
    name = "Qwen-Image"
    attention = "joint"
    text_engine = "text_processing_engine_qwen"
    first_chunk_only = False  # Neo's Qwen engine makes one chunk per prompt (no BREAK, no length limit)
    default_reason = (
        "block 36 of Qwen-Image's 60 (0.6 of the depth): the authors publish no Qwen-Image default, and their "
        "default for Z-Image, the joint-attention model closest to it, is layer 18 of 30 (a block in the second "
        "half, deep features); not measured on Qwen-Image weights (none here)"
    )

    @staticmethod
    def matches(model) -> bool:
        """Neo's QwenImageTransformer2DModel (or its Nunchaku subclass, which the host adapter then refuses):
        `transformer_blocks` with a modulation per stream (img_mod, txt_mod) and an attention, and the text
        RMS-norm `txt_norm` (Neo's own detection keys on it)."""
        blocks = getattr(model, "transformer_blocks", None)
        if model is None or not hasattr(model, "txt_norm") or not blocks:
            return False
        return all(hasattr(blocks[0], name) for name in ("img_mod", "txt_mod", "attn"))

    def layer_role(self, module: str) -> LayerRole:
        for pattern, stream in _STREAMS:
            if pattern.match(module):
                return LayerRole(stream)
        for pattern, stream in _MODULATIONS:
            if found := pattern.match(module):  # Sequential(SiLU, Linear): the Linear's parent is the modulation
                return LayerRole(stream, modulation=True, parent=found.group(1))
        return LayerRole("vector")  # norm_out.linear, time_text_embed.*: the timestep vector

    def capture_sites(self, model) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def default_capture_site(self, model) -> int:
        return min(round(AUTHORS_DEPTH * len(model.transformer_blocks)), len(model.transformer_blocks) - 1)

    def mask_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(latent_hw[0] / 2), math.ceil(latent_hw[1] / 2)  # 2x2 patches, padded (process_img)
