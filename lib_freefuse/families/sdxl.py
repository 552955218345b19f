"""SDXL (base and its fine-tunes: Illustrious, Pony, NoobAI): a UNet whose transformer blocks read CLIP text in a
cross-attention (attn2: image queries, text keys), CLIP-L and CLIP-G contexts side by side in 77-token chunks.

Masks are read in one transformer block: its cross-attention's image queries against the text keys (Eq. 5 from
the model's own probabilities) and its self-attention's q, k (Eq. 9-10). The job keeps the masks on the latent
grid; each layer gets them at its own resolution (1, 1/2, 1/4 of the latent). attn2's to_k/to_v see the text and
are masked by giving each image token the keys and values of its own subjects; every other layer under the
UNet's blocks sees image tokens or an image feature map (convolutions); the embeddings one vector per image."""

from __future__ import annotations

import re

from .base import Family, LayerRole, halved

_CROSS_KV = re.compile(r"^(.+\.transformer_blocks\.\d+\.attn2)\.to_[kv]$")
_VECTOR = re.compile(r"^(time_embed\.\d+|label_emb\.\d+\.\d+|.+\.emb_layers\.\d+)$")
_IMAGE = re.compile(r"^(input_blocks|middle_block|output_blocks|out)\.")
LEVELS = 4  # latent, 1/2, 1/4 (SDXL's three levels) and one more for other channel_mult lengths


class SDXL(Family):
    name = "SDXL"
    attention = "cross"
    text_engine = "text_processing_engine_l"  # CLIP-L and CLIP-G tokenise alike; their contexts are concatenated
    first_chunk_only = False  # every 77-token chunk (BREAK starts one) is in the context
    default_reason = (
        "the last transformer block of the middle block (1/32 of the image: 32x32 at 1024 px), as the authors' SDXL "
        "pipeline reads its map from the middle block's cross-attention; not measured here (no SDXL weights)"
    )

    @staticmethod
    def matches(model) -> bool:
        """A UNet with cross-attention and SDXL's ADM embedding (pooled CLIP-G text and sizes); SD1.x/2.x have none."""
        return (
            model is not None
            and all(hasattr(model, name) for name in ("input_blocks", "middle_block", "output_blocks"))
            and hasattr(model, "label_emb")
        )

    def layer_role(self, module: str) -> LayerRole:
        cross = _CROSS_KV.match(module)
        if cross:
            return LayerRole("text", cross_kv=True, parent=cross.group(1))
        if _VECTOR.match(module):
            return LayerRole("vector")
        if _IMAGE.match(module):
            return LayerRole("image")
        return LayerRole("vector")

    def capture_sites(self, model) -> list[str]:
        return [name for name, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]

    def default_capture_site(self, model) -> int:
        sites = self.capture_sites(model)
        middle = [i for i, name in enumerate(sites) if name.startswith("middle_block.")]
        return middle[-1] if middle else len(sites) // 2

    def mask_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(latent_hw)

    def token_grids(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        return [halved(tuple(latent_hw), level) for level in range(LEVELS)]
