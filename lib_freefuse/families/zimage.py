"""Z-Image and Z-Image Turbo (Forge Neo only, backend/nn/lumina.py's NextDiT with Z-Image's modulation).

One stream of tokens: the caption (Qwen3 hidden states) first, then the image's 2x2 latent patches, each part padded
with a learned pad token to a multiple of 32 (`pad_tokens_multiple`; caption pads after the caption, image pads after
the image). Before the joint `layers`, two kinds of refiner blocks see one part each: `context_refiner` the caption
(with its pads), `noise_refiner` the image (with its pads). Masks are read from one joint layer's attention, q and k
after QK-norm and RoPE, the pads left out: caption rows then image rows, as FLUX.1's capture (Eq. 5 reads the
caption's queries against the image's keys only, so the pads never enter the softmax there). Each block's adaLN
modulation is one vector per image (from the timestep alone); a subject LoRA on its Linear is made per token (each
token's modulation with its own subjects' deltas, as FLUX.1's modulation layers), the timestep embedder's deltas
follow the vector rule.

Layer roles (paths under diffusion_model): joint `layers.N.attention.{qkv,out}`, `layers.N.feed_forward.w{1,2,3}` and
`final_layer.linear` (its caption outputs are dropped by the model); image `x_embedder` and the noise refiners'
attention/feed-forward; text `cap_embedder.1` and the context refiners' attention/feed-forward; modulation the adaLN
Linears (`layers.N.adaLN_modulation.0` and `final_layer.adaLN_modulation.1` joint, `noise_refiner.N.adaLN_modulation.0`
image; parent: the block or final layer); vector everything else (`t_embedder.mlp.*`). Pad tokens: caption pads get
what the caption's last token gets (the chat template's closing newline, nobody's word); image pads get each subject's
share of the image.

Text: Neo's Qwen3 engine wraps each prompt (each emphasis fragment) in Qwen's chat template and pads nothing; the
context is one chunk of byte-level BPE tokens (BREAK is no chunk boundary there); forge/zimage.context_pieces reads
it."""

from __future__ import annotations

import math
import re

from .base import Family, LayerRole

_STREAMS = (
    (re.compile(r"^(layers\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])|final_layer\.linear)$"), "joint"),
    (re.compile(r"^(noise_refiner\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])|x_embedder)$"), "image"),
    (re.compile(r"^(context_refiner\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])|cap_embedder\.1)$"), "text"),
)
_MODULATION = (  # a modulated block's or the final layer's adaLN Linear: (pattern, stream of the tokens it modulates)
    (re.compile(r"^(layers\.\d+)\.adaLN_modulation\.0$"), "joint"),
    (re.compile(r"^(noise_refiner\.\d+)\.adaLN_modulation\.0$"), "image"),
    (re.compile(r"^(final_layer)\.adaLN_modulation\.1$"), "joint"),
)
AUTHORS_BLOCK = 18  # the authors' FreeFuse Z-Image pipeline: sim_map_block_idx=18 of Z-Image's 30 layers


class ZImage(Family):
    name = "Z-Image"
    attention = "joint"
    text_engine = "text_processing_engine_gemma"  # Neo's ZImage engine keeps its Qwen3 engine under this name
    first_chunk_only = False  # Neo's Qwen3 engine makes one chunk of the whole prompt
    default_reason = (
        "the authors' FreeFuse Z-Image pipeline reads its masks at layers.18 of 30 (the last layer where the model has "
        "fewer); not measured with Z-Image weights here (none)"
    )

    @staticmethod
    def matches(model) -> bool:
        """NextDiT's refiners and joint layers, with Z-Image's modulation (a bare Linear; Lumina 2's has a SiLU)."""
        if model is None or not all(hasattr(model, a) for a in ("noise_refiner", "context_refiner", "cap_embedder")):
            return False
        layers = getattr(model, "layers", None)
        return bool(layers) and hasattr(layers[0].adaLN_modulation[0], "weight")

    def layer_role(self, module: str) -> LayerRole:
        for pattern, stream in _MODULATION:
            found = pattern.match(module)
            if found:
                return LayerRole(stream, modulation=True, parent=found.group(1))
        for pattern, stream in _STREAMS:
            if pattern.match(module):
                return LayerRole(stream)
        return LayerRole("vector")

    def capture_sites(self, model) -> list[str]:
        return [f"layers.{i}" for i in range(len(model.layers))]

    def default_capture_site(self, model) -> int:
        return min(AUTHORS_BLOCK, len(model.layers) - 1)

    def mask_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(latent_hw[0] / 2), math.ceil(latent_hw[1] / 2)  # 2x2 patches, the latent padded first
