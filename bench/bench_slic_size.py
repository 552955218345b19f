"""The size of the copy SLIC runs on (MaskConfig.slic_max_side): mask quality and time, at FLUX's own token grids.

Run from the repository root:

    nice python bench/bench_slic_size.py            # 64x64 and 48x80 token grids at 16 px per token, 4 sizes
    python bench/bench_slic_size.py --smoke         # checks that it runs (seconds)

FLUX at 1024x1024 has a 64x64 token grid, 16 pixels per token side. The scenes are tests/core/planted_scenes.py's
geometries (left/right, diagonal, disc, quadrants, three strips) built at that grid and at a wide 48x80 one
(768x1280 px), each with its photo collage at 16 px per token, seeds 0 and 1. For each `slic_max_side`, extract_masks
runs with every other setting at its default; the table gives the mean IoU of the masks against the planted regions
(min over the scenes), and the median time of SLIC alone (skimage, single-threaded) and of the whole extraction.
Time: every size runs once per scene and round, interleaved; the ratio of each size's extraction time to the 512-px
copy's (the default before 0.2.0) on the same scene, median [min - max] over scenes and rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from bench_common import REPO, lib_root, ratio_line, spread

sys.path.insert(0, lib_root(sys.argv))
sys.path.insert(0, str(REPO / "tests" / "core"))  # planted_scenes

import planted_scenes

from lib_freefuse.core import MaskConfig, extract_masks, superpixel

GEOMETRIES = {
    "left_right": planted_scenes.left_right,
    "diagonal": planted_scenes.diagonal,
    "disc": planted_scenes.disc,
    "quadrants": planted_scenes.quadrants,
    "three_strips": planted_scenes.vertical_strips,
}
REFERENCE = 512  # the default before 0.2.0


class SlicClock:
    """Wraps superpixel.slic (as slic_segments calls it) and keeps the time of the last call."""

    def __init__(self):
        self.original = superpixel.slic
        self.last = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.last = time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 16x16 grid at 8 px per token, 2 sizes, 1 round")
    parser.add_argument("--lib-root", help="import lib_freefuse from this path (a prototype copy)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2): seeds 0 .. rounds - 1")
    options = parser.parse_args()
    if options.smoke:
        grids, pixels_per_token, sizes, rounds = [(16, 16)], 8, [64, REFERENCE], 1
    else:
        grids, pixels_per_token, sizes, rounds = [(64, 64), (48, 80)], 16, [1024, REFERENCE, 384, 256], options.rounds
    default = MaskConfig().slic_max_side
    clock = SlicClock()
    superpixel.slic = clock
    ious = {size: [] for size in sizes}
    slic_ms = {size: [] for size in sizes}
    total_ms = {size: [] for size in sizes}
    ratios = {size: [] for size in sizes if size != REFERENCE}
    for seed in range(rounds):
        for grid in grids:
            for name, make in GEOMETRIES.items():
                recipe = planted_scenes.Recipe(pixels_per_token=pixels_per_token)
                scene = planted_scenes.build_scene(name, make(*grid), seed, recipe=recipe)
                spent = {}
                order = sizes if seed % 2 == 0 else sizes[::-1]
                for size in order:
                    config = MaskConfig(slic_max_side=size)
                    start = time.perf_counter()
                    masks = extract_masks(scene.q, scene.k, scene.subject_tokens, scene.grid_hw, scene.image, config)
                    spent[size] = time.perf_counter() - start
                    ious[size].append(planted_scenes.mean_iou(masks, scene))
                    slic_ms[size].append(1000 * clock.last)
                    total_ms[size].append(1000 * spent[size])
                for size in ratios:
                    ratios[size].append(spent[size] / spent[REFERENCE])
    superpixel.slic = clock.original
    scenes = len(grids) * len(GEOMETRIES)
    image_sides = ", ".join(f"{h}x{w} tokens ({h * pixels_per_token}x{w * pixels_per_token} px)" for h, w in grids)
    print(f"{scenes} planted scenes x {rounds} seed(s): {image_sides}; default slic_max_side {default}")
    header = f"{'slic_max_side':>14} {'mean IoU':>9} {'min IoU':>8} {'SLIC ms':>8} {'extract ms':>11}"
    print(f"{header}  time / {REFERENCE}'s")
    for size in sizes:
        versus = "1" if size == REFERENCE else spread(ratios[size])
        print(
            f"{size:>14} {np.mean(ious[size]):>9.3f} {min(ious[size]):>8.3f} {statistics.median(slic_ms[size]):>8.1f} "
            f"{statistics.median(total_ms[size]):>11.1f}  {versus}"
        )
    for size, values in ratios.items():
        print(ratio_line(f"extraction at slic_max_side {size} / {REFERENCE}", values))


if __name__ == "__main__":
    main()
