"""When masks are captured: the paper's step 6 of 28, kept as the same share of any schedule."""

from __future__ import annotations

import math

PAPER_CAPTURE_STEP = 6
PAPER_STEPS = 28


def default_capture_step(steps: int) -> int:
    """1-based capture step: round(steps * 6 / 28), halves rounded up, at least 1 (28 -> 6, 20 -> 4).

    Masks exist from the step after it on; with `steps` >= 2 at least one step is masked.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    return max(1, math.floor(steps * PAPER_CAPTURE_STEP / PAPER_STEPS + 0.5))
