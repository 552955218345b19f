"""extract_masks: the contract of its output, and a clear ValueError naming the argument for bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lib_freefuse.core import MaskConfig, extract_masks

pytestmark = pytest.mark.core

HEADS, DIM, N_TEXT, GRID = 2, 16, 8, (6, 9)
N_IMG = GRID[0] * GRID[1]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(HEADS, N_TEXT + N_IMG, DIM, generator=g)
    k = torch.randn(HEADS, N_TEXT + N_IMG, DIM, generator=g)
    image = torch.rand(GRID[0] * 8, GRID[1] * 8, 3, generator=g)
    return {"q": q, "k": k, "subject_tokens": [[1, 2], [4]], "grid_hw": GRID, "image": image}


@pytest.mark.parametrize(
    "config",
    [MaskConfig(), MaskConfig(soft=True), MaskConfig(superpixel_vote=False), MaskConfig(n_segments=5)],
    ids=["default", "soft", "no-vote", "few-segments"],
)
def test_output_contract(config):
    masks = extract_masks(**inputs(), config=config)
    assert masks.shape == (2, *GRID) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1
    total = masks.sum(dim=0)
    assert torch.all(total <= 1 + 1e-6)
    # Voting partitions the image among the subjects: every token is fully owned.
    torch.testing.assert_close(total, torch.ones(GRID))
    if not config.soft:
        assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_soft_masks_are_area_fractions_of_the_hard_ones():
    args = inputs(3)
    hard = extract_masks(**args, config=MaskConfig(n_segments=12))
    soft = extract_masks(**args, config=MaskConfig(n_segments=12, soft=True))
    assert torch.equal(soft.argmax(dim=0), hard.argmax(dim=0))


def test_uint8_image_reads_as_0_to_255():
    args = inputs(2)
    as_float = extract_masks(**args)
    args["image"] = (args["image"] * 255).round().to(torch.uint8).numpy()
    assert torch.equal(extract_masks(**args), as_float)


def test_numpy_float64_image_and_bf16_qk_work():
    args = inputs()
    args["image"] = args["image"].numpy().astype(np.float64)
    args["q"], args["k"] = args["q"].bfloat16(), args["k"].bfloat16()
    masks = extract_masks(**args)
    assert masks.dtype == torch.float32 and masks.shape == (2, *GRID)


def test_image_optional_without_voting():
    args = inputs()
    args["image"] = None
    masks = extract_masks(**args, config=MaskConfig(superpixel_vote=False))
    assert masks.shape == (2, *GRID)


def test_subjects_whose_maps_tie_everywhere_get_disjoint_masks():
    args = inputs()
    args["subject_tokens"] = [[3], [3]]  # the same token: identical maps at every stage
    for config in (MaskConfig(), MaskConfig(superpixel_vote=False), MaskConfig(soft=True)):
        masks = extract_masks(**args, config=config)
        assert torch.all(masks.sum(dim=0) <= 1 + 1e-6)
        assert not torch.any((masks[0] > 0) & (masks[1] > 0))


def test_single_subject_owns_everything():
    args = inputs()
    args["subject_tokens"] = [[0, 1]]
    assert torch.equal(extract_masks(**args), torch.ones(1, *GRID))


def test_odd_image_size_with_the_aspect_of_a_ceil_grid():
    args = inputs()
    args["image"] = torch.rand(90, 140, 3)  # FLUX grid of a 90x140 image is ceil(90/16) x ceil(140/16) = 6 x 9
    assert extract_masks(**args).shape == (2, *GRID)


def test_deterministic():
    assert torch.equal(extract_masks(**inputs(5)), extract_masks(**inputs(5)))


def _poke(t: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _with(**change):
    def apply(args):
        args = dict(args)
        for key, fn in change.items():
            args[key] = fn(args[key])
        return args

    return apply


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (_with(q=lambda q: q[0]), "q"),
        (_with(q=lambda q: q.long()), "q"),
        (_with(k=lambda k: k[:, :-1]), "k"),
        (_with(k=lambda k: "not a tensor"), "k"),
        (_with(grid_hw=lambda g: (8, 9)), "grid_hw"),  # 72 image tokens > 62 in the sequence
        (_with(grid_hw=lambda g: (6, 0)), "grid_hw"),
        (_with(grid_hw=lambda g: 54), "grid_hw"),
        (_with(subject_tokens=lambda s: []), "subject_tokens"),
        (_with(subject_tokens=lambda s: "harry"), "subject_tokens"),
        (_with(subject_tokens=lambda s: [[1], []]), "subject_tokens[1]"),
        (_with(subject_tokens=lambda s: [[1], [N_TEXT]]), "subject_tokens[1]"),  # an image token, not text
        (_with(subject_tokens=lambda s: [[-1], [2]]), "subject_tokens[0]"),
        (_with(subject_tokens=lambda s: [[1.5], [2]]), "subject_tokens[0]"),
        (_with(q=lambda q: _poke(q, (0, 3, 0), float("nan"))), "q"),
        (_with(k=lambda k: _poke(k, (1, 20, 2), float("inf"))), "k"),
        (_with(image=lambda i: None), "image"),
        (_with(image=lambda i: i[..., :2]), "image"),
        (_with(image=lambda i: i[:, :20]), "image"),  # not the grid's aspect
        (_with(image=lambda i: i * float("nan")), "image"),
        (_with(image=lambda i: [[0.5]]), "image"),
    ],
)
def test_bad_input_names_the_argument(change, argument):
    with pytest.raises(ValueError, match="^" + argument.replace("[", r"\[").replace("]", r"\]") + ":"):
        extract_masks(**change(inputs()))


def test_bad_config_type_names_config():
    with pytest.raises(ValueError, match="^config:"):
        extract_masks(**inputs(), config={"soft": True})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sink_filter", 1),
        ("sink_top_fraction", 0.0),
        ("sink_top_fraction", 1.5),
        ("sink_top_fraction", float("nan")),
        ("edge_width", -1),
        ("edge_width", 1.0),
        ("self_attention_top_fraction", "0.01"),
        ("n_segments", 0),
        ("compactness", float("inf")),
        ("compactness", -1.0),
        ("slic_max_side", 8),
        ("soft", None),
        ("cross_attention", "image_keys"),
    ],
)
def test_bad_config_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        MaskConfig(**{field: value})


def test_config_defaults_follow_algorithm_md():
    assert dataclasses.asdict(MaskConfig()) == {
        "sink_filter": True,
        "sink_top_fraction": 0.01,
        "edge_width": 1,
        "self_attention": True,
        "self_attention_top_fraction": 0.01,
        "superpixel_vote": True,
        "n_segments": None,
        "compactness": 10.0,
        "slic_max_side": 512,
        "soft": False,
        "cross_attention": "text_queries",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskConfig().soft = True  # type: ignore[misc]
