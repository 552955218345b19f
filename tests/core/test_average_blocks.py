"""`average_blocks` (beyond the paper; issue 17's aggregation over blocks): masks from the mean of the score maps
(Eq. 5-10) of every block up to the capture block in the capture call, voted once (Eq. 11-13). Checked in the job
against the naive pipeline of test_equations.py; the host side (a capture patch on each of those blocks) is checked
in the forge tier (test_toyworld2_in_forge.py)."""

from __future__ import annotations

import pytest
import torch
from test_average_steps import NO_VOTE, owners_as_masks, qk
from test_average_steps import flux_job as average_steps_job
from test_equations import N_TEXT, naive_score_maps

from lib_freefuse.forge.job import FreeFuseJob

pytestmark = pytest.mark.core


def flux_job(average_blocks: bool, average_steps: bool = False, capture_step: int = 1) -> FreeFuseJob:
    return average_steps_job(average_steps, capture_step, average_blocks)


def cfg(t: torch.Tensor) -> torch.Tensor:
    """(H, T, D) -> (2, H, T, D): the uncond rows (zeros) then the cond rows, as one CFG call hands them over."""
    return torch.stack([torch.zeros_like(t), t])


def run_call(job: FreeFuseJob, sigma: float, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """One CFG model call whose blocks hand over their q, k in order, the last one being the capture block."""
    job.begin_call(torch.zeros(2, 16, 20, 24), torch.full((2,), sigma), [1, 0], N_TEXT)
    captured = job.capturing
    if captured:
        for q, k in blocks[:-1]:
            job.store_block_maps(cfg(q), cfg(k))
        job.store_attention(*(cfg(t) for t in blocks[-1]))
    job.end_call(torch.zeros(2, 16, 20, 24))
    return captured


def test_the_masks_follow_the_mean_of_every_blocks_maps_in_the_capture_call():
    blocks = [qk(seed) for seed in (30, 31, 32)]
    job = flux_job(average_blocks=True)
    assert [run_call(job, s, blocks) for s in (1.0, 0.8, 0.6)] == [False, True, False]
    assert job.failure is None and job.capture_count == 1  # the capture block's store counts, the others' do not
    naive_mean = torch.stack([naive_score_maps(q, k, NO_VOTE) for q, k in blocks]).mean(dim=0)
    assert torch.equal(job.masks[0], owners_as_masks(naive_mean))
    assert not torch.equal(job.masks[0], owners_as_masks(naive_score_maps(*blocks[-1], NO_VOTE)))  # it can tell


def test_with_average_steps_every_block_of_every_step_counts_once():
    steps = [[qk(seed + 10 * step) for seed in (40, 41)] for step in range(2)]
    job = flux_job(average_blocks=True, average_steps=True)
    assert [run_call(job, s, blocks) for s, blocks in zip((1.0, 0.8), steps, strict=True)] == [True, True]
    every = [naive_score_maps(q, k, NO_VOTE) for blocks in steps for q, k in blocks]
    assert torch.equal(job.masks[0], owners_as_masks(torch.stack(every).mean(dim=0)))


def test_an_aborted_call_leaves_no_block_maps_behind():
    blocks = [qk(seed) for seed in (50, 51)]
    job = flux_job(average_blocks=True)
    run_call(job, 1.0, blocks)
    job.begin_call(torch.zeros(2, 16, 20, 24), torch.full((2,), 0.8), [1, 0], N_TEXT)
    job.store_block_maps(*(cfg(t) for t in qk(99)))  # then an interrupt
    job.abort_call()
    assert run_call(job, 0.8, blocks)
    naive_mean = torch.stack([naive_score_maps(q, k, NO_VOTE) for q, k in blocks]).mean(dim=0)
    assert torch.equal(job.masks[0], owners_as_masks(naive_mean))


def test_on_by_default_where_the_family_can_and_off_on_a_cross_attention_family():
    from lib_freefuse.args import FreeFuseArgs
    from lib_freefuse.families import FLUX1, QWEN_IMAGE, SDXL_FAMILY, Z_IMAGE
    from lib_freefuse.forge.processing import _average_blocks

    assert FreeFuseArgs().average_blocks is True  # the default since 0.6.0
    assert all(_average_blocks(FreeFuseArgs(), family) for family in (FLUX1, QWEN_IMAGE, Z_IMAGE))
    assert _average_blocks(FreeFuseArgs(), SDXL_FAMILY) is False
    assert not any(_average_blocks(FreeFuseArgs(average_blocks=False), f) for f in (FLUX1, QWEN_IMAGE, Z_IMAGE))
