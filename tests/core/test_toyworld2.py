"""The second toy world's pure parts: its text encoder (word vectors + a code of their place), the token positions
the benchmark hands FreeFuse, and the training pictures' figure words."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TOYWORLD2 = Path(__file__).resolve().parents[2] / "bench" / "toyworld2"
sys.path.insert(0, str(TOYWORLD2))

import world2  # noqa: E402
from world2 import world  # noqa: E402  (the first world's sprites, as world2 imports them)

P1 = "zorb on the left and quil on the right"


def test_a_caption_is_its_words_then_the_end_token_then_padding():
    assert world2.tokens(P1) == [*P1.split(), world2.END] + [world2.PAD] * (world2.TEXT_TOKENS - 10)
    assert world2.tokens("") == [world2.END] + [world2.PAD] * (world2.TEXT_TOKENS - 1)
    assert world2.end_position(P1) == 9 and world2.word_position(P1, "quil") == 5


def test_bad_captions_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="vocabulary.*'dragon'"):
        world2.tokens("dragon on the left")
    with pytest.raises(ValueError, match="at most 11"):
        world2.tokens(" ".join(["red"] * 12))


def test_every_training_and_benchmark_caption_is_encodable():
    captions = world.all_captions(names=True) + [p for p, _ in world.benchmark_prompts().values()]
    text = world2.encode(captions)
    assert text["crossattn"].shape == (len(captions), world2.TEXT_TOKENS, world2.TEXT_DIM)
    assert text["vector"].shape == (len(captions), world2.TEXT_DIM)


def test_the_encoding_is_word_vectors_plus_the_place_code_and_the_pooled_mean():
    """Each token = its word's fixed vector + the sinusoidal code of its position (the padding's vector is 0); the
    pooled vector is the mean of the words' vectors (neither the end token nor padding)."""
    text = world2.encode([P1, ""])
    vectors, code = world2.word_vectors(), world2.position_code()
    ids = [world2.VOCAB.index(t) for t in world2.tokens(P1)]
    assert torch.equal(text["crossattn"][0], vectors[ids] + code)
    assert torch.allclose(text["vector"][0], vectors[ids[:9]].mean(0))
    assert torch.equal(text["vector"][1], torch.zeros(world2.TEXT_DIM))
    assert torch.equal(text["crossattn"][1, 1:], code[1:])  # padding: the place code alone


def test_the_place_code_tells_a_caption_from_its_swap():
    """FLUX gives every text token the same RoPE position: without the code "A left, B right" and the swap would be
    the same set of token vectors. With it, the swap's tokens differ, while the pooled vectors agree."""
    swap = "quil on the left and zorb on the right"
    a, b = world2.encode([P1, swap]).values()
    assert not torch.allclose(torch.sort(a[0], 0).values, torch.sort(a[1], 0).values)
    assert torch.allclose(b[0], b[1])


def test_the_word_vectors_are_fixed():
    assert torch.equal(world2.word_vectors(), world2.word_vectors())
    assert world2.word_vectors().shape == (len(world2.VOCAB), world2.TEXT_DIM)
    assert len(set(world2.VOCAB)) == len(world2.VOCAB)


def test_model_space_round_trips_the_cells():
    cells = torch.rand(2, world.CELLS, world.CELLS, 3)
    latent = world2.to_latent(cells)
    assert latent.shape == (2, 3, world.CELLS, world.CELLS) and latent.min() >= -1 and latent.max() <= 1
    assert torch.allclose(world2.to_cells(latent), cells, atol=1e-6)


def test_figure_words_are_the_first_word_of_each_part():
    sys.path.insert(0, str(TOYWORLD2.parent / "toyworld"))
    import train2

    assert train2.figure_words(P1) == [0, 5]
    assert train2.figure_words("wexo in the center") == [0]
    assert train2.figure_words("") == []
