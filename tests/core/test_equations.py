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
    contrastive_scores,
    edge_tokens,
    filter_attention_sinks,
    mean_attention_rows,
    self_attention_maps,
    subject_maps,
)
from lib_freefuse.core.masks import BACKGROUND_SCALE, background_score_map, subject_score_maps
from lib_freefuse.core.superpixel import fill_holes, token_owners, vote_superpixels

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


def naive_sinks(rows: torch.Tensor, edge: torch.Tensor, fraction: float) -> torch.Tensor:
    """Eq. 6 row by row: the values >= the row's k-th largest that lie on the edge, (R, N) bool."""
    k = math.floor(rows.shape[1] * fraction)
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for i in range(rows.shape[0]):
        if k:
            tau = sorted(rows[i].tolist(), reverse=True)[k - 1]
            out[i] = torch.tensor([float(a) >= tau and bool(e) for a, e in zip(rows[i], edge, strict=True)])
    return out


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
        MaskConfig(contrastive="strongest", sink_top_fraction=0.05, self_attention_top_fraction=0.05),
        MaskConfig(contrastive="authors", sink_top_fraction=0.05, self_attention_top_fraction=0.05),
        MaskConfig(contrastive="strongest", sink_filter=False),
        MaskConfig(contrastive="authors", cross_attention="image_queries"),
        MaskConfig(contrastive="strongest", self_attention=False),
        MaskConfig(contrastive="leading", sink_top_fraction=0.05, self_attention_top_fraction=0.05),
        MaskConfig(contrastive="leading", self_attention_top_fraction=0.3),
        MaskConfig(contrastive="leading", cross_attention="image_queries", sink_filter=False),
    ],
)
def test_eq5_to_10_score_maps_match_naive_pipeline(qk, config):
    got = subject_score_maps(*qk, GROUPS, GRID, config, n_text=N_TEXT)
    torch.testing.assert_close(got.double(), naive_score_maps(*qk, config), atol=1e-6, rtol=1e-5)


GROUPS = [[0, 2], [5], [7, 8, 11]]


def naive_score_maps(q, k, config: MaskConfig, skip_sinks: bool = True) -> torch.Tensor:
    """Eq. 5-10 with full matrices; contrastive seeds as defined in config.py, sinks of any subject row skipped."""
    if config.cross_attention == "image_queries":
        cross = naive_image_query_columns(q[:, N_TEXT:], k[:, :N_TEXT])
    else:
        cross = naive_softmax_rows(q[:, :N_TEXT], k[:, N_TEXT:])
    sink_any = torch.zeros(N_IMG, dtype=torch.bool)
    if config.sink_filter:
        edge = naive_edge(GRID, config.edge_width)
        subject_rows = sorted({i for g in GROUPS for i in g})
        sink_any = naive_sinks(cross[subject_rows], edge, config.sink_top_fraction).any(dim=0)
        cross = naive_sink_filter(cross, edge, config.sink_top_fraction)
    maps = torch.stack([cross[g].mean(dim=0) for g in GROUPS])
    if not config.self_attention:
        return maps
    a_self = naive_softmax_rows(q[:, N_TEXT:], k[:, N_TEXT:])
    top = max(1, math.floor(N_IMG * config.self_attention_top_fraction))
    if config.contrastive == "leading":
        seeds = [naive_leading_seeds(maps, l, sink_any if skip_sinks else None, top) for l in range(len(GROUPS))]
        return torch.stack([a_self[s].mean(dim=0) for s in seeds])
    seeds_by = maps
    if config.contrastive != "off":
        seeds_by = torch.stack([naive_contrast(maps, l, config.contrastive) for l in range(len(GROUPS))])
        if skip_sinks:
            seeds_by = seeds_by.masked_fill(sink_any, -math.inf)
    return torch.stack([a_self[s.argsort(descending=True, stable=True)[:top]].mean(dim=0) for s in seeds_by])


def naive_leading_seeds(maps: torch.Tensor, l: int, sinks: torch.Tensor | None, top: int) -> list[int]:
    """The "leading" seeds from config.py's words: the tokens where M_l is the largest map, strongest first, then
    the others by M_l; tokens that are a sink of any subject's row last."""

    def rank(j: int) -> tuple:
        leads = all(float(maps[l, j]) >= float(maps[m, j]) for m in range(maps.shape[0]))
        is_sink = sinks is not None and bool(sinks[j])
        return (not is_sink, leads, float(maps[l, j]))

    return sorted(range(maps.shape[1]), key=rank, reverse=True)[:top]


def naive_contrast(maps: torch.Tensor, l: int, rule: str) -> torch.Tensor:
    """One subject's contrastive score, token by token, from the definitions in config.py."""
    out = torch.zeros(maps.shape[1], dtype=maps.dtype)
    for j in range(maps.shape[1]):
        others = [float(maps[m, j]) for m in range(maps.shape[0]) if m != l]
        if not others:
            out[j] = maps[l, j]
        elif rule == "strongest":
            out[j] = maps[l, j] - max(others)
        else:
            out[j] = maps.shape[0] * maps[l, j] - sum(others)
    return out


@pytest.mark.parametrize("rule", ["strongest", "authors"])
@pytest.mark.parametrize("n_subjects", [1, 2, 4])
def test_contrastive_scores_match_their_definition(rule, n_subjects):
    maps = torch.rand(n_subjects, 50, generator=torch.Generator().manual_seed(n_subjects))
    maps[:, 7] = 0.5  # a token where every subject ties
    expected = torch.stack([naive_contrast(maps, l, rule) for l in range(n_subjects)])
    torch.testing.assert_close(contrastive_scores(maps, rule), expected)


@pytest.mark.parametrize("n_subjects", [1, 2, 4])
def test_leading_seeds_are_a_subjects_strongest_tokens_among_those_it_leads(n_subjects):
    maps = torch.rand(n_subjects, 50, generator=torch.Generator().manual_seed(n_subjects))
    maps[:, 7] = 0.5  # a token where every subject ties: each of them leads it
    scores = contrastive_scores(maps, "leading")
    for l in range(n_subjects):
        order = scores[l].argsort(descending=True, stable=True).tolist()
        assert order == naive_leading_seeds(maps, l, None, 50)


def test_leading_seeds_keep_the_order_of_map_values_a_float32_shift_would_merge():
    """Subject 0 leads one token only; its other seeds are ranked by values 1e-9 apart, as a 4096-token map's are."""
    maps = torch.tensor([[1e-3, 2e-4, 2e-4 + 1e-9, 2e-4 + 2e-9], [0.0, 5e-3, 5e-3, 5e-3]])
    order = contrastive_scores(maps, "leading")[0].argsort(descending=True, stable=True).tolist()
    assert order == naive_leading_seeds(maps, 0, None, 4) == [0, 3, 2, 1]


def test_leading_seeds_leave_a_place_another_subject_claims_more_strongly():
    """The planted leak in two tokens: subject 0's words attend most to token 3, which subject 1 claims more."""
    maps = torch.tensor([[0.1, 0.2, 0.0, 0.6, 0.1], [0.0, 0.0, 0.1, 0.8, 0.1]])
    assert contrastive_scores(maps, "leading")[0].argmax() == 1  # its own strongest (the paper's seed) is token 3
    assert contrastive_scores(maps, "leading")[1].argmax() == 3


def test_contrastive_seeds_skip_sinks_that_the_test_config_really_meets(qk):
    """The sink rule of the contrastive seeds is exercised above: without it the seeds and the maps differ."""
    config = MaskConfig(contrastive="strongest", sink_top_fraction=0.05, self_attention_top_fraction=0.05)
    with_rule, without_rule = naive_score_maps(*qk, config), naive_score_maps(*qk, config, skip_sinks=False)
    assert not torch.allclose(with_rule, without_rule, atol=1e-4)


@pytest.mark.parametrize("cross_attention", ["text_queries", "image_queries"])
@pytest.mark.parametrize("sink_filter", [True, False])
def test_background_map_is_the_background_rows_excess_over_the_even_share(qk, cross_attention, sink_filter):
    q, k = qk
    config = MaskConfig(background="tokens", cross_attention=cross_attention, sink_filter=sink_filter)
    rows = [10, 3]
    if cross_attention == "image_queries":
        cross = naive_image_query_columns(q[:, N_TEXT:], k[:, :N_TEXT])
    else:
        cross = naive_softmax_rows(q[:, :N_TEXT], k[:, N_TEXT:])
    if sink_filter:
        cross = naive_sink_filter(cross, naive_edge(GRID, 1), config.sink_top_fraction)
    mean = cross[rows].mean(dim=0)
    expected = torch.tensor([max(0.0, float(v) - 1.0 / N_IMG) * BACKGROUND_SCALE for v in mean], dtype=torch.float64)
    got = background_score_map(q, k, rows, GRID, config, n_text=N_TEXT)
    assert got.shape == (N_IMG,) and bool((got >= 0).all()) and bool((got == 0).any())
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


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


def naive_vote_with_background(maps, segments, background=None, threshold=None) -> np.ndarray:
    """Eq. 12-13 per superpixel with a background class: the background map competes as class L; with a threshold, a
    superpixel whose every subject's mean upsampled score is below threshold / (h * w) goes to class L."""
    n_subjects, h, w = maps.shape
    channels = maps if background is None else torch.cat([maps, background[None]])
    up = torch.nn.functional.interpolate(channels[None].double(), size=segments.shape, mode="bilinear")[0].numpy()
    owner = np.zeros(segments.shape, dtype=np.int64)
    for label in np.unique(segments):
        region = segments == label
        sums = [up[c][region].sum() for c in range(channels.shape[0])]
        winner = int(np.argmax(sums))
        if threshold is not None and max(sums[:n_subjects]) / region.sum() < threshold / (h * w):
            winner = n_subjects
        owner[region] = winner
    return owner


@pytest.mark.parametrize("threshold", [None, 0.5, 1.0])
@pytest.mark.parametrize("with_background", [False, True])
def test_vote_with_background_matches_naive(threshold, with_background):
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.random((3, 6, 8)) ** 6 / 7).float()  # skewed: some superpixels below 1/N
    background = torch.from_numpy(rng.random((6, 8)) / 30).float() if with_background else None
    segments = np.kron(rng.permutation(48).reshape(6, 8), np.ones((4, 4), dtype=np.int64))  # one per token ...
    segments[rng.random(segments.shape) < 0.2] = 7  # ... and one scattered superpixel
    got = vote_superpixels(maps, torch.from_numpy(segments), background, threshold).numpy()
    expected = naive_vote_with_background(maps, segments, background, threshold)
    assert np.array_equal(got, expected)
    if with_background or threshold:
        assert 3 in set(got.ravel().tolist()), "the case must give some superpixel to the background"


@pytest.mark.parametrize("threshold", [None, 0.8])
def test_token_owners_match_naive(threshold):
    rng = np.random.default_rng(4)
    maps = torch.from_numpy(rng.random((2, 5, 7)) / 20).float()
    background = torch.from_numpy(rng.random((5, 7)) / 30).float()
    got = token_owners(maps, background, threshold)
    for r in range(5):
        for c in range(7):
            scores = [float(maps[0, r, c]), float(maps[1, r, c]), float(background[r, c])]
            want = int(np.argmax(scores))
            if threshold is not None and max(scores[:2]) < threshold / 35:
                want = 2
            assert int(got[r, c]) == want


def test_eq11_13_vote_matches_naive():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((3, 6, 8))).float()
    segments = rng.integers(0, 20, size=(24, 32))
    got = vote_superpixels(maps, torch.from_numpy(segments))
    assert np.array_equal(got.numpy(), naive_vote(maps, segments))


def naive_fill_holes(owner: np.ndarray, min_size: int, max_passes: int = 4, n_subjects: int = 0) -> np.ndarray:
    """fill_holes with a flood fill: every pass finds the 4-connected pieces, then, smallest first (ties in scan
    order of their first pixel), gives each piece under min_size pixels to the owner most common among the pixels
    that touch it (each counted once; ties to the lowest owner), except each subject's (owner < n_subjects) largest
    piece of the pass (ties: the first found in scan order)."""
    owner = owner.copy()
    h, w = owner.shape
    for _ in range(max_passes):
        seen = np.zeros((h, w), dtype=bool)
        pieces = []
        for r in range(h):
            for c in range(w):
                if seen[r, c]:
                    continue
                stack, piece = [(r, c)], []
                seen[r, c] = True
                while stack:
                    y, x = stack.pop()
                    piece.append((y, x))
                    for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                        if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and owner[ny, nx] == owner[r, c]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                pieces.append(piece)
        kept = set()
        for subject in range(n_subjects):
            own_pieces = [i for i, p in enumerate(pieces) if owner[p[0]] == subject]
            if own_pieces:
                kept.add(max(own_pieces, key=lambda i: (len(pieces[i]), -i)))
        changed = False
        small = [p for i, p in enumerate(pieces) if len(p) < min_size and i not in kept]
        for piece in sorted(small, key=len):
            inside = set(piece)
            own = owner[piece[0]]
            ring = {
                n
                for y, x in piece
                for n in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1))
                if 0 <= n[0] < h and 0 <= n[1] < w and n not in inside
            }
            around = [owner[n] for n in ring if owner[n] != own]
            if around:
                counts = np.bincount(around)
                for pixel in piece:
                    owner[pixel] = int(np.argmax(counts))
                changed = True
        if not changed:
            break
    return owner


@pytest.mark.parametrize("n_subjects", [0, 2, 3])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_size", [2, 5, 12])
def test_fill_holes_matches_naive(seed, min_size, n_subjects):
    rng = np.random.default_rng(seed)
    owner = rng.choice(3, size=(14, 17), p=[0.6, 0.3, 0.1])
    got = fill_holes(torch.from_numpy(owner), min_size, n_subjects=n_subjects).numpy()
    assert np.array_equal(got, naive_fill_holes(owner, min_size, n_subjects=n_subjects))


def test_fill_holes_keeps_a_small_subjects_largest_piece():
    """A subject drawn small (one piece under min_size) keeps it; its stray pieces still go; the background's don't
    count as a subject's."""
    owner = np.zeros((12, 12), dtype=np.int64)
    owner[1:3, 1:3] = 1  # subject 1's only piece besides ...
    owner[9, 9] = 1  # ... a stray pixel
    owner[5:7, 8:10] = 2  # a piece of background
    got = fill_holes(torch.from_numpy(owner), min_size=5, n_subjects=2).numpy()
    expected = np.zeros((12, 12), dtype=np.int64)
    expected[1:3, 1:3] = 1
    assert np.array_equal(got, expected)
    assert not fill_holes(torch.from_numpy(owner), min_size=5).numpy().any()  # no subjects named: all go


def test_fill_holes_closes_small_islands_and_keeps_large_ones():
    owner = np.zeros((12, 12), dtype=np.int64)
    owner[:, 6:] = 1
    owner[2:4, 2:4] = 1  # a hole of 4 pixels in subject 0
    owner[8:11, 8:11] = 2  # a 9-pixel piece of background inside subject 1, with ...
    owner[9, 9] = 0  # ... a 1-pixel island inside it
    got = fill_holes(torch.from_numpy(owner), min_size=5).numpy()
    expected = np.zeros((12, 12), dtype=np.int64)
    expected[:, 6:] = 1
    expected[8:11, 8:11] = 2
    assert np.array_equal(got, expected)
    assert np.array_equal(fill_holes(torch.from_numpy(owner), min_size=10).numpy()[8:11, 8:11], np.ones((3, 3)))
    assert np.array_equal(fill_holes(torch.from_numpy(owner), min_size=1).numpy(), owner)


def test_eq11_13_each_superpixel_has_one_owner():
    from lib_freefuse.core.superpixel import slic_segments

    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((40, 40, 3))).float()
    segments = slic_segments(image, 16, 10.0)
    owner = vote_superpixels(torch.rand(2, 5, 5), segments)
    for label in segments.unique():
        assert owner[segments == label].unique().numel() == 1
