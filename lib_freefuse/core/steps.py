"""Which denoising step a model call belongs to, from its sigma (no step index reaches the model)."""

from __future__ import annotations

import torch


class StepCounter:
    """0-based step of each model call within one sampling run.

    With the run's sigma schedule known, a call at sigma s belongs to the last step i whose schedule sigma is
    >= s, counted from the step of the first call seen (img2img runs start part-way into the schedule).
    Second-order samplers' extra evaluations (midpoints, the next step's sigma) stay within one step. Without a
    schedule, each new smaller sigma starts a new step: exact for first-order samplers and Heun.
    """

    def __init__(self, schedule: torch.Tensor | None = None):
        self.schedule = None if schedule is None else schedule.detach().double().cpu()
        self._first: int | None = None
        self._last_sigma: float | None = None
        self._distinct = -1

    def use_schedule(self, schedule: torch.Tensor) -> None:
        """Set the run's schedule (before its first call)."""
        self.schedule = schedule.detach().double().cpu()

    def step_of(self, sigma: float) -> int:
        """Step index of a call at `sigma` (calls arrive in sampling order)."""
        if self.schedule is not None:
            index = int((self.schedule >= sigma * (1 - 1e-5)).sum()) - 1
            if self._first is None:
                self._first = index
            return max(0, index - self._first)
        if self._last_sigma is None or sigma < self._last_sigma * (1 - 1e-5):
            self._distinct += 1
            self._last_sigma = sigma
        return self._distinct
