"""The mask overlay: each subject's region takes its colour, the rest of the picture is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_freefuse.overlay import COLOURS, mask_overlay

pytestmark = pytest.mark.core


def test_regions_take_their_subjects_colours():
    image = Image.fromarray(np.full((64, 96, 3), 128, dtype=np.uint8))
    masks = torch.zeros(2, 4, 6)
    masks[0, :, :3] = 1
    masks[1, 2:, 3:] = 1
    out = np.asarray(mask_overlay(image, masks, ["harry", "daiyu"], alpha=0.5)).astype(int)
    assert out.shape == (64, 96, 3)
    left, right_bottom, right_top = out[40, 20], out[60, 80], out[10, 80]
    assert np.abs(left - (np.array(COLOURS[0]) * 0.5 + 64)).max() <= 1
    assert np.abs(right_bottom - (np.array(COLOURS[1]) * 0.5 + 64)).max() <= 1
    assert (right_top == 128).all()  # nobody's region: unchanged


def _legend_rows(out: np.ndarray, size: int) -> int:
    """How many legend swatches the overlay drew: white-outlined squares down the left edge at 4 + i * (size + 4)."""
    rows = 0
    while 4 + rows * (size + 4) + size < out.shape[0] and (out[4 + rows * (size + 4), 4] == 255).all():
        rows += 1
    return rows


def test_the_legend_names_the_places_no_subject_owns_only_when_there_are_some():
    image = Image.fromarray(np.full((96, 96, 3), 128, dtype=np.uint8))
    size = 96 // 24
    whole = torch.zeros(2, 4, 4)
    whole[0, :, :2] = 1
    whole[1, :, 2:] = 1
    assert _legend_rows(np.asarray(mask_overlay(image, whole, ["a", "b"])), max(8, size)) == 2
    holed = whole.clone()
    holed[:, 3, 3] = 0  # one token nobody owns (a background setting)
    assert _legend_rows(np.asarray(mask_overlay(image, holed, ["a", "b"])), max(8, size)) == 3
