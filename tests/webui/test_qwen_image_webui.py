"""Qwen-Image through the real webui (tier "webui", Forge Neo only): a txt2img job on the tiny Qwen-Image checkpoint
(Neo's own loader and QwenImage engine: Qwen2.5-VL chat template, Wan VAE, 5-D latent) with two bound LoRAs gives
masks, their overlay and the infotext; the next job without FreeFuse is the job it would have been."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.webui

PROMPT = "a (cat:1.2) on the left and a dog on the right <lora:tiny_qwen_image_a:1> <lora:tiny_qwen_image_b:0.8>"


def qwen_image_job(webui, freefuse: dict | None = None, **overrides):
    scripts = {} if freefuse is None else {"alwayson_scripts": {"FreeFuse": {"args": [freefuse]}}}
    return webui.txt2img(
        PROMPT,
        width=128,
        height=128,
        steps=5,
        cfg_scale=1.0,
        override_settings={"sd_model_checkpoint": webui.manifest["qwen_image"]["checkpoint_name"]},
        **scripts,
        **overrides,
    )


def test_qwen_image_txt2img_with_two_bound_loras_gives_masks_overlay_and_infotext(webui):
    if not webui.neo:
        pytest.skip("classic Forge has no Qwen-Image (Forge Neo's backend/nn/qwen.py)")
    before = qwen_image_job(webui)
    assert before.images[0].mean_and_spread()[1] > 0, "a constant image: the tiny model's output saturated or is NaN"
    log = webui.log()
    assert "[freefuse-test] tiny Qwen-Image" in log, "webui_hook/tiny_qwen_image_hook.py did not fit the guess"
    for name in webui.manifest["qwen_image"]["loras"]:  # kohya names and Neo's Qwen-Image-only transformer.* names
        loaded = rf"\[LORA\] Loaded \S*{name}\.safetensors for \S+-UNet with \d+ keys .*\(skipped 0 keys\)"
        assert re.search(loaded, log), log[-3000:]
    subjects = [{"lora": "tiny_qwen_image_a", "words": "cat"}, {"lora": "tiny_qwen_image_b", "words": "dog"}]
    result = qwen_image_job(webui, {"enabled": True, "subjects": subjects, "show_masks": True})
    info = result.infotext
    assert len(result.images) == 2, webui.log_tail()  # the image and its mask overlay
    assert 'FreeFuse: "tiny_qwen_image_a: cat; tiny_qwen_image_b: dog"' in info, info
    assert "FreeFuse coverage:" in info and "FreeFuse warnings" not in info, info
    log = webui.log()
    started = "FreeFuse: 2 subjects (tiny_qwen_image_a, tiny_qwen_image_b), capture at step 1 of 5"
    started += " in transformer_blocks.2"  # Qwen-Image's default for 3 blocks: round(0.6 x 3)
    assert started in log, log[-3000:]
    assert result.images[0].pixels != before.images[0].pixels  # the masks changed the image
    after = qwen_image_job(webui)
    assert after.images[0].pixels == before.images[0].pixels  # nothing left on the model
