"""Finding each subject's activation words among the prompt's tokens (I_l of Eq. 8)."""

from __future__ import annotations

import pytest

from lib_freefuse.core import find_subject_tokens, split_phrases

pytestmark = pytest.mark.core

W = "\u2581"  # SentencePiece's word-start mark, as T5's tokenizer writes it


def t5(*pieces: str) -> list[str]:
    """Pieces as Forge's T5 engine produces them: no BOS, one EOS, padding."""
    return [*pieces, "</s>", "<pad>", "<pad>"]


def positions(pieces, *words):
    return [r.positions for r in find_subject_tokens(pieces, list(words))]


def test_multi_token_words_take_every_piece():
    pieces = t5(f"{W}a", f"{W}photo", f"{W}of", f"{W}Dai", "yu", f"{W}Lin")
    assert positions(pieces, "daiyu lin") == [(3, 4, 5)]


def test_every_mention_counts():
    pieces = t5(f"{W}harry", f"{W}waves", f";{W}harry", f"{W}smiles", f"{W}at", f"{W}harry")
    assert positions(pieces, "harry") == [(0, 2, 5)]


def test_case_is_ignored():
    pieces = t5(f"{W}HARRY", f"{W}Potter", f"{W}and", f"{W}harry", f"{W}potter")
    assert positions(pieces, "Harry Potter") == [(0, 1, 3, 4)]


def test_words_inside_emphasis_syntax_left_in_the_prompt():
    pieces = t5(f"{W}a", f"{W}(", "harry", f"{W}pot", "ter", ":", "1.2", ")", f"{W}and", f"{W}[[", "daiyu", "]]")
    assert positions(pieces, "harry potter", "daiyu") == [(2, 3, 4), (10,)]


def test_words_of_an_emphasis_segment_tokenised_on_their_own():
    # Forge parses (harry potter:1.2) first and tokenises "harry potter" as its own segment.
    pieces = t5(f"{W}a", f"{W}photo", f"{W}of", f"{W}harry", f"{W}potter", f"{W}reading")
    assert positions(pieces, "harry potter") == [(3, 4)]


def test_absent_words_are_reported_not_silently_empty():
    pieces = t5(f"{W}harry", f"{W}potter")
    harry, daiyu = find_subject_tokens(pieces, ["harry potter", "daiyu lin"])
    assert harry.found and harry.missing == ()
    assert not daiyu.found and daiyu.positions == () and daiyu.missing == ("daiyu lin",)


def test_a_subject_with_several_phrases_reports_the_missing_ones():
    pieces = t5(f"{W}harry", f"{W}with", f"{W}round", f"{W}glasses")
    (result,) = find_subject_tokens(pieces, ["harry, round glasses, the boy who lived"])
    assert result.positions == (0, 2, 3)
    assert result.missing == ("the boy who lived",)


def test_word_boundaries_are_respected():
    pieces = t5(f"{W}anna", f"{W}and", f"{W}ann", "'s", f"{W}hat")
    assert positions(pieces, "ann") == [(2,)]  # "ann's" is a mention; "anna" is not
    assert positions(pieces, "nna") == [()]


def test_special_tokens_are_boundaries_not_text():
    pieces = [f"{W}harry", "</s>", f"{W}potter", "<pad>"]
    assert positions(pieces, "harry potter") == [()]
    assert positions(pieces, "pad") == [()]


def test_clip_bpe_pieces():
    pieces = ["<|startoftext|>", "harry</w>", "pot", "ter</w>", "and</w>", "daiyu</w>", "<|endoftext|>"]
    assert positions(pieces, "harry potter", "daiyu") == [(1, 2, 3), (5,)]


def test_non_ascii_words():
    pieces = t5(f"{W}Amélie", f"{W}and", f"{W}", "林黛玉", "和", "哈利")
    assert positions(pieces, "amélie", "林黛玉", "哈利") == [(0,), (3,), (5,)]


def test_phrase_whitespace_is_normalised():
    assert split_phrases("  harry   potter ,, the  boy ,harry potter") == ("harry potter", "the boy")
    assert positions(t5(f"{W}harry", f"{W}potter"), "harry    potter") == [(0, 1)]


@pytest.mark.parametrize("words", ["", " , ,"])
def test_empty_words_are_an_error_naming_the_subject(words):
    with pytest.raises(ValueError, match=r"^subject_words\[1\]"):
        find_subject_tokens(t5(f"{W}harry"), ["harry", words])


def test_non_string_pieces_are_an_error():
    with pytest.raises(ValueError, match="^pieces"):
        find_subject_tokens([f"{W}harry", 5], ["harry"])
