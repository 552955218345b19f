"""The webui tier's own ground: Forge's real webui, on CPU, generates with the tiny FLUX and a LoRA over HTTP."""

from __future__ import annotations

import re

import pytest
from forge_locator import REPO_ROOT

PROMPT = "a photo of a cat and a dog in a garden"


@pytest.fixture(scope="module")
def lora_job(webui):
    """One txt2img with the first tiny LoRA at 0.8: (LoRA name, prompt, result)."""
    lora = webui.lora_names[0]
    prompt = f"{PROMPT} <lora:{lora}:0.8>"
    return lora, prompt, webui.txt2img(prompt)


def test_txt2img_returns_an_image_of_the_requested_size(webui, lora_job):
    _, _, result = lora_job
    assert len(result.images) == 1
    image = result.images[0]
    assert (image.width, image.height) == (64, 64)
    _mean, spread = image.mean_and_spread()
    assert spread > 0, "a constant image: the tiny model's output saturated or is NaN"
    assert image.text.get("parameters") == result.infotext  # the PNG carries the infotext
    assert f"Model: {webui.checkpoint}" in result.infotext
    assert "Sampler: Euler" in result.infotext and "Schedule type: Simple" in result.infotext


def test_tiny_checkpoint_loads_as_flux_with_every_key(webui, lora_job):
    log = webui.log()
    assert "[freefuse-test] tiny FLUX" in log, "webui_hook/sitecustomize.py did not fit the guess"
    if webui.neo:  # Neo logs the split at DEBUG only
        assert "Model loaded in" in log and "Diffusion Model: {storage: torch.float32" in log
    else:
        assert "StateDict Keys: {'transformer':" in log and "'text_encoder_2':" in log
    assert not re.search(r"(Missing|Unexpected): \[", log), "a part of the tiny checkpoint is keyed wrong"


def test_lora_tag_is_applied(webui, lora_job):
    lora, _, result = lora_job
    assert re.search(rf"Lora hashes: \"?{lora}: [0-9a-f]{{12}}", result.infotext), result.infotext
    keys = webui.manifest["lora_keys"]
    loaded = rf"\[LORA\] Loaded \S*{lora}\.safetensors for \S+-UNet with {keys} keys at weight 0\.8 \(skipped 0 keys\)"
    assert re.search(loaded, webui.log()), "Forge did not merge every LoRA key into the tiny transformer"


def test_same_request_and_seed_give_the_same_image(webui, lora_job):
    _, prompt, first = lora_job
    again = webui.txt2img(prompt)
    assert again.info["seed"] == first.info["seed"] == 1234
    assert again.images[0].pixels == first.images[0].pixels


def test_lora_changes_the_image(webui, lora_job):
    _, _, with_lora = lora_job
    without = webui.txt2img(PROMPT)
    assert "Lora hashes" not in without.infotext
    assert without.images[0].pixels != with_lora.images[0].pixels


def test_this_repository_loads_as_an_extension(webui):
    """extensions/sd-forge-freefuse is this checkout, and Forge loaded whatever scripts/ it has without an error.

    (/sdapi/v1/extensions lists only extensions with a git remote, so a local checkout may be missing there; Forge
    also logs "Failed reading extension data from Git repository" for a checkout without an "origin": harmless.)
    """
    assert (webui.data_dir / "extensions" / "sd-forge-freefuse").resolve() == REPO_ROOT
    errors = [
        line
        for line in webui.log().splitlines()
        if line.startswith("*** ") and "sd-forge-freefuse" in line and "Git repository" not in line
    ]
    assert not errors, "\n".join(errors) + "\n" + webui.log_tail()


def test_always_on_scripts_got_their_default_arguments(webui, lora_job):
    """The fixture waited for Forge's full start-up: no built-in script ran with an empty argument list."""
    assert "not enough values to unpack" not in webui.log()
