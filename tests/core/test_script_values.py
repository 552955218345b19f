"""The script's positional values and the API's dict form both give the same FreeFuseArgs."""

from __future__ import annotations

import pytest

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.script_values import (
    SETTING_KEYS,
    args_from_values,
    incomplete_rows,
    value_count,
    values_from_args,
)

pytestmark = pytest.mark.core


def test_no_values_give_defaults():
    assert args_from_values([]) == FreeFuseArgs()


def test_round_trip_through_positional_values():
    args = FreeFuseArgs.from_dict(
        {
            "enabled": True,
            "subjects": [
                {"lora": "harry", "words": "harry potter"},
                {"lora": "daiyu", "words": "daiyu lin", "weight": 0.9},
            ],
            "capture_step": 6,
            "modulation": "off",
            "n_segments": 300,
        }
    )
    values = values_from_args(args)
    assert len(values) == value_count()
    assert args_from_values(values) == args


def test_zero_means_automatic_in_number_boxes():
    values = values_from_args(FreeFuseArgs())
    values[1 + 12 + SETTING_KEYS.index("capture_step")] = 0
    assert args_from_values(values).capture_step is None


def test_missing_trailing_values_keep_defaults():
    args = args_from_values([True, "harry", "harry potter", 1.0, "daiyu", "daiyu lin", 1.0])
    assert [s.lora for s in args.subjects] == ["harry", "daiyu"]
    assert args.capture_block == 17


def test_one_dict_is_the_api_form():
    args = args_from_values([{"enabled": True, "subjects": [{"lora": "a", "words": "x"}, {"lora": "b", "words": "y"}]}])
    assert args.enabled and len(args.subjects) == 2


def test_a_dict_padded_with_ui_defaults_by_the_api():
    padded = [{"enabled": True, "subjects": [{"lora": "a", "words": "x"}]}, *values_from_args(FreeFuseArgs())[1:]]
    assert args_from_values(padded).subjects[0].lora == "a"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([False] * 100, "at most"),
        ([{"capture_stepp": 3}], "capture_stepp"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        args_from_values(values)


def test_a_half_filled_row_is_left_out_and_named_by_its_number_on_screen():
    values = [True, "a", "cat", 1.0, "b", "dog", 1.0, "c_new", "", 1.0, "", "unicorn", 1.0]
    args = args_from_values(values)
    assert args.enabled and [s.lora for s in args.subjects] == ["a", "b"]
    assert incomplete_rows(values) == [
        "row 3 (c_new): no activation words: it acts as an ordinary LoRA",
        "row 4 ('unicorn'): no LoRA: its words bind nothing",
    ]


def test_words_of_commas_only_are_no_words():
    assert incomplete_rows([True, "a", " , ", 1.0]) == ["row 1 (a): no activation words: it acts as an ordinary LoRA"]


def test_only_half_filled_rows_turn_freefuse_off_for_the_job_instead_of_failing_it():
    values = [True, "a", "", 1.0, "", "", 1.0]
    assert args_from_values(values) == FreeFuseArgs()
    assert incomplete_rows(values) == ["row 1 (a): no activation words: it acts as an ordinary LoRA"]


def test_half_filled_rows_say_nothing_while_freefuse_is_off_or_in_the_dict_form():
    assert incomplete_rows([False, "a", "", 1.0]) == []
    assert incomplete_rows([{"enabled": True, "subjects": [{"lora": "a", "words": "x"}]}]) == []


def test_the_api_dict_form_still_refuses_a_row_without_words():
    with pytest.raises(ValueError, match=r"^subjects\[1\]\.words: expected non-empty text"):
        args_from_values([{"enabled": True, "subjects": [{"lora": "a", "words": "x"}, {"lora": "b", "words": ""}]}])


def test_a_wrong_filled_row_is_named_by_its_number_on_screen():
    with pytest.raises(ValueError, match=r"^row 2 lora: <lora:NAME:\.\.\.> names cannot hold"):
        args_from_values([True, "a", "cat", 1.0, "b:c", "dog", 1.0])
