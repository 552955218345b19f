"""Byte-level BPE pieces (Qwen's tokenizer, GPT-2's byte alphabet) turned into text for find_subject_tokens."""

from __future__ import annotations

import pytest

from lib_freefuse.core import byte_level_pieces, find_subject_tokens


def test_spaces_newlines_and_multibyte_characters_become_text():
    # Qwen's pieces of "<|im_start|>user\nA Zorbo and 一只猫 café<|im_end|>" ('\u0120' a space, '\u010a' a newline)
    pieces = ["<|im_start|>", "user", "\u010a", "A", "\u0120Z", "or", "bo", "\u0120and", "\u0120"]
    pieces += ["\u00e4\u00b8\u0122\u00e5\u0131\u00aa", "\u00e7\u012e\u00ab", "\u0120caf\u00c3\u00a9", "<|im_end|>"]
    text = byte_level_pieces(pieces)
    assert text == [
        "<|im_start|>",
        "user",
        "\n",
        "A",
        " Z",
        "or",
        "bo",
        " and",
        " ",
        "一只",
        "猫",
        " café",
        "<|im_end|>",
    ]
    found = find_subject_tokens(text, ["zorbo", "一只猫", "café", "and"])
    assert [r.positions for r in found] == [(4, 5, 6), (9, 10), (11,), (7,)]
    assert not find_subject_tokens(pieces, ["zorbo"])[0].found  # the raw pieces would not match


def test_a_character_split_over_pieces_counts_for_the_piece_that_completes_it():
    # "é" is the bytes C3 A9: GPT-2's alphabet writes them '\u00c3' and '\u00a9'
    assert byte_level_pieces(["\u0120caf", "\u00c3", "\u00a9", "s"]) == [" caf", "", "é", "s"]
    # inside a match, the empty piece of the incomplete character is taken too
    assert find_subject_tokens(byte_level_pieces(["\u0120caf", "\u00c3", "\u00a9"]), ["café"])[0].positions == (0, 1, 2)


def test_not_a_piece_is_refused():
    with pytest.raises(ValueError, match="pieces"):
        byte_level_pieces(["a", 3])
