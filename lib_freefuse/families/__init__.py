"""The model families FreeFuse knows, one module each behind `Family` (base.py), told apart by structure.

A new family is one module here and one line in KNOWN (README "Model families" lists those not done yet)."""

from __future__ import annotations

from .base import Family, LayerRole
from .chroma import Chroma
from .flux1 import Flux1
from .flux2 import Flux2Klein
from .qwen_image import QwenImage
from .sdxl import SDXL
from .zimage import ZImage

__all__ = [
    "CHROMA",
    "FLUX1",
    "FLUX2_KLEIN",
    "KNOWN",
    "QWEN_IMAGE",
    "SDXL_FAMILY",
    "Z_IMAGE",
    "Family",
    "LayerRole",
    "detect",
    "unsupported",
]

FLUX1 = Flux1()
SDXL_FAMILY = SDXL()
CHROMA = Chroma()
FLUX2_KLEIN = Flux2Klein()
QWEN_IMAGE = QwenImage()
Z_IMAGE = ZImage()
KNOWN: tuple[Family, ...] = (FLUX1, SDXL_FAMILY, CHROMA, FLUX2_KLEIN, QWEN_IMAGE, Z_IMAGE)
_FLUX1_SHAPED = (CHROMA, FLUX2_KLEIN)  # they have FLUX.1's blocks too: asked before FLUX.1
_MOST_SPECIFIC_FIRST = (*_FLUX1_SHAPED, *(f for f in KNOWN if f not in _FLUX1_SHAPED))


def detect(model) -> Family | None:
    """The family of `model` (the host's diffusion model), or None when FreeFuse knows none for it."""
    return next((family for family in _MOST_SPECIFIC_FIRST if family.matches(model)), None)


def unsupported(model) -> str:
    """One phrase naming a model FreeFuse does not support, and those it does."""
    kind = type(model).__name__ if model is not None else "no diffusion model"
    return f"the model ({kind}) is none of {', '.join(f.name for f in KNOWN)}"
