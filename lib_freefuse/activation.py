"""Activation words without typing: read them from a LoRA's metadata, list the prompt's LoRA tags, check the prompt.

Where a LoRA's words come from, first found wins:
1. "user metadata": the `<lora file minus extension>.json` beside it, key "activation text" (what Forge's LoRA card
   edit dialog writes);
2. "modelspec": the safetensors header key "modelspec.trigger_phrase" (Stability's ModelSpec; kohya sd-scripts
   writes it with --metadata_trigger_phrase);
3. "kohya tags": the safetensors header key "ss_tag_frequency" ({dataset: {tag: count}}, written by kohya sd-scripts
   and, with the trigger word as its only tag, by ai-toolkit). ONE tag is taken, the trigger word: counts are summed
   over datasets (tags compared case- and space-insensitively); generic booru tags ("1girl", "solo", "looking at
   viewer", ...) and caption sentences (over 6 words) never count; the most frequent tag wins; on a tie, a dataset
   folder's class token ("10_ohwx man" -> "ohwx man") if it is among the tied, else the first tag seen (kohya counts
   in caption order, where the trigger usually comes first); when several tags were each seen only once (sentence
   captions), nothing stands out and no words are given. One phrase, not several: the other frequent tags (hair,
   clothes) are often shared by other subjects and would bind their tokens too.
Words are cleaned as the prompt is: `<...>` tags dropped, emphasis brackets and weights removed, phrases separated by
", ". Unreadable, corrupt or absent files give None; only a wrong argument type raises (TypeError).

`missing_phrases` is the twin of javascript/freefuse.js's live check: both see the prompt as Forge's T5 engine does
(extra-network tags removed, emphasis syntax dropped, BREAK a boundary) and match as lib_freefuse.core.prompt does.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from lib_freefuse.core.prompt import find_subject_tokens, split_phrases

__all__ = ["activation_words", "lora_tags", "missing_phrases", "rows_from_prompt", "styles_left_out"]

USER_METADATA = "user metadata"
MODELSPEC = "modelspec"
KOHYA_TAGS = "kohya tags"
TRIGGER_KEY = "modelspec.trigger_phrase"
TAG_FREQUENCY_KEY = "ss_tag_frequency"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
MAX_TAG_WORDS = 6  # longer "tags" are caption sentences, not trigger words

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # Forge's modules/extra_networks.py re_extra_net
_EMPHASIS = re.compile(r":\s*[+-]?[.\d]+\s*\)|(?<!\\)[()\[\]]")  # weights "(x:1.2)" and bare brackets
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # Forge's re_break: the T5 engine ends a chunk (an EOS token) there
_BOUNDARY_PIECE = "</s>"  # a special piece: lib_freefuse.core.prompt lets no phrase cross it
_GENERIC_TAG = re.compile(r"\d+\+?(?:girl|boy|other)s?")
_GENERIC_TAGS = frozenset(
    {
        "solo",
        "multiple girls",
        "multiple boys",
        "male focus",
        "female focus",
        "looking at viewer",
        "simple background",
        "white background",
        "upper body",
        "full body",
        "portrait",
        "smile",
        "open mouth",
        "closed mouth",
        "blush",
        "standing",
        "indoors",
        "outdoors",
        "realistic",
        "photorealistic",
        "masterpiece",
        "best quality",
        "high quality",
    }
)


def activation_words(lora_path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(words, source) for the LoRA file at lora_path, source one of "user metadata", "modelspec", "kohya tags"."""
    if not isinstance(lora_path, (str, os.PathLike)):
        raise TypeError(f"lora_path: expected a path, got {type(lora_path).__name__}")
    path = os.fspath(lora_path)
    if not isinstance(path, str):
        raise TypeError(f"lora_path: expected a text path, got {type(path).__name__}")
    if not path:
        return None
    user = _read_json_file(os.path.splitext(path)[0] + ".json")
    if isinstance(user, Mapping):
        words = _clean_words(user.get("activation text"))
        if words:
            return words, USER_METADATA
    metadata = _safetensors_metadata(path)
    words = _clean_words(_text_or_list(metadata.get(TRIGGER_KEY)))
    if words:
        return words, MODELSPEC
    words = _clean_words(_top_tag(_decoded(metadata.get(TAG_FREQUENCY_KEY))))
    if words:
        return words, KOHYA_TAGS
    return None


def lora_tags(prompt: str) -> list[tuple[str, float]]:
    """[(name, weight)] of the prompt's `<lora:NAME:...>` tags in order, first of each name; weight is the unet's."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected text, got {type(prompt).__name__}")
    tags: dict[str, float] = {}
    for match in _EXTRA_NETWORK.finditer(prompt):
        if match.group(1) != "lora":
            continue
        parsed = _lora_params(match.group(2).split(":"))
        if parsed is not None and parsed[0] not in tags:
            tags[parsed[0]] = parsed[1]
    return list(tags.items())


def rows_from_prompt(
    prompt: str,
    lookup: Callable[[str], str | os.PathLike[str] | None],
    bound: Mapping[str, str] | None = None,
    include_styles: bool = True,
) -> list[dict[str, Any]]:
    """One subject row {"lora", "words", "weight"} per LoRA tag of the prompt, its words, first found wins: those
    `bound` ({lora: words} already in the rows) gives it, its metadata's, its name where the prompt's text names it
    ("zorbo" or "zorbo_v2" as "zorbo v2"). A LoRA with none of them looks like a style: left out unless
    include_styles or a row binds it already (then its words are "")."""
    if not callable(lookup):
        raise TypeError(f"lookup: expected a function name -> path, got {type(lookup).__name__}")
    bound = bound or {}
    rows = []
    for name, weight in lora_tags(prompt):
        words = (bound.get(name) or "").strip() if isinstance(bound.get(name), str) else ""
        if not split_phrases(words):
            path = lookup(name)
            found = activation_words(path) if path else None
            words = found[0] if found else _named_in_text(prompt, name)
        if words or include_styles or name in bound:
            rows.append({"lora": name, "words": words, "weight": weight})
    return rows


def styles_left_out(prompt: str, rows: list[dict[str, Any]]) -> list[str]:
    """The LoRA tags of the prompt that rows_from_prompt left out (styles), in the prompt's order."""
    kept = {row["lora"] for row in rows}
    return [name for name, _ in lora_tags(prompt) if name not in kept]


def _named_in_text(prompt: str, name: str) -> str:
    """The LoRA's name as the prompt's text (outside tags) writes it: "zorbo_v2" also as "zorbo v2"; "" if absent."""
    for spelling in dict.fromkeys((name, re.sub(r"[_\-.]+", " ", name).strip())):
        if split_phrases(spelling) and not missing_phrases(prompt, spelling):
            return spelling
    return ""


def missing_phrases(prompt: str, words: str) -> list[str]:
    """The phrases of `words` that occur nowhere in the prompt's text outside its `<...>` tags."""
    if not isinstance(prompt, str) or not isinstance(words, str):
        raise TypeError(f"prompt, words: expected text, got {type(prompt).__name__}, {type(words).__name__}")
    if not split_phrases(words):
        return []
    return list(find_subject_tokens(_prompt_pieces(prompt), [words])[0].missing)


def _prompt_pieces(prompt: str) -> list[str]:
    """The prompt as core.prompt pieces: tags removed (as Forge does), emphasis dropped, BREAK a boundary."""
    pieces = []
    for index, part in enumerate(_BREAK.split(_EXTRA_NETWORK.sub("", prompt))):
        if index:
            pieces.append(_BOUNDARY_PIECE)
        pieces.append(" " + _EMPHASIS.sub(" ", part))  # the space keeps a part like "<x>" from reading as special
    return pieces


def _lora_params(items: list[str]) -> tuple[str, float] | None:
    """(name, unet weight) from a tag's ':'-separated items, as Forge's ExtraNetworkLora.activate reads them."""
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0].strip():
        return None
    te = _number(named.get("te"), _number(positional[1] if len(positional) > 1 else None, 1.0))
    unet = _number(named.get("unet"), _number(positional[2] if len(positional) > 2 else None, te))
    return positional[0].strip(), unet


def _number(text: str | None, default: float) -> float:
    """float(text) when it is a finite number, else default (Forge would fail on it; a UI fill should not)."""
    try:
        value = float(text) if text is not None else default
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def _clean_words(text: object) -> str:
    """Activation text as FreeFuse words: tags and emphasis syntax dropped, phrases joined by ", "; "" if none."""
    if not isinstance(text, str):
        return ""
    return ", ".join(split_phrases(_EMPHASIS.sub(" ", _EXTRA_NETWORK.sub("", text))))


def _text_or_list(value: object) -> str | None:
    """A metadata value that is text, or a JSON list of texts (some trainers write one), as comma-separated text."""
    parsed = _decoded(value) if isinstance(value, str) and value.lstrip().startswith("[") else value
    if isinstance(parsed, list):
        return ", ".join(item for item in parsed if isinstance(item, str))
    return value if isinstance(value, str) else None


def _top_tag(frequency: object) -> str | None:
    """The trigger word among kohya's {dataset: {tag: count}}, by the rule in the module docstring; None if unclear."""
    if not isinstance(frequency, Mapping):
        return None
    counts: dict[str, float] = {}
    spelling: dict[str, str] = {}
    every_tag: set[str] = set()
    for dataset in frequency.values():
        if not isinstance(dataset, Mapping):
            continue
        for tag, count in dataset.items():
            key = " ".join(str(tag).split()).casefold()
            every_tag.add(key)
            if not _is_trigger_like(key) or not _is_count(count):
                continue
            counts[key] = counts.get(key, 0) + count
            spelling.setdefault(key, " ".join(str(tag).split()))
    if not counts:
        return None
    best = max(counts.values())
    tied = [key for key, count in counts.items() if count == best]
    classes = {" ".join(name.split("_", 1)[1].split()).casefold() for name in frequency if _is_class_folder(name)}
    preferred = [key for key in tied if key in classes]
    if preferred:
        return spelling[preferred[0]]
    if best <= 1 and len(every_tag) > 1:
        return None
    return spelling[tied[0]]


def _is_trigger_like(tag: str) -> bool:
    """False for generic booru tags, caption sentences and tags without a letter or digit."""
    words = tag.split()
    if not words or len(words) > MAX_TAG_WORDS or not any(char.isalnum() for char in tag):
        return False
    return tag not in _GENERIC_TAGS and not _GENERIC_TAG.fullmatch(tag)


def _is_count(value: object) -> bool:
    """True for a finite, non-negative number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def _is_class_folder(name: object) -> bool:
    """True for a kohya DreamBooth folder name "<repeats>_<class token>"."""
    return isinstance(name, str) and "_" in name and name.split("_", 1)[0].isdigit() and bool(name.split("_", 1)[1])


def _safetensors_metadata(path: str) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file's header, read without its tensors; {} when unreadable."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES or file.read(1) != b"{":
                return {}
            raw = b"{" + file.read(size - 1)
    except OSError:
        return {}
    header = _decoded(raw) if len(raw) == size else None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _read_json_file(path: str) -> object:
    """The JSON value of a text file (UTF-8, with or without BOM); None when absent or unreadable."""
    try:
        with open(path, "rb") as file:
            return _decoded(file.read())
    except OSError:
        return None


def _decoded(data: object) -> object:
    """The value of JSON text or bytes (None when it is not valid JSON); any other value as it is."""
    if isinstance(data, bytes):
        data = data.removeprefix(b"\xef\xbb\xbf")
    elif not isinstance(data, str):
        return data
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None
