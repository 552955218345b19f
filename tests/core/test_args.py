"""The one argument model: defaults, dict form, coercion and rejection rules, capture step, UI labels."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_freefuse.args import (
    BUTTON_HELP,
    FIELD_HELP,
    HIRES_MASKS_CHOICES,
    MODULATION_CHOICES,
    PAPER_SETTINGS,
    PRE_MASK_CHOICES,
    SECTIONS,
    SLIC_IMAGE_CHOICES,
    SUBJECT_FIELD_HELP,
    TOP_KEYS,
    FreeFuseArgs,
    SubjectBinding,
    help_for,
    img2img_steps,
    subject_help_lines,
)
from lib_freefuse.core import MaskConfig, default_capture_step

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]
MASK_KEYS = MaskConfig.field_names()
OWN_KEYS = (
    "enabled",
    "subjects",
    "capture_step",
    "capture_block",
    "pre_mask",
    "restart",
    "modulation",
    "slic_image",
    "show_masks",
    "hires_masks",
    "text_loras",
    "attention_bias",
    "average_steps",
    "average_blocks",
    "background_words",
)
TWO = [{"lora": "harry", "words": "harry potter"}, {"lora": "daiyu", "words": "daiyu lin", "weight": 0.9}]


def parse(**values):
    return FreeFuseArgs.from_dict(values)


def rejects(match: str, **values) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        FreeFuseArgs.from_dict(values)
    return str(caught.value)


# Defaults and the dict form


def test_defaults_are_the_papers_method_switched_off_with_the_extensions_choices():
    args = FreeFuseArgs.defaults()
    assert args == FreeFuseArgs()
    assert (args.enabled, args.subjects, args.capture_step, args.capture_block) == (False, (), None, 17)
    assert (args.pre_mask, args.restart, args.modulation, args.slic_image) == ("joint", False, "per_token", "vae")
    assert (args.show_masks, args.hires_masks) == (False, "reuse")
    # beyond the paper since 0.5.0 / 0.6.0 / 0.7.0 / 0.8.0 (README "Settings"): everything else in the masks is the
    # paper's
    assert (args.text_loras, args.attention_bias, args.average_blocks) == ("own_words", 5.0, True)
    assert args.mask == dataclasses.replace(
        MaskConfig(), contrastive="leading", background="words", fill_holes=0.01, surroundings="nearest_lead"
    )
    assert args.capture_block_name == "double_blocks.17"


def test_paper_settings_are_the_papers_method_and_name_every_default_beyond_it():
    paper = FreeFuseArgs.from_dict(PAPER_SETTINGS)
    assert paper.mask == MaskConfig() and (paper.text_loras, paper.attention_bias, paper.average_blocks) == (
        "all",
        0.0,
        False,
    )
    defaults = FreeFuseArgs().to_dict()
    assert {k for k, v in paper.to_dict().items() if v != defaults[k]} == set(PAPER_SETTINGS)


def test_mask_keys_not_given_keep_the_extensions_defaults():
    given = FreeFuseArgs.from_dict({"fill_holes": 0.02}).mask
    assert given == dataclasses.replace(
        MaskConfig(), contrastive="leading", background="words", fill_holes=0.02, surroundings="nearest_lead"
    )
    paper_mask = {"contrastive": "off", "background": "off", "fill_holes": 0, "surroundings": "vote"}
    assert FreeFuseArgs.from_dict(paper_mask).mask == MaskConfig()
    assert FreeFuseArgs().updated({"background": "threshold"}).mask.contrastive == "leading"


def test_dict_form_is_flat_with_the_mask_settings_after_the_own_ones():
    assert FreeFuseArgs.field_names() == OWN_KEYS + MASK_KEYS
    assert tuple(FreeFuseArgs().to_dict()) == OWN_KEYS + MASK_KEYS


def test_background_words_are_text_with_spaces_normalised():
    assert FreeFuseArgs().background_words == ""
    assert parse(background_words="  misty   forest ,\tsky ").background_words == "misty forest , sky"
    assert parse(background_words=None).background_words == ""
    assert parse(background_words=" , ,").background_words == ""  # no phrase in it: none given
    assert parse(background_words="forest").to_dict(only_changed=True) == {"background_words": "forest"}
    rejects(r"^background_words: expected text, got 3$", background_words=3)
    with pytest.raises(ValueError, match=r"^background_words: expected text, got \['forest'\]$"):
        FreeFuseArgs(background_words=["forest"])


def test_empty_dict_gives_the_defaults_and_defaults_give_an_empty_changed_dict():
    assert FreeFuseArgs.from_dict({}) == FreeFuseArgs()
    assert FreeFuseArgs().to_dict(only_changed=True) == {}


def test_the_api_example_of_issue_4():
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": TWO, "capture_step": 6})
    assert args.enabled and args.capture_step == 6
    assert args.subjects == (SubjectBinding("harry", "harry potter"), SubjectBinding("daiyu", "daiyu lin", 0.9))
    assert args.mask == FreeFuseArgs().mask and args.capture_block == 17


def changed_everywhere() -> FreeFuseArgs:
    return parse(
        enabled=True,
        subjects=TWO,
        capture_step=5,
        capture_block=18,
        pre_mask="off",
        restart=True,
        modulation="off",
        slic_image="preview",
        show_masks=True,
        hires_masks="extract",
        text_loras="all",
        attention_bias=2.0,
        average_steps=not FreeFuseArgs().average_steps,
        average_blocks=not FreeFuseArgs().average_blocks,
        background_words="misty forest, night sky",
        sink_filter=False,
        sink_top_fraction=0.02,
        edge_width=2,
        self_attention=False,
        self_attention_top_fraction=0.05,
        superpixel_vote=False,
        n_segments=300,
        compactness=20.0,
        slic_max_side=384,
        soft=True,
        cross_attention="image_queries",
        contrastive="strongest",
        background="threshold",
        background_threshold=0.8,
        fill_holes=0.02,
        surroundings="vote",
    )


@pytest.mark.parametrize("args", [FreeFuseArgs(), changed_everywhere(), parse(enabled=True, subjects=TWO[:1])])
@pytest.mark.parametrize("only_changed", [False, True])
def test_to_dict_round_trips_also_through_json(args, only_changed):
    as_dict = args.to_dict(only_changed=only_changed)
    assert FreeFuseArgs.from_dict(as_dict) == args
    assert FreeFuseArgs.from_dict(json.loads(json.dumps(as_dict))) == args


def test_only_changed_leaves_every_default_out_including_default_subject_weights():
    args = parse(enabled=True, subjects=TWO, capture_block="double_blocks.18", sink_filter=False)
    assert args.to_dict(only_changed=True) == {
        "enabled": True,
        "subjects": [
            {"lora": "harry", "words": "harry potter"},
            {"lora": "daiyu", "words": "daiyu lin", "weight": 0.9},
        ],
        "capture_block": 18,
        "sink_filter": False,
    }


def test_every_key_changes_when_everything_is_changed():
    assert tuple(changed_everywhere().to_dict(only_changed=True)) == OWN_KEYS + MASK_KEYS


def test_updated_changes_keys_from_xyz_style_strings():
    base = parse(enabled=True, subjects=TWO)
    assert base.updated({"capture_step": "8", "sink_filter": "false"}) == parse(
        enabled=True, subjects=TWO, capture_step=8, sink_filter=False
    )
    assert base.updated({}) == base
    with pytest.raises(ValueError, match="^capture_block:"):
        base.updated({"capture_block": "single_blocks.3"})


def test_the_model_is_frozen_and_hashable():
    args = changed_everywhere()
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.capture_step = 3
    assert hash(args) == hash(changed_everywhere())


# Unknown keys


def test_unknown_key_is_named_with_its_close_matches():
    message = rejects("^captur_step: unknown FreeFuse setting", captur_step=6)
    assert "'capture_step'" in message


def test_unknown_key_without_close_match_lists_the_known_keys():
    message = rejects("^colour: unknown FreeFuse setting", colour="red")
    assert all(repr(key) in message for key in OWN_KEYS + MASK_KEYS)


def test_non_text_key_is_rejected():
    with pytest.raises(ValueError, match="^3: unknown FreeFuse setting"):
        FreeFuseArgs.from_dict({3: True})


def test_nested_mask_dict_is_pointed_to_the_flat_keys():
    message = rejects("^mask: give the mask settings as flat keys", mask={"soft": True})
    assert "'sink_filter'" in message


def test_unknown_subject_key_is_named_with_its_row():
    rejects(
        r"^subjects\[1\]\.wieght: unknown subject key; did you mean 'weight'",
        subjects=[TWO[0], {**TWO[1], "wieght": 1}],
    )


@pytest.mark.parametrize("value", [None, [], "enabled=true", 3, [("enabled", True)]])
def test_non_dict_input_is_rejected(value):
    with pytest.raises(ValueError, match="^FreeFuse args: expected a dict"):
        FreeFuseArgs.from_dict(value)


# Booleans


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", True), (" False ", False)])
def test_booleans_are_bools_or_the_words_true_and_false(value, expected):
    assert parse(show_masks=value).show_masks is expected
    assert parse(soft=value).mask.soft is expected


@pytest.mark.parametrize("value", [1, 0, 1.5, 0.0, "1", "yes", "on", "", None, [True]])
@pytest.mark.parametrize("key", ["enabled", "restart", "show_masks", "sink_filter", "self_attention", "soft"])
def test_anything_else_is_not_a_boolean(key, value):
    rejects(f"^{key}: expected true or false", **{key: value})


# Integers and numbers


@pytest.mark.parametrize(("value", "expected"), [(6, 6), (6.0, 6), ("6", 6), (" +6 ", 6), (None, None), ("Auto", None)])
def test_capture_step_is_an_integer_or_automatic(value, expected):
    assert parse(capture_step=value).capture_step == expected


@pytest.mark.parametrize(
    "value", [0, -1, 6.5, "6.5", "six", "", True, math.nan, math.inf, "1e3", "\u0666", "1_0", 10**400, 10_001]
)
def test_bad_capture_steps_name_the_field(value):
    rejects("^capture_step: ", capture_step=value)


@pytest.mark.parametrize(
    ("value", "expected"), [(17, 17), ("17", 17), ("double_blocks.3", 3), (" double_blocks.0 ", 0)]
)
def test_capture_block_is_an_index_or_its_block_name(value, expected):
    args = parse(capture_block=value)
    assert args.capture_block == expected and args.capture_block_name == f"double_blocks.{expected}"


@pytest.mark.parametrize(
    "value", [-1, 1.5, "single_blocks.3", "double_blocks.", "double_blocks.-1", "blocks.17", None, False, 1000]
)
def test_bad_capture_blocks_name_the_field(value):
    rejects("^capture_block: ", capture_block=value)


@pytest.mark.parametrize(("value", "expected"), [(0.05, 0.05), ("0.05", 0.05), ("5e-2", 0.05), (1, 1.0), (".5", 0.5)])
def test_numbers_may_be_decimal_text(value, expected):
    assert parse(sink_top_fraction=value).mask.sink_top_fraction == expected


@pytest.mark.parametrize("value", ["nan", "inf", math.nan, -math.inf, 10**400, "1e999", "0x10", "1,5", True, None, 0.0])
def test_bad_numbers_name_the_field(value):
    rejects("^compactness: ", compactness=value)
    rejects("^sink_top_fraction: ", sink_top_fraction=value)


def test_numeric_types_of_other_libraries_are_numbers():
    assert parse(compactness=Fraction(25, 2)).mask.compactness == 12.5


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("auto", None), (400, 400), ("400", 400)])
def test_superpixel_count_is_an_integer_or_automatic(value, expected):
    assert parse(n_segments=value).mask.n_segments == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n_segments", 0),
        ("edge_width", -1),
        ("slic_max_side", 8),
        ("fill_holes", 0.5),
        ("fill_holes", -0.1),
        ("background_threshold", 0),
        ("background_threshold", 1000),
    ],
)
def test_mask_config_rules_apply_and_name_the_field(key, value):
    rejects(f"^{key}: ", **{key: value})


def test_options_beyond_the_paper_parse_and_default_to_the_extensions_choices():
    args = parse(contrastive="Authors", background=" THRESHOLD", background_threshold="0.8", fill_holes=0.02)
    assert (args.mask.contrastive, args.mask.background) == ("authors", "threshold")
    assert (args.mask.background_threshold, args.mask.fill_holes) == (0.8, 0.02)
    defaults = FreeFuseArgs().mask
    assert (defaults.contrastive, defaults.background, defaults.fill_holes) == ("leading", "words", 0.01)


def test_background_from_tokens_is_offered_and_unknown_modes_are_named():
    """Background "tokens" (the end-of-text token's attention, named by the host) parses from the dict form and
    built directly; a mode nobody offers is refused with the list of those that are."""
    assert parse(background=" Tokens").mask.background == "tokens"
    assert FreeFuseArgs(mask=MaskConfig(background="tokens")).mask.background == "tokens"
    message = rejects("^background: expected one of ", background="phrase")
    assert "'off', 'threshold', 'tokens'" in message


# Choices


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("pre_mask", PRE_MASK_CHOICES),
        ("modulation", MODULATION_CHOICES),
        ("slic_image", SLIC_IMAGE_CHOICES),
        ("hires_masks", HIRES_MASKS_CHOICES),
    ],
)
def test_choices_accept_their_words_in_any_case_and_nothing_else(key, choices):
    for choice in choices:
        assert getattr(parse(**{key: choice.upper() + " "}), key) == choice
    message = rejects(f"^{key}: expected one of ", **{key: "bogus"})
    assert all(repr(choice) in message for choice in choices)
    rejects(f"^{key}: expected one of ", **{key: 1})


def test_choice_values_are_the_designed_ones():
    assert PRE_MASK_CHOICES == ("joint", "off")
    assert MODULATION_CHOICES == ("per_token", "global", "off")
    assert SLIC_IMAGE_CHOICES == ("vae", "preview")
    assert HIRES_MASKS_CHOICES == ("reuse", "extract")


# Subjects


def test_subject_rows_with_both_fields_empty_are_dropped():
    rows = [{"lora": "", "words": ""}, TWO[0], {"lora": "  ", "words": None, "weight": 0.5}, {}, TWO[1]]
    assert parse(subjects=rows).subjects == parse(subjects=TWO).subjects


def test_subjects_may_be_a_tuple_or_bindings():
    bindings = (SubjectBinding("harry", "harry potter"),)
    assert parse(subjects=bindings).subjects == bindings
    assert parse(subjects=tuple(TWO)).subjects == parse(subjects=TWO).subjects


def test_subject_text_is_stripped_and_its_phrases_split():
    (row,) = parse(subjects=[{"lora": " harry ", "words": " harry potter ,  the boy who lived "}]).subjects
    assert row.lora == "harry" and row.words == "harry potter ,  the boy who lived"
    assert row.phrases == ("harry potter", "the boy who lived")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"lora": "harry"}, r"^subjects\[2\]\.words: "),
        ({"lora": "harry", "words": "  "}, r"^subjects\[2\]\.words: "),
        ({"lora": "harry", "words": " , ,"}, r"^subjects\[2\]\.words: expected at least one activation phrase"),
        ({"words": "harry potter"}, r"^subjects\[2\]\.lora: "),
        ({"lora": "harry", "words": 3}, r"^subjects\[2\]\.words: expected text"),
        ({"lora": ["harry"], "words": "harry"}, r"^subjects\[2\]\.lora: expected text"),
        ({"lora": "har:ry", "words": "harry"}, r"^subjects\[2\]\.lora: <lora:NAME:...> names cannot hold"),
        ({"lora": "harry>", "words": "harry"}, r"^subjects\[2\]\.lora: "),
        ({"lora": "har\nry", "words": "harry"}, r"^subjects\[2\]\.lora: "),
        ("harry", r"^subjects\[2\]: expected a dict"),
        (None, r"^subjects\[2\]: expected a dict"),
    ],
)
def test_bad_subject_rows_name_the_row_as_the_user_gave_it(row, match):
    rejects(match, subjects=[TWO[0], {"lora": "", "words": ""}, row])


@pytest.mark.parametrize(("value", "expected"), [(-10, -10.0), (10, 10.0), ("0.9", 0.9), (0, 0.0), (2.5, 2.5)])
def test_subject_weight_is_a_number_in_range(value, expected):
    (row,) = parse(subjects=[{"lora": "harry", "words": "harry", "weight": value}]).subjects
    assert row.weight == expected and type(row.weight) is float


@pytest.mark.parametrize("value", [10.5, -10.01, math.nan, math.inf, "nan", True, None, "heavy", 10**400])
def test_bad_subject_weights_name_the_row(value):
    rejects(r"^subjects\[1\]\.weight: ", subjects=[TWO[0], {"lora": "daiyu", "words": "daiyu", "weight": value}])


def test_a_lora_bound_twice_is_kept_for_the_run_to_warn_about():
    """Not an argument error (the UI lets a user pick one LoRA in two rows): the run names it and keeps the first."""
    rows = [TWO[0], {"lora": "", "words": ""}, {"lora": "harry", "words": "the boy who lived"}]
    assert [s.words for s in parse(subjects=rows).subjects] == ["harry potter", "the boy who lived"]


@pytest.mark.parametrize("value", ["harry", {"lora": "harry", "words": "harry"}, 3, None])
def test_subjects_must_be_a_list(value):
    rejects("^subjects: expected a list", subjects=value)


def test_enabled_needs_a_subject():
    rejects("^subjects: FreeFuse is enabled but no subject", enabled=True)
    rejects("^subjects: FreeFuse is enabled but no subject", enabled=True, subjects=[{"lora": "", "words": ""}])
    assert parse(enabled=False, subjects=[]) == FreeFuseArgs()


# Direct construction validates too


def test_direct_construction_normalises_like_the_dict_form():
    row = SubjectBinding(" harry ", " harry potter ", 2)
    assert row == SubjectBinding("harry", "harry potter", 2.0) and type(row.weight) is float
    assert FreeFuseArgs(subjects=[row]).subjects == (row,)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"capture_step": 0}, "^capture_step: "),
        ({"capture_step": "6"}, "^capture_step: "),
        ({"capture_block": -1}, "^capture_block: "),
        ({"enabled": 1}, "^enabled: "),
        ({"pre_mask": "JOINT"}, "^pre_mask: "),
        ({"subjects": ({"lora": "a", "words": "b"},)}, "^subjects: "),
        ({"mask": {"soft": True}}, "^mask: "),
    ],
)
def test_direct_construction_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        FreeFuseArgs(**changes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lora": "", "words": "x"}, "^lora: "),
        ({"lora": "x", "words": None}, "^words: "),
        ({"lora": "x", "words": "x", "weight": "1"}, "^weight: "),
        ({"lora": "x", "words": "x", "weight": 10**400}, "^weight: "),
    ],
)
def test_subject_binding_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubjectBinding(**kwargs)


# Capture step


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 28, 50])
def test_automatic_capture_step_follows_the_schedule_rule(steps):
    args = FreeFuseArgs()
    assert args.resolved_capture_step(steps) == default_capture_step(steps)
    assert args.capture_step_note(steps) == ("" if steps > 1 else "a 1-step run leaves no step to use the masks")


@pytest.mark.parametrize(("given", "steps"), [(6, 28), (1, 2), (19, 20), (1, 20)])
def test_a_given_capture_step_inside_the_run_is_kept(given, steps):
    args = FreeFuseArgs(capture_step=given)
    assert args.resolved_capture_step(steps) == given and args.capture_step_note(steps) == ""


def test_a_capture_step_beyond_the_run_is_clamped_and_says_so():
    args = FreeFuseArgs(capture_step=30)
    assert args.resolved_capture_step(20) == 19
    assert args.capture_step_note(20) == "capture step 30 is beyond the 20 steps run: using 19"


def test_the_last_step_leaves_none_for_the_masks_so_the_one_before_is_used():
    args = FreeFuseArgs(capture_step=20)
    assert args.resolved_capture_step(20) == 19
    assert args.capture_step_note(20) == (
        "capture step 20 is the last of the 20 steps run, leaving none for the masks: using 19"
    )


def test_a_one_step_run_captures_at_step_one_and_says_nothing_is_masked():
    args = FreeFuseArgs(capture_step=6)
    assert args.resolved_capture_step(1) == 1
    assert args.capture_step_note(1) == (
        "capture step 6 is beyond the 1 step run: using 1; a 1-step run leaves no step to use the masks"
    )


@pytest.mark.parametrize("steps", [0, -1, 2.0, True, "20", None])
def test_bad_step_counts_name_steps(steps):
    with pytest.raises(ValueError, match="^steps: "):
        FreeFuseArgs().resolved_capture_step(steps)


@given(st.one_of(st.none(), st.integers(1, 10_000)), st.integers(1, 500))
def test_resolved_capture_step_is_always_inside_the_run_with_a_masked_step_after_it(capture_step, steps):
    step = FreeFuseArgs(capture_step=capture_step).resolved_capture_step(steps)
    assert 1 <= step <= max(1, steps - 1)


# UI labels


def test_every_key_of_the_dict_form_has_a_label_and_help_once():
    assert tuple(entry.key for entry in FIELD_HELP) == FreeFuseArgs.field_names()
    assert tuple(entry.key for entry in SUBJECT_FIELD_HELP) == tuple(f.name for f in dataclasses.fields(SubjectBinding))
    for entry in FIELD_HELP + SUBJECT_FIELD_HELP:
        assert entry.label.strip() and entry.help.strip(), entry.key
    labels = [entry.label for entry in FIELD_HELP]
    assert len(set(labels)) == len(labels)


def test_choice_fields_show_their_choices():
    assert help_for("pre_mask").choices == PRE_MASK_CHOICES
    assert help_for("modulation").choices == MODULATION_CHOICES
    assert help_for("slic_image").choices == SLIC_IMAGE_CHOICES
    assert help_for("hires_masks").choices == HIRES_MASKS_CHOICES
    assert help_for("enabled").choices == ()
    with pytest.raises(KeyError):
        help_for("mask")


def test_every_choice_is_shown_with_a_plain_label_and_stored_as_its_value():
    for entry in FIELD_HELP:
        assert len(entry.choice_labels) == len(entry.choices), entry.key
        if entry.choices:
            assert [value for _, value in entry.shown_choices()] == list(entry.choices)
            assert len(set(entry.choice_labels)) == len(entry.choice_labels), entry.key
            # the default's label says so, and no label is a stored code name such as per_token
            default = FreeFuseArgs().to_dict()[entry.key]
            assert entry.choice_labels[entry.choices.index(default)].endswith("(default)"), entry.key
            assert not set(entry.choice_labels) & set(entry.choices), entry.key
    assert help_for("modulation").shown_choices()[0] == ("Inside each mask (default)", "per_token")


def _screen_text(entry) -> list[str]:
    return [entry.label, entry.help, *entry.choice_labels]


def test_the_accordion_shows_no_paper_jargon_or_code_names():
    code_names = {c for entry in FIELD_HELP for c in entry.choices if "_" in c}
    for entry in (*FIELD_HELP, *SUBJECT_FIELD_HELP, *BUTTON_HELP):
        for text in _screen_text(entry):
            for word in ("Eq.", "paper", "authors", "double_blocks", "SLIC", *code_names):
                assert word not in text, (entry.key, word, text)


def test_every_setting_is_laid_out_once_subject_rows_and_show_masks_first():
    laid_out = TOP_KEYS + tuple(key for section in SECTIONS for key in section.setting_keys())
    settings = tuple(key for key in FreeFuseArgs.field_names() if key not in ("enabled", "subjects"))
    assert sorted(laid_out) == sorted(settings) and len(set(laid_out)) == len(laid_out)
    assert TOP_KEYS == ("show_masks",)
    assert [section.title for section in SECTIONS] == [
        "When the masks are made",
        "How the subject LoRAs act",
        "How the masks are found",
    ]
    recipe = SECTIONS[-1]
    assert recipe.rows == () and len(recipe.parts) == 4  # the mask recipe: groups nested in one closed section
    assert all(len(row) <= 4 for section in SECTIONS for row in section.rows)


# Isolation


def test_the_model_imports_no_host_module():
    probe = """
import importlib.abc, sys
FORBIDDEN = ("modules", "backend", "gradio", "ldm_patched", "launch", "lib_freefuse.forge")
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError("lib_freefuse.args imported " + name)
sys.meta_path.insert(0, Refuse())
import lib_freefuse.args
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# Whatever comes in, only ValueError goes out


class BrokenRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**64, 0, 1, -1, 17, 10_000, 10_001]),
    st.sampled_from([400, 5000]).map(lambda digits: -(10**digits)),  # 5000 digits: beyond str(int)'s limit
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["true", "FALSE", "auto", "6", "6.0", "double_blocks.17", "nan", "1e999", "joint", "vae", "off"]),
    st.binary(max_size=8),
    st.builds(BrokenRepr),
    st.builds(Fraction, st.integers(), st.integers(1, 10)),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(
            st.one_of(st.text(max_size=10), st.sampled_from(["lora", "words", "weight"])), inner, max_size=4
        ),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=12,
)
ROW = st.one_of(
    JUNK,
    st.fixed_dictionaries(
        {}, optional={"lora": JUNK | st.text(max_size=12), "words": JUNK | st.text(max_size=12), "weight": JUNK}
    ),
)
KEYS = st.one_of(st.sampled_from(FreeFuseArgs.field_names()), st.text(max_size=12), st.integers(), st.just("mask"))
VALUES = st.one_of(JUNK, st.lists(ROW, max_size=5))


def check_only_value_errors(values) -> None:
    try:
        args = FreeFuseArgs.from_dict(values)
    except ValueError as error:
        message = str(error)
        assert message and len(message) < 2000
        if isinstance(values, dict):
            unknown = [key for key in values if key not in FreeFuseArgs.field_names()]
            if not unknown:
                assert message.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0] in FreeFuseArgs.field_names()
            elif isinstance(unknown[0], str) and unknown[0].isidentifier():
                assert message.startswith(f"{unknown[0]}: "), message
            else:
                assert "unknown FreeFuse setting" in message, message
        return
    assert FreeFuseArgs.from_dict(args.to_dict()) == args
    assert FreeFuseArgs.from_dict(json.loads(json.dumps(args.to_dict(only_changed=True)))) == args


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_dict_gives_arguments_or_a_value_error(values):
    check_only_value_errors(values)


@settings(max_examples=100, deadline=None)
@given(JUNK)
def test_any_value_gives_arguments_or_a_value_error(values):
    check_only_value_errors(values)


SUBJECT_ROWS = st.lists(
    st.fixed_dictionaries(
        {"lora": st.text(st.characters(blacklist_characters=":<>", blacklist_categories=("Cc", "Cs")), max_size=12)},
        optional={"words": st.text(max_size=20), "weight": st.floats(-10, 10) | st.integers(-10, 10)},
    ),
    max_size=4,
)
PLAUSIBLE = st.fixed_dictionaries(
    {},
    optional={
        "enabled": st.booleans() | st.sampled_from(["true", "False"]),
        "subjects": SUBJECT_ROWS,
        "capture_step": st.none() | st.integers(1, 60) | st.integers(1, 60).map(str),
        "capture_block": st.integers(0, 18) | st.integers(0, 18).map(lambda i: f"double_blocks.{i}"),
        "pre_mask": st.sampled_from(PRE_MASK_CHOICES),
        "restart": st.booleans(),
        "modulation": st.sampled_from(MODULATION_CHOICES),
        "slic_image": st.sampled_from(SLIC_IMAGE_CHOICES),
        "show_masks": st.booleans(),
        "hires_masks": st.sampled_from(HIRES_MASKS_CHOICES),
        "text_loras": st.sampled_from(["all", "own_words", "none", " NONE"]),
        "sink_filter": st.booleans(),
        "sink_top_fraction": st.floats(0.001, 1.0),
        "edge_width": st.integers(0, 4),
        "n_segments": st.none() | st.integers(1, 2000),
        "compactness": st.floats(0.1, 100.0) | st.floats(0.1, 100.0).map(repr),
        "soft": st.booleans(),
        "cross_attention": st.sampled_from(["text_queries", "IMAGE_QUERIES ", "image_queries"]),
    },
)


@settings(max_examples=300, deadline=None)
@given(PLAUSIBLE)
def test_plausible_dicts_round_trip_or_name_a_subject_problem(values):
    try:
        args = FreeFuseArgs.from_dict(values)
    except ValueError as error:
        assert str(error).startswith("subjects"), error  # blank words, duplicates, or enabled with no subject
        return
    assert FreeFuseArgs.from_dict(args.to_dict()) == args
    assert FreeFuseArgs.from_dict(args.to_dict(only_changed=True)) == args
    assert FreeFuseArgs.from_dict(json.loads(json.dumps(args.to_dict()))) == args


@pytest.mark.parametrize(
    ("steps", "denoising", "fix_steps", "run"),
    [(20, 0.75, False, 16), (20, 1.0, False, 20), (20, 0.0, False, 1), (20, 0.5, True, 20), (7, 0.3, False, 3)],
)
def test_img2img_steps_count_as_forges_setup_img2img_steps(steps, denoising, fix_steps, run):
    assert img2img_steps(steps, denoising, fix_steps) == run


def test_img2img_steps_refuse_junk():
    with pytest.raises(ValueError, match="^denoising"):
        img2img_steps(20, 1.5)
    with pytest.raises(ValueError, match="^steps"):
        img2img_steps(0, 0.5)


def test_the_weight_help_says_when_the_weight_acts():
    assert "only when the prompt has no <lora:NAME:...> tag" in SUBJECT_FIELD_HELP[2].help


def test_the_help_above_the_rows_names_every_column_and_button():
    lines = subject_help_lines()
    assert lines[0] == help_for("subjects").help
    assert [line.split(":")[0] for line in lines[1:]] == [e.label for e in (*SUBJECT_FIELD_HELP, *BUTTON_HELP)]
    assert any(line.startswith("Add subject: show one more row") for line in lines)


# The attention bias


@pytest.mark.parametrize("value, expected", [(0, 0.0), ("5", 5.0), (2.5, 2.5), (50, 50.0)])
def test_attention_bias_is_a_strength_from_zero(value, expected):
    assert parse(attention_bias=value).attention_bias == expected


@pytest.mark.parametrize("value", [-1, 50.5, "strong", float("nan"), True])
def test_attention_bias_out_of_range_is_named(value):
    rejects("^attention_bias: expected", attention_bias=value)
