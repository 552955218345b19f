"""Reducing pixel masks to the token grid, and the size of the copy SLIC runs on."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse.core import pixel_masks_to_tokens
from lib_freefuse.core.superpixel import owner_to_pixel_masks, slic_scale

pytestmark = pytest.mark.core


def test_exact_blocks_give_area_fractions():
    owner = torch.zeros(4, 6, dtype=torch.long)  # 2x3 tokens of 2x2 pixels
    owner[:, 3:] = 1
    owner[0, 0] = 1  # one pixel of token (0, 0) belongs to subject 1
    soft = pixel_masks_to_tokens(owner_to_pixel_masks(owner, 2), (2, 3), soft=True)
    assert soft[1, 0, 0] == 0.25 and soft[0, 0, 0] == 0.75
    assert soft[1, 0, 1] == 0.5  # columns 2-3: half of it is subject 1
    torch.testing.assert_close(soft.sum(dim=0), torch.ones(2, 3))
    hard = pixel_masks_to_tokens(owner_to_pixel_masks(owner, 2), (2, 3))
    assert hard[:, 0, 0].tolist() == [1.0, 0.0]
    assert hard[:, 0, 1].tolist() == [1.0, 0.0]  # a tie goes to the lower index: still disjoint
    assert hard[:, :, 2].tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_non_divisible_sizes_still_cover_every_pixel():
    owner = torch.randint(0, 3, (37, 53), generator=torch.Generator().manual_seed(0))
    soft = pixel_masks_to_tokens(owner_to_pixel_masks(owner, 3), (5, 7), soft=True)
    assert soft.shape == (3, 5, 7)
    torch.testing.assert_close(soft.sum(dim=0), torch.ones(5, 7))


def test_uncovered_pixels_stay_unowned_in_hard_masks():
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1  # subject 0 owns the top-left token fully
    masks[1, 4:, 4 : 3 + 4] = 1  # subject 1 owns 3/4 of the bottom-right token: a majority
    masks[1, :4, 4:5] = 1  # and a quarter of the top-right one: less than the unowned rest
    hard = pixel_masks_to_tokens(masks, (2, 2))
    assert hard[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert hard[1].tolist() == [[0.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    ("grid", "image_hw", "max_side", "scale"),
    [
        ((64, 64), (1024, 1024), 512, 8),  # FLUX 1024x1024: SLIC on 512x512
        ((64, 64), (1024, 1024), 256, 4),  # the default: 4 x 4 pixels per token
        ((32, 96), (512, 1536), 512, 5),  # very wide: 160x480
        ((4, 4), (64, 64), 512, 16),  # tiny image: never upsampled past its own resolution
        ((128, 128), (2048, 2048), 64, 1),  # at least one pixel per token
    ],
)
def test_slic_scale(grid, image_hw, max_side, scale):
    assert slic_scale(grid, image_hw, max_side) == scale
