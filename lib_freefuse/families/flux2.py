"""FLUX.2 Klein (4B, 9B; Forge Neo only): FLUX.1's double and single blocks with one shared modulation per stream,
1x1 patches of a 128-channel latent, and Qwen3 text in a chat template.

Masks are read as FLUX.1's: one double block's joint attention, text tokens first, then the image tokens (then any
reference image's, Klein's editing: they stay out of the masks and get every subject LoRA, FLUX.1 Kontext's rule),
q and k after QK-norm and RoPE (4 axes; text positions on the 4th). Each image token is one latent pixel (patch
size 1), so the mask grid is the latent itself. The blocks' linears see their tokens as in FLUX.1 (no biases; the
MLPs are SwiGLU, `img_mlp.0` in and `.2` out as FLUX.1's). The blocks carry no modulation of their own: three
model-level `Modulation`s (`double_stream_modulation_img`, `_txt`, `single_stream_modulation`) make one shift/
scale/gate set per image that every block of that stream reads, so their `lin` is a modulation layer made per token
exactly as FLUX.1's per-block ones (one patch per model call instead of one per block).
Text: Neo's Klein engine wraps the prompt (each emphasis piece separately) in Qwen3's chat template, pads it to 512
tokens with <|endoftext|>, and gives the model three of Qwen3's hidden layers side by side per token: one context
token per prompt token, so the words index the engine's own token list."""

from __future__ import annotations

import re

from .base import LayerRole
from .flux1 import Flux1

_MODULATIONS = (
    (re.compile(r"^(double_stream_modulation_img)\.lin$"), "image"),
    (re.compile(r"^(double_stream_modulation_txt)\.lin$"), "text"),
    (re.compile(r"^(single_stream_modulation)\.lin$"), "joint"),
)


class Flux2Klein(Flux1):
    name = "FLUX.2 Klein"
    text_engine = "text_processing_engine_gemma"  # Neo's Flux2 engine keeps its Qwen3 Klein engine under this name
    first_chunk_only = True  # the Klein engine makes one chunk of any prompt (BREAK is a word to it)
    end_of_text = False  # Qwen3's context: the chat template's tokens, then <|endoftext|> padding, no end-of-text
    default_reason = (
        "the second-to-last double block, where the paper's block 17 sits among FLUX.1-dev's 19 (Klein 4B: block 3 "
        "of 5; 9B: 6 of 8); not measured on Klein weights (none here)"
    )

    @staticmethod
    def matches(model) -> bool:
        """FLUX.1's double and single blocks plus the model-level shared modulation (Neo: global_modulation)."""
        return Flux1.matches(model) and hasattr(model, "double_stream_modulation_img")

    def layer_role(self, module: str) -> LayerRole:
        for pattern, stream in _MODULATIONS:
            found = pattern.match(module)
            if found:
                return LayerRole(stream, modulation=True, parent=found.group(1))
        return super().layer_role(module)

    def default_capture_site(self, model) -> int:
        return max(0, len(model.double_blocks) - 2)

    def mask_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return int(latent_hw[0]), int(latent_hw[1])  # 1x1 patches: one token per latent pixel
