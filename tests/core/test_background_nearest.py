"""Background "nearest" (beyond the paper): where no subject's map reaches the threshold, the place goes to the
subject that owns the nearest place, so that each subject's LoRA also acts on the surroundings of its own figure.
Checked against a brute-force nearest owner, and in extract_masks against "threshold"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_extract_masks import GRID, inputs

from lib_freefuse.core import MaskConfig, extract_masks
from lib_freefuse.core.superpixel import give_free_to_nearest

pytestmark = pytest.mark.core


def brute_force_distances(owner: np.ndarray, n_subjects: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the squared distance to the nearest owned pixel, and the set of owners at that distance."""
    owned = np.argwhere(owner != n_subjects)
    rows, cols = np.indices(owner.shape)
    d2 = (rows[..., None] - owned[:, 0]) ** 2 + (cols[..., None] - owned[:, 1]) ** 2  # (H, W, n_owned)
    nearest = d2.min(-1)
    return nearest, d2 == nearest[..., None]


@pytest.mark.parametrize("seed", range(6))
def test_every_free_pixel_takes_the_owner_of_a_nearest_owned_pixel(seed):
    rng = np.random.default_rng(seed)
    n_subjects = int(rng.integers(1, 4))
    owner = rng.integers(0, n_subjects, size=(9, 13))
    owner[rng.random(owner.shape) < 0.8] = n_subjects  # most pixels free
    owner[0, 0] = 0
    got = give_free_to_nearest(torch.from_numpy(owner), n_subjects).numpy()
    assert (got[owner != n_subjects] == owner[owner != n_subjects]).all()  # owned pixels keep their owner
    assert (got < n_subjects).all()  # nothing is left free
    _, at_nearest = brute_force_distances(owner, n_subjects)
    owned_owner = owner[owner != n_subjects]
    for r, c in np.argwhere(owner == n_subjects):
        assert got[r, c] in set(owned_owner[at_nearest[r, c]].tolist()), (r, c)


def test_nothing_or_everything_owned_is_left_as_it_is():
    free = torch.full((4, 5), 2)
    assert torch.equal(give_free_to_nearest(free, 2), free)
    owned = torch.zeros(4, 5, dtype=torch.int64)
    assert torch.equal(give_free_to_nearest(owned, 2), owned)


def test_a_row_splits_at_the_middle_between_its_owners():
    owner = torch.tensor([[0, 2, 2, 2, 2, 1]])
    assert give_free_to_nearest(owner, 2).tolist() == [[0, 0, 0, 1, 1, 1]]


def test_nearest_keeps_what_threshold_gives_and_hands_out_the_rest():
    threshold = extract_masks(**inputs(3), config=MaskConfig(superpixel_vote=False, background="threshold",
                                                            background_threshold=2.0))  # fmt: skip
    nearest = extract_masks(**inputs(3), config=MaskConfig(superpixel_vote=False, background="nearest",
                                                          background_threshold=2.0))  # fmt: skip
    owned = threshold.sum(dim=0) > 0
    assert 0 < int(owned.sum()) < GRID[0] * GRID[1]  # the threshold left some places free: the test can tell
    assert torch.equal(nearest[:, owned], threshold[:, owned])
    torch.testing.assert_close(nearest.sum(dim=0), torch.ones(GRID))


@pytest.mark.parametrize("vote", [False, True])
def test_where_no_subject_reaches_the_threshold_anywhere_the_masks_are_the_papers(vote):
    nearest = MaskConfig(superpixel_vote=vote, background="nearest", background_threshold=50.0)
    freed = MaskConfig(superpixel_vote=vote, background="threshold", background_threshold=50.0)
    assert extract_masks(**inputs(3), config=freed).sum() == 0  # nothing reaches it: the case is the one meant
    paper = extract_masks(**inputs(3), config=MaskConfig(superpixel_vote=vote))
    assert torch.equal(extract_masks(**inputs(3), config=nearest), paper)
