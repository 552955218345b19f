"""A picture of the subject masks: each subject's region tinted in its own colour over the image, with a legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

NO_SUBJECT = "no subject LoRA"  # the legend's name for the untinted places
COLOURS = ((230, 57, 70), (29, 130, 230), (46, 184, 92), (245, 166, 35), (155, 89, 182), (26, 188, 156))


def mask_overlay(image: Image.Image, masks: torch.Tensor, names: Sequence[str], alpha: float = 0.45) -> Image.Image:
    """image: the generated picture; masks: (L, h, w) token masks in [0, 1]; names: one label per subject."""
    width, height = image.size
    up = F.interpolate(masks[None].float().cpu(), size=(height, width), mode="nearest")[0].numpy()  # (L, H, W)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = np.zeros_like(base)
    for index in range(up.shape[0]):
        tint += up[index, ..., None] * np.asarray(COLOURS[index % len(COLOURS)], dtype=np.float32)
    covered = np.clip(up.sum(axis=0), 0, 1)[..., None]
    blended = base * (1 - alpha * covered) + tint * alpha
    result = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    _legend(result, names, unowned=bool((covered < 0.5).any()))
    return result


def _legend(image: Image.Image, names: Sequence[str], unowned: bool = False) -> None:
    """A swatch and a name per subject; with `unowned`, an empty swatch for the untinted places (no subject LoRA:
    the background settings, or a subject whose words were missing)."""
    draw = ImageDraw.Draw(image)
    size = max(8, min(image.size) // 24)
    entries = [(name, COLOURS[index % len(COLOURS)]) for index, name in enumerate(names)]
    if unowned:
        entries.append((NO_SUBJECT, None))
    for index, (name, colour) in enumerate(entries):
        top = 4 + index * (size + 4)
        draw.rectangle([4, top, 4 + size, top + size], fill=colour, outline=(255, 255, 255))
        draw.text((8 + size, top), name, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
