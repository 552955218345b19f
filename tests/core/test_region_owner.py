"""Which subject owns a region of a FreeFuse image (ADetailer's passes), and the pass's prompt keeping its LoRA only."""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from lib_freefuse.args import SubjectBinding
from lib_freefuse.forge import adetailer
from lib_freefuse.regions import (
    AMBIGUOUS,
    BACKGROUND,
    EMPTY,
    MIN_SHARE,
    SUBJECT,
    keep_subject_loras,
    region_owner,
    region_shares,
)

pytestmark = pytest.mark.core


def naive_shares(masks: torch.Tensor, region: torch.Tensor) -> list[float]:
    """s_l = sum over the region's pixels of M_l(token under the pixel) / |region|, pixel by pixel."""
    count, (h, w), (height, width) = int(region.sum()), masks.shape[-2:], region.shape
    totals = [0.0] * masks.shape[0]
    for y in range(height):
        for x in range(width):
            if region[y, x]:
                for subject in range(masks.shape[0]):
                    totals[subject] += float(masks[subject, y * h // height, x * w // width])
    return [t / count if count else 0.0 for t in totals]


def halves(h: int = 4, w: int = 4) -> torch.Tensor:
    """(2, h, w): subject 0 owns the left half of the token grid, subject 1 the right half."""
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    return torch.stack([left, 1 - left])


def box(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    region = torch.zeros(height, width, dtype=torch.bool)
    region[y0:y1, x0:x1] = True
    return region


@pytest.mark.parametrize("seed", range(6))
def test_shares_match_the_pixel_by_pixel_sum(seed):
    rng = random.Random(seed)
    subjects, h, w = rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 6)
    masks = torch.rand(subjects, h, w, generator=torch.Generator().manual_seed(seed))  # soft masks
    height, width = h * 16, w * 16
    region = torch.rand(height, width, generator=torch.Generator().manual_seed(seed + 100)) > rng.random()
    assert region_shares(masks, region).tolist() == pytest.approx(naive_shares(masks, region), abs=1e-5)


def test_a_region_inside_one_mask_belongs_to_that_subject():
    masks = halves()  # 64 x 64 image: left 32 columns subject 0
    left, right = box(64, 64, 4, 4, 28, 28), box(64, 64, 36, 10, 60, 50)
    assert region_owner(masks, left).verdict == SUBJECT and region_owner(masks, left).owner == 0
    assert region_owner(masks, right).owner == 1
    assert region_owner(masks, right).shares == pytest.approx((0.0, 1.0))


def test_a_majority_owns_the_region_and_an_even_split_is_ambiguous():
    masks = halves()
    mostly_left = box(64, 64, 0, 0, 40, 64)  # 32 of 40 columns are subject 0's: 80%
    assert region_owner(masks, mostly_left).owner == 0
    even = box(64, 64, 16, 0, 48, 64)  # 16 columns each
    verdict = region_owner(masks, even)
    assert verdict.verdict == AMBIGUOUS and verdict.owner is None
    assert verdict.shares == pytest.approx((0.5, 0.5))


def test_exactly_the_threshold_is_not_a_majority():
    masks = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])  # 1 x 2 grid; subject 1 nowhere, the rest background
    region = torch.ones(16, 32, dtype=torch.bool)
    owner = region_owner(masks, region)
    assert owner.shares[0] == MIN_SHARE and owner.background == pytest.approx(0.5)
    assert owner.verdict == AMBIGUOUS
    assert region_owner(masks, region, min_share=0.4).owner == 0


def test_background_owns_a_region_no_mask_covers():
    masks = torch.zeros(2, 4, 4)
    masks[0, 0, 0] = 1  # subject 0 has one token, top left
    owner = region_owner(masks, box(64, 64, 32, 32, 64, 64))
    assert owner.verdict == BACKGROUND and owner.background == pytest.approx(1.0)


def test_an_empty_region_owns_nothing():
    owner = region_owner(halves(), torch.zeros(64, 64, dtype=torch.bool))
    assert owner.verdict == EMPTY and owner.shares == (0.0, 0.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"expected masks \(L, h, w\)"):
        region_shares(torch.zeros(4, 4), torch.ones(64, 64, dtype=torch.bool))


PROMPT = "zorbo the knight and quill the wizard <lora:zorb:1> <lora:quil:0.8:0.7> <lora:style:0.5>"


def test_the_other_subjects_tags_are_taken_out_and_styles_kept():
    kept = keep_subject_loras(PROMPT, ["zorb", "quil"], "zorb", 1.0)
    assert kept == "zorbo the knight and quill the wizard <lora:zorb:1> <lora:style:0.5>"
    kept = keep_subject_loras(PROMPT, ["zorb", "quil"], "quil", 1.0)
    assert kept == "zorbo the knight and quill the wizard <lora:quil:0.8:0.7> <lora:style:0.5>"


def test_the_owner_is_added_when_the_prompt_has_no_tag_for_it():
    prompt = "zorbo the knight and quill the wizard <lora:quil:1>"
    assert (
        keep_subject_loras(prompt, ["zorb", "quil"], "zorb", 0.9)
        == "zorbo the knight and quill the wizard <lora:zorb:0.9>"
    )
    assert keep_subject_loras("", ["zorb", "quil"], "zorb", 1.0) == "<lora:zorb:1>"


def test_keep_none_takes_every_subject_out_and_every_mention_goes():
    prompt = "<lora:quil:1>a <lora:zorb:1> b <lora:zorb:0.5> <lora:other:1>"
    assert keep_subject_loras(prompt, ["zorb", "quil"], None, 1.0) == "a b <lora:other:1>"


def test_an_alias_counts_as_its_lora():
    same = lambda tag, subject: {"z": "zorb"}.get(tag, tag) == subject  # noqa: E731
    prompt = "x <lora:z:0.7> <lora:quil:1>"
    assert keep_subject_loras(prompt, ["zorb", "quil"], "zorb", 1.0, same) == "x <lora:z:0.7>"
    assert keep_subject_loras(prompt, ["zorb", "quil"], "quil", 1.0, same) == "x <lora:quil:1>"


def test_bad_values_are_named():
    with pytest.raises(TypeError, match="prompt: expected text"):
        keep_subject_loras(None, ["a"], "a", 1.0)
    with pytest.raises(ValueError, match="weight: expected a finite number"):
        keep_subject_loras("x", ["a"], "a", float("nan"))


# ---- the Forge glue with stand-ins for the job and ADetailer's pass (Forge's own run: tests/webui/) -----------


class Job(SimpleNamespace):
    """A stand-in for Forge's processing object (a plain class: it can be weakly referenced)."""


def fake_job(masks: torch.Tensor, prompt: str, batch_index: int = 0):
    state = SimpleNamespace(image_masks=lambda: list(masks), subject_names=["zorb", "quil"])
    args = SimpleNamespace(subjects=(SubjectBinding("zorb", "zorbo", 0.9), SubjectBinding("quil", "quill", 1.0)))
    return Job(
        freefuse_state=state,
        freefuse_args=args,
        all_prompts=[prompt] * masks.shape[0],
        iteration=0,
        batch_size=masks.shape[0],
        batch_index=batch_index,
        extra_generation_params={},
    )


def fake_pass(prompt: str, rectangle: tuple[int, int, int, int], size: int = 64):
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(rectangle, fill=255)
    return SimpleNamespace(_ad_inner=True, image_mask=mask, prompt=prompt, all_prompts=[prompt])


@pytest.fixture
def lora_files(monkeypatch):
    """Forge's LoRA list (extensions-builtin/sd_forge_lora's networks module): zorb, also known as "z", and quil."""
    zorb, quil = (
        SimpleNamespace(filename="/loras/zorb.safetensors"),
        SimpleNamespace(filename="/loras/quil.safetensors"),
    )
    networks = SimpleNamespace(available_network_aliases={"zorb": zorb, "z": zorb, "quil": quil}, available_networks={})
    monkeypatch.setitem(sys.modules, "networks", networks)


def test_each_pass_keeps_its_regions_owner_and_the_infotext_says_so(lora_files):
    masks = halves()[None].repeat(2, 1, 1, 1)
    masks[1] = masks[1].flip(0)  # image 2: subject 1 on the left
    job = fake_job(masks, "zorbo and quill <lora:quil:0.8>", batch_index=1)
    adetailer.unlink()
    adetailer.link_job(job, len(job.freefuse_state.image_masks()))
    try:
        left, right = fake_pass(job.all_prompts[1], (2, 2, 29, 29)), fake_pass(job.all_prompts[1], (34, 2, 61, 29))
        for inner in (left, right):
            assert adetailer.is_adetailer_pass(inner)
            adetailer.redraw_pass(inner)
        assert left.all_prompts == ["zorbo and quill <lora:quil:0.8>"] and left.prompt == left.all_prompts[0]
        assert right.all_prompts == ["zorbo and quill <lora:zorb:0.9>"]  # no tag: the row's weight
        assert job.extra_generation_params[adetailer.ADETAILER_KEY] == (
            "1: quil (zorb 0%, quil 100%); 2: zorb (zorb 100%, quil 0%)"
        )
        job.batch_index = 0  # the next image: its own passes only
        adetailer.forget_other_image(job)
        assert adetailer.ADETAILER_KEY not in job.extra_generation_params
        straddling = fake_pass(job.all_prompts[0], (16, 0, 47, 63))
        adetailer.redraw_pass(straddling)
        assert straddling.all_prompts == [job.all_prompts[0]]  # ambiguous: left as ADetailer made it
        assert job.extra_generation_params[adetailer.ADETAILER_KEY] == "1: all (zorb 50%, quil 50%)"
    finally:
        adetailer.unlink()


def test_a_job_reused_for_several_batches_reads_the_masks_of_its_latest(lora_files):
    """Forge's img2img batch runs one job object per file: its RunState holds every file's masks, the latest last."""
    earlier, latest = halves()[None], halves()[None].flip(-1)  # the latest image: subject 1 on the left
    job = fake_job(torch.cat([earlier, latest]), "zorbo and quill <lora:zorb:1> <lora:quil:1>")
    job.batch_size, job.batch_index = 1, 0
    adetailer.unlink()
    adetailer.link_job(job, 1)
    try:
        inner = fake_pass(job.all_prompts[0], (2, 2, 29, 29))
        adetailer.redraw_pass(inner)
        assert inner.all_prompts == ["zorbo and quill <lora:quil:1>"]
    finally:
        adetailer.unlink()


def test_a_tag_by_the_lora_alias_counts_as_the_subject(lora_files):
    masks = halves()[None]
    job = fake_job(masks, "zorbo and quill <lora:z:0.7> <lora:quil:1>")
    adetailer.unlink()
    adetailer.link_job(job, len(job.freefuse_state.image_masks()))
    try:
        inner = fake_pass(job.all_prompts[0], (2, 2, 29, 29))
        adetailer.redraw_pass(inner)
        assert inner.all_prompts == ["zorbo and quill <lora:z:0.7>"]
    finally:
        adetailer.unlink()


def test_masks_coarser_than_the_image_still_count_and_masks_of_another_shape_do_not(lora_files):
    job = fake_job(halves(2, 2)[None], "zorbo and quill <lora:zorb:1> <lora:quil:1>")  # hires fix: pass 1's grid
    adetailer.unlink()
    adetailer.link_job(job, len(job.freefuse_state.image_masks()))
    try:
        inner = fake_pass(job.all_prompts[0], (70, 10, 120, 60), size=128)
        adetailer.redraw_pass(inner)
        assert inner.all_prompts == ["zorbo and quill <lora:quil:1>"]
        job.freefuse_state.image_masks = lambda: [halves(2, 6)]  # a wide grid over a square image
        other = fake_pass(job.all_prompts[0], (70, 10, 120, 60), size=128)
        adetailer.redraw_pass(other)
        assert other.all_prompts == [job.all_prompts[0]]
        assert "2: all (FreeFuse's masks, 6x2 tokens, do not fit this 128x128 image)" in str(
            job.extra_generation_params
        )
        job.inpaint_full_res, job.image_mask = True, object()  # an img2img "inpaint only masked" job
        adetailer.redraw_pass(other)
        assert "3: all (the image's masks cover only the crop its inpainting redrew)" in str(
            job.extra_generation_params
        )
    finally:
        adetailer.unlink()


def test_a_pass_after_a_job_without_freefuse_is_left_alone():
    adetailer.unlink()
    inner = fake_pass("zorbo and quill <lora:zorb:1> <lora:quil:1>", (0, 0, 31, 31))
    adetailer.redraw_pass(inner)
    assert inner.all_prompts == ["zorbo and quill <lora:zorb:1> <lora:quil:1>"]
