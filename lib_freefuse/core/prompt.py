"""Where each subject's activation words sit in a tokenised prompt (the I_l of paper Eq. 8).

Works on the tokenizer's own pieces, so it needs no tokenizer: SentencePiece pieces (T5, "\u2581" marks a
word start) and CLIP BPE pieces ("</w>" marks a word end) are both read. The pieces are joined back into
text with each piece's character span kept; phrases are found in that text, case-insensitively and on
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
                if _overlaps(start, end, match.start(), match.end())
            ]
            positions.update(hits)
            if not hits:
                missing.append(phrase)
        results.append(SubjectTokens(words=words, positions=tuple(sorted(positions)), missing=tuple(missing)))
    return results


def _overlaps(start: int, end: int, match_start: int, match_end: int) -> bool:
    """Whether a piece's span overlaps a match; an empty span (a piece holding the later bytes of the character
    before it, byte_level_pieces) belongs to that character, so it counts when that character is in the match."""
    if start == end:
        return match_start < start <= match_end
    return start < match_end and match_start < end


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


def byte_level_pieces(pieces: Sequence[str]) -> list[str]:
    """GPT-2-style byte-level BPE pieces (Qwen: "\u0120cat" for " cat", a CJK character split over pieces) -> text
    pieces whose concatenation is the UTF-8 text, each character given to the piece holding its first byte (a
    piece holding only later bytes of a character becomes ""). Special pieces (<|im_start|>) are kept as they are."""
    table = _byte_table()
    out: list[str] = []
    run: list[tuple[int, int]] = []  # (piece index, byte) of the current run of ordinary pieces

    def flush():
        data = bytes(b for _, b in run)
        i = 0
        while i < len(data):
            size = _utf8_size(data[i])
            char = data[i : i + size].decode("utf-8", errors="replace")
            out[run[i][0]] += char if len(char) == 1 else "\ufffd"
            i += size if len(char) == 1 else 1
        run.clear()

    for index, piece in enumerate(pieces):
        out.append("")
        if _SPECIAL_PIECE.match(piece) or any(c not in table for c in piece):
            flush()
            out[index] = piece
        else:
            run.extend((index, table[c]) for c in piece)
    flush()
    return out


def _byte_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: b for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + extra
    return {chr(c): b for b, c in chars.items()}


def _utf8_size(lead: int) -> int:
    """Bytes of the UTF-8 character whose first byte is `lead` (1 for a stray continuation byte)."""
    return 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1
