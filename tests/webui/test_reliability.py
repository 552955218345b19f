"""Reliability cases through the real webui: odd and wide sizes, BREAK, emphasis, non-ASCII words."""

from __future__ import annotations

import pytest
from test_freefuse_api import freefuse, tagged


@pytest.mark.parametrize(("width", "height"), [(72, 56), (64, 64), (192, 64), (40, 88)], ids=str)
def test_odd_and_wide_sizes_get_masks(webui, width, height):
    result = webui.txt2img(
        tagged(webui), steps=6, width=width, height=height, alwayson_scripts=freefuse(webui, show_masks=True)
    )
    assert [(im.width, im.height) for im in result.images] == [(width, height)] * 2  # the image and its overlay
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a (cat:1.3) and a ((dog)) in a [garden]",
        "ein Foto von einer Katze, a cat, und einem Hund, a dog, am Café",
    ],
    ids=["emphasis", "non-ascii"],
)
def test_prompt_syntax_keeps_the_words_found(webui, prompt):
    result = webui.txt2img(tagged(webui, prompt), steps=6, alwayson_scripts=freefuse(webui))
    assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext, result.infotext


def test_words_after_break_are_named(webui):
    """Forge's FLUX conditions on the text before the first BREAK only: words after it cannot be found by the model."""
    result = webui.txt2img(tagged(webui, "a photo of a cat BREAK and a dog"), steps=6, alwayson_scripts=freefuse(webui))
    assert "(dog) come only after BREAK" in result.infotext, result.infotext
    assert len(result.images) == 1


def test_interrupt_mid_sampling_leaves_nothing_behind(webui):
    """Interrupt (the UI's button, the API's /interrupt) during a FreeFuse job: the job ends, and the next job
    without FreeFuse is bit-identical to one made before."""
    import threading
    import time

    before = webui.txt2img(tagged(webui), steps=4)
    long_job = {}

    def run():
        long_job["result"] = webui.txt2img(tagged(webui), steps=400, alwayson_scripts=freefuse(webui))

    made = webui.log().count("FreeFuse: masks made")
    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while webui.log().count("FreeFuse: masks made") == made and time.monotonic() < deadline:
        time.sleep(0.05)  # interrupt once this job's masks exist, i.e. with every patch in use
    assert worker.is_alive(), "the long job ended before it could be interrupted"
    webui.post("/sdapi/v1/interrupt", {})
    interrupted = time.monotonic()
    worker.join(timeout=120)
    assert not worker.is_alive() and "result" in long_job
    assert time.monotonic() - interrupted < 5, "the job did not stop at the interrupt"
    after = webui.txt2img(tagged(webui), steps=4)
    assert after.images[0].pixels == before.images[0].pixels
