"""Experiment: masks from several double blocks at once (issue 17's "aggregation over blocks"), mask IoU only.

    FORGE_DIR=<forge> <forge python> bench/toyworld2/aggregate_blocks.py [--seeds 8] [--json F]

In the second world, FreeFuse runs once per capture block with the paper's defaults otherwise; the capture block
does not change sampling before the masks exist, so every run reaches the capture step with the same picture, and
the q, k each run hands to extract_masks are the same call's at different blocks. From them: the masks of each block
alone and of the mean of the blocks' subject score maps (Eq. 5-10 per block, then one Eq. 11-13 vote), scored by IoU
against the true halves. Nothing here changes the extension: it only tells whether aggregation is worth building.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import world2
from benchmark2 import BATCH, MODEL, World, first, forge_env, world


def masks_from(captures: list[dict], weighting: str = "mean") -> torch.Tensor:
    """(L, h, w) masks from the captures' subject score maps (each made a distribution over the image), combined by
    `weighting`: "mean"; "separation": each block weighted by (1 - overlap)^2, overlap = sum over the image of the
    subjects' smallest map value (1 for identical maps, 0 for disjoint ones); "most separated": that block alone."""
    from lib_freefuse.core.masks import _masks_from_maps, subject_score_maps

    c = captures[0]
    n_text = c["q"].shape[1] - c["grid"][0] * c["grid"][1]
    maps = [
        subject_score_maps(x["q"], x["k"], x["subject_tokens"], x["grid"], x["config"], n_text=n_text) for x in captures
    ]
    maps = torch.stack([m / m.sum(-1, keepdim=True).clamp_min(1e-12) for m in maps])  # (blocks, L, N)
    separation = 1 - maps.min(1).values.sum(-1)  # (blocks,)
    if weighting == "mean":
        weights = torch.ones_like(separation)
    elif weighting == "separation":
        weights = separation**2
    else:
        weights = (separation == separation.max()).float()
    combined = (maps * weights[:, None, None]).sum(0) / weights.sum()
    return _masks_from_maps(combined.view(-1, *c["grid"]), c["image"], c["config"], None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    forge_env.setup(args.forge.resolve())
    w = World(MODEL)
    blocks = list(range(world2.TRANSFORMER["depth"]))
    ious: dict[str, list[float]] = {}
    with torch.inference_mode():
        for prompt, _ in world.benchmark_prompts().values():
            for start in range(0, args.seeds, BATCH):
                n = min(BATCH, args.seeds - start)
                runs = {}
                for block in blocks:
                    runs[block] = []
                    w.images("both", {"capture_block": block}, False, prompt, 1000 + start, n, runs[block], keep=True)
                for i in range(n):
                    tokens = runs[0][i]["subject_tokens"]
                    chosen = {f"double_blocks.{b}": [runs[b][i]] for b in blocks}
                    every = [runs[b][i] for b in blocks]
                    for name, captures, weighting in (
                        *((name, captures, "mean") for name, captures in chosen.items()),
                        ("mean of all double blocks", every, "mean"),
                        ("separation-weighted mean", every, "separation"),
                        ("the most separating block", every, "most separated"),
                    ):
                        record = {"masks": masks_from(captures, weighting), "subject_tokens": tokens}
                        ious.setdefault(name, []).append(first.mask_iou(record))
    table = {name: first.interval(values) for name, values in ious.items()}
    print(f"\nmask IoU against the true halves, second world ({args.seeds} seeds x 2 prompts, paper defaults):")
    for name, (mean, half) in table.items():
        print(f"| {name} | {mean:.3f} +- {half:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"iou": table, "values": ious, "seeds": args.seeds}, indent=1))


if __name__ == "__main__":
    main()
