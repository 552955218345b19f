"""Chroma's per-token modulation rows (forge/chroma_modulation.py, no host): which mask rows the MLP is run for, and
each token's weights over those runs."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse.forge.chroma_modulation import MAX_ROWS, anchor_rows, coefficients

pytestmark = pytest.mark.core


def test_hard_masks_run_their_distinct_rows_and_the_zero_row_and_each_token_picks_its_own():
    text = torch.ones(2, 5, 2)  # every subject on the text (cond and uncond rows of the call)
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]).expand(2, -1, -1)
    anchors, exact = anchor_rows([text, image])
    assert exact
    assert sorted(map(tuple, anchors.tolist())) == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    weights = coefficients(image, anchors, exact)  # (2, 3, 4)
    assert weights.shape == (2, 3, 4) and torch.equal(weights.sum(-1), torch.ones(2, 3))
    assert torch.equal(weights @ anchors, image)  # one-hot on the token's own row


def test_many_soft_rows_take_the_zero_row_and_each_subject_with_first_order_weights():
    masks = torch.rand(1, MAX_ROWS + 1, 3, generator=torch.Generator().manual_seed(0))
    anchors, exact = anchor_rows([masks])
    assert not exact
    assert torch.equal(anchors, torch.cat([torch.zeros(1, 3), torch.eye(3)]))
    weights = coefficients(masks, anchors, exact)
    torch.testing.assert_close(weights[..., 0], 1 - masks.sum(-1))
    torch.testing.assert_close(weights[..., 1:], masks)


def test_a_few_soft_rows_are_still_run_exactly():
    masks = torch.tensor([[[0.25, 0.5], [0.25, 0.5], [1.0, 0.0]]])
    anchors, exact = anchor_rows([masks])
    assert exact and anchors.shape == (3, 2)  # zero, (0.25, 0.5), (1, 0)
    assert torch.equal(coefficients(masks, anchors, exact) @ anchors, masks)
