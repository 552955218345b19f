"""FreeFuse in the generation parameters (infotext): written as one scalar per "FreeFuse ..." key, the subject
bindings as one readable line, defaults left out; read back for "paste parameters" and the API's `infotext` field.

The bindings: `FreeFuse: "a: zorbo the knight; b (0.9): quill the wizard"`: each row "LoRA: words", a weight other
than 1 in brackets after the name. A LoRA name holds no ':' (a <lora:NAME:...> tag cannot), so the first ':' of a row
ends it. Bindings this line cannot carry (words with ';') are written as JSON under the old key "FreeFuse subjects",
which older infotexts used for every run and which is still read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from . import __version__
from .args import FreeFuseArgs, SubjectBinding
from .script_values import SETTING_KEYS

BINDINGS_KEY = "FreeFuse"  # present exactly when FreeFuse was on (or SUBJECTS_KEY)
SUBJECTS_KEY = "FreeFuse subjects"  # the JSON list of older infotexts
VERSION_KEY = "FreeFuse version"
COVERAGE_KEY = "FreeFuse coverage"  # percent of each image each subject's mask covers (written after sampling)
WARNINGS_KEY = "FreeFuse warnings"
KEYS_WITHOUT_PREFIX = (BINDINGS_KEY,)  # every other key starts with "FreeFuse "

# Defaults that changed, with the version that changed them: an infotext written before it ran with the old value,
# which is not in it (defaults are left out), so it is filled in on the way back to reproduce that image.
CHANGED_DEFAULTS: tuple[tuple[tuple[int, ...], str, object], ...] = (
    ((0, 2, 0), "slic_max_side", 512),
    ((0, 5, 0), "text_loras", "all"),  # own words and b = 5: they won in both toy worlds (README, issue 17)
    ((0, 5, 0), "attention_bias", 0.0),
    ((0, 6, 0), "average_blocks", False),  # blocks averaged, seeds where a subject leads: won in both toy worlds
    ((0, 6, 0), "contrastive", "off"),
    ((0, 7, 0), "fill_holes", 0.0),  # stray pieces filled: the planted wide canvas, neither toy world changed
    ((0, 7, 0), "background", "off"),  # the background words' places free where given: the planted background
    ((0, 8, 0), "surroundings", "vote"),  # unclear places to the nearest clear subject: won in the first toy world
)

_ROW_SEPARATOR = "; "
_WEIGHTED_NAME = re.compile(r"(.*?) \(([^()]*)\)")  # "b (0.9)"


def setting_key(name: str) -> str:
    """The infotext key of a setting: "capture_step" -> "FreeFuse capture step"."""
    return f"FreeFuse {name.replace('_', ' ')}"


def bindings_text(subjects: tuple[SubjectBinding, ...]) -> str | None:
    """The bindings as one line, "a: zorbo the knight; b (0.9): quill the wizard"; None when a row cannot be
    written so (its words hold ';')."""
    rows = []
    for subject in subjects:
        if ";" in subject.words:
            return None
        name = subject.lora
        if subject.weight != 1.0 or _WEIGHTED_NAME.fullmatch(name):  # "x (2)" as a name keeps its own brackets
            name = f"{name} ({subject.weight!r})"
        rows.append(f"{name}: {subject.words}")
    return _ROW_SEPARATOR.join(rows)


def subjects_from_text(text: str) -> list[dict[str, object]]:
    """The rows of a bindings line as the dict form's subject list; ValueError names a row that cannot be read."""
    rows: list[dict[str, object]] = []
    for number, row in enumerate(text.split(";"), start=1):
        if not row.strip():
            continue
        name, colon, words = row.partition(":")
        if not colon:
            raise ValueError(f"subjects: row {number} of {BINDINGS_KEY} ({row.strip()!r}) is not 'LoRA: words'")
        entry: dict[str, object] = {"lora": name.strip(), "words": words.strip()}
        weighted = _WEIGHTED_NAME.fullmatch(name.strip())
        if weighted:
            entry["lora"], entry["weight"] = weighted.group(1).strip(), weighted.group(2).strip()
        rows.append(entry)
    return rows


def coverage_text(coverage: Mapping[str, list[float]]) -> str:
    """{LoRA: [percent of each image of the batch]} -> "a: 46%; b: 53.5%" (a batch: "a: 46%, 12%; b: ..."), the
    percents rounded to 0.1; LoRA names hold no ':' (see bindings_text), so each row's first ':' ends its name."""
    return _ROW_SEPARATOR.join(
        f"{name}: " + ", ".join(f"{round(float(p), 1):g}%" for p in percents) for name, percents in coverage.items()
    )


def coverage_from_text(text: str) -> dict[str, list[float]]:
    """coverage_text back to {LoRA: [percent per image]}; the JSON object of 0.2.x infotexts is read too."""
    text = text.strip()
    if text.startswith("{"):
        return {str(name): [float(p) for p in percents] for name, percents in json.loads(text).items()}
    coverage = {}
    for row in text.split(_ROW_SEPARATOR):
        name, _, percents = row.partition(": ")
        coverage[name] = [float(p.strip().rstrip("%")) for p in percents.split(",")]
    return coverage


def infotext_params(args: FreeFuseArgs) -> dict[str, object]:
    """The infotext entries of an enabled run: bindings, every non-default setting, the version."""
    changed = args.to_dict(only_changed=True)
    text = bindings_text(args.subjects)
    if text is not None:
        params: dict[str, object] = {BINDINGS_KEY: text}
    else:
        params = {SUBJECTS_KEY: json.dumps([s.to_dict(only_changed=True) for s in args.subjects], ensure_ascii=False)}
    params.update((setting_key(key), changed[key]) for key in SETTING_KEYS if key in changed)
    params[VERSION_KEY] = __version__
    return params


def args_from_params(params: Mapping[str, object]) -> FreeFuseArgs | None:
    """The arguments an infotext records (None when FreeFuse was off); ValueError names what is wrong."""
    if BINDINGS_KEY in params and isinstance(params[BINDINGS_KEY], str):
        subjects: object = subjects_from_text(params[BINDINGS_KEY])
    elif SUBJECTS_KEY in params:
        subjects = params[SUBJECTS_KEY]
        try:
            subjects = json.loads(subjects) if isinstance(subjects, str) else subjects
        except json.JSONDecodeError as error:
            raise ValueError(f"subjects: {SUBJECTS_KEY} is not valid JSON ({error.msg})") from error
    else:
        return None
    values: dict[str, object] = {"enabled": True, "subjects": subjects}
    values.update((key, params[setting_key(key)]) for key in SETTING_KEYS if setting_key(key) in params)
    written_by = _version(params.get(VERSION_KEY))
    for changed_in, key, old_default in CHANGED_DEFAULTS:
        if written_by < changed_in:
            values.setdefault(key, old_default)
    return FreeFuseArgs.from_dict(values)


def _version(text: object) -> tuple[int, ...]:
    """ "0.1.0" -> (0, 1, 0); a missing or unreadable version counts as the oldest."""
    try:
        return tuple(int(part) for part in str(text).strip().split("."))
    except ValueError:
        return ()
