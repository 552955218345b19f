"""The capture-step rule of ALGORITHM.md: step 6 of 28, the same share of any schedule."""

from __future__ import annotations

import math

import pytest

from lib_freefuse.core import default_capture_step

pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    ("steps", "capture"),
    [(28, 6), (20, 4), (30, 6), (50, 11), (14, 3), (7, 2), (4, 1), (2, 1), (1, 1), (56, 12), (8, 2), (21, 5)],
)
def test_known_values(steps, capture):
    assert default_capture_step(steps) == capture


@pytest.mark.parametrize("steps", range(1, 201))
def test_rule_for_any_step_count(steps):
    capture = default_capture_step(steps)
    assert capture == max(1, math.floor(steps * 6 / 28 + 0.5))
    assert 1 <= capture <= steps
    if steps >= 2:
        assert capture < steps  # at least one step runs with the masks


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "28", None])
def test_bad_step_count_names_steps(steps):
    with pytest.raises(ValueError, match="^steps"):
        default_capture_step(steps)
