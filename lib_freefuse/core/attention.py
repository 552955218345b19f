"""Attention maps of stage 1 (paper Eq. 5-10), computed row by row: only the rows that are used."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Working memory for one chunk of attention logits; bounds the peak of `mean_attention_rows`.
CHUNK_BYTES = 16 * 2**20


def mean_attention_rows(q_rows: torch.Tensor, k: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(D)) for the given query rows only (Eq. 5 and Eq. 10's A_self).

    q_rows: (H, R, D), k: (H, N, D) -> (R, N) float32. Works through heads and rows in chunks so that no
    more than about `chunk_bytes` of logits exist at once, whatever R and N are.
    """
    heads, rows, dim = q_rows.shape
    n_keys = k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    out = torch.zeros(rows, n_keys, dtype=torch.float32, device=q_rows.device)
    bytes_per_row = n_keys * 4
    row_chunk = max(1, min(rows, chunk_bytes // bytes_per_row))
    # A k that is not float32 (bf16 on the GPU) is converted a chunk of heads at a time: count that copy too.
    k_copy_per_head = 0 if k.dtype == torch.float32 else n_keys * dim * 4
    head_chunk = max(1, min(heads, chunk_bytes // (bytes_per_row * row_chunk + k_copy_per_head)))
    for h0 in range(0, heads, head_chunk):
        k_chunk = k[h0 : h0 + head_chunk].float()  # (h, N, D)
        for r0 in range(0, rows, row_chunk):
            q_chunk = q_rows[h0 : h0 + head_chunk, r0 : r0 + row_chunk].float() * scale  # (h, r, D)
            logits = torch.bmm(q_chunk, k_chunk.transpose(1, 2))  # (h, r, N)
            # softmax in place: one chunk of logits is all the working memory, not two
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            logits.div_(logits.sum(dim=-1, keepdim=True))
            out[r0 : r0 + row_chunk] += logits.sum(dim=0)
            del logits  # before the next chunk's bmm allocates its own
        del k_chunk
    return out.div_(heads)


def edge_tokens(grid_hw: tuple[int, int], edge_width: int, device: torch.device | None = None) -> torch.Tensor:
    """The set E of Eq. 6: image tokens within `edge_width` tokens of the grid border, (h*w,) bool."""
    h, w = grid_hw
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_edge = (rows < edge_width) | (rows >= h - edge_width)
    col_edge = (cols < edge_width) | (cols >= w - edge_width)
    return (row_edge[:, None] | col_edge[None, :]).reshape(-1)


def top_count(n_tokens: int, fraction: float) -> int:
    """k = floor(N_img * fraction) of Eq. 6 and Eq. 9."""
    return math.floor(n_tokens * fraction)


def attention_sinks(attention: torch.Tensor, edge: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Eq. 6: the values that are both in a row's top k (>= tau_k) and on the edge. (R, N), (N,) -> (R, N) bool."""
    k = top_count(attention.shape[-1], top_fraction)
    if k == 0:
        return torch.zeros_like(attention, dtype=torch.bool)
    tau_k = attention.topk(k, dim=-1).values[:, -1:]  # (R, 1): the k-th largest value of each row
    return (attention >= tau_k) & edge


def filter_attention_sinks(
    attention: torch.Tensor, edge: torch.Tensor, top_fraction: float, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 6-7: zero the values that are both in a row's top k and on the edge, then renormalise the row.

    attention: (R, N) rows that sum to 1; edge: (N,) bool -> (R, N). `sinks`: attention_sinks(...) if already
    computed. A row that the filter would empty entirely is kept as it was (renormalising it would divide by zero).
    """
    sink = attention_sinks(attention, edge, top_fraction) if sinks is None else sinks
    if not bool(sink.any()):
        return attention
    filtered = attention.masked_fill(sink, 0.0)
    total = filtered.sum(dim=-1, keepdim=True)
    emptied = total <= 0
    return torch.where(emptied, attention, filtered / total.clamp_min(torch.finfo(total.dtype).tiny))


def subject_maps(rows: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Eq. 8: M_l = mean of the rows that belong to subject l. rows: (R, N), groups index rows -> (L, N)."""
    return torch.stack([rows[list(group)].mean(dim=0) for group in groups])


def self_attention_maps(
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    maps: torch.Tensor,
    top_fraction: float,
    seed_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 9-10: mean self-attention row over each map's top tokens T_l.

    q_img, k_img: (H, N, D) image queries and keys; maps: (L, N) -> (L, N). |T_l| = floor(N * fraction),
    at least one token. `seed_scores` (L, N): rank the tokens by these instead of by the maps (contrastive
    seeds). Only the L * |T_l| self-attention rows are computed, never the N x N matrix.
    """
    n_subjects, n_tokens = maps.shape
    top = max(1, top_count(n_tokens, top_fraction))
    salient = (maps if seed_scores is None else seed_scores).topk(top, dim=-1).indices  # (L, top)
    rows = mean_attention_rows(q_img[:, salient.reshape(-1)], k_img)  # (L * top, N)
    return rows.view(n_subjects, top, n_tokens).mean(dim=1)


def contrastive_scores(maps: torch.Tensor, rule: str) -> torch.Tensor:
    """How much more subject l's words attend to each token than the other subjects' do. maps: (L, N) -> (L, N).

    "strongest": M_l - max_{m != l} M_m; "authors" (the authors' later code): L * M_l - sum_{m != l} M_m;
    "leading": M_l where l's map is the largest of all (where it would win Eq. 12's vote), ranked before every
    token where another subject leads (those keep their order by M_l, so a subject that leads fewer tokens than
    Eq. 9 takes still gets its count; float64, for ranking only). With one subject all three are M_l.
    """
    n_subjects = maps.shape[0]
    if n_subjects == 1:
        return maps.clone()
    if rule == "leading":
        leads = maps == maps.amax(dim=0, keepdim=True)
        exact = maps.double()  # float64: the shift below keeps the order of values ~1/N apart (float32 would not)
        behind = exact.amax() - exact.amin() + 1.0  # larger than any two tokens' difference: leaders rank first
        return torch.where(leads, exact, exact - behind)
    if rule == "authors":
        return (n_subjects + 1) * maps - maps.sum(dim=0, keepdim=True)
    if rule != "strongest":
        raise ValueError(f"rule: expected 'strongest', 'authors' or 'leading', got {rule!r}")
    # the largest other map per token: the largest map, or the second largest where l itself is the largest
    top2 = maps.topk(2, dim=0)
    is_first = torch.arange(n_subjects, device=maps.device)[:, None] == top2.indices[0][None, :]
    strongest_other = torch.where(is_first, top2.values[1][None, :], top2.values[0][None, :])
    return maps - strongest_other


def cross_attention_columns(
    image_q: torch.Tensor, text_k: torch.Tensor, columns: Sequence[int], chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor:
    """Eq. 5 for a cross-attention (SDXL's attn2, where text tokens are keys only): the model's own attention
    probabilities A = mean_h softmax_text(Q_img K_txt^T / sqrt(D)), read for the given text columns and each
    normalised over the image tokens, so that a column is a distribution over the N image tokens as a row of
    Eq. 5 is: cross[r, n] = A[n, t_r] / sum_n' A[n', t_r].

    image_q: (H, N, D) queries of the image tokens, text_k: (H, T, D) keys of the text tokens -> (R, N) float32.
    The softmax runs over all T text tokens (what the model computes); chunks of image rows bound the memory.
    """
    heads, n_image, dim = image_q.shape
    columns = list(columns)
    scale = 1.0 / math.sqrt(dim)
    out = torch.zeros(len(columns), n_image, dtype=torch.float32, device=image_q.device)
    keys = text_k.float()  # (H, T, D): small
    row_chunk = max(1, min(n_image, chunk_bytes // max(1, heads * text_k.shape[1] * 4)))
    index = torch.tensor(columns, device=image_q.device, dtype=torch.long)
    for r0 in range(0, n_image, row_chunk):
        q_chunk = image_q[:, r0 : r0 + row_chunk].float() * scale  # (H, r, D)
        probs = torch.bmm(q_chunk, keys.transpose(1, 2)).softmax(dim=-1)  # (H, r, T): softmax over the text
        out[:, r0 : r0 + row_chunk] = probs.mean(dim=0).index_select(-1, index).T  # (R, r)
    return out.div_(out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
