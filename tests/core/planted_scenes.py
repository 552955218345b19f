"""Planted scenes: synthetic FLUX-like q, k and x0 whose correct subject masks are known.

A scene plants one region per subject on the token grid (the regions partition the grid, as FreeFuse's
vote gives every superpixel to some subject) and builds, from features rather than attention matrices:

- Image tokens. Token j of region r has the feature `f_j = e_r + core_j * kappa * u_r + pos_j + noise_j`:
  `e_r` is the region's embedding, `u_r` marks the region's *core* (its most interior tokens, a stand-in
  for a character's face), `pos_j` is a smooth positional part (low-frequency sines, it makes near tokens a
  little more alike) and `noise_j` is per-token noise. Image queries are `self_gain * f_j` and image keys
  are `f_j`, so self-attention stays inside a token's region (Eq. 10's locality). Keys may also carry
  `confusion` noise along the region embeddings: noise in the maps themselves (the holes scene).
- Attention sinks. A few tokens on the grid's border get an extra key component `sink_key * s` along a
  direction `s` that every text query shares: text rows pour attention into them, whatever the subject.
  Sinks' own queries also point along `s`, so a sink's self-attention row goes mostly to the sinks.
- Text tokens. Subject l's activation words have queries `region * e_l + (core / kappa) * u_l +
  others * sum_{m != l} e_m + (sink / sink_key) * s` plus a little noise, so that (up to noise) the
  logit `q.k / sqrt(D)` of a word on a token is `region` on its subject's region, `region + core` on that
  region's core, `others` on the other subjects' regions and `sink` more on a sink. The other text
  tokens (fillers) attend to random mixtures of the regions; extract_masks must ignore them.

Every direction is a coordinate of a `head_dim`-dimensional space; each head sees the same features through
its own random rotation plus a little per-head noise. q and k are scaled by `head_dim ** 0.25` so that the
numbers above are the attention logits themselves. The image x0 is a collage of real photos bundled with
scikit-image: each region is filled with a different photo, `pixels_per_token` pixels per token side, so
that SLIC's superpixels follow the planted regions the way they follow objects in a generated image.

The three ablation scenes (Fig. 7 of the paper) each make one stage of Eq. 5-13 necessary:
`sink_scene` (sink handling, Eq. 6-7), `intrusion_scene` (self-attention, Eq. 9-10) and `holes_scene`
(superpixel voting, Eq. 11-13). The three failure scenes are where the paper's pipeline itself loses, each with a
remedy beyond the paper: `leak_scene` (words that also attend to the other subject: contrastive seeds),
`wide_holes_scene` (holes that superpixels of a wide canvas cannot outvote: fill_holes) and `background_scene`
(image that no subject owns: a background class). Regions may be left to no subject (background, objects), and a
scene may carry an end-of-text token, whose attention the background class reads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import skimage.data
import torch
from scipy import ndimage
from skimage.transform import resize

__all__ = [
    "ABLATION_SCENES",
    "END_OF_TEXT",
    "FAILURE_SCENES",
    "GEOMETRY_SCENES",
    "PHOTOS",
    "Recipe",
    "Scene",
    "Words",
    "background_scene",
    "build_scene",
    "collage",
    "edge_positions",
    "holes_scene",
    "intrusion_scene",
    "leak_scene",
    "mean_iou",
    "sink_scene",
    "wide_holes_scene",
]

# Bundled with scikit-image (no download). Ordered so that neighbouring regions get photos of unlike colour.
PHOTOS = ("astronaut", "immunohistochemistry", "coffee", "rocket", "chelsea", "retina", "colorwheel")
# Fraction of each photo kept around its centre: retina and colorwheel have black corners.
_PHOTO_CROP = {"retina": 0.6, "colorwheel": 0.55}


@dataclass(frozen=True)
class Words:
    """How one subject's activation words attend: attention logits on the image tokens (module docstring)."""

    count: int = 2  # activation-word tokens of the subject
    region: float = 3.0  # logit on every token of the subject's own region
    core: float = 2.0  # extra logit on the region's core
    others: float = 0.0  # logit on every token of the other subjects' regions (cross-intrusion)
    sink: float = 7.0  # extra logit on every sink token
    others_core: float = 0.0  # extra logit on the other subjects' cores: the words leak onto the other "face"


@dataclass(frozen=True)
class Recipe:
    """Sizes and feature scales shared by the whole scene."""

    heads: int = 4
    head_dim: int = 48
    n_text: int = 20
    pixels_per_token: int = 8
    self_gain: float = 4.0  # image-image logit between two tokens of the same region
    core_strength: float = 0.7  # kappa: weight of the core direction in a core token's feature
    core_fraction: float = 0.015  # core size as a fraction of the grid (at least 2 tokens)
    position: float = 0.4  # weight of the smooth positional part
    token_noise: float = 0.1  # isotropic per-token noise (std per coordinate)
    confusion: float = 0.0  # per-token noise on image keys along the region embeddings (the "holes" noise)
    sink_key: float = 4.0  # length of the sink component of a sink's key
    sink_self: float = 6.0  # extra logit between two sinks: sinks attend to one another
    head_noise: float = 0.05  # per-head noise on every query and key
    text_noise: float = 0.05  # per-word noise on the text queries


@dataclass(frozen=True)
class Scene:
    """One planted scene: the inputs of `extract_masks` and the regions it should recover."""

    name: str
    regions: np.ndarray  # (h, w) int64: the subject that owns each token
    q: torch.Tensor  # (H, L_txt + h*w, D) float32, text tokens first
    k: torch.Tensor  # (H, L_txt + h*w, D)
    subject_tokens: tuple[tuple[int, ...], ...]  # text positions of each subject's activation words
    image: np.ndarray  # (h * ppt, w * ppt, 3) float64 RGB in [0, 1]: the photo collage
    sinks: tuple[int, ...] = ()  # image-token indices (row-major) of the attention sinks
    background_tokens: tuple[int, ...] = ()  # text positions of the planted end-of-text token, if any

    @property
    def grid_hw(self) -> tuple[int, int]:
        return int(self.regions.shape[0]), int(self.regions.shape[1])

    @property
    def n_subjects(self) -> int:
        return len(self.subject_tokens)

    def planted_masks(self) -> torch.Tensor:
        """(L, h, w) bool: the planted region of each subject (labels >= L are unclaimed: background, props)."""
        labels = torch.from_numpy(self.regions)
        return torch.stack([labels == subject for subject in range(self.n_subjects)])


def mean_iou(masks: torch.Tensor, scene: Scene) -> float:
    """Mean over subjects of IoU(mask > 0.5, planted region). masks: (L, h, w)."""
    predicted = masks.detach().cpu() > 0.5
    planted = scene.planted_masks()
    inter = (predicted & planted).flatten(1).sum(dim=1).double()
    union = (predicted | planted).flatten(1).sum(dim=1).double()
    return float((inter / union.clamp_min(1)).mean())


# ----------------------------------------------------------------------------------------------------------
# Geometries: (h, w) int64 label grids that partition the token grid.


def left_right(h: int, w: int) -> np.ndarray:
    """Subject 0 on the left half, subject 1 on the right half."""
    return np.broadcast_to(np.arange(w) >= w // 2, (h, w)).astype(np.int64)


def top_bottom(h: int, w: int) -> np.ndarray:
    """Subject 0 on the top half, subject 1 on the bottom half."""
    return left_right(w, h).T.copy()


def diagonal(h: int, w: int) -> np.ndarray:
    """Subject 0 above the anti-diagonal (top left), subject 1 below it."""
    rows, cols = np.mgrid[0:h, 0:w]
    return ((rows + 0.5) / h + (cols + 0.5) / w > 1.0).astype(np.int64)


def disc(h: int, w: int, radius: float = 0.32) -> np.ndarray:
    """Subject 0 in a centred disc of `radius` times the short side, subject 1 in the surround."""
    rows, cols = np.mgrid[0:h, 0:w]
    inside = (rows + 0.5 - h / 2) ** 2 + (cols + 0.5 - w / 2) ** 2 <= (radius * min(h, w)) ** 2
    return (~inside).astype(np.int64)


def vertical_strips(h: int, w: int, n: int = 3) -> np.ndarray:
    """n subjects in vertical strips of (near) equal width, left to right."""
    return np.broadcast_to(np.arange(w) * n // w, (h, w)).astype(np.int64)


def quadrants(h: int, w: int) -> np.ndarray:
    """Four subjects in the 2x2 quadrants, row-major: top left, top right, bottom left, bottom right."""
    rows, cols = np.mgrid[0:h, 0:w]
    return (2 * (rows >= h // 2) + (cols >= w // 2)).astype(np.int64)


def uneven_split(h: int, w: int, fraction: float = 0.7) -> np.ndarray:
    """Subject 0 on the left `fraction` of the columns, subject 1 on the rest."""
    return np.broadcast_to(np.arange(w) >= round(w * fraction), (h, w)).astype(np.int64)


def edge_positions(regions: np.ndarray, subject: int | None = None) -> np.ndarray:
    """Row-major indices of the border tokens (edge_width 1), optionally only those of one subject."""
    h, w = regions.shape
    border = np.zeros((h, w), dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    if subject is not None:
        border &= regions == subject
    return np.flatnonzero(border)


# ----------------------------------------------------------------------------------------------------------
# Building a scene.


def build_scene(
    name: str,
    regions: np.ndarray,
    seed: int,
    words: Sequence[Words] | None = None,
    recipe: Recipe = Recipe(),
    sinks: Sequence[int] | None = None,
    photos: Sequence[str] = PHOTOS,
    subjects: int | None = None,
    end_of_text: Words | None = None,
) -> Scene:
    """Plant `regions` (h, w); `sinks` defaults to 3 random border tokens.

    Labels 0..subjects-1 are the subjects (default: every label); higher labels are unclaimed regions that no
    subject's words point at: label `subjects` is the background, higher ones are objects (a prop, a third person)
    that only the filler words mix in. `end_of_text`: plant an end-of-text token after the words whose logit is
    `region` on the background, `others` on the subjects' regions and 0 on the objects (the authors' later code
    takes this token's attention as the background).
    """
    regions = np.ascontiguousarray(regions, dtype=np.int64)
    n_labels = int(regions.max()) + 1
    n_subjects = n_labels if subjects is None else subjects
    words = list(words) if words is not None else [Words()] * n_subjects
    if (
        len(words) != n_subjects
        or not 1 <= n_subjects <= n_labels
        or sorted(np.unique(regions)) != list(range(n_labels))
    ):
        raise ValueError("regions must use labels 0..L-1 and words must have one entry per subject")
    rng = np.random.default_rng(seed)
    if sinks is None:
        sinks = rng.choice(edge_positions(regions), size=3, replace=False)
    sinks = tuple(sorted(int(s) for s in sinks))
    basis = _Basis(n_labels, recipe.head_dim)
    image_queries, image_keys = _image_queries_keys(regions, sinks, recipe, basis, rng)  # (N, D) each
    subject_tokens = _text_layout(words, recipe.n_text)
    background_tokens = _end_of_text_layout(subject_tokens, end_of_text, recipe.n_text)
    text_queries = _text_queries(words, subject_tokens, recipe, basis, rng, end_of_text, background_tokens)
    text_keys = rng.normal(size=(recipe.n_text, recipe.head_dim)) / math.sqrt(recipe.head_dim)
    q = np.concatenate([text_queries, image_queries])
    k = np.concatenate([text_keys, image_keys])
    q_heads, k_heads = _heads(q, k, recipe, seed)
    image = collage(regions, recipe.pixels_per_token, photos)
    return Scene(name, regions, q_heads, k_heads, subject_tokens, image, sinks, background_tokens)


@dataclass(frozen=True)
class _Basis:
    """Coordinates of the feature space: region embeddings (coordinate l for label l), core directions,
    sink, position, then free coordinates for noise."""

    n_labels: int
    dim: int

    def __post_init__(self) -> None:
        if self.free_start >= self.dim:
            raise ValueError(f"head_dim {self.dim} is too small for {self.n_labels} regions")

    def core(self, label: int) -> int:
        return self.n_labels + label

    @property
    def sink(self) -> int:
        return 2 * self.n_labels

    @property
    def position(self) -> slice:
        return slice(2 * self.n_labels + 1, 2 * self.n_labels + 5)

    @property
    def free_start(self) -> int:
        return 2 * self.n_labels + 5

    def unit(self, index: int) -> np.ndarray:
        vector = np.zeros(self.dim)
        vector[index] = 1.0
        return vector


def _core_mask(regions: np.ndarray, subject: int, size: int) -> np.ndarray:
    """The `size` tokens of a region farthest from its outline (ties broken by position): its core."""
    inside = np.pad(regions == subject, 1)
    depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1].reshape(-1)
    order = np.lexsort((np.arange(depth.size), -depth))
    core = np.zeros(depth.size, dtype=bool)
    core[order[:size]] = True
    return core.reshape(regions.shape) & (regions == subject)


def _image_features(regions: np.ndarray, recipe: Recipe, basis: _Basis, rng: np.random.Generator) -> np.ndarray:
    """(N, D) features f_j of the module docstring, rows in row-major token order."""
    h, w = regions.shape
    labels = regions.reshape(-1)
    features = np.zeros((h * w, basis.dim))
    features[np.arange(h * w), labels] = 1.0  # e_r
    core_size = max(2, round(recipe.core_fraction * h * w))
    for label in range(basis.n_labels):
        core = _core_mask(regions, label, core_size).reshape(-1)
        features[core, basis.core(label)] = recipe.core_strength
    rows, cols = np.mgrid[0:h, 0:w]
    angles = (np.pi * rows.reshape(-1) / max(h - 1, 1), np.pi * cols.reshape(-1) / max(w - 1, 1))
    waves = np.stack([np.cos(angles[0]), np.sin(angles[0]), np.cos(angles[1]), np.sin(angles[1])], axis=1)
    features[:, basis.position] += recipe.position * waves / math.sqrt(2.0)
    noise = recipe.token_noise * rng.normal(size=features.shape)
    noise[:, basis.sink] = 0.0  # the sink direction belongs to the sinks alone
    return features + noise


def _image_queries_keys(
    regions: np.ndarray, sinks: Sequence[int], recipe: Recipe, basis: _Basis, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) image queries `self_gain * f_j` and keys `f_j` (+ confusion noise), sinks marked on both."""
    features = _image_features(regions, recipe, basis, rng)
    queries = recipe.self_gain * features
    keys = features.copy()
    keys[:, : basis.n_labels] += recipe.confusion * rng.normal(size=(features.shape[0], basis.n_labels))
    sink = basis.unit(basis.sink)
    keys[list(sinks)] += recipe.sink_key * sink
    queries[list(sinks)] += recipe.sink_self / recipe.sink_key * sink
    return queries, keys


def _text_layout(words: Sequence[Words], n_text: int) -> tuple[tuple[int, ...], ...]:
    """Positions of each subject's words in a prompt of fillers: 1 filler first, then 2 between subjects."""
    positions: list[tuple[int, ...]] = []
    cursor = 1
    for subject_words in words:
        positions.append(tuple(range(cursor, cursor + subject_words.count)))
        cursor += subject_words.count + 2
    if cursor - 1 > n_text:
        raise ValueError(f"n_text {n_text} is too short for {sum(word.count for word in words)} words")
    return tuple(positions)


def _end_of_text_layout(
    subject_tokens: Sequence[Sequence[int]], end_of_text: Words | None, n_text: int
) -> tuple[int, ...]:
    """Positions of the end-of-text token(s): right after the last subject's words and its 2 fillers."""
    if end_of_text is None:
        return ()
    start = subject_tokens[-1][-1] + 3
    if start + end_of_text.count > n_text:
        raise ValueError(f"n_text {n_text} is too short for the end-of-text token")
    return tuple(range(start, start + end_of_text.count))


def _text_queries(
    words: Sequence[Words],
    subject_tokens: Sequence[Sequence[int]],
    recipe: Recipe,
    basis: _Basis,
    rng: np.random.Generator,
    end_of_text: Words | None = None,
    background_tokens: Sequence[int] = (),
) -> np.ndarray:
    """(L_txt, D) text queries: subject words as in the module docstring, fillers on random region mixes, and the
    end-of-text token on the unclaimed regions."""
    n_labels, n_subjects = basis.n_labels, len(words)
    queries = np.zeros((recipe.n_text, basis.dim))
    mixes = rng.dirichlet(np.ones(n_labels), size=recipe.n_text)  # fillers: a random mix of the regions
    queries[:, :n_labels] = 3.0 * mixes
    queries[:, basis.sink] = Words().sink / recipe.sink_key
    queries[:, basis.free_start :] = rng.normal(size=(recipe.n_text, basis.dim - basis.free_start))
    for subject, (subject_words, positions) in enumerate(zip(words, subject_tokens, strict=True)):
        others = [m for m in range(n_subjects) if m != subject]
        for position in positions:
            queries[position] = 0.0
            queries[position, others] = subject_words.others
            queries[position, subject] = subject_words.region
            queries[position, basis.core(subject)] = subject_words.core / recipe.core_strength
            queries[position, [basis.core(m) for m in others]] = subject_words.others_core / recipe.core_strength
            queries[position, basis.sink] = subject_words.sink / recipe.sink_key
    if end_of_text is not None:
        for position in background_tokens:
            queries[position] = 0.0
            queries[position, :n_subjects] = end_of_text.others
            if n_subjects < n_labels:  # a scene without background leaves the end-of-text token nothing of its own
                queries[position, n_subjects] = end_of_text.region
            queries[position, basis.sink] = end_of_text.sink / recipe.sink_key
    queries += recipe.text_noise * rng.normal(size=queries.shape)
    return queries


def _heads(q: np.ndarray, k: np.ndarray, recipe: Recipe, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) features -> (H, T, D) float32 q and k: one random rotation and a little noise per head.

    Both are scaled by D ** 0.25 so that q.k / sqrt(D) equals the feature dot product (the logit).
    """
    generator = torch.Generator().manual_seed(seed)
    dim = recipe.head_dim
    q_t = torch.from_numpy(q).float()
    k_t = torch.from_numpy(k).float()
    rotations = torch.linalg.qr(torch.randn(recipe.heads, dim, dim, generator=generator)).Q  # (H, D, D)
    q_heads = (q_t + recipe.head_noise * torch.randn(recipe.heads, *q_t.shape, generator=generator)) @ rotations
    k_heads = (k_t + recipe.head_noise * torch.randn(recipe.heads, *k_t.shape, generator=generator)) @ rotations
    scale = dim**0.25
    return (q_heads * scale).contiguous(), (k_heads * scale).contiguous()


# ----------------------------------------------------------------------------------------------------------
# The image: a collage of real photos.


@functools.lru_cache(maxsize=32)
def _photo(name: str, height: int, width: int) -> np.ndarray:
    """The named scikit-image photo, centre-cropped to the aspect height:width and resized, float64 RGB."""
    photo = getattr(skimage.data, name)()
    keep = _PHOTO_CROP.get(name, 1.0)
    ph, pw = photo.shape[:2]
    crop_h, crop_w = ph * keep, pw * keep
    if crop_h / crop_w > height / width:
        crop_h = crop_w * height / width
    else:
        crop_w = crop_h * width / height
    top, left = round((ph - crop_h) / 2), round((pw - crop_w) / 2)
    cropped = photo[top : top + round(crop_h), left : left + round(crop_w), :3]
    resized = resize(cropped, (height, width), anti_aliasing=True)  # uint8 in -> float64 in [0, 1]
    resized.setflags(write=False)
    return resized


def collage(regions: np.ndarray, pixels_per_token: int, photos: Sequence[str] = PHOTOS) -> np.ndarray:
    """(h * ppt, w * ppt, 3) image whose planted region l shows photo l (cropped to the whole image)."""
    h, w = regions.shape
    size = (h * pixels_per_token, w * pixels_per_token)
    owner = np.kron(regions, np.ones((pixels_per_token, pixels_per_token), dtype=np.int64))
    image = np.zeros((*size, 3))
    for subject in range(int(regions.max()) + 1):
        inside = owner == subject
        image[inside] = _photo(photos[subject % len(photos)], *size)[inside]
    return image


# ----------------------------------------------------------------------------------------------------------
# The catalogue.


def _geometry(
    name: str, make: Callable[[int, int], np.ndarray], hw: tuple[int, int], pixels_per_token: int = 8
) -> Callable[..., Scene]:
    def scene(seed: int, end_of_text: Words | None = None) -> Scene:
        recipe = Recipe(pixels_per_token=pixels_per_token)
        return build_scene(name, make(*hw), seed, recipe=recipe, end_of_text=end_of_text)

    scene.__doc__ = f"{make.__doc__} On a {hw[0]}x{hw[1]} token grid at {pixels_per_token} px per token, default words."
    return scene


GEOMETRY_SCENES: dict[str, Callable[..., Scene]] = {
    "left_right": _geometry("left_right", left_right, (24, 24)),
    "top_bottom": _geometry("top_bottom", top_bottom, (24, 24), pixels_per_token=16),
    "diagonal": _geometry("diagonal", diagonal, (28, 28)),
    "disc": _geometry("disc", disc, (32, 32)),
    "three_strips": _geometry("three_strips", vertical_strips, (24, 30)),
    "quadrants": _geometry("quadrants", quadrants, (28, 28), pixels_per_token=12),
    "uneven_70_30": _geometry("uneven_70_30", uneven_split, (24, 32)),
}


def sink_scene(seed: int, end_of_text: Words | None = None) -> Scene:
    """Left/right split whose subject 0 over-focuses on sinks that lie in subject 1's region.

    There are exactly k = floor(N * 0.01) sinks (Eq. 6's k, also Eq. 9's |T|), all on subject 1's border.
    Subject 0's words give them a logit far above anything in subject 0's own region; subject 1's words
    only a little more than their own region. With the filter (Eq. 6-7) the sinks are subject 0's top k on
    the edge and are dropped. Without it they are subject 0's top 1% tokens (Eq. 9), and since sinks attend
    mostly to one another, subject 0's self-attention map is the sinks alone: subject 0 keeps the superpixels
    around the sinks and subject 1 takes the rest of the image, as in the paper ("one LoRA over-focuses on
    sink elements, allowing another LoRA to dominate most regions"). More than k sinks would survive the
    filter too; fewer than |T| would leave some of subject 0's own tokens in T and blunt the failure.
    """
    regions = left_right(24, 24)
    rng = np.random.default_rng(seed + 1000)
    n_sinks = math.floor(regions.size * 0.01)
    sinks = rng.choice(edge_positions(regions, subject=1), size=n_sinks, replace=False)
    words = [Words(sink=11.0), Words(sink=1.5)]
    return build_scene("sink", regions, seed, words, sinks=sinks, end_of_text=end_of_text)


def intrusion_scene(seed: int, end_of_text: Words | None = None) -> Scene:
    """Left/right split where subject 0's cross-attention spreads over subject 1's region.

    Subject 0's words peak on its core (its "face") but give subject 1's region the same logit as their own
    region; subject 1's words are weak and diffuse (small region logit) yet peak on subject 1's core. Every
    map sums to 1, and subject 1's puts much of its mass on its core and spreads the rest over the whole
    image, so outside that core it is smaller, token by token, than subject 0's broad share: the
    cross-attention maps alone (no Eq. 9-10) hand nearly the whole image to subject 0. The top 1% tokens
    of each map still lie in the right cores, and their self-attention rows stay inside their own regions.
    """
    words = [Words(region=3.0, core=3.0, others=3.0), Words(region=0.3, core=4.5)]
    return build_scene("intrusion", left_right(24, 24), seed, words, end_of_text=end_of_text)


def holes_scene(seed: int, end_of_text: Words | None = None) -> Scene:
    """Left/right split whose image keys carry strong per-token "confusion" noise along the region embeddings.

    The noise is in the keys, hence in every map (cross- and self-attention) at that token. A token whose
    key looks more like the other region than its own goes to the wrong subject when the maps are compared
    token by token (no Eq. 11-13): salt-and-pepper holes, about one token in ten. The noise is independent
    of the photo collage, so summing the maps over each SLIC superpixel (32x32 tokens of 8x8 px give
    sqrt(256 * 256) = 256 superpixels, about 4 tokens each, inside one region) outvotes the isolated wrong
    tokens. A lower self-attention gain keeps one extreme token from outweighing the rest of its superpixel.
    """
    recipe = Recipe(confusion=0.7, self_gain=2.0, pixels_per_token=8)
    return build_scene("holes", left_right(32, 32), seed, recipe=recipe, end_of_text=end_of_text)


ABLATION_SCENES: dict[str, Callable[..., Scene]] = {
    "sink": sink_scene,
    "intrusion": intrusion_scene,
    "holes": holes_scene,
}


# ----------------------------------------------------------------------------------------------------------
# Failure scenes: kinds of input on which the paper's pipeline loses, each with a remedy beyond the paper.

# The end-of-text token of every scene that has one: it attends to the background (if any) and evenly elsewhere.
END_OF_TEXT = Words(count=1, region=3.0, others=0.0)
# A background phrase of the user's ("in a misty forest"), planted where the end-of-text token goes: two words that
# attend to the background, and a little to the figures too (a phrase is not as clean as an end-of-text token).
BACKGROUND_PHRASE = Words(count=2, region=3.0, others=0.5)


def leak_scene(seed: int, end_of_text: Words | None = None) -> Scene:
    """Left/right split where subject 0's words also attend to subject 1, its face above all.

    Subject 0's words give subject 1's region the logit of their own region (3) and subject 1's core (its
    "face") one more than their own core (6 against 5); subject 1's words attend to their own core most (7).
    Subject 0's top 1% tokens (Eq. 9) then lie on subject 1's face, its self-attention map is subject 1's
    region, and the two subjects fight over one half of the image while the other half goes to whichever map
    is less small there. The contrast M_0 - M_1 is largest on subject 0's own face: contrastive seeds fix it.
    """
    words = [Words(others=3.0, others_core=3.0), Words(core=4.0)]
    return build_scene("leak", left_right(24, 24), seed, words, end_of_text=end_of_text)


def wide_holes_scene(seed: int, end_of_text: Words | None = None) -> Scene:
    """Three subjects in strips of a wide canvas (24x72 tokens at FLUX's 16 px per token: 1152x384 px) whose
    maps have holes (the keys' confusion noise of `holes_scene`, a little stronger).

    sqrt(pixel count) = 665 superpixels on 1728 tokens is 2.6 tokens each, too few to outvote the holes that
    clump together; filling the small pieces of each owner with their surroundings closes them.
    """
    recipe = Recipe(confusion=0.8, self_gain=2.0, pixels_per_token=16)
    return build_scene("wide_holes", vertical_strips(24, 72), seed, recipe=recipe, end_of_text=end_of_text)


def figures_with_prop(h: int, w: int) -> np.ndarray:
    """Two standing figures (0 left, 1 right) in a background (2), with an object (3) on the ground between them."""
    regions = np.full((h, w), 2, dtype=np.int64)
    regions[h // 5 :, round(w * 0.1) : round(w * 0.35)] = 0
    regions[h // 5 :, round(w * 0.65) : round(w * 0.9)] = 1
    regions[round(h * 0.65) : round(h * 0.9), round(w * 0.44) : round(w * 0.56)] = 3
    return regions


def background_scene(seed: int, end_of_text: Words | None = END_OF_TEXT) -> Scene:
    """Two figures in a background with a third object between them that no subject's words name.

    The paper's vote gives every superpixel to some subject, so the background and the object go to the two
    figures (their LoRAs would paint them). The end-of-text token attends to the background; the object is only
    in the fillers' mixes. The subjects' maps are far below the uniform score 1/N on both.
    """
    return build_scene("background", figures_with_prop(28, 40), seed, subjects=2, end_of_text=end_of_text)


FAILURE_SCENES: dict[str, Callable[..., Scene]] = {
    "leak": leak_scene,
    "wide_holes": wide_holes_scene,
    "background": background_scene,
}
