"""Quality on the committed toy world (bench/toyworld): through the real webui, FreeFuse keeps two character LoRAs
apart where merging them loses both characters. Fixed seeds on the CPU, so the figures are reproducible; the full
benchmark with intervals is bench/toyworld/benchmark.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import PAPER, TOY_WORLD

sys.path.insert(0, str(TOY_WORLD.parent))

import world
from scorer import load_scorer, read_halves, score_image

SEEDS = 16  # per prompt: two batches of 8 consecutive seeds
BATCH = 8
STEPS = 24
BOTH = " <lora:toy_zorb:1> <lora:toy_quil:1>"
SUBJECTS = [{"lora": "toy_zorb", "words": "zorb"}, {"lora": "toy_quil", "words": "quil"}]


@pytest.fixture(scope="module")
def scorer():
    return load_scorer(TOY_WORLD / "scorer.safetensors")


def scores(webui, scorer, freefuse: dict | None) -> dict[str, float]:
    """Mean present / identity / wrong colour over SEEDS seeds x both benchmark prompts."""
    every = []
    for prompt, left in world.benchmark_prompts().values():
        overrides = dict(width=world.IMAGE_PX, height=world.IMAGE_PX, steps=STEPS, seed=1000, batch_size=SEEDS)
        overrides["override_settings"] = {"sd_model_checkpoint": "toyworld_flux"}
        if freefuse is not None:
            args = {"enabled": True, "subjects": SUBJECTS, "capture_block": 2, **freefuse}
            overrides["alwayson_scripts"] = {"FreeFuse": {"args": [args]}}
        result = webui.txt2img(prompt + BOTH, **overrides)
        if freefuse is not None:
            assert "FreeFuse coverage" in result.infotext and "FreeFuse warnings" not in result.infotext
        images = [im for im in result.images if (im.width, im.height) == (world.IMAGE_PX, world.IMAGE_PX)]
        assert len(images) == SEEDS
        pixels = np.stack(
            [np.frombuffer(im.pixels, np.uint8).reshape(im.height, im.width, -1)[..., :3] for im in images]
        )
        every += [score_image(h, left) for h in read_halves(scorer, torch.from_numpy(pixels.astype(np.float32) / 255))]
    return {key: float(np.mean([s[key] for s in every])) for key in every[0]}


def test_freefuse_keeps_two_character_loras_apart_where_merging_fails(webui, scorer):
    merged = scores(webui, scorer, None)
    paper = scores(webui, scorer, PAPER)
    defaults = scores(webui, scorer, {})
    print(f"\ntoy world, {SEEDS} seeds x 2 prompts: merged {merged}, FreeFuse paper {paper}, defaults {defaults}")
    # Merged at full strength the two LoRAs still draw two figures, but blended: a character is recognised in its
    # own half almost never (the benchmark: 0.02 of the halves over 32 seeds).
    assert merged["present"] >= 0.8 and merged["identity"] <= 2 / 64, merged
    # FreeFuse keeps the figures and its characters are recognised in their own halves at least 6 more times in 64
    # than merged use (the benchmark: 0.18 +- 0.05 over 32 seeds; its oracle masks reach 0.23).
    assert paper["present"] >= 0.8, paper
    assert paper["identity"] >= merged["identity"] + 6 / 64, paper
    # So do the extension's defaults (0.6.0: own words, b = 5, the blocks' average, seeds where each subject leads;
    # the benchmark: 0.23 against 0.5.0's 0.20 and the paper's 0.18 over 128 seeds; its first 16 seeds: 15 of 64)
    assert defaults["present"] >= 0.8, defaults
    assert defaults["identity"] >= merged["identity"] + 6 / 64, defaults
