"""Z-Image through the real webui (tier "webui", Forge Neo only): a txt2img job on the tiny Z-Image checkpoint (Neo's
own ZImage engine: Qwen3 text engine, Turbo-like few steps, CFG 1) with two bound LoRAs gives masks, their overlay
and the infotext; the next job without FreeFuse is the job it would have been."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui

PROMPT = "a (cat:1.2) on the left and a dog on the right <lora:tiny_zimage_a:1> <lora:tiny_zimage_b:0.8>"


def zimage_job(webui, freefuse: dict | None = None, **overrides):
    scripts = {} if freefuse is None else {"alwayson_scripts": {"FreeFuse": {"args": [freefuse]}}}
    return webui.txt2img(
        PROMPT,
        width=128,
        height=128,
        steps=8,
        cfg_scale=1.0,
        override_settings={"sd_model_checkpoint": webui.manifest["zimage"]["checkpoint_name"]},
        **scripts,
        **overrides,
    )


def test_zimage_txt2img_with_two_bound_loras_gives_masks_overlay_and_infotext(webui):
    if not webui.neo:
        pytest.skip("classic Forge has no Z-Image (Forge Neo's backend/nn/lumina.py)")
    before = zimage_job(webui)
    subjects = [{"lora": "tiny_zimage_a", "words": "cat"}, {"lora": "tiny_zimage_b", "words": "dog"}]
    result = zimage_job(webui, {"enabled": True, "subjects": subjects, "show_masks": True})
    info = result.infotext
    assert len(result.images) == 2, webui.log_tail()  # the image and its mask overlay
    assert 'FreeFuse: "tiny_zimage_a: cat; tiny_zimage_b: dog"' in info, info
    assert "FreeFuse coverage:" in info and "FreeFuse warnings" not in info, info
    log = webui.log()
    assert "FreeFuse: 2 subjects (tiny_zimage_a, tiny_zimage_b), capture at step 2 of 8 in layers.2" in log, log[-3000:]
    assert result.images[0].pixels != before.images[0].pixels  # the masks changed the image
    after = zimage_job(webui)
    assert after.images[0].pixels == before.images[0].pixels  # nothing left on the model
