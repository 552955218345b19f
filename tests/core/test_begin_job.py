"""The script's process(): which job objects FreeFuse sets up, and that a job run again starts with a fresh state."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from lib_freefuse.forge.processing import begin_job, run_state

pytestmark = pytest.mark.core


def test_a_job_run_again_starts_afresh_and_a_copy_of_it_is_left_out():
    job = SimpleNamespace()
    assert begin_job(job)
    first = run_state(job)
    first.warn("row 2 (b): no activation words: it acts as an ordinary LoRA")
    during = copy.copy(job)  # ADetailer's copy after its passes shares the job's state
    assert not begin_job(during) and during.freefuse_state is first
    assert job.freefuse_state is first and first.warnings  # the copy changed nothing
    assert begin_job(job)  # Forge's img2img batch: the same object for the next input file
    assert run_state(job) is not first and not run_state(job).warnings
