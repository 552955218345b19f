"""The script's positional values and the API's dict form both give the same FreeFuseArgs."""

from __future__ import annotations

import pytest

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.script_values import SETTING_KEYS, args_from_values, value_count, values_from_args

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
