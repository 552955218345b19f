"""Activation words from LoRA metadata, the prompt's LoRA tags, and the missing-phrase check (Python and JavaScript)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_freefuse.activation import activation_words, lora_tags, missing_phrases, rows_from_prompt, styles_left_out

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")


def write_lora(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A tiny safetensors LoRA with this header metadata."""
    tensors = {"lora_up.weight": torch.zeros(2, 1), "lora_down.weight": torch.zeros(1, 2)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_json(path: Path, value: object) -> None:
    """What Forge's LoRA card editor writes: UTF-8, non-ASCII kept."""
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def tag_frequency(value: object) -> dict[str, str]:
    return {"ss_tag_frequency": json.dumps(value)}


# --- activation_words: where the words come from ---


def test_user_metadata_comes_first(tmp_path):
    metadata = {"modelspec.trigger_phrase": "hp", **tag_frequency({"1_x": {"x": 3}})}
    lora = write_lora(tmp_path / "harry.safetensors", metadata)
    write_json(tmp_path / "harry.json", {"activation text": "harry potter, the boy who lived", "preferred weight": 0.8})
    assert activation_words(lora) == ("harry potter, the boy who lived", "user metadata")


def test_user_metadata_is_the_json_named_like_the_lora_without_its_extension(tmp_path):
    lora = write_lora(tmp_path / "harry.v2.safetensors")
    write_json(tmp_path / "harry.v2.safetensors.json", {"activation text": "wrong"})
    write_json(tmp_path / "harry.json", {"activation text": "wrong too"})
    assert activation_words(lora) is None
    write_json(tmp_path / "harry.v2.json", {"activation text": "harry"})
    assert activation_words(str(lora)) == ("harry", "user metadata")


def test_user_metadata_is_cleaned_like_a_prompt(tmp_path):
    lora = write_lora(tmp_path / "harry.safetensors")
    write_json(tmp_path / "harry.json", {"activation text": "(harry potter:1.2), <lora:harry:1>, [glasses],\n  scar ,"})
    assert activation_words(lora) == ("harry potter, glasses, scar", "user metadata")


@pytest.mark.parametrize(
    "content",
    [
        '{"activation text": ""}',
        '{"activation text": "  , <lora:x:1> ,"}',
        '{"activation text": 12}',
        '{"preferred weight": 0.8}',
        '["activation text"]',
        "{not json",
        "",
    ],
)
def test_empty_or_bad_user_metadata_falls_through_to_the_safetensors_header(tmp_path, content):
    lora = write_lora(tmp_path / "harry.safetensors", {"modelspec.trigger_phrase": "harry potter"})
    (tmp_path / "harry.json").write_text(content, encoding="utf-8")
    assert activation_words(lora) == ("harry potter", "modelspec")


def test_user_metadata_with_a_byte_order_mark_and_unicode(tmp_path):
    folder = tmp_path / "人物"
    folder.mkdir()
    lora = write_lora(folder / "黛玉.safetensors")
    (folder / "黛玉.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"activation text": "林黛玉, Daiyu Lin"}).encode())
    assert activation_words(lora) == ("林黛玉, Daiyu Lin", "user metadata")


def test_user_metadata_without_a_lora_file(tmp_path):
    write_json(tmp_path / "harry.json", {"activation text": "harry"})
    assert activation_words(tmp_path / "harry.safetensors") == ("harry", "user metadata")


def test_modelspec_trigger_phrase_comes_before_kohya_tags(tmp_path):
    metadata = {"modelspec.trigger_phrase": "ohwx man", **tag_frequency({"10_x": {"x": 9}})}
    assert activation_words(write_lora(tmp_path / "a.safetensors", metadata)) == ("ohwx man", "modelspec")


def test_modelspec_trigger_phrase_as_a_json_list(tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", {"modelspec.trigger_phrase": '["ohwx man", "sks"]'})
    assert activation_words(lora) == ("ohwx man, sks", "modelspec")


def test_blank_modelspec_trigger_phrase_falls_through_to_kohya_tags(tmp_path):
    metadata = {"modelspec.trigger_phrase": "  ", **tag_frequency({"10_x": {"ohwx": 9}})}
    assert activation_words(write_lora(tmp_path / "a.safetensors", metadata)) == ("ohwx", "kohya tags")


@pytest.mark.parametrize(
    ("frequency", "expected"),
    [
        # the most frequent tag; generic booru tags never count
        ({"10_ohwx man": {"ohwx man": 20, "1girl": 20, "smile": 12, "glasses": 5}}, "ohwx man"),
        ({"5_img": {"1girl": 30, "solo": 30, "looking at viewer": 28, "Harry Potter": 25}}, "Harry Potter"),
        # counts add up over datasets, tags compared case- and space-insensitively
        ({"a": {"x": 3, "y": 2}, "b": {"y": 2}}, "y"),
        ({"a": {"Harry  Potter": 2, "x": 3}, "b": {"harry potter": 2}}, "Harry Potter"),
        # a tie: the dataset folder's class token, else the first tag seen
        ({"10_ohwx": {"brown hair": 10, "ohwx": 10}}, "ohwx"),
        ({"img": {"brown hair": 10, "ohwx": 10}}, "brown hair"),
        # ai-toolkit writes its trigger word as the only tag, seen once
        ({"1_harry": {"harry": 1}}, "harry"),
        ({"1_李黛玉": {"李黛玉": 1}}, "李黛玉"),
        # sentence captions: nothing stands out
        ({"img": {"a photo of a man in a park": 1, "wearing a hat": 1}}, None),
        ({"img": {"a photo of ohwx man standing in a park": 5}}, None),
        ({"img": {"1girl": 5, "solo": 5}}, None),
        # malformed
        ({"img": {"x": "5", "y": True, "z": None}}, None),
        ({"img": ["x", "y"]}, None),
        ([["x", 1]], None),
        ({}, None),
    ],
)
def test_kohya_tag_frequency(tmp_path, frequency, expected):
    found = activation_words(write_lora(tmp_path / "a.safetensors", tag_frequency(frequency)))
    assert found == (None if expected is None else (expected, "kohya tags"))


def test_kohya_tag_frequency_that_is_not_json(tmp_path):
    assert activation_words(write_lora(tmp_path / "a.safetensors", {"ss_tag_frequency": "{oops"})) is None


def test_header_is_read_without_the_tensors(tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", {"modelspec.trigger_phrase": "ohwx"})
    size = 8 + int.from_bytes(lora.read_bytes()[:8], "little")
    lora.write_bytes(lora.read_bytes()[:size])  # the tensor data cut off
    assert activation_words(lora) == ("ohwx", "modelspec")


def header_file(path: Path, header: bytes, size: int | None = None) -> Path:
    path.write_bytes((len(header) if size is None else size).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda p: write_lora(p),  # no metadata
        lambda p: write_lora(p, {"ss_network_dim": "16"}),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"\x05\x00"),
        lambda p: p.write_bytes(b"PK\x03\x04" + bytes(200)),  # a .pt (zip) file
        lambda p: p.write_text("plain text, not a model"),
        lambda p: header_file(p, b'{"__metadata__": {"modelspec.trigger_phrase": "x"}}', size=10_000),  # truncated
        lambda p: header_file(p, b"{" * 10, size=2**63),
        lambda p: header_file(p, b'{"__metadata__": {"modelspec.trigger_phrase": "x"'),  # not JSON
        lambda p: header_file(p, b"[" * 100_000),  # deeply nested
        lambda p: header_file(p, b'{"__metadata__": ["x"]}'),
        lambda p: header_file(p, b'{"__metadata__": {"modelspec.trigger_phrase": 5}}'),
        lambda p: header_file(p, b'{"__metadata__": {"modelspec.trigger_phrase": "\xff\xfe"}}'),  # not UTF-8
        lambda p: None,  # absent
        lambda p: p.mkdir(),  # a folder
    ],
)
def test_unreadable_or_corrupt_files_give_none(tmp_path, make):
    path = tmp_path / "broken.safetensors"
    make(path)
    assert activation_words(path) is None


def test_an_empty_path_gives_none_and_reads_no_stray_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / ".json", {"activation text": "stray"})
    assert activation_words("") is None


@pytest.mark.parametrize("bad", [None, 12, b"harry.safetensors", ["a"]])
def test_a_wrong_argument_type_raises(bad):
    with pytest.raises(TypeError, match="lora_path"):
        activation_words(bad)


# --- lora_tags: Forge's <lora:NAME:te:unet> syntax ---


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a <lora:harry:0.8> and <lora:daiyu>", [("harry", 0.8), ("daiyu", 1.0)]),
        ("<lora:harry:0.8> <lora:harry:0.3> <lora:daiyu:1.1>", [("harry", 0.8), ("daiyu", 1.1)]),
        ("<lora:harry:0.4:0.9>", [("harry", 0.9)]),  # te then unet: the unet's (the FLUX transformer's) weight
        ("<lora:harry:te=0.4>", [("harry", 0.4)]),  # the unet weight defaults to the te weight
        ("<lora:harry:0.4:unet=0.7>", [("harry", 0.7)]),
        ("<lora:harry:0.5:0.6:16>", [("harry", 0.6)]),  # a dyn dim after the weights
        ("<lora:harry:-0.5>", [("harry", -0.5)]),
        ("<lora:harry:abc> <lora:b:nan> <lora:c:inf>", [("harry", 1.0), ("b", 1.0), ("c", 1.0)]),
        ("<lora: harry potter :0.5>", [("harry potter", 0.5)]),
        ("<lora:李黛玉:0.9>", [("李黛玉", 0.9)]),
        ("<hypernet:x:1> <LORA:y:1> <lora::1> <lora:=1> <lora:> <lora:z", []),
        ("(harry potter:1.2) in a garden", []),
        ("", []),
    ],
)
def test_lora_tags(prompt, expected):
    assert lora_tags(prompt) == expected


def test_lora_tags_rejects_a_non_text_prompt():
    with pytest.raises(TypeError, match="prompt"):
        lora_tags(None)


# --- rows_from_prompt: the "Fill from prompt" button ---


def test_rows_from_prompt(tmp_path):
    harry = write_lora(tmp_path / "harry.safetensors", {"modelspec.trigger_phrase": "harry potter"})
    daiyu = write_lora(tmp_path / "daiyu.safetensors")
    write_json(tmp_path / "daiyu.json", {"activation text": "daiyu lin"})
    plain = write_lora(tmp_path / "plain.safetensors")
    files = {"harry": harry, "daiyu": str(daiyu), "plain": plain, "empty": ""}
    prompt = "<lora:harry:0.8> <lora:daiyu> <lora:plain:0.5> <lora:gone:1> <lora:empty> (harry potter:1.2), daiyu"
    assert rows_from_prompt(prompt, files.get) == [
        {"lora": "harry", "words": "harry potter", "weight": 0.8},
        {"lora": "daiyu", "words": "daiyu lin", "weight": 1.0},
        {"lora": "plain", "words": "", "weight": 0.5},
        {"lora": "gone", "words": "", "weight": 1.0},
        {"lora": "empty", "words": "", "weight": 1.0},
    ]
    assert rows_from_prompt("no tags here", files.get) == []


def test_fill_keeps_the_words_of_loras_already_bound(tmp_path):
    harry = write_lora(tmp_path / "harry.safetensors", {"modelspec.trigger_phrase": "harry potter"})
    prompt = "harry and the boy <lora:harry:0.8> <lora:boy:1>"
    bound = {"harry": "harry, the wizard", "boy": "the boy", "gone": "x"}
    assert rows_from_prompt(prompt, {"harry": harry}.get, bound, include_styles=False) == [
        {"lora": "harry", "words": "harry, the wizard", "weight": 0.8},
        {"lora": "boy", "words": "the boy", "weight": 1.0},
    ]
    # a row with the LoRA but empty words: its metadata's words, or its name the prompt's text holds, or none: the
    # row is kept even so (the user bound it)
    bound = {"harry": " ", "boy": "", "cat": ""}
    assert rows_from_prompt(prompt + " <lora:cat:1>", {"harry": harry}.get, bound, include_styles=False) == [
        {"lora": "harry", "words": "harry potter", "weight": 0.8},
        {"lora": "boy", "words": "boy", "weight": 1.0},
        {"lora": "cat", "words": "", "weight": 1.0},
    ]


def test_fill_leaves_out_styles_unless_asked(tmp_path):
    knight = write_lora(tmp_path / "knight.safetensors", {"modelspec.trigger_phrase": "zorbo the knight"})
    files = {"knight": knight, "film_grain": write_lora(tmp_path / "film_grain.safetensors")}
    prompt = "zorbo the knight and quill v2 <lora:knight:1> <lora:film_grain:0.5> <lora:quill_v2:0.9>"
    rows = rows_from_prompt(prompt, files.get, include_styles=False)
    assert rows == [
        {"lora": "knight", "words": "zorbo the knight", "weight": 1.0},
        {"lora": "quill_v2", "words": "quill v2", "weight": 0.9},  # named in the prompt's text
    ]
    assert styles_left_out(prompt, rows) == ["film_grain"]
    every = rows_from_prompt(prompt, files.get, include_styles=True)
    assert [row["lora"] for row in every] == ["knight", "film_grain", "quill_v2"] and every[1]["words"] == ""
    assert styles_left_out(prompt, every) == []


def test_rows_from_prompt_needs_a_lookup_function():
    with pytest.raises(TypeError, match="lookup"):
        rows_from_prompt("<lora:a:1>", {"a": "a.safetensors"})


# --- missing_phrases: the live check's rule, shared with javascript/freefuse.js ---

MISSING_CASES = [
    ("a photo of Harry Potter", "harry potter", []),
    ("(harry potter:1.2) in a garden", "harry potter", []),
    ("((harry potter:1.3):1.1)", "harry potter", []),
    ("[Harry] ((potter))", "harry potter", []),
    ("(harry:1.2) potter", "harry potter", []),
    ("\\(harry\\) potter", "harry", []),
    ("harry  \n potter", "Harry Potter", []),
    ("<lora:harry potter:1> a wizard", "harry potter", ["harry potter"]),
    ("a <lora:harry:0.8> harry", "harry", []),
    ("harry<lora:x:1>potter", "harrypotter", []),  # Forge removes the tag, joining the text around it
    ("anna and bob", "ann", ["ann"]),
    ("harry_potter", "harry", ["harry"]),
    ("hárry", "harry", ["harry"]),
    ("Straße im Regen", "straße", []),
    ("c++ code", "c++", []),
    ("harry potter BREAK daiyu lin", "potter daiyu, daiyu lin", ["potter daiyu"]),
    ("李黛玉在花园里", "黛玉", []),
    ("李黛玉在花园里", "林黛玉", ["林黛玉"]),
    ("Daiyu Lin, harry", "daiyu lin, hermione", ["hermione"]),
    ("harry potter", "harry potter, harry  potter", []),
    ("", "harry", ["harry"]),
    ("harry", "", []),
    ("harry", " , ,", []),
]


@pytest.mark.parametrize(("prompt", "words", "expected"), MISSING_CASES)
def test_missing_phrases(prompt, words, expected):
    assert missing_phrases(prompt, words) == expected


@pytest.mark.parametrize(("prompt", "words"), [(None, "x"), ("x", None), ("x", ["x"])])
def test_missing_phrases_rejects_non_text(prompt, words):
    with pytest.raises(TypeError):
        missing_phrases(prompt, words)


FRAGMENTS = [
    "Harry Potter",
    "(harry potter:1.2)",
    "[harry]",
    "harry(potter)",
    "<lora:harry potter:0.8>",
    "<lora:daiyu:1>",
    "BREAK",
    "Anna",
    "ann",
    "李黛玉",
    "在花园",
    "Daiyu_Lin",
    "daiyu lin",
    "potter:1.1)",
    "\\(harry\\)",
    "hárry",
    "Straße",
    "C++",
    "x2",
    "テキスト",
]
WORDS = ["harry potter", "ann", "anna", "黛玉", "daiyu lin", "lin", "c++", "straße", "harry, potter", "x2", "テキスト"]


def parity_cases(count: int = 400) -> list[list]:
    """The fixed cases plus random prompts from tricky fragments, each with Python's answer."""
    rng = random.Random(4)
    pairs = [(prompt, words) for prompt, words, _ in MISSING_CASES]
    for _ in range(count):
        pieces = rng.choices(FRAGMENTS, k=rng.randint(1, 6))
        prompt = "".join(piece + rng.choice([" ", ", ", "", "\n"]) for piece in pieces)
        pairs.append((prompt, ", ".join(rng.sample(WORDS, rng.randint(1, 3)))))
    return [[prompt, words, missing_phrases(prompt, words)] for prompt, words in pairs]


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_javascript_agrees_with_python(tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(parity_cases(), ensure_ascii=False), encoding="utf-8")
    result = subprocess.run(
        [NODE, "--test", str(ROOT / "tests" / "js" / "freefuse.test.mjs")],
        env={"FREEFUSE_CASES_FILE": str(cases), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
