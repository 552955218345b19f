"""Chroma through the real webui (tier "webui", Forge Neo only): a txt2img job on the tiny Chroma checkpoint (Neo's
own Chroma engine: T5 without padding, CFG 3 with a negative prompt) with two bound LoRAs gives masks, their overlay
and the infotext; the next job without FreeFuse is the job it would have been."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui

PROMPT = "a (cat:1.2) on the left and a dog on the right <lora:tiny_chroma_a:1> <lora:tiny_chroma_b:0.8>"


def chroma_job(webui, freefuse: dict | None = None, **overrides):
    scripts = {} if freefuse is None else {"alwayson_scripts": {"FreeFuse": {"args": [freefuse]}}}
    return webui.txt2img(
        PROMPT,
        negative_prompt="blurry",
        width=128,
        height=128,
        steps=4,
        cfg_scale=3.0,
        override_settings={"sd_model_checkpoint": webui.manifest["chroma"]["checkpoint_name"]},
        **scripts,
        **overrides,
    )


def test_chroma_txt2img_with_two_bound_loras_gives_masks_overlay_and_infotext(webui):
    if not webui.neo:
        pytest.skip("classic Forge has no Chroma (Forge Neo's backend/nn/chroma.py)")
    before = chroma_job(webui)
    subjects = [{"lora": "tiny_chroma_a", "words": "cat"}, {"lora": "tiny_chroma_b", "words": "dog"}]
    result = chroma_job(webui, {"enabled": True, "subjects": subjects, "show_masks": True})
    info = result.infotext
    assert len(result.images) == 2, webui.log_tail()  # the image and its mask overlay
    assert "Model: tiny_chroma" in info, info
    assert 'FreeFuse: "tiny_chroma_a: cat; tiny_chroma_b: dog"' in info, info
    assert "FreeFuse coverage:" in info and "FreeFuse warnings" not in info, info
    log = webui.log()
    assert "[freefuse-test] tiny Chroma" in log, "webui_hook/tiny_chroma_hook.py did not guess the tiny Chroma"
    assert "FreeFuse: 2 subjects (tiny_chroma_a, tiny_chroma_b), capture at step" in log, log[-3000:]
    assert result.images[0].pixels != before.images[0].pixels  # the masks changed the image
    after = chroma_job(webui)
    assert after.images[0].pixels == before.images[0].pixels  # nothing left on the model
