"""Chroma (Forge Neo only): FLUX.1-schnell's transformer without per-block modulation and without CLIP.

Its double and single blocks are FLUX.1's own classes (modulation=False), so masks are read as FLUX.1's: one double
block's joint attention, text tokens first, then the 2x2-patch image tokens, q and k after QK-norm and RoPE. The
blocks' linears see their tokens as in FLUX.1. Every shift/scale/gate comes instead from one global
`distilled_guidance_layer` (an MLP over (timestep, guidance, slot index) rows: one vector per modulation slot per
image), so its linears get the role "vector": their rows are no tokens. With modulation "per_token" (the default) the
forge side runs that MLP once per subject-mask row and hands each token its own row's slots (FLUX.1's per-token
modulation, forge/chroma_modulation.py); "global": every subject on every token; "off": none once masks exist.
Text: T5 alone (no pooled vector), through Neo's T5 engine with no padding (min_length 1): the prompt's tokens, then
one end token; the engine passes no attention mask, so every text token is attended, as in FLUX.1."""

from __future__ import annotations

import re

from .base import LayerRole
from .flux1 import Flux1

_APPROXIMATOR = re.compile(r"^distilled_guidance_layer\.")


class Chroma(Flux1):
    name = "Chroma"
    text_engine = "text_processing_engine_t5"
    first_chunk_only = True  # Neo's T5 engine stacks a BREAK's chunks as images: each prompt keeps its first
    default_reason = (
        "Chroma keeps FLUX.1-schnell's 19 double blocks, so the paper's FLUX.1-dev block 17 (the last block where "
        "the model has fewer); not measured on Chroma weights (none here)"
    )

    @staticmethod
    def matches(model) -> bool:
        """FLUX.1's double and single blocks plus the global modulation MLP (Neo: distilled_guidance_layer)."""
        return Flux1.matches(model) and hasattr(model, "distilled_guidance_layer")

    def layer_role(self, module: str) -> LayerRole:
        if _APPROXIMATOR.match(module):
            return LayerRole("vector")
        return super().layer_role(module)
