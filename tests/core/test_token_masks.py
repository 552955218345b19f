"""Per-token masks of each FLUX stream: the text-token rule and the layout of one model call."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse.core import call_token_masks, text_token_masks

pytestmark = pytest.mark.core


def test_text_rule_zeroes_a_subject_on_the_other_subjects_words():
    masks = text_token_masks([(1, 2), (5,)], text_tokens=8)
    assert masks.shape == (8, 2)
    assert masks[:, 0].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]  # subject 0's LoRA: off on subject 1's word
    assert masks[:, 1].tolist() == [1, 0, 0, 1, 1, 1, 1, 1]  # subject 1's LoRA: off on subject 0's words


def test_text_rule_follows_a_repeated_context():
    masks = text_token_masks([(1,), (3,)], text_tokens=12, period=4)  # the prompt repeated 3 times
    assert masks[:, 1].nonzero().numel() == 9 and masks[[1, 5, 9], 1].eq(0).all()
    assert masks[[3, 7, 11], 0].eq(0).all()


def test_three_subjects():
    masks = text_token_masks([(0,), (1,), (2,)], text_tokens=4)
    assert masks.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]


def test_call_layout_for_cfg_batch():
    image = torch.rand(2, 6, 2)  # 2 images, 6 image tokens, 2 subjects
    text = torch.rand(2, 3, 2)
    uncond_cond = [1, 0]
    img = call_token_masks("image", image, text, uncond_cond)
    assert img.shape == (4, 6, 2) and torch.equal(img[:2], image) and torch.equal(img[2:], image)
    txt = call_token_masks("text", image, text, uncond_cond)
    assert torch.equal(txt[:2], torch.ones(2, 3, 2)) and torch.equal(txt[2:], text)
    joint = call_token_masks("joint", image, text, uncond_cond)
    assert joint.shape == (4, 9, 2) and torch.equal(joint[2:, :3], text) and torch.equal(joint[2:, 3:], image)


def test_cond_only_call():
    image, text = torch.rand(1, 4, 3), torch.rand(1, 2, 3)
    assert torch.equal(call_token_masks("joint", image, text, [0]), torch.cat([text, image], dim=1))


def test_unknown_stream_is_named():
    with pytest.raises(ValueError, match="^stream:"):
        call_token_masks("vector", torch.rand(1, 4, 2), torch.rand(1, 2, 2), [0])


@pytest.mark.parametrize("mode", ["all", "own_words", "none"])
def test_text_lora_modes(mode):
    """all: every LoRA except on other subjects' words; own_words: each LoRA on its own words only; none: nothing."""
    masks = text_token_masks([(1, 2), (5,)], text_tokens=12, period=6, mode=mode)  # the prompt repeated twice
    expected = torch.zeros(12, 2) if mode != "all" else torch.ones(12, 2)
    for offset in (0, 6):
        if mode == "all":
            expected[[1 + offset, 2 + offset], 1] = 0
            expected[5 + offset, 0] = 0
        elif mode == "own_words":
            expected[[1 + offset, 2 + offset], 0] = 1
            expected[5 + offset, 1] = 1
    assert torch.equal(masks, expected)


def test_text_lora_mode_is_checked():
    with pytest.raises(ValueError, match="^mode: expected one of own_words, all, none"):
        text_token_masks([(1,), (2,)], text_tokens=4, mode="some")
