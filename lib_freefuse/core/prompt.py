"""Where each subject's activation words sit in a tokenised prompt (the I_l of paper Eq. 8).

Works on the tokenizer's own pieces, so it needs no tokenizer: SentencePiece pieces (T5, "\u2581" marks a
word start) and CLIP BPE pieces ("</w>" marks a word end) are both read; byte-level BPE pieces (GPT-2, Qwen: each
byte a printable character, "\u0120" a space) are made text first by `byte_level_pieces`. The pieces are joined
back into text with each piece's character span kept; phrases are found in that text, case-insensitively and on
word boundaries, and every token that overlaps a match is taken. That makes a match independent of how
the tokenizer happened to split a word in context, and of emphasis syntax the host may leave in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SubjectTokens", "byte_level_pieces", "find_subject_tokens", "split_phrases"]

_SPECIAL_PIECE = re.compile(r"^<[^<>\s]+>$")  # </s>, <pad>, <unk>, <|endoftext|>: boundaries, not text


@dataclass(frozen=True)
class SubjectTokens:
    """The token positions of one subject's activation words, and the phrases that were not found."""

    words: str  # as the user wrote them: one or more phrases separated by commas
    positions: tuple[int, ...]  # sorted, 0-based positions in the token sequence
    missing: tuple[str, ...]  # phrases of `words` that occur nowhere in the prompt

    @property
    def found(self) -> bool:
        return bool(self.positions)


def split_phrases(words: str) -> tuple[str, ...]:
    """'harry potter, the boy who lived' -> ('harry potter', 'the boy who lived'), whitespace normalised."""
    phrases = (" ".join(part.split()) for part in words.split(","))
    return tuple(dict.fromkeys(p for p in phrases if p))


def find_subject_tokens(pieces: Sequence[str], subject_words: Sequence[str]) -> list[SubjectTokens]:
    """For each subject's words, every position of every mention of each of its phrases in `pieces`.

    pieces: the prompt's tokens as the tokenizer's piece strings, in sequence order. A phrase matches
    case-insensitively, on word boundaries (so "ann" does not match "anna"), inside emphasis brackets
    too; every mention counts. A subject whose phrases occur nowhere comes back with no positions and
    its phrases listed in `missing`: the caller decides how to report it, it is never silently empty.
    """
    text, spans = _join_pieces(pieces)
    results = []
    for index, words in enumerate(subject_words):
        if not isinstance(words, str):
            raise ValueError(f"subject_words[{index}]: expected a string, got {type(words).__name__}")
        phrases = split_phrases(words)
        if not phrases:
            raise ValueError(f"subject_words[{index}]: no activation words given")
        positions: set[int] = set()
        missing = []
        for phrase in phrases:
            hits = [
                i
                for match in _phrase_pattern(phrase).finditer(text)
                for i, (start, end) in enumerate(spans)
                if start < match.end() and match.start() < end
            ]
            positions.update(hits)
            if not hits:
                missing.append(phrase)
        results.append(SubjectTokens(words=words, positions=tuple(sorted(positions)), missing=tuple(missing)))
    return results


def _join_pieces(pieces: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Casefolded text of the pieces and each piece's (start, end) span in it; word marks become spaces."""
    parts = []
    spans = []
    cursor = 0
    for piece in pieces:
        if not isinstance(piece, str):
            raise ValueError(f"pieces: expected token strings, got {type(piece).__name__}")
        if _SPECIAL_PIECE.match(piece):
            part = " \x00 "  # a boundary no phrase can cross
        else:
            part = piece.replace("\u2581", " ").replace("</w>", " ").casefold()
        parts.append(part)
        spans.append((cursor, cursor + len(part)))
        cursor += len(part)
    return "".join(parts), spans


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Regex for a phrase: any run of spaces between its words, word boundaries where its script has spaces."""
    words = phrase.casefold().split()
    body = r"\s+".join(re.escape(word) for word in words)
    before = r"(?<!\w)" if _spaced(words[0][0]) else ""
    after = r"(?!\w)" if _spaced(words[-1][-1]) else ""
    return re.compile(before + body + after)


def _spaced(char: str) -> bool:
    """True for a word character of a script that separates words by spaces (not CJK, kana)."""
    if not char.isalnum():
        return False
    code = ord(char)
    return not (0x2E80 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0xAC00 <= code <= 0xD7AF)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()


def byte_level_pieces(pieces: Sequence[str]) -> list[str]:
    """Byte-level BPE pieces (GPT-2, Qwen: "\u0120cat" for " cat") -> the text each piece adds, one per piece.

    A character whose UTF-8 bytes span several pieces counts for the piece that completes it (the others give "");
    special pieces (<|im_start|>) come back as they are, a boundary for find_subject_tokens.
    """
    out = []
    pending = b""
    for piece in pieces:
        if not isinstance(piece, str):
            raise ValueError(f"pieces: expected token strings, got {type(piece).__name__}")
        if _SPECIAL_PIECE.match(piece):
            out.append(piece)
            pending = b""
            continue
        pending += b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in piece)
        try:
            out.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            out.append("")  # an incomplete character: its last piece carries it
    return out
