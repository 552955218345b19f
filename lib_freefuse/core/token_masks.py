"""Per-token subject masks for each stream of FLUX's joint sequence (ALGORITHM.md stage 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["call_token_masks", "text_token_masks"]


TEXT_LORA_CHOICES = ("own_words", "all", "none")  # the extension's default first (args.FreeFuseArgs)


def text_token_masks(
    word_positions: Sequence[Sequence[int]], text_tokens: int, period: int | None = None, mode: str = "all"
) -> torch.Tensor:
    """(T_txt, L) masks of the text tokens, by `mode`:

    "all" (ALGORITHM.md, as the authors' code): every subject LoRA acts on every text token, except that subject
    l's LoRA is zeroed on the *other* subjects' activation-word tokens; "own_words": subject l's LoRA acts only on
    its own activation-word tokens; "none": no subject LoRA on any text token.

    word_positions[l]: positions of subject l's words in the tokenised prompt of length `period`; a context that
    the host padded by repeating the prompt (CFG text lengths brought to a common multiple) repeats them.
    """
    if mode not in TEXT_LORA_CHOICES:
        raise ValueError(f"mode: expected one of {', '.join(TEXT_LORA_CHOICES)}, got {mode!r}")
    n_subjects = len(word_positions)
    period = period or text_tokens
    masks = torch.ones(text_tokens, n_subjects) if mode == "all" else torch.zeros(text_tokens, n_subjects)
    if mode == "none":
        return masks
    for owner, positions in enumerate(word_positions):
        rows = [p + k for p in positions for k in range(0, text_tokens, period) if p + k < text_tokens]
        if not rows:
            continue
        if mode == "all":
            others = [l for l in range(n_subjects) if l != owner]
            masks[torch.tensor(rows)[:, None], torch.tensor(others)[None, :]] = 0.0
        else:
            masks[torch.tensor(rows), owner] = 1.0
    return masks


def call_token_masks(
    stream: str,
    image_masks: torch.Tensor,
    text_masks: torch.Tensor,
    cond_or_uncond: Sequence[int],
) -> torch.Tensor:
    """Masks for one model call whose batch is `len(cond_or_uncond)` chunks of the same images.

    image_masks: (B_img, N_img, L); text_masks: (B_img, T_txt, L) for the conditional prompt of each image.
    stream: "image" -> (B, N_img, L), "text" -> (B, T_txt, L), "joint" -> (B, T_txt + N_img, L), where
    B = chunks * B_img in the call's order. Image masks apply to every chunk (cond and uncond alike); the text
    rule only to conditional chunks, whose prompts hold the words (unconditional text gets every LoRA).
    """
    chunks = []
    for kind in cond_or_uncond:
        text = text_masks if kind == 0 else torch.ones_like(text_masks)
        if stream == "image":
            chunks.append(image_masks)
        elif stream == "text":
            chunks.append(text)
        elif stream == "joint":
            chunks.append(torch.cat([text, image_masks], dim=1))
        else:
            raise ValueError(f"stream: expected 'image', 'text' or 'joint', got {stream!r}")
    return torch.cat(chunks)
