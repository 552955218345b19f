"""Background "tokens" through the webui hook's path (processing.start_run, tier "forge"): the host's own T5 engine
names the end-of-text token whose attention is the background class, and a family without one (SDXL's
cross-attention) says so and keeps the background free by the threshold instead. The user's background words, where
given, are the background class instead, found by the host's engine as a subject's words are (FLUX.1 and SDXL).
Only the LoRA extension's name lookup (`networks`) is a stand-in."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import sdxl_env
import torch
from test_masked_sampling import GRID, LATENT, lora_sd
from test_sdxl_masked_sampling import LATENT as SDXL_LATENT
from test_sdxl_start_run import sdxl_job

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.forge import job as job_module
from lib_freefuse.forge.processing import start_run

PROMPT = "zorbo the knight and (quill the wizard:1.2) in a hall"
SUBJECTS = [{"lora": "fa", "words": "zorbo the knight"}, {"lora": "fb", "words": "quill the wizard"}]


def flux_job(forge, forge_root, unet, monkeypatch, prompts, **settings):
    """A webui job's `p` for the tiny FLUX with two tagged LoRAs merged by the host, and FreeFuse's arguments."""
    sds = {"fa.safetensors": lora_sd(1, image_only=True), "fb.safetensors": lora_sd(2, image_only=True)}
    merged, paths, _ = forge.with_loras(unet, sds, 0.8)
    networks = types.ModuleType("networks")
    networks.available_network_aliases = {
        "fa": SimpleNamespace(filename=paths[0]),
        "fb": SimpleNamespace(filename=paths[1]),
    }
    networks.available_networks = {}
    monkeypatch.setitem(sys.modules, "networks", networks)
    engine = forge.flux_t5_engine(forge_root)
    model = SimpleNamespace(forge_objects=SimpleNamespace(unet=merged), text_processing_engine_t5=engine)
    p = SimpleNamespace(sd_model=model, prompts=prompts, steps=4)
    settings = {"enabled": True, "subjects": SUBJECTS, "superpixel_vote": False, "capture_block": 2, **settings}
    args = FreeFuseArgs.from_dict(settings)
    return p, args, merged, engine


def recorded_extractions(monkeypatch) -> list:
    """[(config.background, background tokens)] of each extract_masks call the job makes from now on."""
    seen = []
    real = job_module.extract_masks

    def recording(q, k, words, grid_hw, image, config, background_tokens=(), earlier_maps=()):
        seen.append((config.background, tuple(background_tokens)))
        return real(q, k, words, grid_hw, image, config, background_tokens, earlier_maps)

    monkeypatch.setattr(job_module, "extract_masks", recording)
    return seen


def test_a_flux_job_reads_the_background_from_each_prompts_end_of_text_token(forge, forge_root, tiny_unet, monkeypatch):
    prompts = [PROMPT, PROMPT + ", under a starry sky at night"]
    p, args, _, engine = flux_job(forge, forge_root, tiny_unet, monkeypatch, prompts, background="tokens")
    seen = recorded_extractions(monkeypatch)
    job = start_run(p, args, torch.zeros(2, 16, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    # </s> right after each prompt's pieces, counted by the tokenizer itself on the text without the emphasis
    # "(...:1.2)", which the engine parses away
    plain = PROMPT.replace("(", "").replace(":1.2)", "")
    texts = (plain, plain + prompts[1][len(PROMPT) :])
    ends = [len(engine.tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    assert job.plan.background_positions == ((ends[0],), (ends[1],))
    assert ends[1] > ends[0] and job.plan.mask_config.background == "tokens"
    tokens = job.plan.text_length
    cond = forge.conditions(2, tokens)
    out = forge.sample(p.sd_model.forge_objects.unet, steps=4, batch=2, cond=cond, latent_hw=LATENT)
    assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
    assert seen == [("tokens", (ends[0],)), ("tokens", (ends[1],))]
    assert tuple(job.masks.shape) == (2, 2, *GRID)


def test_by_default_without_background_words_no_token_is_the_background(forge, forge_root, tiny_unet, monkeypatch):
    """The default "words" without background words: no background class, not even the end-of-text token."""
    p, args, _, _ = flux_job(forge, forge_root, tiny_unet, monkeypatch, [PROMPT])
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and job.plan.background_positions == () and job.plan.mask_config.background == "words"
    assert p.freefuse_state.warnings == []


def test_sdxl_has_no_end_of_text_background_and_says_so(forge, forge_root, monkeypatch):
    unet = sdxl_env.make_sdxl_patcher(forge, sdxl_env.make_tiny_sdxl(forge))
    try:
        p, args, _ = sdxl_job(forge, forge_root, unet, monkeypatch, background="tokens")
        job = start_run(p, args, torch.zeros(1, 4, *SDXL_LATENT))
        assert job is not None
        (warning,) = p.freefuse_state.warnings
        assert "SDXL" in warning and "end-of-text" in warning and "stay free instead" in warning
        assert job.plan.mask_config.background == "threshold" and job.plan.background_positions == ()
    finally:
        forge.unload(unet)


@pytest.mark.parametrize("background", ["off", "threshold"])
def test_the_other_background_settings_pass_unchanged(forge, forge_root, tiny_unet, monkeypatch, background):
    p, args, _, _ = flux_job(forge, forge_root, tiny_unet, monkeypatch, [PROMPT], background=background)
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job.plan.mask_config.background == background and job.plan.background_positions == ()


def piece_positions(engine, prompt: str, phrase: str) -> tuple[int, ...]:
    """Where the words of `phrase` (each one T5 piece, "▁word") sit in the pieces of `prompt` (emphasis parsed
    away), counted by hand."""
    plain = prompt.replace("(", "").replace(":1.2)", "")
    pieces = engine.tokenizer.convert_ids_to_tokens(engine.tokenizer(plain, add_special_tokens=False).input_ids)
    wanted = ["▁" + word for word in phrase.split()]
    for start in range(len(pieces) - len(wanted) + 1):
        if pieces[start : start + len(wanted)] == wanted:
            return tuple(range(start, start + len(wanted)))
    raise AssertionError(f"{phrase!r} not in {pieces}")


def test_background_words_are_the_background_class_instead_of_the_end_of_text(
    forge, forge_root, tiny_unet, monkeypatch
):
    prompts = [PROMPT, "a starry sky over " + PROMPT]
    p, args, _, engine = flux_job(
        forge, forge_root, tiny_unet, monkeypatch, prompts, background="tokens", background_words="hall"
    )
    seen = recorded_extractions(monkeypatch)
    job = start_run(p, args, torch.zeros(2, 16, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    expected = tuple(piece_positions(engine, prompt, "hall") for prompt in prompts)
    assert job.plan.background_positions == expected and job.plan.mask_config.background == "tokens"
    assert expected[1][0] > expected[0][0]  # each image's own positions: the second prompt is longer before them
    for image, background in zip(job.plan.word_positions, expected, strict=True):
        assert not {t for subject in image for t in subject} & set(background)
    out = forge.sample(p.sd_model.forge_objects.unet, steps=4, batch=2, cond=forge.conditions(2, job.plan.text_length),
                       latent_hw=LATENT)  # fmt: skip
    assert torch.isfinite(out).all() and job.failure is None and seen == [("tokens", e) for e in expected]


def test_background_words_missing_from_the_prompt_are_named_and_the_threshold_used(
    forge, forge_root, tiny_unet, monkeypatch
):
    p, args, _, _ = flux_job(
        forge, forge_root, tiny_unet, monkeypatch, [PROMPT], background="tokens", background_words="misty forest"
    )
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and job.plan.background_positions == () and job.plan.mask_config.background == "threshold"
    assert p.freefuse_state.warnings == [
        "the background words (misty forest) are not in the prompt: places where no subject scores high stay free "
        "instead"
    ]


def test_background_words_with_another_background_setting_are_named_and_left_out(
    forge, forge_root, tiny_unet, monkeypatch
):
    p, args, _, _ = flux_job(
        forge, forge_root, tiny_unet, monkeypatch, [PROMPT], background="off", background_words="hall"
    )
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and job.plan.background_positions == () and job.plan.mask_config.background == "off"
    assert p.freefuse_state.warnings == [
        "the background words (hall) count only when places no subject claims 'Free at background words (default)': "
        "made without them"
    ]


def test_by_default_the_background_words_are_the_background_class(forge, forge_root, tiny_unet, monkeypatch):
    """The default "words": the user's background words are found and handed to the masks as with "tokens"."""
    prompts = [PROMPT, "a starry sky over " + PROMPT]
    p, args, _, engine = flux_job(forge, forge_root, tiny_unet, monkeypatch, prompts, background_words="hall")
    seen = recorded_extractions(monkeypatch)
    job = start_run(p, args, torch.zeros(2, 16, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    expected = tuple(piece_positions(engine, prompt, "hall") for prompt in prompts)
    assert job.plan.background_positions == expected and job.plan.mask_config.background == "words"
    out = forge.sample(p.sd_model.forge_objects.unet, steps=4, batch=2, cond=forge.conditions(2, job.plan.text_length),
                       latent_hw=LATENT)  # fmt: skip
    assert torch.isfinite(out).all() and job.failure is None and seen == [("words", e) for e in expected]


def test_by_default_background_words_missing_from_the_prompt_leave_every_place_to_a_subject(
    forge, forge_root, tiny_unet, monkeypatch
):
    p, args, _, _ = flux_job(forge, forge_root, tiny_unet, monkeypatch, [PROMPT], background_words="misty forest")
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and job.plan.background_positions == () and job.plan.mask_config.background == "words"
    assert p.freefuse_state.warnings == [
        "the background words (misty forest) are not in the prompt: every place goes to some subject"
    ]


def test_sdxl_reads_background_words_through_its_cross_attention(forge, forge_root, monkeypatch):
    unet = sdxl_env.make_sdxl_patcher(forge, sdxl_env.make_tiny_sdxl(forge))
    try:
        p, args, _ = sdxl_job(forge, forge_root, unet, monkeypatch, background="tokens", background_words="a hall")
        seen = []
        real = job_module.extract_cross_masks

        def recording(*args, **kwargs):
            seen.append((args[7].background, tuple(args[10])))
            return real(*args, **kwargs)

        monkeypatch.setattr(job_module, "extract_cross_masks", recording)
        job = start_run(p, args, torch.zeros(1, 4, *SDXL_LATENT))
        assert job is not None and p.freefuse_state.warnings == []
        # CLIP: BOS, "zorbo" in two pieces, "the knight and quill the wizard in" -> "a hall" at 10, 11
        assert job.plan.background_positions == ((10, 11),) and job.plan.mask_config.background == "tokens"
        out = sdxl_env.sample(forge, p.sd_model.forge_objects.unet, steps=4, cfg_scale=3.0, latent_hw=SDXL_LATENT)
        assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
        assert seen == [("tokens", (10, 11))]
    finally:
        forge.unload(unet)


@pytest.mark.parametrize(
    ("words", "warning", "kept"),
    [
        ("the knight", "the background words are a subject's own words: places where no subject scores high stay "
         "free instead", False),
        ("knight, hall", "some background words are also a subject's words: they count for the subject only", True),
    ],
)  # fmt: skip
def test_background_words_that_are_a_subjects_words_count_for_the_subject(
    forge, forge_root, tiny_unet, monkeypatch, words, warning, kept
):
    p, args, _, engine = flux_job(
        forge, forge_root, tiny_unet, monkeypatch, [PROMPT], background="tokens", background_words=words
    )
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and p.freefuse_state.warnings == [warning]
    if kept:
        assert job.plan.background_positions == (piece_positions(engine, PROMPT, "hall"),)
        assert job.plan.mask_config.background == "tokens"
    else:
        assert job.plan.background_positions == () and job.plan.mask_config.background == "threshold"
