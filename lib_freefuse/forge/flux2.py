"""FLUX.2 Klein in Forge Neo (backend/nn/flux.py with global_modulation): FLUX.1's blocks, so FLUX.1's capture and
masked layers; the model-level shared modulations are made per token by FLUX.1's PerTokenModulation, patched once
on each (lib_freefuse/families/flux2.py says which layer sees which tokens)."""

from __future__ import annotations

from ..core.prompt import byte_level_pieces
from ..families import FLUX2_KLEIN
from ..hosts import Host
from . import flux1
from .job import FreeFuseJob
from .patching import SubjectDeltas


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """FLUX.1's install with Klein's layer roles (the three shared modulations' `lin` are modulation layers)."""
    flux1.install(clone, model, job, subject_deltas, capture_block, host, family=FLUX2_KLEIN)


ROLE = "<|role|>"  # stands for a chat template's role word: a boundary no subject's words can match


def context_pieces(engine, prompt: str) -> list[str]:
    """The context Neo's Klein engine gives the model for `prompt`, one text piece per token: its one chunk (each
    emphasis piece in Qwen3's chat template, then <|endoftext|> up to 512 tokens), the byte-level pieces as text, the
    template's role words ("user", "assistant" after each <|im_start|>) made boundaries."""
    chunks = engine.tokenize_line(prompt)  # Neo's Klein engine returns the chunks alone, always one
    pieces = byte_level_pieces(engine.tokenizer.convert_ids_to_tokens(chunks[0].tokens))  # <|...|>, <think>: kept
    return [ROLE if i and pieces[i - 1] == "<|im_start|>" else piece for i, piece in enumerate(pieces)]
