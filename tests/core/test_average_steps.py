"""`average_steps` (beyond the paper): masks from the mean of the score maps (Eq. 5-10) of every step up to the
capture step, voted once (Eq. 11-13). Checked against the naive pipeline of test_equations.py, and in the job."""

from __future__ import annotations

import pytest
import torch
from test_equations import GRID, GROUPS, HEADS, N_IMG, N_TEXT, naive_score_maps

from lib_freefuse.core import (
    MaskConfig,
    cross_subject_maps,
    extract_cross_masks,
    extract_masks,
    joint_score_maps,
)
from lib_freefuse.core.masks import cross_score_maps
from lib_freefuse.forge.job import FreeFuseJob, JobPlan

pytestmark = pytest.mark.core

NO_VOTE = MaskConfig(superpixel_vote=False)


def qk(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(HEADS, N_TEXT + N_IMG, 16, generator=g) * 2 for _ in range(2))


def owners_as_masks(maps: torch.Tensor) -> torch.Tensor:
    """(L, N) maps -> (L, h, w) one-hot masks of each token's largest map (the vote-free rule, ties to the first)."""
    owner = maps.argmax(dim=0)
    return torch.stack([(owner == l).float() for l in range(maps.shape[0])]).view(-1, *GRID)


@pytest.mark.parametrize("config", [MaskConfig(), MaskConfig(self_attention=False, sink_filter=False)])
def test_joint_score_maps_are_eq5_to_10_of_one_step(config):
    q, k = qk(1)
    got = joint_score_maps(q, k, GROUPS, GRID, config)
    assert got.shape == (len(GROUPS), *GRID)
    torch.testing.assert_close(got.double().flatten(1), naive_score_maps(q, k, config), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(dim=(1, 2)), torch.ones(len(GROUPS)))  # each a distribution: fair to average


def test_masks_follow_the_mean_of_this_and_the_earlier_steps_maps():
    steps = [qk(seed) for seed in (2, 3, 4)]
    earlier = [joint_score_maps(q, k, GROUPS, GRID, NO_VOTE) for q, k in steps[:2]]
    got = extract_masks(*steps[2], GROUPS, GRID, None, NO_VOTE, earlier_maps=earlier)
    naive_mean = torch.stack([naive_score_maps(q, k, NO_VOTE) for q, k in steps]).mean(dim=0)
    assert torch.equal(got, owners_as_masks(naive_mean))
    alone = extract_masks(*steps[2], GROUPS, GRID, None, NO_VOTE)
    assert not torch.equal(got, alone)  # the earlier steps changed the owners: the test can tell


def test_the_same_steps_maps_again_change_nothing_and_the_vote_still_runs():
    q, k = qk(5)
    image = torch.rand(GRID[0] * 8, GRID[1] * 8, 3, generator=torch.Generator().manual_seed(5))
    config = MaskConfig()
    same = joint_score_maps(q, k, GROUPS, GRID, config)
    paper = extract_masks(q, k, GROUPS, GRID, image, config)
    assert torch.equal(extract_masks(q, k, GROUPS, GRID, image, config, earlier_maps=[same, same]), paper)
    assert torch.equal(extract_masks(q, k, GROUPS, GRID, image, config, earlier_maps=()), paper)


@pytest.mark.parametrize("bad", [torch.ones(2, *GRID), torch.ones(len(GROUPS), GRID[1], GRID[0]), "maps"])
def test_earlier_maps_of_another_shape_are_named(bad):
    q, k = qk(6)
    with pytest.raises(ValueError, match=r"earlier_maps\[1\]: expected a tensor of shape"):
        extract_masks(q, k, GROUPS, GRID, None, NO_VOTE, earlier_maps=[torch.ones(len(GROUPS), *GRID), bad])


def test_cross_attention_masks_follow_the_mean_of_the_steps_maps():
    g = torch.Generator().manual_seed(7)
    grid, groups = (4, 5), [[1, 2], [6]]

    def capture():
        return (torch.randn(2, 20, 8, generator=g) * 2, torch.randn(2, 77, 8, generator=g) * 2,
                torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 8, generator=g))  # fmt: skip

    first, second = capture(), capture()
    earlier = cross_subject_maps(*first, groups, grid, NO_VOTE)
    torch.testing.assert_close(earlier.flatten(1), cross_score_maps(*first, groups, grid, NO_VOTE))
    got = extract_cross_masks(*second, groups, grid, None, NO_VOTE, earlier_maps=[earlier])
    mean = (earlier.flatten(1) + cross_score_maps(*second, groups, grid, NO_VOTE)) / 2
    owner = mean.argmax(dim=0)
    assert torch.equal(got, torch.stack([(owner == l).float() for l in range(2)]).view(2, *grid))


# The job: which calls capture, and what the masks are made of


def flux_job(average_steps: bool, capture_step: int = 2, average_blocks: bool = False) -> FreeFuseJob:
    plan = JobPlan(
        word_positions=(tuple(tuple(g) for g in GROUPS),),
        text_length=N_TEXT,
        capture_step=capture_step,
        mask_config=NO_VOTE,
        average_steps=average_steps,
        average_blocks=average_blocks,
    )
    return FreeFuseJob(plan, decode=None)


def run_step(job: FreeFuseJob, sigma: float, q: torch.Tensor, k: torch.Tensor) -> bool:
    """One CFG model call (uncond, cond) of one image on a 10x12 token grid; True if the job captured in it."""
    job.begin_call(torch.zeros(2, 16, 20, 24), torch.full((2,), sigma), [1, 0], N_TEXT)
    captured = job.capturing
    if captured:
        job.store_attention(torch.stack([torch.zeros_like(q), q]), torch.stack([torch.zeros_like(k), k]))
    job.end_call(torch.zeros(2, 16, 20, 24))
    return captured


def test_the_job_averages_every_step_up_to_the_capture_step_and_then_stops_capturing():
    steps = [qk(seed) for seed in (10, 11, 12, 13)]
    job = flux_job(average_steps=True)
    captured = [run_step(job, sigma, q, k) for sigma, (q, k) in zip((1.0, 0.8, 0.6, 0.4), steps, strict=True)]
    assert captured == [True, True, True, False] and job.capture_count == 3 and job.failure is None
    naive_mean = torch.stack([naive_score_maps(q, k, NO_VOTE) for q, k in steps[:3]]).mean(dim=0)
    assert torch.equal(job.masks[0], owners_as_masks(naive_mean))


def test_without_it_the_job_captures_the_capture_step_alone():
    steps = [qk(seed) for seed in (10, 11, 12, 13)]
    job = flux_job(average_steps=False)
    captured = [run_step(job, sigma, q, k) for sigma, (q, k) in zip((1.0, 0.8, 0.6, 0.4), steps, strict=True)]
    assert captured == [False, False, True, False] and job.capture_count == 1
    assert torch.equal(job.masks[0], owners_as_masks(naive_score_maps(*steps[2], NO_VOTE)))


def test_an_sdxl_job_averages_its_cross_attention_captures():
    """The cross-attention path (SDXL): two CFG calls before the capture step and the capture step's own."""
    from lib_freefuse.families import SDXL_FAMILY

    g = torch.Generator().manual_seed(20)
    groups, grid = [[1, 2], [5]], (3, 4)
    plan = JobPlan(word_positions=((tuple(groups[0]), tuple(groups[1])),), text_length=77, capture_step=2,
                   mask_config=NO_VOTE, average_steps=True)  # fmt: skip
    job = FreeFuseJob(plan, decode=None, family=SDXL_FAMILY)
    captures = []
    for sigma in (5.0, 4.0, 3.0):
        job.begin_call(torch.zeros(2, 4, 12, 16), torch.tensor([sigma, sigma]), [1, 0], 77)
        assert job.capturing
        capture = [torch.randn(2, 2, n, 8, generator=g) * 2 for n in (12, 77, 12, 12)]
        job.store_cross_attention(*capture)
        job.end_call(torch.zeros(2, 4, 12, 16))
        captures.append([t[1] for t in capture])  # the conditional rows
    assert job.failure is None and job.capture_count == 3
    maps = [cross_score_maps(*c, groups, grid, NO_VOTE) for c in captures]
    owner = torch.stack(maps).mean(dim=0).argmax(dim=0)
    expected = torch.stack([(owner == l).float() for l in range(2)]).view(1, 2, *grid)
    assert torch.equal(job.masks, torch.nn.functional.interpolate(expected, size=(12, 16), mode="nearest-exact"))
