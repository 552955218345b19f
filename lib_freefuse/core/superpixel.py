"""Superpixel voting of stage 1 (paper Eq. 11-13) and the reduction of pixel masks to the token grid."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage  # installed with scikit-image, which is built on it
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


def vote_superpixels(
    maps: torch.Tensor,
    segments: torch.Tensor,
    background: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Eq. 12-13: each superpixel goes to the subject with the largest summed upsampled score.

    maps: (L, h, w) token-grid scores; segments: (H_px, W_px) labels -> (H_px, W_px) int64 owner index, where
    index L means nobody (background). background: an (h, w) score map that competes as one more class.
    threshold: a superpixel where every subject's mean score is below `threshold` times the even share 1 / (h * w)
    goes to nobody (each map is a distribution over the tokens); the subjects' own contest is unchanged.
    """
    n_subjects = maps.shape[0]
    channels = maps if background is None else torch.cat([maps, background[None].to(maps)])
    size = tuple(segments.shape)
    upsampled = F.interpolate(channels[None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0]
    labels = segments.reshape(-1)
    n_labels = int(labels.max()) + 1
    scores = torch.zeros(channels.shape[0], n_labels, dtype=torch.float64)  # s_{l,j} of Eq. 12
    scores.index_add_(1, labels, upsampled.reshape(channels.shape[0], -1).double())
    winner = scores.argmax(dim=0)  # l* of Eq. 13, per superpixel
    if threshold is not None:
        pixels = torch.bincount(labels, minlength=n_labels).double().clamp_min(1.0)
        strength = scores[:n_subjects].amax(dim=0) / pixels * (maps.shape[1] * maps.shape[2])  # in units of 1/N
        winner = torch.where(strength < threshold, n_subjects, winner)
    return winner[labels].view(size)


def token_owners(
    maps: torch.Tensor, background: torch.Tensor | None = None, threshold: float | None = None
) -> torch.Tensor:
    """vote_superpixels with every token its own superpixel: (L, h, w) -> (h, w) int64, index L = nobody."""
    n_subjects = maps.shape[0]
    channels = maps if background is None else torch.cat([maps, background[None].to(maps)])
    winner = channels.argmax(dim=0)
    if threshold is not None:
        strength = maps.amax(dim=0).double().cpu() * (maps.shape[1] * maps.shape[2])  # in units of 1/N
        winner = torch.where(strength < threshold, n_subjects, winner.cpu())
    return winner.cpu()


def give_free_to_nearest(owner: torch.Tensor, n_subjects: int) -> torch.Tensor:
    """Every free pixel (owner == n_subjects) goes to the owner of the nearest owned pixel (Euclidean distance; ties as
    scipy's distance transform breaks them). owner: (H, W) int64 -> (H, W) int64; unchanged when nothing or
    everything is owned."""
    free = (owner == n_subjects).numpy()
    if not free.any() or free.all():
        return owner
    _, (rows, cols) = ndimage.distance_transform_edt(free, return_indices=True)
    result = owner.numpy().copy()
    result[free] = result[rows[free], cols[free]]
    return torch.from_numpy(result)


def fill_holes(owner: torch.Tensor, min_size: int, max_passes: int = 4, n_subjects: int = 0) -> torch.Tensor:
    """Each connected piece (4-neighbour) of one owner smaller than `min_size` pixels goes to the owner that most of
    the pixels touching it have (ties: the lowest index), smallest piece first (ties: the one whose first pixel comes
    first in row-major order). owner: (H, W) int64 -> (H, W) int64.

    The largest piece of each subject (owner index below `n_subjects`; ties: the first in row-major order) is never
    filled: a subject drawn small keeps its mask, only its stray pieces go. Pieces of the other owners (background)
    have no such guard.
    A pass relabels the pieces once; merging can leave new small pieces behind (an island inside an island), so
    passes repeat until nothing changes, at most `max_passes` times.
    """
    result = owner.numpy().copy()
    height, width = result.shape
    for _ in range(max_passes):
        pieces, count = _pieces(result)
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)
        first_pixel = np.unique(pieces.ravel(), return_index=True)[1]  # per label 1..count, in label order
        kept = _largest_pieces(result, sizes, first_pixel, n_subjects)
        small = np.setdiff1d(np.flatnonzero(sizes[1:] < min_size) + 1, kept)  # labels, ascending
        if small.size == 0:
            break
        boxes = ndimage.find_objects(pieces)
        changed = False
        for piece in small[np.lexsort((first_pixel[small - 1], sizes[small]))]:  # smallest first, then scan order
            rows, cols = boxes[piece - 1]
            r0, r1 = max(rows.start - 1, 0), min(rows.stop + 1, height)
            c0, c1 = max(cols.start - 1, 0), min(cols.stop + 1, width)
            inside = pieces[r0:r1, c0:c1] == piece
            ring = ndimage.binary_dilation(inside, structure=_CROSS) & ~inside
            window = result[r0:r1, c0:c1]
            neighbours = window[ring]
            neighbours = neighbours[neighbours != window[inside][0]]  # pieces merged earlier may share the owner
            if neighbours.size:
                window[inside] = np.bincount(neighbours).argmax()
                changed = True
        if not changed:
            break
    return torch.from_numpy(result)


_CROSS = ndimage.generate_binary_structure(2, 1)


def _largest_pieces(owner: np.ndarray, sizes: np.ndarray, first_pixel: np.ndarray, n_subjects: int) -> np.ndarray:
    """Labels (1..count) of each subject's largest piece, ties to the first in row-major order. sizes: (count + 1,)
    pixels per label; first_pixel: (count,) flat index of each label's first pixel."""
    piece_owner = owner.ravel()[first_pixel]  # (count,)
    largest = []
    for subject in range(n_subjects):
        labels = np.flatnonzero(piece_owner == subject) + 1
        if labels.size:
            largest.append(labels[np.lexsort((first_pixel[labels - 1], -sizes[labels]))[0]])
    return np.asarray(largest, dtype=np.int64)


def _pieces(owner: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected pieces of equal owner: (H, W) labels 1..count."""
    pieces = np.zeros(owner.shape, dtype=np.int64)
    count = 0
    for value in np.unique(owner):
        labelled, found = ndimage.label(owner == value, structure=_CROSS)
        pieces[labelled > 0] = labelled[labelled > 0] + count
        count += found
    return pieces, count


def owner_to_pixel_masks(owner: torch.Tensor, n_subjects: int) -> torch.Tensor:
    """F_l of Eq. 13: (H, W) owner indices (index n_subjects = nobody) -> (L, H, W) float32 0/1 masks."""
    return F.one_hot(owner, n_subjects + 1)[..., :n_subjects].permute(2, 0, 1).float()


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
