"""Each stage of the mask extraction against a direct, naive implementation of its equation (Eq. 5-13).

The naive versions build the full softmax matrices (text x image, image x image) and loop over rows,
superpixels and subjects; the core never does either.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib_freefuse.core import MaskConfig
from lib_freefuse.core.attention import (
    edge_tokens,
    filter_attention_sinks,
    mean_attention_rows,
    self_attention_maps,
    subject_maps,
)
from lib_freefuse.core.masks import subject_score_maps
from lib_freefuse.core.superpixel import vote_superpixels

pytestmark = pytest.mark.core

HEADS, DIM, N_TEXT, GRID = 3, 16, 12, (10, 12)
N_IMG = GRID[0] * GRID[1]


@pytest.fixture
def qk() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(HEADS, N_TEXT + N_IMG, DIM, generator=g, dtype=torch.float64) * 2
    k = torch.randn(HEADS, N_TEXT + N_IMG, DIM, generator=g, dtype=torch.float64) * 2
    return q.float(), k.float()


def naive_softmax_rows(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full head-averaged softmax(q k^T / sqrt(D)) in float64, built one head and one row at a time."""
    q, k = q.double(), k.double()
    out = torch.zeros(q.shape[1], k.shape[1], dtype=torch.float64)
    for h in range(q.shape[0]):
        for i in range(q.shape[1]):
            logits = (k[h] @ q[h, i]) / math.sqrt(q.shape[2])  # (N,)
            e = torch.exp(logits - logits.max())
            out[i] += (e / e.sum()).double()
    return out / q.shape[0]


def naive_edge(grid_hw: tuple[int, int], width: int) -> torch.Tensor:
    h, w = grid_hw
    return torch.tensor([min(r, c, h - 1 - r, w - 1 - c) < width for r in range(h) for c in range(w)])


def naive_sink_filter(rows: torch.Tensor, edge: torch.Tensor, fraction: float) -> torch.Tensor:
    """Eq. 6-7 row by row: tau_k = k-th largest; zero A >= tau_k on the edge; renormalise."""
    k = math.floor(rows.shape[1] * fraction)
    out = rows.clone().double()
    if k == 0:
        return out
    for i in range(rows.shape[0]):
        tau = sorted(rows[i].tolist(), reverse=True)[k - 1]
        keep = torch.tensor([not (float(a) >= tau and bool(e)) for a, e in zip(rows[i], edge, strict=True)])
        filtered = rows[i].double() * keep
        out[i] = filtered / filtered.sum()
    return out


# Eq. 5 -----------------------------------------------------------------------------------------------------------
def test_eq5_cross_attention_rows_match_full_softmax(qk):
    q, k = qk
    rows = [1, 4, 5, 9]
    full = naive_softmax_rows(q[:, :N_TEXT], k[:, N_TEXT:])  # (L_txt, N): only the test builds this
    got = mean_attention_rows(q[:, rows], k[:, N_TEXT:])
    torch.testing.assert_close(got.double(), full[rows], atol=1e-6, rtol=1e-5)


def test_eq5_chunking_does_not_change_rows(qk):
    q, k = qk
    whole = mean_attention_rows(q[:, :N_TEXT], k[:, N_TEXT:])
    tiny_chunks = mean_attention_rows(q[:, :N_TEXT], k[:, N_TEXT:], chunk_bytes=1)  # one head, one row at a time
    torch.testing.assert_close(tiny_chunks, whole, atol=1e-7, rtol=1e-6)


def test_eq5_accepts_bf16_and_returns_float32(qk):
    q, k = qk
    got = mean_attention_rows(q[:, :3].bfloat16(), k[:, N_TEXT:].bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(dim=1), torch.ones(3), atol=1e-5, rtol=0)


# Eq. 6-7 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 2])
def test_edge_tokens_match_definition(width):
    assert torch.equal(edge_tokens(GRID, width), naive_edge(GRID, width))


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_eq6_7_sink_filter_matches_naive(qk, fraction):
    q, k = qk
    rows = mean_attention_rows(q[:, :N_TEXT], k[:, N_TEXT:])
    edge = edge_tokens(GRID, 1)
    got = filter_attention_sinks(rows, edge, fraction)
    torch.testing.assert_close(got.double(), naive_sink_filter(rows, edge, fraction), atol=1e-6, rtol=1e-5)


def test_eq6_7_filter_removes_planted_edge_sink_and_keeps_interior_peak():
    rows = torch.full((1, N_IMG), 1.0)
    rows[0, 0] = 500.0  # corner: on the edge -> a sink, removed
    rows[0, 5 * GRID[1] + 5] = 400.0  # interior: kept even though it is in the top k
    rows = rows / rows.sum()
    got = filter_attention_sinks(rows, edge_tokens(GRID, 1), 0.02)
    assert got[0, 0] == 0
    assert got[0, 5 * GRID[1] + 5] > 0.3
    torch.testing.assert_close(got.sum(), torch.tensor(1.0))


def test_eq6_7_ties_at_tau_are_all_filtered():
    rows = torch.full((1, N_IMG), 1.0)
    rows[0, [0, 1, 2]] = 10.0  # three edge tokens tie at the top; k = 1 -> all three are >= tau_k
    rows = rows / rows.sum()
    got = filter_attention_sinks(rows, edge_tokens(GRID, 1), 1 / N_IMG)
    assert torch.all(got[0, :3] == 0)


def test_eq6_7_a_row_the_filter_would_empty_is_kept():
    grid = (2, 2)  # every token is an edge token
    rows = torch.full((1, 4), 0.25)
    torch.testing.assert_close(filter_attention_sinks(rows, edge_tokens(grid, 1), 0.5), rows)


# Eq. 8 -----------------------------------------------------------------------------------------------------------
def test_eq8_subject_map_is_mean_of_its_rows():
    rows = torch.rand(6, N_IMG)
    groups = [[0, 3], [1], [2, 4, 5]]
    got = subject_maps(rows, groups)
    for l, group in enumerate(groups):
        expected = sum(rows[i] for i in group) / len(group)
        torch.testing.assert_close(got[l], expected)


# Eq. 9-10 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.01, 0.05])
def test_eq9_10_self_attention_maps_match_full_matrix(qk, fraction):
    q, k = qk
    q_img, k_img = q[:, N_TEXT:], k[:, N_TEXT:]
    maps = torch.rand(2, N_IMG, generator=torch.Generator().manual_seed(3))
    a_self = naive_softmax_rows(q_img, k_img)  # (N, N): only the test builds this
    top = max(1, math.floor(N_IMG * fraction))
    expected = torch.stack([a_self[maps[l].argsort(descending=True)[:top]].mean(dim=0) for l in range(2)])
    got = self_attention_maps(q_img, k_img, maps, fraction)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


# Eq. 5-10 together -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        MaskConfig(),
        MaskConfig(sink_filter=False),
        MaskConfig(self_attention=False),
        MaskConfig(edge_width=2, sink_top_fraction=0.1, self_attention_top_fraction=0.05),
        MaskConfig(cross_attention="image_queries"),
        MaskConfig(cross_attention="image_queries", sink_filter=False, self_attention=False),
    ],
)
def test_eq5_to_10_score_maps_match_naive_pipeline(qk, config):
    q, k = qk
    groups = [[0, 2], [5], [7, 8, 11]]
    if config.cross_attention == "image_queries":
        cross = naive_image_query_columns(q[:, N_TEXT:], k[:, :N_TEXT])
    else:
        cross = naive_softmax_rows(q[:, :N_TEXT], k[:, N_TEXT:])
    if config.sink_filter:
        cross = naive_sink_filter(cross, naive_edge(GRID, config.edge_width), config.sink_top_fraction)
    maps = torch.stack([cross[g].mean(dim=0) for g in groups])
    if config.self_attention:
        a_self = naive_softmax_rows(q[:, N_TEXT:], k[:, N_TEXT:])
        top = max(1, math.floor(N_IMG * config.self_attention_top_fraction))
        maps = torch.stack([a_self[m.argsort(descending=True)[:top]].mean(dim=0) for m in maps])
    got = subject_score_maps(q, k, groups, GRID, config, n_text=N_TEXT)
    torch.testing.assert_close(got.double(), maps, atol=1e-6, rtol=1e-5)


def naive_image_query_columns(q_img: torch.Tensor, k_txt: torch.Tensor) -> torch.Tensor:
    """The transposed scores, literally: the full (N, L_txt) logits q_img k_txt^T / sqrt(D) per head, each text
    column softmaxed over the image tokens, heads averaged, returned as (L_txt, N) rows in float64."""
    heads, _, dim = q_img.shape
    total = torch.zeros(k_txt.shape[1], q_img.shape[1], dtype=torch.float64)
    for h in range(heads):
        logits = q_img[h].double() @ k_txt[h].double().T / math.sqrt(dim)  # (N, L_txt)
        total += torch.softmax(logits, dim=0).T
    return total / heads


# Eq. 11-13 -------------------------------------------------------------------------------------------------------
def naive_vote(maps: torch.Tensor, segments: np.ndarray) -> np.ndarray:
    """Eq. 12-13 literally: bilinear upsampling, then per superpixel the summed score of each subject."""
    up = torch.nn.functional.interpolate(maps[None].double(), size=segments.shape, mode="bilinear")[0].numpy()
    owner = np.zeros(segments.shape, dtype=np.int64)
    for label in np.unique(segments):
        region = segments == label
        scores = [up[l][region].sum() for l in range(maps.shape[0])]
        owner[region] = int(np.argmax(scores))
    return owner


def test_eq11_13_vote_matches_naive():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((3, 6, 8))).float()
    segments = rng.integers(0, 20, size=(24, 32))
    got = vote_superpixels(maps, torch.from_numpy(segments))
    assert np.array_equal(got.numpy(), naive_vote(maps, segments))


def test_eq11_13_each_superpixel_has_one_owner():
    from lib_freefuse.core.superpixel import slic_segments

    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((40, 40, 3))).float()
    segments = slic_segments(image, 16, 10.0)
    owner = vote_superpixels(torch.rand(2, 5, 5), segments)
    for label in segments.unique():
        assert owner[segments == label].unique().numel() == 1
