"""What FreeFuse must know about a model family, without any host: where its masks are read, which tokens each
LoRA-touched layer sees, the default capture site and why, the grids its image tokens form, and which of the
webui's text engines locates the words. A family is one module beside this one; nothing here imports Forge."""

from __future__ import annotations

import math
from dataclasses import dataclass

STREAMS = ("image", "text", "joint", "vector")


@dataclass(frozen=True)
class LayerRole:
    """Which tokens a LoRA-touched layer sees and how its subject deltas are masked.

    stream: "image" (image tokens, or an image feature map for a convolution), "text", "joint" (text then image
    tokens in one sequence) or "vector" (one value per image: time, pooled text, size embeddings).
    modulation: a FLUX modulation layer (one vector per image, made per token, ALGORITHM.md stage 2); its module
    is `parent`. cross_kv: the key/value projection of a cross-attention whose keys every image token reads (SDXL's
    attn2.to_k/to_v): masked by giving each image token the keys and values of its own subjects; the attention
    module is `parent`.
    """

    stream: str
    modulation: bool = False
    cross_kv: bool = False
    parent: str | None = None

    def __post_init__(self):
        if self.stream not in STREAMS:
            raise ValueError(f"stream: expected one of {', '.join(STREAMS)}, got {self.stream!r}")


class Family:
    """One model family (FLUX.1, SDXL, ...). Subclasses fill the class attributes and the methods."""

    name: str = "a model"
    attention: str = "joint"  # "joint": text and image q/k in one sequence; "cross": image queries, text keys
    text_engine: str = ""  # the webui model's attribute whose tokenizer indexes the context (its chunks)
    first_chunk_only: bool = False  # whether the model conditions on the text before the first BREAK only
    end_of_text: bool = False  # whether the context holds the engine's end-of-text token (`id_end`) after the prompt,
    # whose attention gives the background class (MaskConfig background "tokens")
    attention_bias: bool = False  # whether its joint attention can take the phase-2 bias (core.attention_bias)
    default_reason: str = ""  # why the default capture site is the one it is (README, logs)

    @staticmethod
    def matches(model) -> bool:
        """Whether `model` (the host's diffusion model, `unet.model.diffusion_model`) is of this family."""
        raise NotImplementedError

    def layer_role(self, module: str) -> LayerRole:
        """The role of the layer at `module` (its path under diffusion_model)."""
        raise NotImplementedError

    def capture_sites(self, model) -> list[str]:
        """Paths of the blocks whose attention can make the masks, in forward order; the setting indexes these."""
        raise NotImplementedError

    def default_capture_site(self, model) -> int:
        """Index into capture_sites of the default site (reason: default_reason)."""
        raise NotImplementedError

    def mask_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The grid the job keeps its masks on, for a latent of latent_hw."""
        raise NotImplementedError

    def token_grids(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """Every grid the image tokens or feature maps form in some layer, finest first."""
        return [self.mask_grid(latent_hw)]


def halved(hw: tuple[int, int], times: int) -> tuple[int, int]:
    """A grid after `times` stride-2 convolutions with padding 1 (ceil(side / 2) each)."""
    h, w = hw
    for _ in range(times):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w
