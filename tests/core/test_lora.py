"""masked_lora_delta: the masked, stacked low-rank product equals the naive per-subject sum."""

from __future__ import annotations

import re

import pytest
import torch

from lib_freefuse.core import StackedLoRA, masked_lora_delta

pytestmark = pytest.mark.core


def make_loras(ranks, d_in=24, d_out=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    downs = [torch.randn(r, d_in, generator=g).to(dtype) for r in ranks]
    ups = [torch.randn(d_out, r, generator=g).to(dtype) for r in ranks]
    scales = [0.5 + 0.25 * i for i in range(len(ranks))]
    return downs, ups, scales


def naive_delta(x, downs, ups, scales, masks):
    """sum_l masks[..., l, None] * s_l * (x @ A_l^T @ B_l^T), subject by subject, in float64."""
    out = 0
    for l, (down, up, scale) in enumerate(zip(downs, ups, scales, strict=True)):
        out = out + masks[..., l, None].double() * scale * (x.double() @ down.double().T @ up.double().T)
    return out


@pytest.fixture
def x():
    return torch.randn(2, 30, 24, generator=torch.Generator().manual_seed(1))


def random_masks(batch=2, tokens=30, subjects=2, seed=2):
    return torch.rand(batch, tokens, subjects, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ranks", [(4, 4), (2, 8, 3)])
def test_equals_naive_sum_fp32(x, ranks):
    downs, ups, scales = make_loras(ranks)
    masks = random_masks(subjects=len(ranks))
    got = masked_lora_delta(x, downs, ups, scales, masks)
    assert got.dtype == torch.float32 and got.shape == (2, 30, 40)
    torch.testing.assert_close(got.double(), naive_delta(x, downs, ups, scales, masks), atol=1e-4, rtol=1e-5)


def test_equals_naive_sum_bf16(x):
    downs, ups, scales = make_loras((4, 6), dtype=torch.bfloat16)
    masks = random_masks()
    got = masked_lora_delta(x.bfloat16(), downs, ups, scales, masks)
    assert got.dtype == torch.bfloat16
    expected = naive_delta(x.bfloat16(), downs, ups, scales, masks)
    torch.testing.assert_close(got.double(), expected, atol=0.1 * expected.abs().max().item() / 8, rtol=2e-2)


def test_all_ones_masks_equal_plain_lora_delta(x):
    downs, ups, scales = make_loras((4, 8))
    plain = sum(s * (x @ d.T @ u.T) for d, u, s in zip(downs, ups, scales, strict=True))
    got = masked_lora_delta(x, downs, ups, scales, torch.ones(2, 30, 2))
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-5)


def test_zero_masks_give_zeros(x):
    downs, ups, scales = make_loras((4, 8))
    got = masked_lora_delta(x, downs, ups, scales, torch.zeros(2, 30, 2))
    assert torch.count_nonzero(got) == 0


def test_each_subject_acts_only_on_its_tokens(x):
    downs, ups, scales = make_loras((4, 8))
    masks = torch.zeros(2, 30, 2)
    masks[:, :10, 0] = 1
    masks[:, 10:, 1] = 1
    got = masked_lora_delta(x, downs, ups, scales, masks)
    first = scales[0] * (x @ downs[0].T @ ups[0].T)
    second = scales[1] * (x @ downs[1].T @ ups[1].T)
    torch.testing.assert_close(got[:, :10], first[:, :10], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[:, 10:], second[:, 10:], atol=1e-4, rtol=1e-5)


def test_batch_one_masks_are_shared_by_the_batch(x):
    downs, ups, scales = make_loras((3, 5))
    masks = random_masks(batch=1)
    got = masked_lora_delta(x, downs, ups, scales, masks)
    torch.testing.assert_close(got, masked_lora_delta(x, downs, ups, scales, masks.expand(2, -1, -1)))


def test_result_follows_x_dtype_when_factors_differ(x):
    downs, ups, scales = make_loras((4, 4), dtype=torch.float16)
    got = masked_lora_delta(x, downs, ups, scales, random_masks())
    assert got.dtype == x.dtype


def test_prepared_stack_reuses_cast_factors(x):
    downs, ups, scales = make_loras((4, 4))
    stack = StackedLoRA(downs, ups, scales)
    first = stack(x, random_masks())
    cached = stack.factors(x.dtype, x.device)
    second = stack(x, random_masks())
    assert stack.factors(x.dtype, x.device)[0] is cached[0]
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda a: {**a, "x": a["x"][0]}, "x"),
        (lambda a: {**a, "x": a["x"][..., :5]}, "x"),
        (lambda a: {**a, "masks": a["masks"][..., :1]}, "masks"),
        (lambda a: {**a, "masks": a["masks"][:, :4]}, "masks"),
        (lambda a: {**a, "downs": []}, "downs"),
        (lambda a: {**a, "ups": a["ups"][:1]}, "ups"),
        (lambda a: {**a, "ups": [a["ups"][0][:, :2], a["ups"][1]]}, "ups[0]"),
        (lambda a: {**a, "downs": [a["downs"][0], a["downs"][1][:, :3]]}, "downs[1]"),
        (lambda a: {**a, "scales": [1.0, float("nan")]}, "scales[1]"),
        (lambda a: {**a, "scales": [1.0, "2"]}, "scales[1]"),
    ],
)
def test_bad_input_names_the_argument(x, change, argument):
    downs, ups, scales = make_loras((4, 4))
    args = change({"x": x, "downs": downs, "ups": ups, "scales": scales, "masks": random_masks()})
    with pytest.raises(ValueError, match="^" + re.escape(argument)):
        masked_lora_delta(**args)


@pytest.mark.parametrize("layout", ["contiguous", "column-slice", "transposed"])
def test_add_to_accumulates_in_place(x, layout):
    downs, ups, scales = make_loras((4, 6))
    stack = StackedLoRA(downs, ups, scales)
    masks = random_masks()
    base = torch.randn(2, 30, 100, generator=torch.Generator().manual_seed(4))
    untouched = base.clone()
    if layout == "contiguous":
        out = base[..., :40].clone()
    elif layout == "column-slice":  # e.g. the k part of a fused qkv output
        out = base[..., 30:70]
    else:
        out = base[..., :40].transpose(0, 1).clone().transpose(0, 1)
    expected = out.clone() + stack(x, masks)
    returned = stack.add_to(out, x, masks)
    assert returned is out
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    if layout == "column-slice":
        assert torch.equal(base[..., :30], untouched[..., :30]) and torch.equal(base[..., 70:], untouched[..., 70:])


def test_add_to_rejects_a_mismatched_output(x):
    stack = StackedLoRA(*make_loras((4, 4)))
    with pytest.raises(ValueError, match="^out:"):
        stack.add_to(torch.zeros(2, 30, 41), x, random_masks())
    with pytest.raises(ValueError, match="^out:"):
        stack.add_to(torch.zeros(2, 30, 40, dtype=torch.float64), x, random_masks())


def test_explicit_subjects_share_and_skip_mask_columns(x):
    downs, ups, scales = make_loras((4, 2, 3))
    masks = random_masks(subjects=3)
    # LoRAs 0 and 1 both belong to subject 2 (say to_q and to_k of one file); LoRA 2 to subject 0; subject 1 has none.
    got = StackedLoRA(downs, ups, scales, subjects=[2, 2, 0])(x, masks)
    remapped = masks[..., [2, 2, 0]]
    torch.testing.assert_close(got.double(), naive_delta(x, downs, ups, scales, remapped), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("subjects", [[0], [0, -1], [0, 1.0], [0, True]])
def test_bad_subjects_name_subjects(x, subjects):
    downs, ups, scales = make_loras((4, 4))
    with pytest.raises(ValueError, match="^subjects:"):
        StackedLoRA(downs, ups, scales, subjects=subjects)


def test_serial_chunks_tile_the_rows_below_the_grain_size():
    from lib_freefuse.core.lora import _SERIAL_NUMEL, _serial_chunks

    cpu = torch.device("cpu")
    for rows, row_numel in ((4608, 32), (9216, 16), (16, 3072), (5, 40000), (1, 1)):
        chunks = _serial_chunks(cpu, rows, row_numel)
        assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(rows))
        assert all((c.stop - c.start) * row_numel <= _SERIAL_NUMEL or c.stop - c.start == 1 for c in chunks)
    assert _serial_chunks(torch.device("meta"), 4608, 32) == [slice(0, 4608)]  # off the CPU: one op


@pytest.mark.parametrize("ranks", [(16, 16), (16, 16, 5)])
def test_equals_naive_sum_when_stacking_and_scaling_run_in_chunks(ranks):
    """Sizes at which the factors are stacked and the activations scaled in several serial chunks each."""
    from lib_freefuse.core.lora import _serial_chunks

    d, tokens = 2100, 1000
    cpu = torch.device("cpu")
    assert len(_serial_chunks(cpu, ranks[0], d)) > 1 and len(_serial_chunks(cpu, d, ranks[0])) > 1
    assert len(_serial_chunks(cpu, tokens, 2 * sum(ranks))) > 1
    downs, ups, scales = make_loras(ranks, d_in=d, d_out=d, seed=4)
    x = torch.randn(2, tokens, d, generator=torch.Generator().manual_seed(5))
    masks = random_masks(batch=1, tokens=tokens, subjects=len(ranks) + 1, seed=6)  # batch-shared, a spare column
    got = masked_lora_delta(x, downs, ups, scales, masks)
    torch.testing.assert_close(got.double(), naive_delta(x, downs, ups, scales, masks), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("ranks", [(16, 16), (4, 4, 4), (16, 16, 5)])
@pytest.mark.parametrize("mask_batch", [1, 2])
def test_stack_scales_by_subject_in_chunks_over_many_tokens(ranks, mask_batch):
    """Equal ranks scale (B, T, n_loras, r), unequal ones (B, T, R); either in several chunks of tokens (R * B * T is
    well above the serial grain size here), with masks for the batch or shared by it, and subjects shared by LoRAs."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3000, 24, generator=gen)
    downs, ups, scales = make_loras(ranks)
    subjects = [1, 0, 1][: len(ranks)]
    masks = torch.rand(mask_batch, 3000, 2, generator=gen)
    got = StackedLoRA(downs, ups, scales, subjects=subjects)(x, masks)
    expected = naive_delta(x, downs, ups, scales, masks[..., subjects].expand(2, -1, -1))
    torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-5)
    one_shot = masked_lora_delta(x, downs, ups, scales, masks[..., subjects])
    torch.testing.assert_close(got, one_shot, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("ranks", [(4, 4), (2, 8, 3)])
def test_works_on_inference_tensors_as_forge_samples(x, ranks):
    """Forge samples under torch.inference_mode: masks made there keep no version counter. The per-masks weights are
    still shared by layers given the same masks, and a layer sees a changed mask through a new masks tensor."""
    downs, ups, scales = make_loras(ranks)
    stacked = StackedLoRA(downs, ups, scales)
    with torch.inference_mode():
        masks = random_masks(subjects=len(ranks))
        first = stacked(x, masks)
        again = stacked(x, masks)
        other = stacked(x, torch.zeros_like(masks))
    expected = naive_delta(x, downs, ups, scales, masks)
    torch.testing.assert_close(first.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert other.abs().max() == 0


def test_masks_changed_in_place_give_new_weights(x):
    """A masks tensor that tracks in-place changes (outside inference mode) is not served stale weights."""
    downs, ups, scales = make_loras((4, 4))
    stacked = StackedLoRA(downs, ups, scales)
    masks = torch.ones(2, 30, 2)
    before = stacked(x, masks)
    masks.zero_()
    assert before.abs().max() > 0 and stacked(x, masks).abs().max() == 0
