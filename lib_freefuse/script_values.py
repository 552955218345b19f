"""The script's positional values (the order of `ui()`'s components) <-> FreeFuseArgs.

The API sends either those values in order, or ONE dict of the dict form as the only value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .args import FreeFuseArgs
from .core import split_phrases

SUBJECT_ROWS = 4
SUBJECT_KEYS = ("lora", "words", "weight")
SETTING_KEYS = tuple(k for k in FreeFuseArgs.field_names() if k not in ("enabled", "subjects"))
# UI widgets cannot hold None: 0 stands for "automatic" in these number boxes.
AUTO_ZERO = ("capture_step", "n_segments")


def value_count() -> int:
    return 1 + SUBJECT_ROWS * len(SUBJECT_KEYS) + len(SETTING_KEYS)


def args_from_values(values: Sequence[Any]) -> FreeFuseArgs:
    """FreeFuseArgs from the script's values: positional (missing trailing values keep defaults) or one dict first
    (the API pads the values it was not sent with the UI's defaults: those are ignored).

    Positional rows are the UI's: a half-filled row (a LoRA without words, words without a LoRA) is left out, never an
    error (incomplete_rows names it), and FreeFuse left on with only such rows is off for the job; a row that is
    filled but wrong is named by its number on screen ("row 3.weight: ...")."""
    if len(values) >= 1 and isinstance(values[0], Mapping):
        return FreeFuseArgs.from_dict(values[0])
    if len(values) > value_count():
        raise ValueError(f"FreeFuse args: expected at most {value_count()} values, got {len(values)}")
    if not values:
        return FreeFuseArgs()
    given: dict[str, Any] = {"enabled": values[0]}
    subjects = []
    for number, row in _rows(values):
        if _row_text(row.get("lora")) and _row_words(row.get("words")):
            try:
                subjects.extend(FreeFuseArgs.from_dict({"subjects": [row]}).subjects)
            except ValueError as error:
                raise ValueError(f"row {number} {str(error).removeprefix('subjects[0].')}") from None
    given["subjects"] = subjects
    if not subjects and incomplete_rows(values):
        given["enabled"] = False  # a half-filled form must not cost the job: the image is made, the rows named
    settings = values[1 + SUBJECT_ROWS * len(SUBJECT_KEYS) :]
    for key, value in zip(SETTING_KEYS, settings, strict=False):
        given[key] = None if key in AUTO_ZERO and value in (0, 0.0) else value
    return FreeFuseArgs.from_dict(given)


def incomplete_rows(values: Sequence[Any]) -> list[str]:
    """One warning per half-filled positional row, numbered as on screen: "row 3 (c_new): no activation words: it
    acts as an ordinary LoRA"; [] for the API's dict form and while FreeFuse is off."""
    if not values or isinstance(values[0], Mapping) or not _is_on(values[0]):
        return []
    notes = []
    for number, row in _rows(values):
        lora, words = _row_text(row.get("lora")), _row_text(row.get("words"))
        if lora and not _row_words(words):
            notes.append(f"row {number} ({lora}): no activation words: it acts as an ordinary LoRA")
        elif words and not lora:
            notes.append(f"row {number} ({words!r}): no LoRA: its words bind nothing")
    return notes


def _rows(values: Sequence[Any]) -> list[tuple[int, dict[str, Any]]]:
    """The positional subject rows as (number on screen, {"lora", "words", "weight"?})."""
    flat = list(values[1 : 1 + SUBJECT_ROWS * len(SUBJECT_KEYS)])
    return [
        (start // len(SUBJECT_KEYS) + 1, dict(zip(SUBJECT_KEYS, flat[start : start + len(SUBJECT_KEYS)], strict=False)))
        for start in range(0, len(flat), len(SUBJECT_KEYS))
    ]


def _is_on(value: Any) -> bool:
    """The enabled value as from_dict reads it, without its error for junk (from_dict names that)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _row_text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _row_words(value: Any) -> bool:
    """True when the words hold at least one phrase (", ," holds none)."""
    return bool(split_phrases(_row_text(value)))


def values_from_args(args: FreeFuseArgs) -> list[Any]:
    """The positional values of `args` (what the UI shows for them)."""
    flat = args.to_dict()
    rows: list[Any] = []
    for index in range(SUBJECT_ROWS):
        subject = flat["subjects"][index] if index < len(flat["subjects"]) else {"lora": "", "words": "", "weight": 1.0}
        rows.extend(subject[key] for key in SUBJECT_KEYS)
    settings = [0 if key in AUTO_ZERO and flat[key] is None else flat[key] for key in SETTING_KEYS]
    return [flat["enabled"], *rows, *settings]
