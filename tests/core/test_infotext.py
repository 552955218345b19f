"""Infotext: FreeFuse's arguments survive being written into the generation parameters and pasted back."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

import lib_freefuse
from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.forge.xyz import clear_previous_cell
from lib_freefuse.infotext import (
    BINDINGS_KEY,
    SUBJECTS_KEY,
    VERSION_KEY,
    args_from_params,
    coverage_from_text,
    coverage_text,
    infotext_params,
    setting_key,
)

pytestmark = pytest.mark.core


def forge_roundtrip(params: dict[str, object]) -> dict[str, str]:
    """What Forge does to extra_generation_params: `key: quote(value)` joined by ", ", then parsed back into
    strings (modules/infotext_utils.quote and parse_generation_parameters, re-stated for this test)."""

    def quote(text: str) -> str:
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text

    line = ", ".join(f"{k}: {quote(str(v))}" for k, v in params.items() if v is not None)
    pattern = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    parsed = {}
    for key, value in pattern.findall(line):
        parsed[key.strip()] = json.loads(value) if value.startswith('"') else value
    return parsed


ARGS = FreeFuseArgs.from_dict(
    {
        "enabled": True,
        "subjects": [
            {"lora": "harry", "words": "harry potter, the boy who lived"},
            {"lora": "daiyu", "words": "林黛玉, daiyu lin", "weight": 0.9},
        ],
        "capture_step": 6,
        "capture_block": 18,
        "sink_filter": False,
        "modulation": "off",
        "sink_top_fraction": 0.02,
        "n_segments": 300,
    }
)


def test_only_changed_settings_and_the_bindings_are_written():
    params = infotext_params(ARGS)
    assert params[setting_key("capture_step")] == 6 and params[setting_key("sink_filter")] is False
    assert setting_key("restart") not in params and setting_key("compactness") not in params  # defaults
    assert params[BINDINGS_KEY] == "harry: harry potter, the boy who lived; daiyu (0.9): 林黛玉, daiyu lin"
    assert SUBJECTS_KEY not in params and VERSION_KEY in params


def test_the_bindings_read_as_one_line_in_png_info():
    args = FreeFuseArgs.from_dict(
        {"enabled": True, "subjects": [{"lora": "a", "words": "zorbo the knight"}, {"lora": "b", "words": "quill"}]}
    )
    line = ", ".join(f"{k}: {v}" for k, v in forge_roundtrip(infotext_params(args)).items())
    assert line.startswith("FreeFuse: a: zorbo the knight; b: quill, FreeFuse version: ")


@pytest.mark.parametrize(
    "subjects",
    [
        [{"lora": "x (2)", "words": "a name that looks weighted"}, {"lora": "y", "words": "y"}],
        [{"lora": "b", "words": "quill (the wizard)", "weight": -1.25}],
        [{"lora": "semi", "words": "a; b"}],  # a ';' in the words: the JSON form under the old key
    ],
)
def test_awkward_bindings_round_trip(subjects):
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects})
    assert args_from_params(forge_roundtrip(infotext_params(args))) == args


def test_old_infotexts_with_the_json_subjects_still_paste():
    old = {SUBJECTS_KEY: '[{"lora": "a", "words": "cat"}, {"lora": "b", "words": "dog", "weight": 0.8}]'}
    args = args_from_params(forge_roundtrip(old))
    assert [(s.lora, s.words, s.weight) for s in args.subjects] == [("a", "cat", 1.0), ("b", "dog", 0.8)]


@pytest.mark.parametrize(
    ("version", "given", "pasted"),
    [
        ("0.1.0", None, 512),  # written when 512 was the default, so it was left out: that image used 512
        (None, None, 512),  # no version: as old as it gets
        ("0.1.0", "384", 384),  # a value written is a value kept
        (lib_freefuse.__version__, None, FreeFuseArgs().mask.slic_max_side),
    ],
)
def test_an_old_infotext_keeps_the_defaults_it_was_made_with(version, given, pasted):
    params = {BINDINGS_KEY: "a: cat", VERSION_KEY: version, setting_key("slic_max_side"): given}
    args = args_from_params(forge_roundtrip({k: v for k, v in params.items() if v is not None}))
    assert args.mask.slic_max_side == pasted
    assert FreeFuseArgs().mask.slic_max_side != 512  # else this test proves nothing


@pytest.mark.parametrize(
    ("version", "written", "text_loras", "bias"),
    [
        ("0.4.0", {}, "all", 0.0),  # made before own words and b = 5 were the defaults: pasted back as made
        ("0.4.0", {"text_loras": "none", "attention_bias": "2"}, "none", 2.0),
        ("0.5.0", {}, "own_words", 5.0),
        ("0.5.0", {"text_loras": "all", "attention_bias": "0"}, "all", 0.0),  # the paper's values, written out
    ],
)
def test_infotexts_before_0_5_paste_back_the_papers_text_loras_and_no_bias(version, written, text_loras, bias):
    params = {BINDINGS_KEY: "a: cat", VERSION_KEY: version, **{setting_key(k): v for k, v in written.items()}}
    args = args_from_params(forge_roundtrip(params))
    assert (args.text_loras, args.attention_bias) == (text_loras, bias)


@pytest.mark.parametrize(
    ("version", "written", "background", "fill_holes"),
    [
        ("0.6.0", {}, "off", 0.0),  # made before the background words and hole filling were the defaults
        ("0.6.0", {"background_words": "forest"}, "off", 0.0),  # its words were left out then: so they are again
        ("0.6.0", {"background": "tokens", "fill_holes": "0.02"}, "tokens", 0.02),
        ("0.7.0", {}, "words", 0.01),
        ("0.7.0", {"background": "off", "fill_holes": "0.0"}, "off", 0.0),  # the paper's values, written out
    ],
)
def test_infotexts_before_0_7_paste_back_no_background_words_class_and_no_hole_filling(
    version, written, background, fill_holes
):
    params = {BINDINGS_KEY: "a: cat", VERSION_KEY: version, **{setting_key(k): v for k, v in written.items()}}
    args = args_from_params(forge_roundtrip(params))
    assert (args.mask.background, args.mask.fill_holes) == (background, fill_holes)
    assert args.background_words == written.get("background_words", "")


@pytest.mark.parametrize(
    ("version", "written", "surroundings"),
    [
        ("0.7.0", {}, "vote"),  # made before the nearest clear subject was the default: pasted back as made
        ("0.7.0", {"surroundings": "nearest_lead"}, "nearest_lead"),
        ("0.8.0", {}, "nearest_lead"),
        ("0.8.0", {"surroundings": "vote"}, "vote"),  # the paper's value, written out
    ],
)
def test_infotexts_before_0_8_paste_back_the_votes_surroundings(version, written, surroundings):
    params = {BINDINGS_KEY: "a: cat", VERSION_KEY: version, **{setting_key(k): v for k, v in written.items()}}
    assert args_from_params(forge_roundtrip(params)).mask.surroundings == surroundings


def test_the_papers_values_are_written_now_that_they_are_not_the_defaults():
    paper = FreeFuseArgs.from_dict({"enabled": True, "subjects": [{"lora": "a", "words": "cat"}], "text_loras": "all"})
    params = infotext_params(FreeFuseArgs.from_dict({**paper.to_dict(), "attention_bias": 0}))
    assert params[setting_key("text_loras")] == "all" and params[setting_key("attention_bias")] == 0.0


def test_an_xyz_cell_drops_the_bindings_of_the_cell_before():
    cell = SimpleNamespace(extra_generation_params={"Steps": 6, **infotext_params(ARGS)})
    clear_previous_cell(cell)
    assert cell.extra_generation_params == {"Steps": 6}


@pytest.mark.parametrize(
    "args", [ARGS, FreeFuseArgs.from_dict({"enabled": True, "subjects": [{"lora": "a", "words": "x"}]})]
)
def test_round_trip_through_forges_infotext_format(args):
    assert args_from_params(forge_roundtrip(infotext_params(args))) == args


def test_an_infotext_without_freefuse_gives_none():
    assert args_from_params({"Steps": "20", "Sampler": "Euler"}) is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({SUBJECTS_KEY: "[{"}, "subjects"),
        ({SUBJECTS_KEY: '[{"lora": "a", "words": "x"}]', setting_key("capture_step"): "six"}, "capture_step"),
        ({SUBJECTS_KEY: '[{"lora": "a"}]'}, "subjects"),
        ({BINDINGS_KEY: "a cat"}, "subjects"),
        ({BINDINGS_KEY: "a (heavy): cat"}, "subjects"),
    ],
)
def test_a_damaged_infotext_names_the_field(params, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        args_from_params(params)


def test_coverage_reads_as_percents_per_lora_and_comes_back():
    """The mask coverage entry is readable in PNG Info ("a: 46%; b: 53.5%"), names with spaces and a batch's images
    included, and reads back to the same numbers (rounded to 0.1); older JSON entries are still read."""
    coverage = {"zorbo v2": [46.04, 12.0], "quill": [53.46, 88.0]}
    text = coverage_text(coverage)
    assert text == "zorbo v2: 46%, 12%; quill: 53.5%, 88%"
    assert coverage_from_text(text) == {"zorbo v2": [46.0, 12.0], "quill": [53.5, 88.0]}
    assert coverage_from_text('{"a": [46.0], "b": [54.0]}') == {"a": [46.0], "b": [54.0]}
