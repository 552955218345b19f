"""What the webui tests of the Neo families' tiny checkpoints (FLUX.2 Klein, Z-Image) share: a txt2img job on one of
them with its two LoRAs in the prompt, and the check that FreeFuse with those LoRAs bound gives masks, their overlay
and the infotext, and leaves nothing behind (the next job without FreeFuse is the one before it)."""

from __future__ import annotations


def family_job(webui, family: str, prompt: str, steps: int, freefuse: dict | None = None, **overrides):
    """txt2img on the tiny checkpoint of manifest[family] (128 px, CFG 1, as distilled few-step models run)."""
    scripts = {} if freefuse is None else {"alwayson_scripts": {"FreeFuse": {"args": [freefuse]}}}
    return webui.txt2img(
        prompt,
        width=128,
        height=128,
        steps=steps,
        cfg_scale=1.0,
        override_settings={"sd_model_checkpoint": webui.manifest[family]["checkpoint_name"]},
        **scripts,
        **overrides,
    )


def check_two_bound_loras(webui, family: str, prompt: str, steps: int, capture: str) -> None:
    """A plain job, the same job with FreeFuse binding the family's two LoRAs to "cat" and "dog" (show masks), and
    the plain job again. capture: where the log must say the masks are read ("step 1 of 4 in double_blocks.0")."""
    a, b = webui.manifest[family]["loras"]
    before = family_job(webui, family, prompt, steps)
    subjects = [{"lora": a, "words": "cat"}, {"lora": b, "words": "dog"}]
    result = family_job(webui, family, prompt, steps, {"enabled": True, "subjects": subjects, "show_masks": True})
    info = result.infotext
    assert len(result.images) == 2, webui.log_tail()  # the image and its mask overlay
    assert f'FreeFuse: "{a}: cat; {b}: dog"' in info, info
    assert "FreeFuse coverage:" in info and "FreeFuse warnings" not in info, info
    log = webui.log()
    assert f"FreeFuse: 2 subjects ({a}, {b}), capture at {capture}" in log, log[-3000:]
    assert result.images[0].pixels != before.images[0].pixels  # the masks changed the image
    after = family_job(webui, family, prompt, steps)
    assert after.images[0].pixels == before.images[0].pixels  # nothing left on the model
