"""FLUX.2 Klein through the real webui (tier "webui", Forge Neo only): a txt2img job on the tiny Klein checkpoint
(Neo's own Flux2 engine: Klein text engine, 4 steps, CFG 1) with two bound LoRAs gives masks, their overlay and the
infotext; the next job without FreeFuse is the job it would have been."""

from __future__ import annotations

import pytest
from bound_loras import check_two_bound_loras

pytestmark = pytest.mark.webui

PROMPT = "a (cat:1.2) on the left and a dog on the right <lora:tiny_klein_a:1> <lora:tiny_klein_b:0.8>"


def test_klein_txt2img_with_two_bound_loras_gives_masks_overlay_and_infotext(webui):
    if not webui.neo:
        pytest.skip("classic Forge has no FLUX.2 (Forge Neo's backend/nn/flux.py global_modulation)")
    # Klein's default capture block for 2 double blocks is double_blocks.0 (FLUX.1's would be 1); step 1 of 4
    check_two_bound_loras(webui, "klein", PROMPT, steps=4, capture="step 1 of 4 in double_blocks.0")
