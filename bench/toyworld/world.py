"""The toy world's sprites: generic figures on grey, two characters the base model never sees, and their captions.

Pure numpy, no Forge. A picture is a 32 x 32 grid of "cells" (one cell = one 8 x 8 pixel block of the 256 x 256
image = one latent pixel, so the 16 x 16 image-token grid has 2 x 2 cells per token). A sprite is
(shape, colour, pattern, pattern colour), drawn inside one half: the left half is cells x < 16, the right x >= 16.

ZORB = red disc with yellow horizontal stripes, QUIL = blue square with white dots. The base model is trained on
every other combination, with captions that name colour and place ("green on the left and orange on the right");
each character LoRA on its character alone ("zorb on the left").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

CELLS = 32  # the picture is CELLS x CELLS cells
CELL_PX = 8  # one cell = CELL_PX x CELL_PX pixels (the VAE's downscale factor): images are 256 x 256
IMAGE_PX = CELLS * CELL_PX
HALF = CELLS // 2
SPRITE = 12  # a sprite's box, in cells

BACKGROUND = (0.5, 0.5, 0.5)
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.10),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.68, 0.22),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.96, 0.55, 0.78),
}
PATTERN_COLOURS = {"yellow": (0.98, 0.92, 0.10), "white": (1.0, 1.0, 1.0), "black": (0.05, 0.05, 0.05)}
SHAPES = ("disc", "square", "triangle", "diamond")
PATTERNS = ("plain", "hstripes", "vstripes", "dots", "checks")
PLACES = ("left", "right", "center")


@dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    pattern: str
    pattern_colour: str


ZORB = Sprite("disc", "red", "hstripes", "yellow")
QUIL = Sprite("square", "blue", "dots", "white")
CHARACTERS = {"zorb": ZORB, "quil": QUIL}
ALL_SPRITES = tuple(
    Sprite(s, c, p, pc) for s in SHAPES for c in COLOURS for p in PATTERNS for pc in PATTERN_COLOURS if pc != c
)
GENERIC_SPRITES = tuple(s for s in ALL_SPRITES if s not in CHARACTERS.values())


# Made-up names the base may be trained with (train.py --base-names), each naming a random generic figure, so that
# the base routes a figure's words by their place in the caption rather than by what the word is, as a real FLUX
# that has seen countless names does. More names than the T5's 64 dimensions, so that no direction of a word's own
# embedding can carry its place. Never a character's or a colour's.
_HAND_MADE_NAMES = (
    "blick", "tamsen", "vorp", "kesh", "mibble", "drosk", "pellan", "gorvin", "snib", "trelka", "wumble", "fazzo",
    "norrit", "plimsy", "dax", "yorla", "brimmet", "skiv", "hobbard", "lunt", "crasp", "ebbin", "mardle", "tuzz",
)  # fmt: skip
NAME_COUNT = 128
HELD_OUT_NAMES = ("jorp", "wexa")  # never trained on: word_maps.py checks that unseen words route by place


def made_up_names(count: int = NAME_COUNT, seed: int = 11) -> tuple[str, ...]:
    """The hand-made names, then consonant-vowel syllables drawn from `seed` until there are `count`."""
    rng = np.random.default_rng(seed)
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "n", "r", "sk", "ll", "m", "x", "t")
    caption_words = {"on", "the", "in", "and", *PLACES}
    taken = set(_HAND_MADE_NAMES) | set(COLOURS) | set(CHARACTERS) | set(HELD_OUT_NAMES) | caption_words
    names = list(_HAND_MADE_NAMES)
    while len(names) < count:
        syllables = int(rng.integers(1, 3))
        word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(syllables))
        word += codas[int(rng.integers(len(codas)))]
        if len(word) >= 3 and word not in taken:
            taken.add(word)
            names.append(word)
    return tuple(names)


NAMES = made_up_names()


@cache
def sprite_cells(sprite: Sprite) -> np.ndarray:
    """(SPRITE, SPRITE, 4) RGBA of one sprite in its box: alpha 1 inside the shape (cached: do not write to it)."""
    y, x = np.mgrid[0:SPRITE, 0:SPRITE] + 0.5
    c = SPRITE / 2
    r = SPRITE / 2 - 0.3
    inside = {
        "disc": (x - c) ** 2 + (y - c) ** 2 <= r**2,
        "square": (np.abs(x - c) <= r - 0.7) & (np.abs(y - c) <= r - 0.7),
        "triangle": (y >= 0.5) & (np.abs(x - c) <= (y - 0.5) * 0.55 + 0.3),
        "diamond": np.abs(x - c) + np.abs(y - c) <= r + 0.4,
    }[sprite.shape]
    iy, ix = np.mgrid[0:SPRITE, 0:SPRITE]
    marked = {
        "plain": np.zeros_like(inside),
        "hstripes": iy % 4 < 2,
        "vstripes": ix % 4 < 2,
        "dots": (iy % 4 == 1) & (ix % 4 == 1) | (iy % 4 == 2) & (ix % 4 == 2) | (iy % 4 == 1) & (ix % 4 == 2),
        "checks": ((iy // 3) + (ix // 3)) % 2 == 0,
    }[sprite.pattern]
    rgba = np.zeros((SPRITE, SPRITE, 4), np.float32)
    rgba[..., :3] = COLOURS[sprite.colour]
    rgba[marked & inside, :3] = PATTERN_COLOURS[sprite.pattern_colour]
    rgba[..., 3] = inside
    return rgba


def place_box(place: str, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left cell of a sprite's box in `place`, with a random jitter: left/right boxes stay inside their half."""
    top = int(rng.integers(4, CELLS - SPRITE - 4 + 1))
    if place == "left":
        left = int(rng.integers(1, HALF - SPRITE + 1))
    elif place == "right":
        left = int(rng.integers(HALF, CELLS - SPRITE))
    elif place == "center":
        left = int(rng.integers(HALF - SPRITE // 2 - 2, HALF - SPRITE // 2 + 3))
    else:
        raise ValueError(f"place: expected one of {PLACES}, got {place!r}")
    return top, left


def render_with_masks(figures: list[tuple[Sprite, str]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """((CELLS, CELLS, 3) float32 picture in [0, 1], (len(figures), CELLS, CELLS) bool: where each figure is drawn):
    the sprites drawn at their places on the grey background."""
    picture = np.empty((CELLS, CELLS, 3), np.float32)
    picture[:] = BACKGROUND
    masks = np.zeros((len(figures), CELLS, CELLS), bool)
    for i, (sprite, place) in enumerate(figures):
        top, left = place_box(place, rng)
        rgba = sprite_cells(sprite)
        box = picture[top : top + SPRITE, left : left + SPRITE]
        alpha = rgba[..., 3:]
        box[:] = box * (1 - alpha) + rgba[..., :3] * alpha
        masks[i, top : top + SPRITE, left : left + SPRITE] = rgba[..., 3] > 0
    return picture, masks


def render(figures: list[tuple[Sprite, str]], rng: np.random.Generator) -> np.ndarray:
    """(CELLS, CELLS, 3) float32 picture in [0, 1]: the sprites drawn at their places on the grey background."""
    return render_with_masks(figures, rng)[0]


def upscale(picture: np.ndarray) -> np.ndarray:
    """(..., CELLS, CELLS, 3) cells -> (..., IMAGE_PX, IMAGE_PX, 3) pixels (each cell a CELL_PX block)."""
    return picture.repeat(CELL_PX, axis=-3).repeat(CELL_PX, axis=-2)


def cells_of(image: np.ndarray) -> np.ndarray:
    """(..., IMAGE_PX, IMAGE_PX, 3) pixels -> (..., CELLS, CELLS, 3): the mean of each cell's block."""
    *lead, h, w, c = image.shape
    blocks = image.reshape(*lead, h // CELL_PX, CELL_PX, w // CELL_PX, CELL_PX, c)
    return blocks.mean(axis=(-4, -2))


def caption(names: list[tuple[str, str]]) -> str:
    """[(word, place)] -> "red on the left and blue on the right" / "zorb in the center"."""
    parts = [f"{word} in the center" if place == "center" else f"{word} on the {place}" for word, place in names]
    return " and ".join(parts)


def base_example_with_masks(rng: np.random.Generator, names: float = 0.0) -> tuple[np.ndarray, str, np.ndarray]:
    """One training picture for the base model: 1-2 generic sprites, captioned by colour (or, with probability
    `names` each, by a made-up name) and place, with each figure's (CELLS, CELLS) mask in caption order."""
    layout = rng.random()
    if layout < 0.6:
        places = ["left", "right"]
    elif layout < 0.85:
        places = [("left", "right")[int(rng.integers(2))]]
    else:
        places = ["center"]
    figures = [(GENERIC_SPRITES[int(rng.integers(len(GENERIC_SPRITES)))], place) for place in places]
    picture, masks = render_with_masks(figures, rng)
    words = [s.colour for s, _ in figures]
    if names:  # no draw at 0: the first world's base data stays as it was made
        words = [NAMES[int(rng.integers(len(NAMES)))] if rng.random() < names else w for w in words]
    return picture, caption(list(zip(words, places, strict=True))), masks


def base_example(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One training picture for the base model: 1-2 generic sprites, captioned by colour and place."""
    return base_example_with_masks(rng)[:2]


def character_example(name: str, rng: np.random.Generator, paired: float = 0.0) -> tuple[np.ndarray, str]:
    """One training picture for a character LoRA, the character named by its word: alone at a random place, or
    (with probability `paired`) in one half beside a generic sprite in the other. The committed LoRAs use 0.5 (alone
    they made every picture a single figure on the names base); the first world's used 0 (bench/toyworld/README.md)."""
    if paired and rng.random() < paired:  # no draw at 0: the first world's LoRA data stays as it was made
        place, other = ("left", "right") if rng.random() < 0.5 else ("right", "left")
        sprite = GENERIC_SPRITES[int(rng.integers(len(GENERIC_SPRITES)))]
        figures = [(CHARACTERS[name], place, name), (sprite, other, sprite.colour)]
        figures.sort(key=lambda figure: figure[1] != "left")  # the caption names the left figure first
        return render([(s, p) for s, p, _ in figures], rng), caption([(word, p) for _, p, word in figures])
    place = PLACES[int(rng.integers(len(PLACES)))]
    return render([(CHARACTERS[name], place)], rng), caption([(name, place)])


def all_captions(names: bool = False) -> list[str]:
    """Every caption the training sets and the benchmark use, "" (the dropped caption) first; with `names`, also
    those of base pictures named by NAMES."""
    words = list(COLOURS) + list(CHARACTERS) + (list(NAMES) if names else [])
    captions = [""]
    captions += [caption([(w, p)]) for w in words for p in PLACES]
    captions += [caption([(a, "left"), (b, "right")]) for a in words for b in words]
    if names:
        a, b = HELD_OUT_NAMES
        captions += [caption([(a, "left"), (b, "right")]), caption([(b, "left"), (a, "right")])]
    return captions


def benchmark_prompts() -> dict[str, tuple[str, str]]:
    """The two benchmark prompts: name -> (prompt, character on the left)."""
    return {
        "P1": (caption([("zorb", "left"), ("quil", "right")]), "zorb"),
        "P2": (caption([("quil", "left"), ("zorb", "right")]), "quil"),
    }


def halves_iou(masks: np.ndarray) -> float:
    """(2, h, w) bool masks of the left and the right subject -> mean IoU against the true halves of the grid."""
    truth = np.zeros(masks.shape, bool)
    truth[0, :, : masks.shape[-1] // 2] = True
    truth[1] = ~truth[0]
    inter = (masks & truth).reshape(2, -1).sum(1)
    union = (masks | truth).reshape(2, -1).sum(1)
    return float((inter / np.maximum(union, 1)).mean())


FIGURE_CONTRAST = 0.15  # a token belongs to a figure where its pixels differ from the background more, on average


def figure_tokens(image: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(H_px, W_px, 3) image in [0, 1] -> (h, w) bool: the tokens whose pixels mostly are not the grey background."""
    h, w = grid_hw
    contrast = np.abs(np.asarray(image, np.float32) - np.asarray(BACKGROUND, np.float32)).max(-1)
    return contrast.reshape(h, contrast.shape[0] // h, w, contrast.shape[1] // w).mean((1, 3)) > FIGURE_CONTRAST


# The benchmarks' diagnostic oracles (benchmark.CONFIGS): the extracted masks with one part put right, so that the
# rest of the oracle's gain can be told apart: "truth on figures" (each figure token to its half's subject, the rest
# as extracted) and "truth off figures" (the figures as extracted, every other token to its half's subject).
MIXED_ORACLES = ("truth on figures", "truth off figures")


def mixed_masks(extracted, halves, figure, mode: str):
    """(L, h, w) masks: `extracted` where `mode` keeps the extraction, `halves` (the true halves) elsewhere; figure:
    (h, w) 0/1 of the same type (torch or numpy)."""
    if mode == "truth on figures":
        return extracted * (1 - figure) + halves * figure
    if mode == "truth off figures":
        return extracted * figure + halves * (1 - figure)
    raise ValueError(f"mode: expected one of {', '.join(MIXED_ORACLES)}, got {mode!r}")


def figure_accuracy(masks: np.ndarray, figure: np.ndarray) -> float:
    """(2, h, w) bool masks of the left and the right subject, (h, w) figure tokens -> the share of the figure tokens
    that the subject of their half owns: where each LoRA paints a figure (the halves' IoU also counts the background,
    which neither LoRA changes). 1.0 for a picture without figures."""
    truth = np.zeros(masks.shape, bool)
    truth[0, :, : masks.shape[-1] // 2] = True
    truth[1] = ~truth[0]
    right = (masks & truth).any(0) & figure
    return float(right.sum() / figure.sum()) if figure.any() else 1.0


def half_regions(left_character: str) -> dict[str, np.ndarray]:
    """The true region of each character in a benchmark picture: (CELLS, CELLS) bool, its half of the grid."""
    left = np.zeros((CELLS, CELLS), bool)
    left[:, :HALF] = True
    other = next(n for n in CHARACTERS if n != left_character)
    return {left_character: left, other: ~left}
