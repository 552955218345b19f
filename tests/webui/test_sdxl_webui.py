"""SDXL through the real webui (tier "webui"): a txt2img job on the tiny SDXL checkpoint with two bound LoRAs, CFG
with a negative prompt and a BREAK, gives masks, their overlay and the infotext; the next job without FreeFuse is
the job it would have been."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui

PROMPT = "a (cat:1.2) on the left BREAK a dog on the right <lora:tiny_sdxl_a:1> <lora:tiny_sdxl_b:0.8>"


def sdxl_job(webui, freefuse: dict | None = None, **overrides):
    scripts = {} if freefuse is None else {"alwayson_scripts": {"FreeFuse": {"args": [freefuse]}}}
    return webui.txt2img(
        PROMPT,
        negative_prompt="blurry",
        cfg_scale=5.0,
        steps=4,
        # classic Forge loads an SDXL live-preview model from the network unless live previews are off
        override_settings={
            "sd_model_checkpoint": webui.manifest["sdxl"]["checkpoint_name"],
            "live_previews_enable": False,
        },
        **scripts,
        **overrides,
    )


def test_sdxl_txt2img_with_two_bound_loras_gives_masks_overlay_and_infotext(webui):
    before = sdxl_job(webui)
    subjects = [{"lora": "tiny_sdxl_a", "words": "cat"}, {"lora": "tiny_sdxl_b", "words": "dog"}]
    result = sdxl_job(webui, {"enabled": True, "subjects": subjects, "show_masks": True})
    info = result.infotext
    assert len(result.images) == 2, webui.log_tail()  # the image and its mask overlay
    assert 'FreeFuse: "tiny_sdxl_a: cat; tiny_sdxl_b: dog"' in info, info
    assert "FreeFuse coverage:" in info and "FreeFuse warnings" not in info, info
    assert "FreeFuse: 2 subjects" in webui.log() and "in middle_block.1.transformer_blocks.1" in webui.log()
    assert result.images[0].pixels != before.images[0].pixels  # the masks changed the image
    after = sdxl_job(webui)
    assert after.images[0].pixels == before.images[0].pixels  # nothing left on the model


def test_sdxl_names_what_it_cannot_do_and_still_makes_the_masks(webui):
    """On SDXL the joint-attention options a user chose are named in the warnings and left out (attention bias 2);
    the default bias (5) and the blocks' average (on by default, for the joint-attention families) are left out
    silently, as the first test shows."""
    subjects = [{"lora": "tiny_sdxl_a", "words": "cat"}, {"lora": "tiny_sdxl_b", "words": "dog"}]
    result = sdxl_job(webui, {"enabled": True, "subjects": subjects, "attention_bias": 2, "average_blocks": True})
    info = result.infotext
    assert "FreeFuse coverage:" in info, info
    assert "keeping words to their regions is not available for SDXL models" in info, info
    assert "averaging the blocks" not in info, info
