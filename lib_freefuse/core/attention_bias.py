"""Phase-2 attention bias (the authors' later code; not in the paper): once the masks exist, each subject's words
and its region are pushed to attend to each other and away from the other subjects', in both directions.

For an image token i with subject masks m_l(i) and a text token j that is subject l's word (w_l(j) = 1):

    image -> text:  b(i, j) = sum_l m_l(i) * (positive * w_l(j) - negative * o_l(j)),  o_l(j) = sum_{l' != l} w_l'(j)
    text -> image:  b(j, i) = sum_l w_l(j) * (positive * m_l(i) - negative * (1 - m_l(i)))

text -> text and image -> image get 0, and so does every token that is no subject's word. The bias is added to the
attention logits q k^T / sqrt(d) before the softmax, in every joint-attention block, for the steps after the masks.
"""

from __future__ import annotations

import torch

__all__ = ["NEGATIVE_TO_POSITIVE", "joint_attention_bias"]

NEGATIVE_TO_POSITIVE = 5.0  # the authors' defaults: negative 5, positive 1


def joint_attention_bias(
    image_masks: torch.Tensor,
    word_masks: torch.Tensor,
    negative: float,
    positive: float | None = None,
    extra_tokens: int = 0,
) -> torch.Tensor:
    """The additive bias of a joint [text, image, extra] sequence, (B, 1, T + N + E, T + N + E) float32.

    image_masks: (B, N, L) each subject's mask on the image tokens, in [0, 1]. word_masks: (B, T, L), 1 where text
    token j is one of subject l's words (0 elsewhere; an unconditional row is all 0, so it gets no bias).
    negative: the push away from the other subjects (>= 0). positive: the pull to one's own (default negative / 5).
    extra_tokens: tokens after the image's (reference-image tokens), which get no bias.
    """
    if image_masks.ndim != 3 or word_masks.ndim != 3:
        raise ValueError(
            f"masks: expected image (B, N, L) and words (B, T, L), got {tuple(image_masks.shape)} and "
            f"{tuple(word_masks.shape)}"
        )
    if image_masks.shape[0] != word_masks.shape[0] or image_masks.shape[2] != word_masks.shape[2]:
        raise ValueError(
            f"masks: image {tuple(image_masks.shape)} and words {tuple(word_masks.shape)} differ in batch or subjects"
        )
    if negative < 0 or (positive is not None and positive < 0):
        raise ValueError(f"bias: expected strengths >= 0, got negative {negative} and positive {positive}")
    positive = negative / NEGATIVE_TO_POSITIVE if positive is None else positive
    m = image_masks.float()  # (B, N, L)
    w = word_masks.float()  # (B, T, L)
    batch, n_image, _ = m.shape
    n_text = w.shape[1]
    others = w.sum(dim=2, keepdim=True) - w  # (B, T, L): o_l(j), the other subjects' words
    length = n_text + n_image + extra_tokens
    bias = m.new_zeros(batch, 1, length, length)
    image_rows = slice(n_text, n_text + n_image)
    # image -> text: (B, N, L) @ (B, L, T)
    bias[:, 0, image_rows, :n_text] = m @ (positive * w - negative * others).transpose(1, 2)
    # text -> image: (B, T, L) @ (B, L, N)
    bias[:, 0, :n_text, image_rows] = w @ ((positive + negative) * m - negative).transpose(1, 2)
    return bias
