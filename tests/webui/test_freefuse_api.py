"""FreeFuse through Forge's API in a real webui: two bound LoRAs, masks, infotext; hires fix, batch 2, CFG > 1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import PAPER

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.infotext import coverage_from_text

PROMPT = "a photo of a cat and a dog in a garden"


def freefuse(webui, **settings) -> dict:
    """alwayson_scripts entry: FreeFuse's args as ONE dict, binding the two tiny LoRAs to "cat" and "dog"."""
    a, b = webui.lora_names[:2]
    args = {"enabled": True, "subjects": [{"lora": a, "words": "cat"}, {"lora": b, "words": "dog"}], "capture_block": 1}
    args.update(settings)
    return {"FreeFuse": {"args": [args]}}


def tagged(webui, prompt: str = PROMPT) -> str:
    a, b = webui.lora_names[:2]
    return f"{prompt} <lora:{a}:0.8> <lora:{b}:0.8>"


def infotext_coverage(infotext: str) -> dict[str, list[float]]:
    """The "FreeFuse coverage" entry of an infotext: {LoRA: [percent per image]} (Forge quotes the value)."""
    match = re.search(r'FreeFuse coverage: ("(?:[^"\\]|\\.)*"|[^,]*)', infotext)
    assert match, f"no FreeFuse coverage in {infotext}"
    value = match.group(1)
    return coverage_from_text(json.loads(value) if value.startswith('"') else value)


def test_script_is_listed_with_its_arguments(webui):
    info = webui.get("/sdapi/v1/script-info")
    (entry,) = [s for s in info if s["name"] == "freefuse" and not s["is_img2img"]]
    assert entry["is_alwayson"] and len(entry["args"]) > 20


def test_two_bound_loras_give_an_image_masks_and_infotext(webui):
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, show_masks=True))
    assert len(result.images) == 2  # the image and its mask overlay
    image, overlay = result.images
    assert (image.width, image.height) == (overlay.width, overlay.height) == (64, 64)
    assert image.pixels != overlay.pixels
    a, b = webui.lora_names[:2]
    assert f'FreeFuse: "{a}: cat; {b}: dog"' in result.infotext, result.infotext  # the bindings, readable
    coverage = infotext_coverage(result.infotext)
    assert f'FreeFuse coverage: "{a}: ' in result.infotext, result.infotext  # readable, not JSON
    assert set(coverage) == {a, b} and sum(coverage[a] + coverage[b]) == pytest.approx(100, abs=0.5)
    assert "FreeFuse version" in result.infotext
    assert "FreeFuse: masks made at step 1" in webui.log()


def test_freefuse_changes_the_image_and_leaves_no_trace(webui):
    """The same job without FreeFuse before and after a FreeFuse job: bit-identical (CPU)."""
    before = webui.txt2img(tagged(webui), steps=6)
    with_freefuse = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui))
    after = webui.txt2img(tagged(webui), steps=6)
    assert before.images[0].pixels == after.images[0].pixels
    assert with_freefuse.images[0].pixels != before.images[0].pixels
    assert "FreeFuse" not in after.infotext


@pytest.mark.parametrize(
    "overrides",
    [
        {"batch_size": 2},
        {"n_iter": 2},
        {"cfg_scale": 3.0},
        {
            "enable_hr": True,
            "hr_scale": 1.5,
            "hr_upscaler": "host's",
            "hr_second_pass_steps": 3,
            "denoising_strength": 0.6,
            "hr_additional_modules": ["Use same choices"],  # Forge's API fails on hires fix without it
        },
    ],
    ids=["batch-2", "batch-count-2", "cfg-3", "hires-fix"],
)
def test_variants_give_images_with_masks(webui, overrides):
    if "hr_upscaler" in overrides:
        overrides = {**overrides, "hr_upscaler": webui.hires_upscaler}
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, show_masks=True), **overrides)
    images = overrides.get("batch_size", 1) * overrides.get("n_iter", 1)
    assert len(result.images) == 2 * images  # each image and its overlay
    overlays = result.images[images:]
    assert all(o.pixels != i.pixels for o, i in zip(overlays, result.images[:images], strict=True))
    size = webui.image_size(96, 96) if overrides.get("enable_hr") else (64, 64)
    assert [(im.width, im.height) for im in result.images] == [size] * len(result.images)
    assert "FreeFuse coverage" in result.infotext
    assert "FreeFuse warnings" not in result.infotext, result.infotext


def test_a_batch_with_the_preview_slic_image_gets_masks_for_each_image(webui):
    """The cheap latent preview (slic_image "preview") decodes only a batch's first latent on Neo: FreeFuse asks it
    once per image, so both images of a batch of two get their masks."""
    settings = freefuse(webui, show_masks=True, slic_image="preview")
    result = webui.txt2img(tagged(webui), steps=6, batch_size=2, alwayson_scripts=settings)
    assert len(result.images) == 4  # each image and its overlay
    assert "FreeFuse coverage" in result.infotext
    assert "FreeFuse warnings" not in result.infotext, result.infotext


def test_invalid_arguments_are_rejected_before_sampling(webui):
    payload = webui.txt2img_payload(tagged(webui), alwayson_scripts=freefuse(webui, capture_stepp=3))
    with pytest.raises(AssertionError, match="capture_stepp"):
        webui.post("/sdapi/v1/txt2img", payload)


def test_img2img_counts_the_capture_step_within_the_steps_run(webui):
    """Denoising 0.5 of 6 steps runs int(0.5 * 6) + 1 = 4 steps: the automatic capture step is 1 of those 4."""
    init = webui.post("/sdapi/v1/txt2img", webui.txt2img_payload(PROMPT))["images"][0]
    payload = webui.txt2img_payload(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, show_masks=True))
    payload |= {"init_images": [init], "denoising_strength": 0.5}
    response = webui.post("/sdapi/v1/img2img", payload)
    assert len(response["images"]) == 2  # the image and its overlay
    assert "FreeFuse coverage" in json.loads(response["info"])["infotexts"][0]
    assert "capture at step 1 of 4 in double_blocks.1" in webui.log()


def test_a_bound_lora_without_a_tag_is_loaded_at_its_row_weight(webui):
    a, b = webui.lora_names[:2]
    prompt = f"{PROMPT} <lora:{a}:0.8>"  # no tag for b
    settings = {"subjects": [{"lora": a, "words": "cat"}, {"lora": b, "words": "dog", "weight": 0.7}]}
    result = webui.txt2img(prompt, steps=6, alwayson_scripts=freefuse(webui, **settings))
    assert "FreeFuse coverage" in result.infotext
    assert f"FreeFuse: {b} has no tag in the prompt: loaded at weight 0.7" in webui.log()


def test_hires_fix_can_extract_the_masks_again_in_pass_two(webui):
    hires = {
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": webui.hires_upscaler,
        "hr_second_pass_steps": 6,
        "denoising_strength": 0.6,
        "hr_additional_modules": ["Use same choices"],
    }
    made = webui.log().count("FreeFuse: masks made")
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, hires_masks="extract"), **hires)
    assert "FreeFuse coverage" in result.infotext
    assert webui.log().count("FreeFuse: masks made") == made + 2  # pass 1, then pass 2 on its own grid


def test_the_infotext_restores_freefuse_and_the_image(webui):
    """The infotext Forge wrote, parsed as Forge parses pasted parameters, gives back the same FreeFuse arguments,
    and running with them gives the same image. (Forge's own API `infotext` field fails at this Forge commit for
    every infotext, FreeFuse or not: "isinstance() argument 2 cannot be a parameterized generic".)"""
    from lib_freefuse.infotext import args_from_params

    settings = {"capture_step": 2, "modulation": "global", "sink_filter": False, "n_segments": 40}
    first = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, **settings))
    assert "FreeFuse capture step: 2" in first.infotext and "FreeFuse modulation: global" in first.infotext
    restored = args_from_params(parse_generation_parameters(first.infotext))
    sent = freefuse(webui, **settings)["FreeFuse"]["args"][0]
    assert restored.to_dict() == FreeFuseArgs.from_dict(sent).to_dict()
    again = webui.txt2img(tagged(webui), steps=6, alwayson_scripts={"FreeFuse": {"args": [restored.to_dict()]}})
    assert again.infotext == first.infotext
    assert again.images[0].pixels == first.images[0].pixels


def parse_generation_parameters(infotext: str) -> dict[str, str]:
    """The key: value part of an infotext, as modules/infotext_utils.parse_generation_parameters reads it."""
    last_line = infotext.strip().splitlines()[-1]
    pattern = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    return {k.strip(): json.loads(v) if v.startswith('"') else v for k, v in pattern.findall(last_line)}


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        (
            {"subjects": [{"lora": "no_such_lora", "words": "cat"}, {"lora": "B", "words": "dog"}]},
            "LoRA no_such_lora not found",
        ),
        (
            {"subjects": [{"lora": "A", "words": "unicorn"}, {"lora": "B", "words": "dog"}]},
            "(unicorn) are not in the prompt",
        ),
        (
            {"subjects": [{"lora": "A", "words": "tiny_lora_a"}, {"lora": "B", "words": "dog"}]},
            "(tiny_lora_a) are not in the prompt",
        ),
        ({"capture_step": 30}, "capture step 30 is beyond the 6 steps run: using 5"),
    ],
    ids=["unknown-lora", "absent-words", "words-only-in-a-tag", "capture-step-beyond"],
)
def test_problems_are_named_and_the_image_is_made(webui, settings, warning):
    a, b = webui.lora_names[:2]
    if "subjects" in settings:
        settings = {
            "subjects": [{**s, "lora": {"A": a, "B": b}.get(s["lora"], s["lora"])} for s in settings["subjects"]]
        }
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, **settings))
    assert len(result.images) == 1
    assert warning in result.infotext, result.infotext
    assert f"FreeFuse: {warning}" in webui.log() or warning in webui.log()


# The extension's defaults of each version, over the paper's settings (each adds to the one before).
DEFAULTS_0_5 = {"text_loras": "own_words", "attention_bias": 5.0}
DEFAULTS_0_6 = {**DEFAULTS_0_5, "average_blocks": True, "contrastive": "leading"}
DEFAULTS_0_7 = {**DEFAULTS_0_6, "background": "words", "fill_holes": 0.01}


@pytest.mark.parametrize(
    "settings",
    [
        {"cross_attention": "image_queries"},
        {"text_loras": "own_words"},
        {"text_loras": "none"},
        {"background": "tokens"},
        {"attention_bias": 5.0},
        DEFAULTS_0_5,
        DEFAULTS_0_6,
        DEFAULTS_0_7,
        {**DEFAULTS_0_7, "surroundings": "nearest_lead"},
    ],
    ids=[
        "image-queries",
        "text-own-words",
        "text-none",
        "background-end-of-text",
        "attention-bias",
        "defaults-0.5",
        "defaults-0.6",
        "defaults-0.7",
        "defaults",
    ],
)
def test_options_beyond_the_paper_run_change_the_image_and_are_recorded(webui, settings):
    """Each option beyond the paper, over the paper's settings, is accepted by the API, makes masks, changes the image
    against the paper's settings on the same seed, and is in the infotext: written where it is not the default,
    left out where it is (as every default), and the paper's values written out where they are no longer defaults."""
    paper = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, **PAPER))
    run = {**PAPER, **settings}
    result = webui.txt2img(tagged(webui), steps=6, alwayson_scripts=freefuse(webui, **run))
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext
    defaults = FreeFuseArgs().to_dict()  # flat: the mask settings beside the others
    for key, value in run.items():
        written = f"FreeFuse {key.replace('_', ' ')}: {value}" in result.infotext
        assert written == (value != defaults[key]), (key, value, result.infotext)
    assert result.images[0].pixels != paper.images[0].pixels


def test_average_steps_runs_changes_the_masks_and_is_recorded(webui):
    """average_steps through the API: with the capture at step 3 of 6 the masks come from steps 1-3, not 3 alone, so
    the masks (their coverage) and the image differ from the same job without it; the infotext records it. Token-wise
    masks (no vote) on a 128 px image: the tiny model's 64 px masks have too few tokens to move."""
    job = dict(capture_step=3, superpixel_vote=False)
    paper = webui.txt2img(tagged(webui), steps=6, width=128, height=128, alwayson_scripts=freefuse(webui, **job))
    result = webui.txt2img(
        tagged(webui), steps=6, width=128, height=128, alwayson_scripts=freefuse(webui, **job, average_steps=True)
    )
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext
    assert "FreeFuse average steps: True" in result.infotext and "FreeFuse average steps" not in paper.infotext
    coverage = re.compile(r'FreeFuse coverage: "[^"]*"')
    assert coverage.search(result.infotext).group() != coverage.search(paper.infotext).group()
    assert result.images[0].pixels != paper.images[0].pixels
    assert webui.log().count("FreeFuse: masks made at step 3") >= 2


def test_average_blocks_runs_changes_the_masks_and_is_recorded(webui):
    """average_blocks through the API: with the capture at the tiny model's block 1 the masks come from the mean of
    blocks 0 and 1, so the masks (their coverage) and the image differ from the same job without it (token-wise
    masks on a 128 px image); the infotext records it where it is not the default (0.6.0: on)."""
    # the blocks alone: with the nearest clear subject this tiny model splits the same way either way
    job = dict(capture_step=3, superpixel_vote=False, surroundings="vote")
    size = dict(steps=6, width=128, height=128)
    alone = webui.txt2img(tagged(webui), **size, alwayson_scripts=freefuse(webui, **job, average_blocks=False))
    result = webui.txt2img(tagged(webui), **size, alwayson_scripts=freefuse(webui, **job))
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext
    assert "FreeFuse average blocks: False" in alone.infotext and "FreeFuse average blocks" not in result.infotext
    coverage = re.compile(r'FreeFuse coverage: "[^"]*"')
    assert coverage.search(result.infotext).group() != coverage.search(alone.infotext).group()
    assert result.images[0].pixels != alone.images[0].pixels


@pytest.mark.parametrize("background", ["words", "tokens"])
def test_background_words_free_the_background_and_are_recorded(webui, background):
    """Background words through the API, by default ("words") and with "tokens": "garden" is the background class
    (token-wise masks on a 128 px image), so the two subjects' masks no longer cover the whole image, unlike the same
    job without background words; the infotext records the words (and the setting where it is not the default). Words
    the prompt lacks are named in the warnings with what the job did instead, and the image is still made."""
    job = dict(capture_step=3, superpixel_vote=False, background=background)
    size = dict(steps=6, width=128, height=128)
    without = webui.txt2img(tagged(webui), **size, alwayson_scripts=freefuse(webui, **job))
    result = webui.txt2img(tagged(webui), **size, alwayson_scripts=freefuse(webui, **job, background_words="garden"))
    assert "FreeFuse warnings" not in result.infotext, result.infotext
    assert "FreeFuse background words: garden" in result.infotext
    assert ("FreeFuse background: tokens" in result.infotext) == (background == "tokens"), result.infotext
    assert "FreeFuse background: words" not in result.infotext
    if background == "words":  # no words, no background: every place to some subject
        assert sum(p for percents in infotext_coverage(without.infotext).values() for p in percents) >= 99.9
    assert sum(p for percents in infotext_coverage(result.infotext).values() for p in percents) < 99.9
    missing = webui.txt2img(tagged(webui), **size, alwayson_scripts=freefuse(webui, **job, background_words="forest"))
    assert len(missing.images) == 1 and "FreeFuse coverage" in missing.infotext
    instead = {"words": "every place goes to some subject", "tokens": "places where no subject scores high stay free"}
    assert f"the background words (forest) are not in the prompt: {instead[background]}" in missing.infotext


def _rgb(image) -> bytes:
    """The RGB bytes of a decoded PNG (classic Forge can hide the parameters in a saved file's alpha channel)."""
    if image.channels == 3:
        return image.pixels
    return bytes(b for i, b in enumerate(image.pixels) if i % image.channels < 3)


def _saved(webui, pattern: str) -> set[Path]:
    return {path for path in webui.data_dir.rglob(pattern) if "extensions" not in path.parts}


def test_the_setting_saves_each_mask_overlay_beside_its_image(webui):
    """Settings > FreeFuse > "Save a mask overlay beside each image": a job that saves its images saves each
    overlay too, with the host's file name and -freefuse-masks (also with Show masks off); a job that saves no
    images saves no overlay."""
    before_overlays, before_images = _saved(webui, "*-freefuse-masks.png"), _saved(webui, "*.png")
    webui.post("/sdapi/v1/options", {"freefuse_save_overlays": True})
    try:
        webui.txt2img(tagged(webui), steps=6, seed=91, alwayson_scripts=freefuse(webui))  # saves nothing
        assert _saved(webui, "*-freefuse-masks.png") == before_overlays
        result = webui.txt2img(
            tagged(webui), steps=6, seed=91, batch_size=2, save_images=True, alwayson_scripts=freefuse(webui)
        )
    finally:
        webui.post("/sdapi/v1/options", {"freefuse_save_overlays": False})
    assert len(result.images) == 3  # the batch's grid and two images; Show masks off: no overlay in the output
    overlays = sorted(_saved(webui, "*-freefuse-masks.png") - before_overlays)
    assert len(overlays) == 2 and overlays[0].parent == overlays[1].parent, overlays
    images = sorted(path for path in _saved(webui, "*.png") - before_images - set(overlays))
    images = [path for path in images if path.parent == overlays[0].parent]  # beside them (the grid goes elsewhere)
    assert len(images) == 2, images
    shown = webui.txt2img(
        tagged(webui), steps=6, seed=91, batch_size=2, alwayson_scripts=freefuse(webui, show_masks=True)
    )
    decode = type(shown.images[0]).decode  # tests/webui/conftest.py PngImage
    saved = [decode(path.read_bytes()) for path in overlays]
    assert [path.name.split("-")[1] for path in overlays] == [path.stem.split("-")[1] for path in images]  # seeds
    assert len(shown.images) == 4  # two images, their overlays (no grid: the job saves nothing)
    assert [_rgb(image) for image in saved] == [_rgb(image) for image in shown.images[2:]]
    assert all("FreeFuse coverage" in image.text.get("parameters", "") for image in saved)
