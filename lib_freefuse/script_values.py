"""The script's positional values (the order of `ui()`'s components) <-> FreeFuseArgs.

The API sends either those values in order, or ONE dict of the dict form as the only value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .args import FreeFuseArgs

SUBJECT_ROWS = 4
SUBJECT_KEYS = ("lora", "words", "weight")
SETTING_KEYS = tuple(k for k in FreeFuseArgs.field_names() if k not in ("enabled", "subjects"))
# UI widgets cannot hold None: 0 stands for "automatic" in these number boxes.
AUTO_ZERO = ("capture_step", "n_segments")


def value_count() -> int:
    return 1 + SUBJECT_ROWS * len(SUBJECT_KEYS) + len(SETTING_KEYS)


def args_from_values(values: Sequence[Any]) -> FreeFuseArgs:
    """FreeFuseArgs from the script's values: positional (missing trailing values keep defaults) or one dict first
    (the API pads the values it was not sent with the UI's defaults: those are ignored)."""
    if len(values) >= 1 and isinstance(values[0], Mapping):
        return FreeFuseArgs.from_dict(values[0])
    if len(values) > value_count():
        raise ValueError(f"FreeFuse args: expected at most {value_count()} values, got {len(values)}")
    if not values:
        return FreeFuseArgs()
    given: dict[str, Any] = {"enabled": values[0]}
    rows = list(values[1 : 1 + SUBJECT_ROWS * len(SUBJECT_KEYS)])
    subjects = []
    for start in range(0, len(rows), len(SUBJECT_KEYS)):
        row = dict(zip(SUBJECT_KEYS, rows[start : start + len(SUBJECT_KEYS)], strict=False))
        if any(isinstance(v, str) and v.strip() for k, v in row.items() if k != "weight"):
            subjects.append(row)
    given["subjects"] = subjects
    settings = values[1 + SUBJECT_ROWS * len(SUBJECT_KEYS) :]
    for key, value in zip(SETTING_KEYS, settings, strict=False):
        given[key] = None if key in AUTO_ZERO and value in (0, 0.0) else value
    return FreeFuseArgs.from_dict(given)


def values_from_args(args: FreeFuseArgs) -> list[Any]:
    """The positional values of `args` (what the UI shows for them)."""
    flat = args.to_dict()
    rows: list[Any] = []
    for index in range(SUBJECT_ROWS):
        subject = flat["subjects"][index] if index < len(flat["subjects"]) else {"lora": "", "words": "", "weight": 1.0}
        rows.extend(subject[key] for key in SUBJECT_KEYS)
    settings = [0 if key in AUTO_ZERO and flat[key] is None else flat[key] for key in SETTING_KEYS]
    return [flat["enabled"], *rows, *settings]
