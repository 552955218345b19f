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
        ("contrastive", "on"),
        ("contrastive", True),
        ("background", "eos"),
        ("background_threshold", 0.0),
        ("background_threshold", 101.0),
        ("background_threshold", float("nan")),
        ("fill_holes", -0.01),
        ("fill_holes", 0.5),
        ("fill_holes", "0.01"),
        ("surroundings", "nearest"),
        ("surroundings", None),
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
        "slic_max_side": 256,
        "soft": False,
        "cross_attention": "text_queries",
        # options beyond the paper, off by default
        "contrastive": "off",
        "background": "off",
        "background_threshold": 0.5,
        "fill_holes": 0.0,
        "surroundings": "vote",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskConfig().soft = True  # type: ignore[misc]


BEYOND_THE_PAPER = [
    MaskConfig(contrastive="strongest"),
    MaskConfig(contrastive="authors", superpixel_vote=False),
    MaskConfig(fill_holes=0.05),
    MaskConfig(fill_holes=0.05, superpixel_vote=False, soft=True),
    MaskConfig(background="tokens"),
    MaskConfig(background="tokens", superpixel_vote=False),
    MaskConfig(background="threshold", background_threshold=0.9),
    MaskConfig(background="threshold", background_threshold=0.9, soft=True, fill_holes=0.05),
    MaskConfig(background="nearest", background_threshold=2.0),
    MaskConfig(background="nearest", background_threshold=2.0, superpixel_vote=False, fill_holes=0.05),
]


@pytest.mark.parametrize("config", BEYOND_THE_PAPER, ids=repr)
def test_output_contract_with_the_options_beyond_the_paper(config):
    masks = extract_masks(**inputs(), config=config, background_tokens=[6])
    assert masks.shape == (2, *GRID) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1 and torch.all(masks.sum(dim=0) <= 1 + 1e-6)
    if config.background in ("off", "nearest"):  # the subjects share the whole image, as the paper's vote does
        torch.testing.assert_close(masks.sum(dim=0), torch.ones(GRID))
    if not config.soft:
        assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_background_leaves_part_of_the_image_to_nobody_and_the_rest_as_before():
    """A background token that attends to the image's bottom rows takes them from both subjects."""
    args = inputs(1)
    n_img = GRID[0] * GRID[1]
    bottom = torch.zeros(n_img, dtype=torch.bool)
    bottom[-2 * GRID[1] :] = True
    args["k"] = args["k"].clone()
    args["q"] = args["q"].clone()
    direction = torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(9)), dim=0)
    args["k"][:, N_TEXT:][:, bottom] = 8 * direction  # the bottom rows' keys are one direction ...
    args["q"][:, 6] = 4 * direction  # ... that the background token's query points along: logit 8 there
    paper = extract_masks(**args, config=MaskConfig(superpixel_vote=False))
    masks = extract_masks(**args, config=MaskConfig(superpixel_vote=False, background="tokens"), background_tokens=[6])
    nobody = masks.sum(dim=0) == 0
    assert bool(nobody.reshape(-1)[bottom].all()) and not bool(nobody.reshape(-1)[~bottom].any())
    assert torch.equal(masks[:, ~nobody], paper[:, ~nobody])


def test_background_words_are_the_tokens_class_where_given_and_off_where_not():
    """background "words": with background tokens, the "tokens" masks; with none, the masks of "off" (no error)."""
    args = inputs(1)
    words, tokens = MaskConfig(background="words"), MaskConfig(background="tokens")
    assert torch.equal(extract_masks(**args, config=words), extract_masks(**args))
    assert torch.equal(
        extract_masks(**args, config=words, background_tokens=[6]),
        extract_masks(**args, config=tokens, background_tokens=[6]),
    )
    with pytest.raises(ValueError, match="^background_tokens:"):
        extract_masks(**args, config=words, background_tokens=[N_TEXT])


def test_background_tokens_are_ignored_unless_asked_for():
    args = inputs(2)
    assert torch.equal(extract_masks(**args, background_tokens=[6]), extract_masks(**args))
    assert torch.equal(extract_masks(**args, background_tokens="junk"), extract_masks(**args))


@pytest.mark.parametrize(
    "tokens", [(), [N_TEXT], [-1], [1.5], "eos", None], ids=["none", "image-token", "negative", "float", "str", "None"]
)
def test_bad_background_tokens_name_the_argument(tokens):
    with pytest.raises(ValueError, match="^background_tokens:"):
        extract_masks(**inputs(), config=MaskConfig(background="tokens"), background_tokens=tokens)


def test_fill_holes_absorbs_a_subject_island_into_its_surround():
    """Without the vote, a token that the other subject wins alone inside a subject's area is a hole."""
    args = inputs(3)
    paper = extract_masks(**args, config=MaskConfig(superpixel_vote=False))
    filled = extract_masks(**args, config=MaskConfig(superpixel_vote=False, fill_holes=2.5 / (GRID[0] * GRID[1])))
    owner_paper, owner_filled = paper.argmax(dim=0).numpy(), filled.argmax(dim=0).numpy()
    from scipy import ndimage

    def pieces(owner):
        return sum(ndimage.label(owner == value)[1] for value in (0, 1))

    def single_token_pieces(owner):
        return sum(int((np.bincount(ndimage.label(owner == v)[0].ravel())[1:] == 1).sum()) for v in (0, 1))

    assert single_token_pieces(owner_paper) > 0, "the case needs a one-token hole"
    assert single_token_pieces(owner_filled) == 0 and pieces(owner_filled) < pieces(owner_paper)
