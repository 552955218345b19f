"""The second toy world (bench/toyworld2) in the host: its committed transformer loads into Forge's own FLUX class,
its LoRA files match every key in Forge's LoRA loader, and its benchmark runs FreeFuse and oracle rows end to end
through the extension's job (so that neither the world nor its benchmark can rot unseen)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOYWORLD2 = Path(__file__).resolve().parents[2] / "bench" / "toyworld2"


@pytest.fixture(scope="module")
def benchmark2(forge):
    sys.path.insert(0, str(TOYWORLD2))
    import benchmark2

    return benchmark2


@pytest.fixture(scope="module")
def second_world(benchmark2):
    return benchmark2.World(benchmark2.MODEL, steps=8)


def test_freefuse_and_oracle_rows_run_through_the_extensions_job(benchmark2, second_world):
    """One seed x both prompts per row; World.images raises when Forge left a LoRA key unmatched or FreeFuse made no
    masks, so a row that comes back ran FreeFuse."""
    from scorer import load_scorer

    scorer = load_scorer(benchmark2.SCORER)
    names = ["both merged", "FreeFuse (paper defaults)", "  LoRAs off before masks", "oracle masks (paper timing)"]
    rows = {name: benchmark2.run_config(second_world, scorer, name, seeds=1) for name in names}
    assert all(row["images"] == 2 for row in rows.values())
    table = benchmark2.first.format_table(rows)
    assert "| FreeFuse (paper defaults) |" in table and "| ↳ LoRAs off before masks |" in table


def test_the_oracle_seam_gives_the_true_halves_and_is_undone(benchmark2, second_world):
    import lib_freefuse.forge.job as job_module

    original = job_module.extract_masks
    prompt, _ = benchmark2.world.benchmark_prompts()["P2"]  # "quil on the left and zorb on the right"
    oracle, own = [], []
    with torch.inference_mode():
        oracle_images = second_world.images("both", {}, True, prompt, seed=5, n=1, dump=oracle)
        own_images = second_world.images("both", {}, False, prompt, seed=5, n=1, dump=own)
    assert job_module.extract_masks is original
    (record,) = oracle
    masks = record["masks"]  # subjects in LoRA order: zorb, quil; quil is named first, so it owns the left half
    w = masks.shape[-1]
    assert (masks[1, :, : w // 2] == 1).all() and (masks[1, :, w // 2 :] == 0).all()
    assert torch.equal(masks[0], 1 - masks[1])
    assert len(own) == 1 and not torch.equal(own[0]["masks"], masks)
    assert not torch.equal(oracle_images, own_images)


def test_the_mixed_oracles_put_one_part_right_and_keep_the_extraction_elsewhere(benchmark2, second_world):
    """The modes "truth on figures" and "truth off figures": the job's own extraction (the same as without the
    seam, since the steps before it are the same) with the figure tokens of the capture's x0, or all the other
    tokens, given to the subject of their half."""
    prompt, _ = benchmark2.world.benchmark_prompts()["P1"]
    runs = {}
    with torch.inference_mode():
        for mode in (False, True, *benchmark2.world.MIXED_ORACLES):
            dump = []
            second_world.images("both", {}, mode, prompt, seed=3, n=1, dump=dump, keep=True)
            (runs[mode],) = dump
    own, halves = runs[False]["masks"], runs[True]["masks"]
    figure = benchmark2.world.figure_tokens(np.asarray(runs[False]["image"], np.float32), runs[False]["grid"])
    assert figure.any() and (~figure).any()
    inside, outside = torch.from_numpy(figure), torch.from_numpy(~figure)
    on, off = runs["truth on figures"]["masks"], runs["truth off figures"]["masks"]
    assert torch.equal(on[:, inside], halves[:, inside]) and torch.equal(on[:, outside], own[:, outside])
    assert torch.equal(off[:, inside], own[:, inside]) and torch.equal(off[:, outside], halves[:, outside])


def test_each_lora_changes_the_picture_and_merging_both_differs_from_either(benchmark2, second_world):
    prompt, _ = benchmark2.world.benchmark_prompts()["P1"]
    with torch.inference_mode():
        images = {tags: second_world.images(tags, None, False, prompt, seed=3, n=1) for tags in benchmark2.TAGS}
    for tags in ("zorb", "quil", "both"):
        assert (images[tags] - images["none"]).abs().max() > 0.05, tags
    assert (images["both"] - images["zorb"]).abs().max() > 0.05


def test_freefuse_keeps_the_second_worlds_characters_apart_where_merging_fails(benchmark2):
    """Quality on the committed second world, 16 fixed seeds x both prompts, 24 steps (the benchmark's full table
    with intervals: bench/toyworld2/README.md)."""
    from scorer import load_scorer

    scorer = load_scorer(benchmark2.SCORER)
    world = benchmark2.World(benchmark2.MODEL)
    with torch.inference_mode():
        merged, paper, defaults = (benchmark2.run_config(world, scorer, name, seeds=16) for name in QUALITY_ROWS)
    print(
        f"\nsecond world, 16 seeds x 2 prompts: merged {merged['identity']}, FreeFuse paper {paper['identity']}, "
        f"defaults {defaults['identity']} (both right {defaults['both_right']})"
    )
    assert merged["identity"][0] <= MERGED_AT_MOST, merged
    assert paper["identity"][0] >= merged["identity"][0] + GAIN_AT_LEAST, paper
    assert merged["both_right"][0] <= MERGED_BOTH_RIGHT_AT_MOST, merged
    assert paper["both_right"][0] >= BOTH_RIGHT_AT_LEAST, paper
    assert defaults["identity"][0] >= merged["identity"][0] + DEFAULTS_GAIN_AT_LEAST, defaults
    assert defaults["both_right"][0] >= DEFAULTS_BOTH_RIGHT_AT_LEAST, defaults
    # --first-seed: seeds 8-15 alone are the images of seeds 8-15 within the 16 (P1's, then P2's)
    with torch.inference_mode():
        later = benchmark2.run_config(world, scorer, "FreeFuse (defaults)", seeds=8, first_seed=8)
    values = defaults["identity_values"]
    assert len(set(values[8:16] + values[24:32])) > 1  # else the check below proves little
    assert later["identity_values"] == values[8:16] + values[24:32]


QUALITY_ROWS = ("both merged", "FreeFuse (paper defaults)", "FreeFuse (defaults)")
# Merged at full strength the two LoRAs show a character in its own half almost never (the benchmark: 0.07 of the
# halves over 64 seeds; these 16 seeds: 3 of 64) and both characters right in one image never; FreeFuse shows at least
# 24 more halves of 64 (the benchmark: 0.61 +- 0.06 over 64 seeds; these 16 seeds: 33 of 64) and both right in at
# least 4 of the 32 images (the benchmark: 0.38 +- 0.08; these 16 seeds: 7 of 32).
MERGED_AT_MOST = 4 / 64
GAIN_AT_LEAST = 24 / 64
MERGED_BOTH_RIGHT_AT_MOST = 1 / 32
BOTH_RIGHT_AT_LEAST = 4 / 32
# The extension's defaults (0.6.0: own words, b = 5, the blocks' average, seeds where each subject leads) show at
# least 32 more halves of 64 than merged use and both right in at least 10 of 32 images (the benchmark: 0.725 and 0.52
# over 128 seeds; these 16 seeds: 46 of 64 and 18 of 32; 0.5.0's 46 and 17), above what the paper's settings reach.
DEFAULTS_GAIN_AT_LEAST = 32 / 64
DEFAULTS_BOTH_RIGHT_AT_LEAST = 10 / 32


def test_mask_signals_rebuilds_the_jobs_masks_from_the_kept_inputs(forge, forge_root, tmp_path):
    """bench/toyworld/mask_signals.py on the second world at smoke size: what it collects is what the job handed
    extract_masks, and its offline "paper" masks are the job's own masks (so its other variants are comparable);
    with average_steps the job's masks are the offline mean of the steps' maps, with average_blocks the mean of the
    blocks' maps at the capture step."""
    sys.path.insert(0, str(TOYWORLD2.parent / "toyworld"))
    import mask_signals

    path = tmp_path / "captures.pt"
    mask_signals.collect_second(forge_root, seeds=1, out=path, blocks=[0, 1], steps=[1, 2, 3])
    captures = torch.load(path, weights_only=False)
    assert sorted(captures) == [(b, s) for b in (0, 1) for s in (1, 2, 3)]
    assert all(len(r) == 2 for r in captures.values())  # 2 prompts
    for record in captures[(1, 3)]:
        offline = mask_signals.masks_of(record, mask_signals.paper_maps(record))
        assert torch.equal(offline, record["masks"])
    benchmark2 = sys.modules["benchmark2"]
    averaged = []
    prompt, _ = benchmark2.world.benchmark_prompts()["P1"]
    settings = {"capture_block": 1, "capture_step": 3, "average_steps": True, **mask_signals.PAPER_MASKS}
    with torch.inference_mode():
        benchmark2.World(benchmark2.MODEL).images("both", settings, False, prompt, 1000, 1, averaged)
    maps = [mask_signals.paper_maps(captures[(1, s)][0]) for s in (3, 1, 2)]  # the job's order: this step, then earlier
    offline = mask_signals.masks_of(captures[(1, 3)][0], torch.stack(maps).mean(0))
    assert torch.equal(averaged[0]["masks"], offline)
    assert not torch.equal(offline, captures[(1, 3)][0]["masks"])  # the mean moved some owners: the check can tell
    blocks = []
    with torch.inference_mode():
        settings = {"capture_block": 1, "capture_step": 3, "average_blocks": True, "contrastive": "off"}
        benchmark2.World(benchmark2.MODEL).images("both", settings, False, prompt, 1000, 1, blocks)
    maps = [mask_signals.paper_maps(captures[(b, 3)][0]) for b in (1, 0)]  # the job's order: the capture block first
    offline = mask_signals.masks_of(captures[(1, 3)][0], torch.stack(maps).mean(0))
    assert len(blocks) == 1 and torch.equal(blocks[0]["masks"], offline)
    assert not torch.equal(offline, captures[(1, 3)][0]["masks"])
    defaults = []  # 0.6.0: the blocks' mean of the maps whose seeds lie where each subject leads
    with torch.inference_mode():
        settings = {"capture_block": 1, "capture_step": 3}
        benchmark2.World(benchmark2.MODEL).images("both", settings, False, prompt, 1000, 1, defaults)
    maps = [mask_signals.paper_maps(captures[(b, 3)][0], contrastive="leading") for b in (1, 0)]
    offline = mask_signals.masks_of(captures[(1, 3)][0], torch.stack(maps).mean(0))
    assert len(defaults) == 1 and torch.equal(defaults[0]["masks"], offline)
    table = mask_signals.analyse_steps(path)
    assert 0 <= table["mean of steps 1..s, block 1, step 3: figure accuracy"] <= 1
    assert set(mask_signals.analyse(path)) >= {"paper, block 1, step 3", "mean of steps, block 1"}
    by_block = mask_signals.analyse_blocks(path, step=3)
    assert set(by_block) == {
        f"{v}: {m}" for v in ("block 0", "block 1", "mean of blocks") for m in ("IoU", "figure accuracy")
    }
    assert all(0 <= value <= 1 for value in by_block.values())
    by_seeds = mask_signals.analyse_blocks(path, step=3, seed_rules=("off", "leading"))
    assert by_seeds["seeds off, block 1: IoU"] == pytest.approx(by_block["block 1: IoU"])
    assert {"seeds leading, mean of blocks: figure accuracy P2", "seeds off, block 0: largest mask's share"} <= set(
        by_seeds
    )
    configs = mask_signals.analyse_configs(path, step=3)
    assert configs["paper, block 1: IoU"] == pytest.approx(table["paper, block 1, step 3: IoU"])


def test_the_mask_sweep_scores_halves_and_figures(benchmark2, second_world, capsys):
    """benchmark2.iou_sweep at smoke size: every variant x block at the asked step, IoU and figure accuracy each a
    (mean, half-width) in [0, 1], printed as "IoU / figures" per cell."""
    table = benchmark2.iou_sweep(second_world, seeds=1, capture_steps=[2])
    blocks = range(benchmark2.world2.TRANSFORMER["depth"])
    assert set(table) == {(v, b, 2) for v in benchmark2.first.IOU_VARIANTS for b in blocks}
    assert all(0 <= cell[m][0] <= 1 for cell in table.values() for m in ("iou", "figure"))
    benchmark2.first.print_iou(table, 1, len(blocks))
    assert "| double_blocks.1 | " in capsys.readouterr().out
