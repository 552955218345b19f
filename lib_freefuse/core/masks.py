"""Stage 1 of FreeFuse: one mask per subject from one block's q and k (paper Eq. 5-13)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .attention import (
    attention_sinks,
    contrastive_scores,
    cross_attention_columns,
    edge_tokens,
    filter_attention_sinks,
    mean_attention_rows,
    self_attention_maps,
    subject_maps,
)
from .config import BACKGROUND_FROM_TOKENS, MaskConfig
from .superpixel import (
    fill_holes,
    give_free_to_nearest,
    owner_to_pixel_masks,
    pixel_masks_to_tokens,
    resize_image,
    slic_scale,
    slic_segments,
    token_owners,
    vote_superpixels,
)
from .surroundings import nearest_lead

__all__ = [
    "BACKGROUND_SCALE",
    "background_score_map",
    "cross_background_map",
    "cross_score_maps",
    "cross_subject_maps",
    "extract_cross_masks",
    "extract_masks",
    "joint_score_maps",
    "subject_score_maps",
]

# Background "tokens": the factor of the background map in the vote. Planted background scene (tests/core): mean IoU
# 0.94 at 2, 0.95 at 3 to 6; scenes without background unchanged at any of them.
BACKGROUND_SCALE = 3.0


def extract_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    subject_tokens: Sequence[Sequence[int]],
    grid_hw: tuple[int, int],
    image: np.ndarray | torch.Tensor | None = None,
    config: MaskConfig = MaskConfig(),
    background_tokens: Sequence[int] = (),
    earlier_maps: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Subject masks of one image (Eq. 5-13).

    q, k: (H, L_txt + h*w, D) at the capture block, after QK-norm and RoPE, text tokens first.
    subject_tokens: one sequence of text-token positions per subject. grid_hw: (h, w), row-major.
    image: predicted x0 as (H_px, W_px, 3) RGB in [0, 1] (or uint8); needed when `config.superpixel_vote` is on.
    background_tokens: text positions whose attention is the background (an end-of-text token, a background
    phrase); used when `config.background` is "tokens" or "words" (which may have none), ignored otherwise.
    earlier_maps: (L, h, w) score maps of the same image at earlier steps (joint_score_maps), averaged with this
    step's before the vote (beyond the paper: `average_steps`); none, the paper's single step.
    Returns (L, h, w) float32 masks in [0, 1] on q's device, disjoint (sum over subjects <= 1; with a background
    setting, the tokens that nobody owns are 0 in every mask).
    """
    n_text, groups = _check_inputs(q, k, subject_tokens, grid_hw, image, config)
    background_rows = _check_background_tokens(background_tokens, n_text, config)
    h, w = grid_hw
    scores = subject_score_maps(q, k, groups, grid_hw, config, n_text=n_text)  # (L, N)
    maps = _averaged(scores.view(-1, h, w), earlier_maps)
    background = None
    if background_rows:
        background = background_score_map(q, k, background_rows, grid_hw, config, n_text=n_text).view(h, w)
    return _masks_from_maps(maps, image, config, background).to(device=q.device, dtype=torch.float32)


def joint_score_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    subject_tokens: Sequence[Sequence[int]],
    grid_hw: tuple[int, int],
    config: MaskConfig = MaskConfig(),
) -> torch.Tensor:
    """Eq. 5-10 of one image, without the vote: (L, h, w) float32 score maps, each a distribution over the image
    tokens; inputs as extract_masks'. For `earlier_maps` of a later step's extract_masks."""
    n_text, groups = _check_inputs(q, k, subject_tokens, grid_hw, None, replace(config, superpixel_vote=False))
    return subject_score_maps(q, k, groups, grid_hw, config, n_text=n_text).view(-1, *grid_hw)


def _averaged(maps: torch.Tensor, earlier_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of (L, h, w) maps and earlier steps' maps of the same shape; maps itself when there are none."""
    if not earlier_maps:
        return maps
    for i, earlier in enumerate(earlier_maps):
        if not isinstance(earlier, torch.Tensor) or tuple(earlier.shape) != tuple(maps.shape):
            raise ValueError(
                f"earlier_maps[{i}]: expected a tensor of shape {tuple(maps.shape)}, got {_describe(earlier)}"
            )
    return torch.stack([maps, *(e.to(maps) for e in earlier_maps)]).mean(dim=0)


def extract_cross_masks(
    image_q: torch.Tensor,
    text_k: torch.Tensor,
    self_q: torch.Tensor,
    self_k: torch.Tensor,
    subject_tokens: Sequence[Sequence[int]],
    grid_hw: tuple[int, int],
    image: np.ndarray | torch.Tensor | None = None,
    config: MaskConfig = MaskConfig(),
    out_hw: tuple[int, int] | None = None,
    earlier_maps: Sequence[torch.Tensor] = (),
    background_tokens: Sequence[int] = (),
) -> torch.Tensor:
    """Subject masks of one image from a cross-attention block, where text tokens are keys only (SDXL's UNet).

    image_q: (H, N, D) the cross-attention's queries of the image tokens; text_k: (H, T, D) its keys of the text
    tokens (Eq. 5 from the model's probabilities, cross_score_maps); self_q, self_k: (H', N, D') the image
    self-attention's q and k of the same block (Eq. 9-10). subject_tokens: text positions per subject, in [0, T).
    grid_hw: (h, w), h*w = N, row-major. image: predicted x0 (H_px, W_px, 3), for the vote (Eq. 11-13).
    out_hw: the grid of the returned masks (default grid_hw): the vote's superpixel masks are pooled to it, token
    owners without the vote are enlarged (nearest). earlier_maps: (L, h, w) maps of earlier steps
    (cross_subject_maps), averaged with this step's. background_tokens: text positions whose attention is the
    background (a background phrase's words; the CLIP context has no end-of-text token that attends like T5's),
    used when `config.background` is "tokens" or "words". Returns (L, *out_hw) float32 in [0, 1], disjoint.
    """
    groups = _check_cross_inputs(image_q, text_k, self_q, self_k, subject_tokens, grid_hw, image, config)
    background_rows = _check_background_tokens(background_tokens, text_k.shape[1], config)
    h, w = grid_hw
    maps = cross_score_maps(image_q, text_k, self_q, self_k, groups, grid_hw, config).view(-1, h, w)
    background = None
    if background_rows:
        background = cross_background_map(image_q, text_k, background_rows, grid_hw, config).view(h, w)
    return _masks_from_maps(_averaged(maps, earlier_maps), image, config, background, out_hw).to(
        device=image_q.device, dtype=torch.float32
    )


def cross_subject_maps(
    image_q: torch.Tensor,
    text_k: torch.Tensor,
    self_q: torch.Tensor,
    self_k: torch.Tensor,
    subject_tokens: Sequence[Sequence[int]],
    grid_hw: tuple[int, int],
    config: MaskConfig = MaskConfig(),
) -> torch.Tensor:
    """Eq. 5-10 of one image from a cross-attention block, without the vote: (L, h, w) float32; inputs as
    extract_cross_masks'. For `earlier_maps` of a later step's extract_cross_masks."""
    config = replace(config, superpixel_vote=False)
    groups = _check_cross_inputs(image_q, text_k, self_q, self_k, subject_tokens, grid_hw, None, config)
    return cross_score_maps(image_q, text_k, self_q, self_k, groups, grid_hw, config).view(-1, *grid_hw)


def _masks_from_maps(
    maps: torch.Tensor,
    image,
    config: MaskConfig,
    background: torch.Tensor | None,
    out_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Eq. 11-13 (or the token-wise argmax without the vote) for (L, h, w) score maps -> (L, *out_hw) masks; then, with
    `surroundings` "nearest_lead", the places no subject clearly leads to the nearest one that does."""
    grid_hw = tuple(maps.shape[-2:])
    out_hw = tuple(out_hw or grid_hw)
    threshold = config.background_threshold if config.background in ("threshold", "nearest") else None
    if config.superpixel_vote:
        masks = _vote_masks(maps, _as_image(image), grid_hw, config, background, threshold, out_hw)
    else:
        # Without voting each token goes to the subject with the largest score: the paper's "holes".
        owner = _owners(lambda t: token_owners(maps, background, t), threshold, config, maps.shape[0])
        masks = owner_to_pixel_masks(owner, maps.shape[0])
        if out_hw != grid_hw:
            masks = F.interpolate(masks[None], size=out_hw, mode="nearest-exact")[0]
    if config.surroundings == "nearest_lead":
        masks = nearest_lead(masks, maps)
    return masks


def subject_score_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    groups: Sequence[Sequence[int]],
    grid_hw: tuple[int, int],
    config: MaskConfig,
    *,
    n_text: int,
) -> torch.Tensor:
    """Eq. 5-10 for validated input: per-subject score over the image tokens, (L, h*w) float32."""
    used_rows = sorted({i for group in groups for i in group})
    cross, sinks = _filtered_cross_rows(q, k, used_rows, grid_hw, config, n_text)  # Eq. 5-7: (R, N)
    return _refined_maps(cross, sinks, used_rows, groups, q[:, n_text:], k[:, n_text:], config)


def cross_score_maps(
    image_q: torch.Tensor,
    text_k: torch.Tensor,
    self_q: torch.Tensor,
    self_k: torch.Tensor,
    groups: Sequence[Sequence[int]],
    grid_hw: tuple[int, int],
    config: MaskConfig,
) -> torch.Tensor:
    """Eq. 5-10 from a cross-attention block (validated input): per-subject score over the image tokens, (L, N).

    Eq. 5 is read from the cross-attention's probabilities (cross_attention_columns), or with "image_queries" as
    softmax over the image of k_t q_img^T; Eq. 9-10 from the same block's image self-attention (self_q, self_k)."""
    used_rows = sorted({i for group in groups for i in group})
    cross, sinks = _sink_filtered(_cross_block_rows(image_q, text_k, used_rows, config), grid_hw, config)  # Eq. 5-7
    return _refined_maps(cross, sinks, used_rows, groups, self_q, self_k, config)


def _refined_maps(
    cross: torch.Tensor,
    sinks: torch.Tensor | None,
    used_rows: list[int],
    groups: Sequence[Sequence[int]],
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    config: MaskConfig,
) -> torch.Tensor:
    """Eq. 8-10: the subjects' mean rows of `cross` (R, N), refined by the image self-attention q_img, k_img."""
    row_of = {token: r for r, token in enumerate(used_rows)}
    maps = subject_maps(cross, [[row_of[t] for t in group] for group in groups])  # Eq. 8: (L, N)
    if config.self_attention:
        seed_scores = None
        if config.contrastive != "off":
            seed_scores = contrastive_scores(maps, config.contrastive)
            if sinks is not None:
                # A sink dropped from one subject's row but not from another's would have the largest contrast of all.
                seed_scores = seed_scores.masked_fill(sinks.any(dim=0), -math.inf)
        maps = self_attention_maps(q_img, k_img, maps, config.self_attention_top_fraction, seed_scores)  # Eq. 9-10
    return maps


def background_score_map(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: Sequence[int],
    grid_hw: tuple[int, int],
    config: MaskConfig,
    *,
    n_text: int,
    scale: float = BACKGROUND_SCALE,
) -> torch.Tensor:
    """The background class of the vote, (h*w,) float32: where the background tokens' mean filtered cross-attention
    (Eq. 5-8) exceeds its even share 1 / (h*w), the excess times `scale`; zero elsewhere.

    Only the excess counts: an end-of-text token in a picture with no background spreads its attention evenly, and
    that even share outweighs the weak parts of the subjects' maps (planted scenes without background: mean IoU
    0.95-1.0 fell to 0.70-0.88 with the authors' unshifted map times 0.95). No self-attention step (Eq. 9-10): the
    top 1% tokens would be one patch of the background, whose self-attention leaves out the rest of it."""
    cross, _ = _filtered_cross_rows(q, k, sorted(set(rows)), grid_hw, config, n_text)
    return _above_even(cross, scale)


def cross_background_map(
    image_q: torch.Tensor,
    text_k: torch.Tensor,
    rows: Sequence[int],
    grid_hw: tuple[int, int],
    config: MaskConfig,
    *,
    scale: float = BACKGROUND_SCALE,
) -> torch.Tensor:
    """background_score_map read from a cross-attention block, (h*w,) float32: the background tokens' mean column
    of the model's probabilities (Eq. 5 as cross_score_maps reads it, Eq. 6-8), its excess over 1 / (h*w), times
    `scale`. image_q: (H, N, D), text_k: (H, T, D); rows: text positions in [0, T)."""
    cross, _ = _sink_filtered(_cross_block_rows(image_q, text_k, sorted(set(rows)), config), grid_hw, config)
    return _above_even(cross, scale)


def _above_even(cross: torch.Tensor, scale: float) -> torch.Tensor:
    """(R, N) rows over the image tokens -> their mean's excess over the even share 1 / N, times scale: (N,)."""
    return (cross.mean(dim=0) - 1.0 / cross.shape[1]).clamp_min_(0.0).mul_(scale)


def _cross_block_rows(image_q: torch.Tensor, text_k: torch.Tensor, rows: list[int], config: MaskConfig) -> torch.Tensor:
    """Eq. 5 from a cross-attention block for the given text rows: (R, N), each a distribution over the image."""
    if config.cross_attention == "image_queries":
        return mean_attention_rows(text_k[:, rows], image_q)  # softmax over the image tokens
    return cross_attention_columns(image_q, text_k, rows)  # the model's probabilities, normalised over the image


def _filtered_cross_rows(
    q: torch.Tensor, k: torch.Tensor, rows: list[int], grid_hw: tuple[int, int], config: MaskConfig, n_text: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 5-7 for the given text rows: (R, N) attention over the image tokens, and the sinks dropped (or None)."""
    if config.cross_attention == "image_queries":
        # softmax over the image tokens of q_img k_t^T: the words' keys against every image query, (R, N)
        cross = mean_attention_rows(k[:, rows], q[:, n_text:])
    else:
        cross = mean_attention_rows(q[:, rows], k[:, n_text:])  # Eq. 5: (R, N), the given rows only
    return _sink_filtered(cross, grid_hw, config)


def _sink_filtered(
    cross: torch.Tensor, grid_hw: tuple[int, int], config: MaskConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 6-7 on (R, N) rows over the image tokens, when the sink filter is on: (filtered rows, sinks or None)."""
    if not config.sink_filter:
        return cross, None
    edge = edge_tokens(grid_hw, config.edge_width, device=cross.device)
    sinks = attention_sinks(cross, edge, config.sink_top_fraction)
    return filter_attention_sinks(cross, edge, config.sink_top_fraction, sinks), sinks  # Eq. 6-7


def _vote_masks(
    maps: torch.Tensor,
    image: torch.Tensor,
    grid_hw: tuple[int, int],
    config: MaskConfig,
    background: torch.Tensor | None = None,
    threshold: float | None = None,
    out_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Eq. 11-13 on a copy of x0 whose every token is an s x s pixel block, then pooled to the out_hw grid."""
    h, w = grid_hw
    s = slic_scale(grid_hw, tuple(image.shape[:2]), config.slic_max_side)
    small = resize_image(image, (h * s, w * s))
    n_segments = config.n_segments or round(math.sqrt(image.shape[0] * image.shape[1]))
    segments = slic_segments(small, min(n_segments, small.shape[0] * small.shape[1]), config.compactness)
    owner = _owners(lambda t: vote_superpixels(maps, segments, background, t), threshold, config, maps.shape[0])
    pixel_masks = owner_to_pixel_masks(owner, maps.shape[0])
    return pixel_masks_to_tokens(pixel_masks, tuple(out_hw or grid_hw), soft=config.soft)


def _owners(owners_at, threshold: float | None, config: MaskConfig, n_subjects: int) -> torch.Tensor:
    """The owner map of owners_at(threshold) (index n_subjects: nobody); with background "nearest" its free places
    go to the nearest owner (none owned at all: the map without the threshold); then fill_holes."""
    owner = owners_at(threshold)
    if config.background == "nearest":
        owned = bool((owner != n_subjects).any())
        owner = give_free_to_nearest(owner, n_subjects) if owned else owners_at(None)
    return _filled(owner, config, n_subjects)


def _filled(owner: torch.Tensor, config: MaskConfig, n_subjects: int) -> torch.Tensor:
    """fill_holes at `config.fill_holes` of the owner map's area (unchanged when that is under one pixel); each
    subject keeps its largest piece."""
    min_size = math.floor(config.fill_holes * owner.numel())
    return fill_holes(owner, min_size, n_subjects=n_subjects) if min_size >= 1 else owner


def _as_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] on the CPU; 8-bit images are scaled from [0, 255]."""
    tensor = torch.as_tensor(image).detach().cpu()
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()  # resize_image clamps its (small) result


def _check_inputs(q, k, subject_tokens, grid_hw, image, config) -> tuple[int, list[list[int]]]:
    """Validate every argument; return L_txt and the token groups as lists of ints."""
    if not isinstance(config, MaskConfig):
        raise ValueError(f"config: expected a MaskConfig, got {type(config).__name__}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor of shape (heads, tokens, head_dim), got {_describe(t)}")
    if q.shape != k.shape:
        raise ValueError(f"k: shape {tuple(k.shape)} differs from q's {tuple(q.shape)}")
    if (
        not isinstance(grid_hw, Sequence)
        or len(grid_hw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid_hw)
    ):
        raise ValueError(f"grid_hw: expected two positive integers (h, w), got {grid_hw!r}")
    n_img = grid_hw[0] * grid_hw[1]
    n_text = q.shape[1] - n_img
    if n_text < 1:
        raise ValueError(
            f"grid_hw: {grid_hw[0]}x{grid_hw[1]} = {n_img} image tokens leave no text tokens in a sequence of "
            f"{q.shape[1]}"
        )
    for name, t in (("q", q), ("k", k)):
        # One reduction per tensor: min and max are NaN if any value is, +-inf if any value is.
        if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    groups = _check_subject_tokens(subject_tokens, n_text)
    if config.superpixel_vote:
        _check_image(image, grid_hw)
    return n_text, groups


def _check_cross_inputs(image_q, text_k, self_q, self_k, subject_tokens, grid_hw, image, config) -> list[list[int]]:
    """Validate extract_cross_masks' arguments; return the token groups as lists of ints."""
    if not isinstance(config, MaskConfig):
        raise ValueError(f"config: expected a MaskConfig, got {type(config).__name__}")
    for name, t in (("image_q", image_q), ("text_k", text_k), ("self_q", self_q), ("self_k", self_k)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor of shape (heads, tokens, head_dim), got {_describe(t)}")
        if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    if text_k.shape[0] != image_q.shape[0] or text_k.shape[2] != image_q.shape[2]:
        raise ValueError(f"text_k: shape {tuple(text_k.shape)} has other heads or head size than image_q's")
    if self_q.shape != self_k.shape or self_q.shape[1] != image_q.shape[1]:
        raise ValueError(
            f"self_q, self_k: shapes {tuple(self_q.shape)}, {tuple(self_k.shape)} must be equal and have "
            f"image_q's {image_q.shape[1]} tokens"
        )
    if (
        not isinstance(grid_hw, Sequence)
        or len(grid_hw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid_hw)
        or grid_hw[0] * grid_hw[1] != image_q.shape[1]
    ):
        raise ValueError(f"grid_hw: expected (h, w) with h*w = {image_q.shape[1]} image tokens, got {grid_hw!r}")
    groups = _check_subject_tokens(subject_tokens, text_k.shape[1])
    if config.superpixel_vote:
        _check_image(image, grid_hw)
    return groups


def _check_background_tokens(background_tokens, n_text: int, config: MaskConfig) -> list[int]:
    """The background rows to use: validated positions with background "tokens" or "words" (which may have none),
    nothing otherwise."""
    if config.background not in BACKGROUND_FROM_TOKENS:
        return []
    if isinstance(background_tokens, torch.Tensor):
        background_tokens = background_tokens.tolist()
    if isinstance(background_tokens, (str, bytes)) or not isinstance(background_tokens, Sequence):
        raise ValueError(f"background_tokens: expected a sequence of token positions, got {background_tokens!r}")
    if len(background_tokens) == 0:
        if config.background == "words":
            return []  # no background words given: as "off"
        raise ValueError("background_tokens: background is 'tokens' but no background token positions were given")
    for p in background_tokens:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < n_text:
            raise ValueError(f"background_tokens: position {p!r} is outside the text tokens [0, {n_text})")
    return [int(p) for p in background_tokens]


def _check_subject_tokens(subject_tokens, n_text: int) -> list[list[int]]:
    if isinstance(subject_tokens, (str, bytes)) or not isinstance(subject_tokens, Sequence):
        raise ValueError(
            f"subject_tokens: expected one sequence of token positions per subject, got {subject_tokens!r}"
        )
    if len(subject_tokens) == 0:
        raise ValueError("subject_tokens: no subjects given")
    groups = []
    for index, positions in enumerate(subject_tokens):
        if isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
            raise ValueError(f"subject_tokens[{index}]: expected a sequence of token positions, got {positions!r}")
        if len(positions) == 0:
            raise ValueError(f"subject_tokens[{index}]: subject has no tokens")
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < n_text:
                raise ValueError(f"subject_tokens[{index}]: position {p!r} is outside the text tokens [0, {n_text})")
        groups.append([int(p) for p in positions])
    return groups


def _check_image(image, grid_hw: tuple[int, int]) -> None:
    if image is None:
        raise ValueError("image: superpixel_vote is on but no image (predicted x0) was given")
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise ValueError(f"image: expected a numpy array or tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected shape (H_px, W_px, 3), got {tuple(image.shape)}")
    finite = np.isfinite(image).all() if isinstance(image, np.ndarray) else torch.isfinite(image).all()
    if not bool(finite):
        raise ValueError("image: contains NaN or infinite values")
    h, w = grid_hw
    per_token_h, per_token_w = image.shape[0] / h, image.shape[1] / w
    # FLUX's grid is ceil(side / 16): the pixel-per-token ratios of the two axes may differ by up to one token.
    tolerance = 1.0 / min(h, w) + 0.02
    if abs(per_token_h - per_token_w) > tolerance * max(per_token_h, per_token_w):
        raise ValueError(
            f"image: {image.shape[0]}x{image.shape[1]} px does not have the aspect of the {h}x{w} token grid"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
