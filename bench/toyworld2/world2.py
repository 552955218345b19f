"""The second toy world: the first world's sprites, built differently everywhere else (see README.md here).

- No VAE: the transformer's "latent" is the picture itself, 32 x 32 cells x RGB scaled to [-1, 1] (3 channels).
- No T5 or CLIP: a caption is its words as fixed random vectors (seed 2, dim 64) plus a sinusoidal code of their
  place (FLUX gives every text token the same RoPE position, so without it "A left, B right" and the swap would
  read alike), then an end-of-text token "</s>" and padding to TEXT_TOKENS; the pooled vector is the words' mean.
  One word = one token, so a word's token position is its index in the caption.
- A smaller transformer (2 double + 1 single blocks) from another seed, and character LoRAs that keep the double
  blocks' text-stream layers (the first world's leave them out).

Pure torch and numpy; the sprites, captions and scorer are the first world's (bench/toyworld/world.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toyworld"))
import world

TEXT_TOKENS = 12  # the longest caption has 9 words, then "</s>", then padding
TEXT_DIM = 64
END = "</s>"
PAD = "<pad>"
VOCAB = (PAD, END, "on", "the", "in", "and", *world.PLACES, *world.COLOURS, *world.CHARACTERS, *world.NAMES,
         *world.HELD_OUT_NAMES)  # fmt: skip
TEXT_SEED = 2

TRANSFORMER = dict(
    in_channels=3,  # the picture's RGB cells; the model patchifies 2 x 2 cells into one token
    vec_in_dim=TEXT_DIM,
    context_in_dim=TEXT_DIM,
    hidden_size=96,
    mlp_ratio=4.0,
    num_heads=3,  # head dim 32
    depth=2,
    depth_single_blocks=1,
    axes_dim=[4, 14, 14],
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,
)
CAPTURE_BLOCK = TRANSFORMER["depth"] - 1  # the last double block: the paper's "late" block


def word_vectors() -> torch.Tensor:
    """(len(VOCAB), TEXT_DIM) fixed random word vectors; the padding token's is zero."""
    vectors = torch.randn(len(VOCAB), TEXT_DIM, generator=torch.Generator().manual_seed(TEXT_SEED))
    vectors[VOCAB.index(PAD)] = 0
    return vectors


def position_code() -> torch.Tensor:
    """(TEXT_TOKENS, TEXT_DIM) sinusoidal code of each token's place in the caption."""
    place = torch.arange(TEXT_TOKENS, dtype=torch.float32)[:, None]
    rate = torch.exp(-math.log(100.0) * torch.arange(0, TEXT_DIM, 2, dtype=torch.float32) / TEXT_DIM)
    code = torch.zeros(TEXT_TOKENS, TEXT_DIM)
    code[:, 0::2], code[:, 1::2] = torch.sin(place * rate), torch.cos(place * rate)
    return code


def tokens(caption: str) -> list[str]:
    """A caption's tokens: its words, "</s>", padding to TEXT_TOKENS ("" is just "</s>" and padding)."""
    words = caption.split()
    if len(words) >= TEXT_TOKENS:
        raise ValueError(f"caption of {len(words)} words: at most {TEXT_TOKENS - 1} fit: {caption!r}")
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise ValueError(f"words not in the second world's vocabulary: {unknown}")
    return [*words, END] + [PAD] * (TEXT_TOKENS - len(words) - 1)


def encode(captions: list[str]) -> dict[str, torch.Tensor]:
    """{"crossattn": (N, TEXT_TOKENS, TEXT_DIM) word vectors + position code, "vector": (N, TEXT_DIM) the mean of the
    caption's word vectors (zero for "")}."""
    vectors, code = word_vectors(), position_code()
    ids = torch.tensor([[VOCAB.index(t) for t in tokens(c)] for c in captions], dtype=torch.long)
    context = vectors[ids] + code
    is_word = (ids > VOCAB.index(END)).float()[..., None]
    pooled = (vectors[ids] * is_word).sum(1) / is_word.sum(1).clamp_min(1)
    return {"crossattn": context, "vector": pooled}


def word_position(caption: str, word: str) -> int:
    """The token position of `word` in `caption` (one word = one token)."""
    return caption.split().index(word)


def end_position(caption: str) -> int:
    """The token position of the caption's "</s>"."""
    return len(caption.split())


def to_latent(cells: torch.Tensor) -> torch.Tensor:
    """(B, CELLS, CELLS, 3) cells in [0, 1] -> (B, 3, CELLS, CELLS) model space in [-1, 1]."""
    return cells.permute(0, 3, 1, 2) * 2 - 1


def to_cells(latent: torch.Tensor) -> torch.Tensor:
    """(B, 3, CELLS, CELLS) model space -> (B, CELLS, CELLS, 3) cells in [0, 1] (clamped)."""
    return ((latent.float().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)
