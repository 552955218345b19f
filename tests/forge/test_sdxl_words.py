"""SDXL's word positions through the host's own CLIP text engine (tier "forge"): 77-token chunks (BOS, 75 tokens,
EOS), BREAK, emphasis and prompts past 75 tokens, as `ClassicTextProcessingEngine.tokenize_line` builds the chunks
that the SDXL context concatenates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sdxl_env

from lib_freefuse.forge.processing import RunState, _words_in_all_chunks


@pytest.fixture(scope="module")
def engine(forge, forge_root):
    return sdxl_env.clip_engine(forge_root)


def positions(engine, prompt: str, words: list[str]) -> tuple[list, int, RunState]:
    state = RunState()
    subjects = [SimpleNamespace(lora=f"s{i}", words=w) for i, w in enumerate(words)]
    found, length = _words_in_all_chunks(engine, [prompt], subjects, state)
    return [found.get(f"s{i}", [None])[0] for i in range(len(words))], length, state


def pieces(engine, prompt: str, where) -> list[str]:
    chunks, _ = engine.tokenize_line(prompt)
    tokens = [t for chunk in chunks for t in chunk.tokens]
    return [p.replace("</w>", "") for p in engine.tokenizer.convert_ids_to_tokens([tokens[i] for i in where])]


def test_words_in_the_first_chunk_follow_the_bos_token(engine):
    (knight, wizard), length, state = positions(engine, "zorbo the knight and quill the wizard", ["knight", "wizard"])
    assert length == 77 and not state.warnings
    assert knight == (4,) and wizard == (8,)  # BOS at 0, "zorbo" two pieces on CLIP's vocabulary
    assert pieces(engine, "zorbo the knight and quill the wizard", knight + wizard) == ["knight", "wizard"]


def test_emphasis_brackets_and_weights_do_not_move_the_words(engine):
    plain, _, _ = positions(engine, "zorbo the knight and quill the wizard", ["zorbo the knight", "quill"])
    weighted, _, _ = positions(engine, "(zorbo the knight:1.3) and [quill] the wizard", ["zorbo the knight", "quill"])
    assert weighted == plain


def test_break_starts_a_chunk_and_every_chunk_counts(engine):
    prompt = "zorbo the knight BREAK quill the wizard"
    (knight, wizard), length, state = positions(engine, prompt, ["knight", "wizard"])
    assert length == 2 * 77 and not state.warnings
    assert all(p < 77 for p in knight) and all(p > 77 for p in wizard)  # after the second chunk's BOS (77)
    assert pieces(engine, prompt, wizard) == ["wizard"]


def test_a_prompt_past_75_tokens_puts_later_words_in_the_next_chunk(engine):
    filler = ", ".join(["red"] * 40)  # 79 tokens: the engine breaks at the last comma within 20 tokens
    prompt = f"zorbo the knight, {filler}, quill the wizard"
    (knight, wizard), length, _ = positions(engine, prompt, ["knight", "wizard"])
    assert length == 2 * 77 and knight[0] < 77 and wizard[0] > 77
    assert pieces(engine, prompt, knight + wizard) == ["knight", "wizard"]


def test_words_missing_from_the_prompt_are_named(engine):
    (knight, dragon), _, state = positions(engine, "zorbo the knight", ["knight", "dragon"])
    assert knight is not None and dragon is None
    assert state.warnings == ["the words of s1 (dragon) are not in the prompt: s1 acts as an ordinary LoRA"]
