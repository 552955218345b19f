"""Infotext: FreeFuse's arguments survive being written into the generation parameters and pasted back."""

from __future__ import annotations

import json
import re

import pytest

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.infotext import SUBJECTS_KEY, VERSION_KEY, args_from_params, infotext_params, setting_key

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
    assert json.loads(params[SUBJECTS_KEY])[1] == {"lora": "daiyu", "words": "林黛玉, daiyu lin", "weight": 0.9}
    assert VERSION_KEY in params


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
    ],
)
def test_a_damaged_infotext_names_the_field(params, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        args_from_params(params)
