"""Z-Image through the real webui (tier "webui", Forge Neo only): a txt2img job on the tiny Z-Image checkpoint (Neo's
own ZImage engine: Qwen3 text engine, Turbo-like 8 steps, CFG 1) with two bound LoRAs (one on a joint layer's adaLN,
made per token) gives masks, their overlay and the infotext; the next job without FreeFuse is the job it would have
been."""

from __future__ import annotations

import pytest
from bound_loras import check_two_bound_loras

pytestmark = pytest.mark.webui

PROMPT = "a (cat:1.2) on the left and a dog on the right <lora:tiny_zimage_a:1> <lora:tiny_zimage_b:0.8>"


def test_zimage_txt2img_with_two_bound_loras_gives_masks_overlay_and_infotext(webui):
    if not webui.neo:
        pytest.skip("classic Forge has no Z-Image (Forge Neo's backend/nn/lumina.py)")
    # Z-Image's default capture layer is layers.18, the last of the tiny model's 3; step 2 of Turbo's 8
    check_two_bound_loras(webui, "zimage", PROMPT, steps=8, capture="step 2 of 8 in layers.2")
