"""Stage 1 (Eq. 5-13) on planted scenes: masks recover known regions, and each ablation of Fig. 7 hurts.

The scenes are built in `planted_scenes.py` from features (region embeddings, per-token noise, attention
sinks) and a collage of real scikit-image photos; see that module's docstrings for how and why.

The failure scenes (leaking words, a wide canvas with holes, a background with an object nobody names) are where
the paper's pipeline loses; each has a remedy beyond the paper (MaskConfig's contrastive, fill_holes, background).
The IoU of every scene before and after the remedies is printed by

    python -m pytest tests/core/test_planted_scenes.py -k remedy -s -q
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.core import MaskConfig, extract_masks
from lib_freefuse.core.attention import edge_tokens, mean_attention_rows

try:  # tests/core as a package
    from .planted_scenes import (
        ABLATION_SCENES,
        BACKGROUND_PHRASE,
        END_OF_TEXT,
        FAILURE_SCENES,
        GEOMETRY_SCENES,
        PHOTOS,
        Scene,
        background_scene,
        collage,
        mean_iou,
    )
except ImportError:  # tests/core as a plain directory on sys.path (pytest's default rootdir-less import)
    from planted_scenes import (
        ABLATION_SCENES,
        BACKGROUND_PHRASE,
        END_OF_TEXT,
        FAILURE_SCENES,
        GEOMETRY_SCENES,
        PHOTOS,
        Scene,
        background_scene,
        collage,
        mean_iou,
    )

pytestmark = pytest.mark.core

MIN_IOU = 0.85  # acceptance: the full pipeline on every planted scene
GEOMETRY_SEEDS = (0, 1)
ABLATION_SEEDS = (0, 1, 2)

# Each ablation scene, the setting that removes the stage it is built for, and the least IoU that removing
# it must cost. Over seeds 0-15 the smallest drops seen were 0.74 (sink), 0.58 (intrusion) and 0.16 (holes),
# and the full pipeline's IoU never fell below 0.91 on any planted scene.
ABLATIONS: dict[str, tuple[MaskConfig, float]] = {
    "sink": (MaskConfig(sink_filter=False), 0.5),
    "intrusion": (MaskConfig(self_attention=False), 0.4),
    "holes": (MaskConfig(superpixel_vote=False), 0.12),
}
ALL_SCENES: dict[str, Callable[..., Scene]] = {**GEOMETRY_SCENES, **ABLATION_SCENES}


@pytest.mark.parametrize("name", sorted(ALL_SCENES))
def test_scene_is_well_formed(name: str) -> None:
    """Regions partition the grid; q/k/x0 have FLUX's layout; words, fillers and sinks are where they should."""
    scene = ALL_SCENES[name](0)
    h, w = scene.grid_hw
    planted = scene.planted_masks()
    assert 2 <= scene.n_subjects <= 4
    assert 24 <= min(h, w) <= max(h, w) <= 32
    assert torch.equal(planted.sum(dim=0), torch.ones(h, w, dtype=torch.long)), "regions must partition the grid"
    assert bool(planted.flatten(1).any(dim=1).all()), "every subject needs a region"

    heads, tokens, dim = scene.q.shape
    n_text = tokens - h * w
    assert scene.k.shape == scene.q.shape and heads == 4 and 32 <= dim <= 64 and 10 <= n_text <= 30
    words = [t for group in scene.subject_tokens for t in group]
    assert len(set(words)) == len(words) and all(1 <= len(group) <= 3 for group in scene.subject_tokens)
    assert max(words) < n_text and len(words) < n_text, "some text tokens must be unrelated fillers"

    edge = edge_tokens((h, w), 1)
    assert 0 < len(scene.sinks) <= math.floor(h * w * 0.01) and bool(edge[list(scene.sinks)].all())

    ppt = scene.image.shape[0] // h
    assert scene.image.shape == (h * ppt, w * ppt, 3) and 8 <= ppt <= 16
    assert scene.image.min() >= 0.0 and scene.image.max() <= 1.0
    np.testing.assert_array_equal(scene.image, collage(scene.regions, ppt, PHOTOS))


@pytest.mark.parametrize("name", ["quadrants", "sink"])
def test_scene_is_deterministic(name: str) -> None:
    first, second = ALL_SCENES[name](3), ALL_SCENES[name](3)
    assert torch.equal(first.q, second.q) and torch.equal(first.k, second.k)
    assert first.sinks == second.sinks and np.array_equal(first.image, second.image)


def test_sink_scene_sinks_are_subject_0s_top_tokens() -> None:
    """The sink scene's k sinks lie on subject 1's border and are every subject-0 word's top k tokens."""
    scene = ABLATION_SCENES["sink"](0)
    h, w = scene.grid_hw
    top_k = math.floor(h * w * 0.01)
    assert len(scene.sinks) == top_k
    assert all(scene.regions.reshape(-1)[s] == 1 for s in scene.sinks)
    n_text = scene.q.shape[1] - h * w
    rows = mean_attention_rows(scene.q[:, list(scene.subject_tokens[0])], scene.k[:, n_text:])
    for row in rows:
        assert sorted(row.topk(top_k).indices.tolist()) == list(scene.sinks)


@pytest.mark.parametrize("seed", GEOMETRY_SEEDS)
@pytest.mark.parametrize("name", sorted(GEOMETRY_SCENES))
def test_full_pipeline_recovers_planted_regions(name: str, seed: int) -> None:
    iou = scene_iou(name, seed)
    assert iou >= MIN_IOU, f"{name} (seed {seed}): mean IoU {iou:.3f} < {MIN_IOU}"


@pytest.mark.parametrize("seed", ABLATION_SEEDS)
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_lowers_iou_on_its_scene(name: str, seed: int) -> None:
    """Fig. 7: without sink handling, self-attention or voting, the scene built for that stage fails."""
    ablated_config, margin = ABLATIONS[name]
    full, ablated = scene_iou(name, seed), scene_iou(name, seed, ablated_config)
    assert full >= MIN_IOU, f"{name} scene (seed {seed}): full pipeline mean IoU {full:.3f} < {MIN_IOU}"
    assert ablated <= full - margin, (
        f"{name} scene (seed {seed}): ablated mean IoU {ablated:.3f} is not {margin} below the full {full:.3f}"
    )


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_scene_needs_only_its_stage(name: str) -> None:
    """Each ablation scene isolates one stage: removing either of the other two stages keeps the masks good."""
    for other, (config, _) in ABLATIONS.items():
        if other != name:
            iou = scene_iou(name, 0, config)
            assert iou >= MIN_IOU, f"{name} scene without the {other} stage: mean IoU {iou:.3f} < {MIN_IOU}"


# ----------------------------------------------------------------------------------------------------------
# Failure scenes and their remedies beyond the paper.

FAILURE_SEEDS = (0, 1, 2)
REGRESSION_SEEDS = (0, 1)
GOAL = 0.95  # mean IoU of each failure kind with the remedies on
REMEDIES: dict[str, MaskConfig] = {
    "leak": MaskConfig(contrastive="strongest"),
    "wide_holes": MaskConfig(fill_holes=0.01),
    "background": MaskConfig(background="tokens"),
}
ALL_ON = MaskConfig(contrastive="strongest", fill_holes=0.01, background="tokens")
# Background from a threshold instead of an end-of-text token: for hosts that cannot name that token.
ALL_ON_THRESHOLD = MaskConfig(contrastive="strongest", fill_holes=0.01, background="threshold")
EVERY_SCENE: dict[str, Callable[..., Scene]] = {**ALL_SCENES, **FAILURE_SCENES}


@functools.cache
def _scene(name: str, seed: int) -> Scene:
    """Every scene with its end-of-text token (attending evenly where the scene has no background)."""
    return EVERY_SCENE[name](seed, end_of_text=END_OF_TEXT)


@functools.cache
def scene_iou(name: str, seed: int, config: MaskConfig = MaskConfig()) -> float:
    scene = _scene(name, seed)
    masks = extract_masks(
        scene.q, scene.k, scene.subject_tokens, scene.grid_hw, scene.image, config, scene.background_tokens
    )
    return mean_iou(masks, scene)


def mean_over(name: str, seeds: tuple[int, ...], config: MaskConfig = MaskConfig()) -> float:
    return float(np.mean([scene_iou(name, seed, config) for seed in seeds]))


@pytest.mark.parametrize("name", sorted(FAILURE_SCENES))
def test_failure_scene_is_well_formed(name: str) -> None:
    """As test_scene_is_well_formed, for the failure scenes: wide grids and regions that no subject owns allowed."""
    scene = FAILURE_SCENES[name](0)
    h, w = scene.grid_hw
    labels = sorted(np.unique(scene.regions).tolist())
    assert labels == list(range(len(labels))) and 2 <= scene.n_subjects <= len(labels) <= 4
    assert min(h, w) >= 24 and max(h, w) <= 72 and h * w <= 2048
    planted = scene.planted_masks()
    assert planted.shape == (scene.n_subjects, h, w) and int(planted.sum(dim=(1, 2)).min()) >= 0.05 * h * w
    heads, tokens, _ = scene.q.shape
    n_text = tokens - h * w
    assert scene.k.shape == scene.q.shape and heads == 4 and 10 <= n_text <= 30
    words = [t for group in scene.subject_tokens for t in group]
    assert all(t not in words and t < n_text for t in scene.background_tokens)
    ppt = scene.image.shape[0] // h
    assert scene.image.shape == (h * ppt, w * ppt, 3) and 8 <= ppt <= 16
    np.testing.assert_array_equal(scene.image, collage(scene.regions, ppt, PHOTOS))


def test_end_of_text_token_attends_to_the_background_and_evenly_elsewhere() -> None:
    """The planted end-of-text token: most of its attention on the background, near the even share on the rest."""
    with_background, without = _scene("background", 0), _scene("left_right", 0)
    for scene in (with_background, without):
        assert len(scene.background_tokens) == 1
    n_text = with_background.q.shape[1] - with_background.regions.size
    row = mean_attention_rows(
        with_background.q[:, list(with_background.background_tokens)], with_background.k[:, n_text:]
    )[0]
    background = torch.from_numpy(with_background.regions.reshape(-1) == with_background.n_subjects)
    assert float(row[background].sum()) > 0.9
    n_text = without.q.shape[1] - without.regions.size
    row = mean_attention_rows(without.q[:, list(without.background_tokens)], without.k[:, n_text:])[0]
    interior = ~edge_tokens(without.grid_hw, 1)  # the sinks lie on the edge
    assert float(row[interior].max()) < 5.0 / without.regions.size


@pytest.mark.parametrize("name", sorted(FAILURE_SCENES))
def test_remedy_lifts_its_failure_scene_to_the_goal(name: str) -> None:
    """Each failure scene really fails today (mean IoU <= 0.9), its own remedy lifts it far, and all the remedies
    together reach the goal on every seed."""
    today = mean_over(name, FAILURE_SEEDS)
    alone = mean_over(name, FAILURE_SEEDS, REMEDIES[name])
    together = [scene_iou(name, seed, ALL_ON) for seed in FAILURE_SEEDS]
    assert today <= 0.9, f"{name}: mean IoU {today:.3f} today: the scene shows no failure"
    assert alone >= max(today + 0.05, 0.93), f"{name}: its remedy gives {alone:.3f} (today {today:.3f})"
    assert float(np.mean(together)) >= GOAL and min(together) >= GOAL - 0.01, f"{name}: all remedies: {together}"


@pytest.mark.parametrize("name", sorted(EVERY_SCENE))
def test_remedies_make_no_scene_worse(name: str) -> None:
    """All remedies on: no planted scene loses on average over the seeds (0.002 of IoU allowed), nor more than 0.01
    on any seed (the leak scene's seed 0, which the paper's pipeline gets right, loses 0.007: other seeds, as
    good). The threshold variant of the background may cost 0.02 on a seed (the holes scene: its noisiest
    superpixels fall under the threshold) and still takes the background scene most of the way."""
    for config, allowed in ((ALL_ON, 0.01), (ALL_ON_THRESHOLD, 0.02)):
        for seed in REGRESSION_SEEDS:
            today, remedied = scene_iou(name, seed), scene_iou(name, seed, config)
            assert remedied >= today - allowed, f"{name} (seed {seed}): {remedied:.3f} with {config}, {today:.3f} today"
    today, remedied = mean_over(name, REGRESSION_SEEDS), mean_over(name, REGRESSION_SEEDS, ALL_ON)
    assert remedied >= today - 0.002, f"{name}: mean IoU {remedied:.3f} with all remedies, {today:.3f} today"
    if name == "background":
        assert mean_over(name, REGRESSION_SEEDS, ALL_ON_THRESHOLD) >= 0.9


LEADING = MaskConfig(contrastive="leading")


def test_seeds_where_a_subject_leads_lift_the_leak_and_cost_no_scene() -> None:
    """The "leading" seeds (a subject's strongest tokens among those where its map is the largest) take the leak scene
    to the goal on every seed; no planted scene loses on average (0.002 allowed), nor more than 0.01 on a seed (the
    leak scene's seed 0, which the paper gets right, loses 0.007 as with the other contrastive rules)."""
    leak = [scene_iou("leak", seed, LEADING) for seed in FAILURE_SEEDS]
    assert float(np.mean(leak)) >= GOAL and min(leak) >= GOAL - 0.01, leak
    for name in sorted(EVERY_SCENE):
        seeds = FAILURE_SEEDS if name in FAILURE_SCENES else REGRESSION_SEEDS
        for seed in seeds:
            today, leading = scene_iou(name, seed), scene_iou(name, seed, LEADING)
            assert leading >= today - 0.01, f"{name} (seed {seed}): {leading:.3f} with leading seeds, {today:.3f} today"
        assert mean_over(name, seeds, LEADING) >= mean_over(name, seeds) - 0.002, name


def extension_iou(name: str, seed: int, config: MaskConfig, phrase: bool = False) -> float:
    """scene_iou as the extension calls extract_masks: background tokens only where the user gives background words
    (a two-word phrase planted where the end-of-text token was), no end-of-text token."""
    scene = background_scene(seed, end_of_text=BACKGROUND_PHRASE) if phrase else EVERY_SCENE[name](seed)
    tokens = scene.background_tokens if phrase else ()
    masks = extract_masks(scene.q, scene.k, scene.subject_tokens, scene.grid_hw, scene.image, config, tokens)
    return mean_iou(masks, scene)


def test_the_extensions_defaults_reach_the_goal_on_every_failure_kind_and_cost_no_scene() -> None:
    """FreeFuseArgs()'s masks (0.7.0: seeds where a subject leads, stray pieces filled, the background words' places
    free) on every failure kind: the leak and the wide canvas as they come, the background scene with its words given
    (without them nothing names the background: the 0.6.0 figure, 0.44); no other scene worse than the 0.6.0
    defaults' on average (0.002 allowed), nor by more than 0.01 on a seed."""
    defaults = FreeFuseArgs().mask
    before = dataclasses.replace(defaults, background="off", fill_holes=0.0, surroundings="vote")  # 0.6.0
    for name, phrase in (("leak", False), ("wide_holes", False), ("background", True)):
        ious = [extension_iou(name, seed, defaults, phrase) for seed in FAILURE_SEEDS]
        assert float(np.mean(ious)) >= GOAL and min(ious) >= GOAL - 0.01, (name, ious)
    for name in sorted(EVERY_SCENE):
        seeds = FAILURE_SEEDS if name in FAILURE_SCENES else REGRESSION_SEEDS
        now = [extension_iou(name, seed, defaults) for seed in seeds]
        then = [extension_iou(name, seed, before) for seed in seeds]
        assert min(np.subtract(now, then)) >= -0.01 and np.mean(now) >= np.mean(then) - 0.002, (name, now, then)


def test_the_nearest_clear_subject_costs_no_scene_over_eight_seeds() -> None:
    """0.8.0's places no subject clearly leads, to the nearest clear subject (surroundings "nearest_lead"), against
    the 0.7.0 defaults on every planted scene and seeds 0-7: no scene worse on average (0.002 allowed), none by more
    than 0.01 on a seed, and the failure kinds still at the goal (README "Masks beyond the paper")."""
    now = FreeFuseArgs().mask
    assert now.surroundings == "nearest_lead"
    before = dataclasses.replace(now, surroundings="vote")  # 0.7.0
    gained = []
    for name in sorted(EVERY_SCENE):
        after = np.array([extension_iou(name, seed, now) for seed in range(8)])
        then = np.array([extension_iou(name, seed, before) for seed in range(8)])
        assert (after - then).min() >= -0.01 and after.mean() >= then.mean() - 0.002, (name, after, then)
        if name in FAILURE_SCENES and name != "background":
            assert after.mean() >= GOAL, (name, after)
        gained.append(after.mean() > then.mean())
    assert sum(gained) >= 3  # it does move the masks somewhere


def test_a_background_phrase_frees_the_background_scene() -> None:
    """The user's background words (background "tokens" with the phrase's positions, not the end-of-text token) take
    the background scene to the goal, alone and with the other remedies, on every seed."""
    ious = {}
    for label, config in (("paper", MaskConfig()), ("phrase", REMEDIES["background"]), ("all on", ALL_ON)):
        ious[label] = []
        for seed in FAILURE_SEEDS:
            scene = background_scene(seed, end_of_text=BACKGROUND_PHRASE)
            tokens = scene.background_tokens if config.background == "tokens" else ()
            masks = extract_masks(scene.q, scene.k, scene.subject_tokens, scene.grid_hw, scene.image, config, tokens)
            ious[label].append(mean_iou(masks, scene))
    assert len(scene.background_tokens) == 2 and float(np.mean(ious["paper"])) <= 0.6, ious
    for label in ("phrase", "all on"):
        assert float(np.mean(ious[label])) >= GOAL and min(ious[label]) >= GOAL - 0.01, ious


def test_remedy_table() -> None:
    """Prints mean [min] IoU over the seeds of every scene before and after each remedy (run with -s). The single
    remedies are shown on the failure scenes only; on the others, all remedies together (checked above)."""
    h, w = _scene("wide_holes", 0).grid_hw
    columns = {
        "paper": MaskConfig(),
        "contrastive": REMEDIES["leak"],
        "fill_holes": REMEDIES["wide_holes"],
        "bg tokens": REMEDIES["background"],
        "bg threshold": MaskConfig(background="threshold"),
        "all on": ALL_ON,
        "all, bg thr.": ALL_ON_THRESHOLD,
    }
    lines = ["", f"{'scene':<14}" + "".join(f"{c:>16}" for c in columns)]
    for name in [*sorted(ALL_SCENES), *sorted(FAILURE_SCENES)]:
        failure = name in FAILURE_SCENES
        seeds = FAILURE_SEEDS if failure else REGRESSION_SEEDS
        cells = []
        for label, config in columns.items():
            if not failure and label not in ("paper", "all on", "all, bg thr."):
                cells.append(f"{'-':>16}")
                continue
            ious = [scene_iou(name, seed, config) for seed in seeds]
            cells.append(f"{np.mean(ious):>9.3f} [{min(ious):.2f}]")
        lines.append(f"{name:<14}" + "".join(cells))
    slic = {
        "n_segments = tokens / 4": MaskConfig(n_segments=h * w // 4),
        "compactness 5": MaskConfig(compactness=5.0),
        "compactness 20": MaskConfig(compactness=20.0),
    }
    measured = {label: mean_over("wide_holes", REGRESSION_SEEDS, config) for label, config in slic.items()}
    lines.append(
        f"wide_holes, seeds {REGRESSION_SEEDS}: paper {mean_over('wide_holes', REGRESSION_SEEDS):.3f}; SLIC settings "
        "instead of fill_holes: " + ", ".join(f"{k} {v:.3f}" for k, v in measured.items())
    )
    lines.append(f"seeds: failure scenes {FAILURE_SEEDS}, the others {REGRESSION_SEEDS}")
    print("\n".join(lines))
    # No SLIC setting closes the holes that fill_holes closes.
    assert max(measured.values()) < mean_over("wide_holes", REGRESSION_SEEDS, REMEDIES["wide_holes"]) - 0.05
