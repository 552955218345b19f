"""Superpixel voting of stage 1 (paper Eq. 11-13) and the reduction of pixel masks to the token grid."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import slic


def slic_scale(grid_hw: tuple[int, int], image_hw: tuple[int, int], max_side: int) -> int:
    """Pixels per token side of the copy SLIC runs on: at most `max_side` long, at most the image's own
    resolution, at least 1. An integer scale makes every token an exact s x s block of that copy."""
    h, w = grid_hw
    native = max(image_hw[0] / h, image_hw[1] / w)
    return max(1, min(max_side // max(h, w), math.ceil(native)))


def resize_image(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) float image -> (size_h, size_w, 3) clamped to [0, 1], antialiased when shrinking."""
    if tuple(image.shape[:2]) == tuple(size_hw):
        return image.clamp(0.0, 1.0)
    chw = image.permute(2, 0, 1)[None]
    shrinking = size_hw[0] < image.shape[0] or size_hw[1] < image.shape[1]
    resized = F.interpolate(chw, size=size_hw, mode="bilinear", align_corners=False, antialias=shrinking)
    return resized[0].permute(1, 2, 0).clamp_(0.0, 1.0)


def slic_segments(image: torch.Tensor, n_segments: int, compactness: float) -> torch.Tensor:
    """Eq. 11: R = SLIC(x0, n_segments, compactness). image: (H, W, 3) in [0, 1] -> (H, W) int64 labels."""
    pixels = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)  # skimage keeps float32
    labels = slic(pixels, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


def vote_superpixels(maps: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Eq. 12-13: each superpixel goes to the subject with the largest summed upsampled score.

    maps: (L, h, w) token-grid scores; segments: (H_px, W_px) labels -> (H_px, W_px) int64 owner index.
    """
    size = tuple(segments.shape)
    upsampled = F.interpolate(maps[None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0]
    labels = segments.reshape(-1)
    n_labels = int(labels.max()) + 1
    scores = torch.zeros(maps.shape[0], n_labels, dtype=torch.float64)  # s_{l,j} of Eq. 12
    scores.index_add_(1, labels, upsampled.reshape(maps.shape[0], -1).double())
    winner = scores.argmax(dim=0)  # l* of Eq. 13, per superpixel
    return winner[labels].view(size)


def owner_to_pixel_masks(owner: torch.Tensor, n_subjects: int) -> torch.Tensor:
    """F_l of Eq. 13: (H, W) owner indices -> (L, H, W) float32 0/1 masks."""
    return F.one_hot(owner, n_subjects).permute(2, 0, 1).float()


def pixel_masks_to_tokens(pixel_masks: torch.Tensor, grid_hw: tuple[int, int], soft: bool = False) -> torch.Tensor:
    """Reduce (L, H_px, W_px) masks in [0, 1] to the (L, h, w) token grid.

    Soft: the fraction of each token's area that each subject owns. Hard: the token goes wholly to the
    subject with the largest share, provided that share beats the unowned remainder (1 - sum of shares),
    so masks that partition the image stay a partition and uncovered tokens stay empty. Ties go to the
    lower subject index, so hard masks are always disjoint.
    """
    shares = F.adaptive_avg_pool2d(pixel_masks.float(), grid_hw)  # (L, h, w)
    if soft:
        return shares
    unowned = (1.0 - shares.sum(dim=0, keepdim=True)).clamp_min(0.0)
    winner = torch.cat([shares, unowned]).argmax(dim=0)  # index L means "nobody"
    return F.one_hot(winner, shares.shape[0] + 1)[..., :-1].permute(2, 0, 1).float()
