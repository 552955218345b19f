"""Which subject LoRAs a redraw of one region of a FreeFuse image keeps (ADetailer's face passes), and its prompt.

The rule: a region (an inpainting mask over the finished image, e.g. a detected face) belongs to the subject whose
FreeFuse mask covers more than half of it (`MIN_SHARE`); the redraw keeps that subject's LoRA and drops the other
subjects'. A region more than half outside every subject's mask (background, with FreeFuse's background option)
keeps no subject LoRA, as the image gave it none. A region that no one holds a majority of (two subjects overlap
in it) is ambiguous: the redraw keeps every subject LoRA, as it would without FreeFuse. LoRAs that are not
subjects (styles) are never touched.

Plain Python and torch: no Forge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MIN_SHARE", "RegionOwner", "keep_subject_loras", "region_owner", "region_shares"]

MIN_SHARE = 0.5  # a region belongs to whoever covers MORE than this share of it
SUBJECT, BACKGROUND, AMBIGUOUS, EMPTY = "subject", "background", "ambiguous", "empty"

_LORA_TAG = re.compile(r"\s*<lora:([^>]+)>")  # Forge's re_extra_net, for lora tags, with the space before it


@dataclass(frozen=True)
class RegionOwner:
    """Who a region belongs to: per-subject shares of its pixels, the background's, and the verdict."""

    shares: tuple[float, ...]  # [L]: sum over the region of M_l / |region|
    background: float  # 1 - sum of the shares (0 where the masks cover every pixel)
    verdict: str  # SUBJECT, BACKGROUND, AMBIGUOUS or EMPTY (no pixel in the region)
    owner: int | None = None  # the subject's index when verdict is SUBJECT


def region_shares(masks: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """s_l = sum_{p in R} M_l(p) / |R|: the share of the region R each subject's mask covers.

    masks: (L, h, w) on FreeFuse's token grid, 0/1 or soft; region: (H, W) bool over the image, which the grid
    covers whole (each token a H/h x W/w block: nearest-neighbour upsampling). Returns (L,) float; zeros for an
    empty region."""
    if masks.dim() != 3 or region.dim() != 2:
        raise ValueError(f"expected masks (L, h, w) and region (H, W), got {tuple(masks.shape)}, {tuple(region.shape)}")
    pixels = F.interpolate(masks[None].float(), size=tuple(region.shape), mode="nearest")[0]  # (L, H, W)
    inside = region.bool()
    count = int(inside.sum())
    if count == 0:
        return torch.zeros(masks.shape[0])
    return pixels[:, inside].sum(dim=1) / count


def region_owner(masks: torch.Tensor, region: torch.Tensor, min_share: float = MIN_SHARE) -> RegionOwner:
    """The region's owner by the module's rule: a subject with share > min_share, else the background with more
    than min_share, else ambiguous."""
    shares = region_shares(masks, region)
    values = tuple(float(s) for s in shares)
    if not bool(region.bool().any()):
        return RegionOwner(values, 0.0, EMPTY)
    background = max(0.0, 1.0 - sum(values))
    best = max(range(len(values)), key=values.__getitem__) if values else None
    if best is not None and values[best] > min_share:
        return RegionOwner(values, background, SUBJECT, best)
    if background > min_share:
        return RegionOwner(values, background, BACKGROUND)
    return RegionOwner(values, background, AMBIGUOUS)


def keep_subject_loras(
    prompt: str,
    subjects: Sequence[str],
    keep: str | None,
    weight: float,
    same: Callable[[str, str], bool] = str.__eq__,
) -> str:
    """The prompt with the `<lora:...>` tags of every subject but `keep` taken out; `keep`'s tag is left as written,
    or added as `<lora:keep:weight>` when the prompt has none. keep None: every subject's tag taken out. Tags of
    LoRAs that are not subjects are left alone. same(tag name, subject name): whether a tag names that subject
    (Forge also accepts a LoRA's alias)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected text, got {type(prompt).__name__}")
    if keep is not None and not math.isfinite(weight):
        raise ValueError(f"weight: expected a finite number, got {weight!r}")
    kept = False

    def rewrite(match: re.Match[str]) -> str:
        nonlocal kept
        name = match.group(1).split(":", 1)[0].strip()
        if keep is not None and same(name, keep):
            kept = True
            return match.group(0)
        return "" if any(same(name, subject) for subject in subjects) else match.group(0)

    result = _LORA_TAG.sub(rewrite, prompt)
    if keep is not None and not kept:
        result = f"{result.rstrip()} <lora:{keep}:{weight:g}>".lstrip()
    return result
