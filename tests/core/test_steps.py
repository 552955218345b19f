"""Step counting from sigmas: first-order, second-order and img2img runs."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse.core.steps import StepCounter

pytestmark = pytest.mark.core

SCHEDULE = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_euler_calls_one_per_step():
    counter = StepCounter(SCHEDULE)
    assert [counter.step_of(s) for s in [1.0, 0.8, 0.6, 0.4, 0.2]] == [0, 1, 2, 3, 4]


def test_cfg_calls_at_one_sigma_share_the_step():
    counter = StepCounter(SCHEDULE)
    assert [counter.step_of(s) for s in [1.0, 1.0, 0.8, 0.8]] == [0, 0, 1, 1]


def test_midpoint_evaluations_stay_in_their_step():
    counter = StepCounter(SCHEDULE)  # DPM2-style: sigma_i, then a midpoint between sigma_i and sigma_i+1
    assert [counter.step_of(s) for s in [1.0, 0.9, 0.8, 0.7, 0.6]] == [0, 0, 1, 1, 2]


def test_heun_second_evaluation_at_the_next_sigma():
    counter = StepCounter(SCHEDULE)
    assert [counter.step_of(s) for s in [1.0, 0.8, 0.8, 0.6, 0.6]] == [0, 1, 1, 2, 2]


def test_img2img_counts_within_the_steps_run():
    counter = StepCounter(SCHEDULE)  # denoising strength 0.6: the run starts at sigma 0.6
    assert [counter.step_of(s) for s in [0.6, 0.4, 0.2]] == [0, 1, 2]


def test_without_schedule_each_smaller_sigma_is_a_step():
    counter = StepCounter()
    assert [counter.step_of(s) for s in [0.9, 0.9, 0.7, 0.7, 0.5]] == [0, 0, 1, 1, 2]
