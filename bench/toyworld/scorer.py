"""Reads identity per half of a toy-world picture: a small CNN on the half's 32 x 16 cells.

Heads: present (no figure / a figure), body colour, shape, pattern, pattern colour. A character is "identified"
in a half when a figure is present with the character's body colour, pattern and pattern colour (shape is left
out: the base model draws shapes loosely). Trained by train.py on rendered pictures (half of them through the
VAE) and validated there on held-out renders.
"""

from __future__ import annotations

import torch
import world
from torch import nn

HEADS = ("present", "colour", "shape", "pattern", "pattern_colour")
CLASSES = {
    "present": ("absent", "present"),
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "pattern": world.PATTERNS,
    "pattern_colour": tuple(world.PATTERN_COLOURS),
}
IDENTITY_HEADS = ("colour", "pattern", "pattern_colour")


class Scorer(nn.Module):
    """(N, 3, CELLS, HALF) cells in [0, 1] -> {head: (N, classes) logits}."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * width * (world.CELLS // 4) * (world.HALF // 4), 128),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict({head: nn.Linear(128, len(CLASSES[head])) for head in HEADS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x - 0.5)
        return {head: layer(h) for head, layer in self.heads.items()}


def sprite_label(sprite: world.Sprite | None) -> dict[str, int]:
    if sprite is None:
        return {"present": 0, "colour": 0, "shape": 0, "pattern": 0, "pattern_colour": 0}
    return {
        "present": 1,
        "colour": CLASSES["colour"].index(sprite.colour),
        "shape": CLASSES["shape"].index(sprite.shape),
        "pattern": CLASSES["pattern"].index(sprite.pattern),
        "pattern_colour": CLASSES["pattern_colour"].index(sprite.pattern_colour),
    }


def half_labels(figures: list[tuple[world.Sprite, str]]) -> list[dict[str, int]]:
    """Labels of a picture's [left, right] halves from its (sprite, "left" | "right") figures."""
    at = {place: sprite for sprite, place in figures}
    return [sprite_label(at.get("left")), sprite_label(at.get("right"))]


def halves(cells: torch.Tensor) -> torch.Tensor:
    """(B, CELLS, CELLS, 3) -> (2B, 3, CELLS, HALF): each picture's left half, then its right half."""
    x = cells.permute(0, 3, 1, 2)
    return torch.stack([x[..., : world.HALF], x[..., world.HALF :]], dim=1).flatten(0, 1)


def load_scorer(path) -> Scorer:
    from safetensors.torch import load_file

    scorer = Scorer()
    scorer.load_state_dict(load_file(str(path)))
    return scorer.eval()


@torch.no_grad()
def read_halves(scorer: Scorer, images: torch.Tensor) -> list[list[dict[str, str]]]:
    """(B, IMAGE_PX, IMAGE_PX, 3) RGB in [0, 1] -> per image, [left, right] of {head: predicted class name}."""
    cells = nn.functional.avg_pool2d(images.permute(0, 3, 1, 2).float(), world.CELL_PX).permute(0, 2, 3, 1)
    out = scorer(halves(cells.clamp(0, 1)))
    names = {head: [CLASSES[head][i] for i in out[head].argmax(1).tolist()] for head in HEADS}
    read = [{head: names[head][i] for head in HEADS} for i in range(len(cells) * 2)]
    return [read[i : i + 2] for i in range(0, len(read), 2)]


def identified(half: dict[str, str], character: str) -> bool:
    """A half shows `character`: a figure with its body colour, pattern and pattern colour."""
    sprite = world.CHARACTERS[character]
    return half["present"] == "present" and all(half[h] == getattr(sprite, h) for h in IDENTITY_HEADS)


def score_image(halves_read: list[dict[str, str]], left_character: str) -> dict[str, float]:
    """One benchmark image: present (share of the 2 halves with a figure), identity (share of the halves showing
    their own character), both right (1 if both do), wrong colour (share of the halves whose figure has the other
    character's body colour)."""
    other = next(n for n in world.CHARACTERS if n != left_character)
    expected = (left_character, other)
    present = [h["present"] == "present" for h in halves_read]
    ident = [identified(h, c) for h, c in zip(halves_read, expected, strict=True)]
    wrong = [
        p and h["colour"] == world.CHARACTERS[o].colour
        for h, p, o in zip(halves_read, present, (other, left_character), strict=True)
    ]
    return {
        "present": sum(present) / 2,
        "identity": sum(ident) / 2,
        "both_right": float(all(ident)),
        "wrong_colour": sum(wrong) / 2,
    }
