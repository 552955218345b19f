"""Experiment: mask IoU of variants of the mask pipeline, from the captures of both toy worlds (issue 17).

    FORGE_DIR=<forge> FORGE_PYTHON=<python> <python> bench/toyworld/mask_signals.py collect --world 1 --out F
    FORGE_DIR=<forge> <forge python> bench/toyworld/mask_signals.py collect --world 2 --out F
    <python> bench/toyworld/mask_signals.py analyse F1 F2

`collect` runs FreeFuse (paper defaults) in one world once per capture block and step and keeps what each mask
extraction was handed (q, k, grid, x0, config): the first world through its webui and the benchmark seam, the
second through Forge's backend (bench/toyworld2). The capture block and step do not change sampling before the
masks exist, so for one seed the runs at different blocks see the same picture. `analyse` computes, from those
inputs alone, the masks of each variant (heads weighted, blocks or steps combined, a block chosen per image by a
signal) and their IoU against the true halves. Nothing here changes the extension: it tells what to build.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE), str(HERE.parent / "toyworld2")]
import world  # noqa: E402

STEPS = (2, 5, 8)
PAPER_MASKS = {"average_blocks": False, "contrastive": "off"}  # the paper's masks where the defaults (0.6.0) go beyond


def collect_first(forge: Path, python: str, seeds: int, out: Path, blocks=None, steps=STEPS) -> None:
    """The first world through its webui: captures per (block, step), in seed order over both prompts."""
    import benchmark as first

    data_dir = Path(tempfile.mkdtemp(prefix="toyworld-signals-"))
    os.environ["FREEFUSE_TOY_KEEP_INPUTS"] = "1"  # the webui inherits it (benchmark._server_env keeps os.environ)
    webui, process, stop = first.start_webui(forge, python, data_dir)
    dump = data_dir / "masks"
    captures = {}
    try:
        for block in blocks if blocks is not None else range(first.LAST_BLOCK + 1):
            for step in steps:
                records = []
                for prompt, _ in world.benchmark_prompts().values():
                    for start in range(0, seeds, first.BATCH):
                        shutil.rmtree(dump, ignore_errors=True)
                        dump.mkdir()
                        n = min(first.BATCH, seeds - start)
                        scripts = first.freefuse(capture_block=block, capture_step=step)
                        first.generate(webui, prompt + first.TAGS["both"], 1000 + start, n, first.STEPS, scripts)
                        found = [torch.load(p, weights_only=False) for p in sorted(dump.glob("*.pt"))]
                        if len(found) != n or "q" not in found[0]:
                            raise RuntimeError(f"expected {n} extractions with inputs, found {len(found)}")
                        records += found
                captures[(block, step)] = records
                print(f"  block {block}, step {step}: {len(records)} captures", flush=True)
    finally:
        stop(process)
        shutil.rmtree(data_dir, ignore_errors=True)
    torch.save(captures, out)


def collect_second(forge: Path, seeds: int, out: Path, blocks=None, steps=STEPS) -> None:
    """The second world through Forge's backend: captures per (block, step), in seed order over both prompts."""
    import benchmark2
    import world2

    benchmark2.forge_env.setup(forge)
    w = benchmark2.World(benchmark2.MODEL)
    captures = {}
    with torch.inference_mode():
        for block in blocks if blocks is not None else range(world2.TRANSFORMER["depth"]):
            for step in steps:
                records = []
                for prompt, _ in world.benchmark_prompts().values():
                    for start in range(0, seeds, benchmark2.BATCH):
                        n = min(benchmark2.BATCH, seeds - start)
                        settings = {"capture_block": block, "capture_step": step, **PAPER_MASKS}
                        w.images("both", settings, False, prompt, 1000 + start, n, records, keep=True)
                captures[(block, step)] = records
                print(f"  block {block}, step {step}: {len(records)} captures", flush=True)
    torch.save(captures, out)


# --- analysis ---------------------------------------------------------------------------------------------------


def n_text_of(c: dict) -> int:
    return c["q"].shape[1] - c["grid"][0] * c["grid"][1]


def head_rows(c: dict) -> tuple[torch.Tensor, list[int]]:
    """Eq. 5 per head, before the mean: (H, R, N) softmax over the image tokens of the subjects' word rows, and
    those rows' text positions."""
    n_text = n_text_of(c)
    rows = sorted({t for group in c["subject_tokens"] for t in group})
    q = c["q"][:, rows].float()
    k = c["k"][:, n_text:].float()
    return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1), rows


def paper_maps(c: dict, head_weights: torch.Tensor | None = None, contrastive: str = "off") -> torch.Tensor:
    """Eq. 5-10 (L, N) with the heads of Eq. 5 weighted (None: the paper's mean) and Eq. 9's seeds by `contrastive`
    (MaskConfig's rule; "off": the paper's)."""
    from dataclasses import replace

    from lib_freefuse.core.masks import _refined_maps, _sink_filtered

    per_head, rows = head_rows(c)
    w = torch.ones(per_head.shape[0]) if head_weights is None else head_weights
    cross = (per_head * (w / w.sum())[:, None, None]).sum(0)
    cross, sinks = _sink_filtered(cross, c["grid"], c["config"])
    n_text = n_text_of(c)
    config = replace(c["config"], contrastive=contrastive)
    return _refined_maps(cross, sinks, rows, c["subject_tokens"], c["q"][:, n_text:].float(),
                         c["k"][:, n_text:].float(), config)  # fmt: skip


def masks_of(c: dict, maps: torch.Tensor) -> torch.Tensor:
    from lib_freefuse.core.masks import _masks_from_maps

    return _masks_from_maps(maps.view(-1, *c["grid"]), c["image"], c["config"], None)


def iou(c: dict, masks: torch.Tensor) -> float:
    import benchmark as first

    return first.mask_iou({"masks": masks, "subject_tokens": c["subject_tokens"]})


def figure_tokens(c: dict) -> torch.Tensor:
    """(h, w) bool: the tokens whose pixels of the capture's x0 are mostly not the grey background."""
    img = np.asarray(c["image"], np.float32)
    return torch.from_numpy(world.figure_tokens(img / 255 if img.max() > 1.5 else img, c["grid"]))


def figure_accuracy(c: dict, masks: torch.Tensor, figure: torch.Tensor) -> float:
    """world.figure_accuracy of the masks of one capture."""
    import benchmark as first

    ordered = first.ordered_masks({"masks": masks, "subject_tokens": c["subject_tokens"]})
    return world.figure_accuracy(ordered, figure.numpy())


def head_separation(c: dict) -> torch.Tensor:
    """(H,) how differently each head's subject maps spread: total variation between the subjects' rows."""
    per_head, rows = head_rows(c)
    row_of = {t: r for r, t in enumerate(rows)}
    maps = torch.stack([per_head[:, [row_of[t] for t in g]].mean(1) for g in c["subject_tokens"]], 1)  # (H, L, N)
    return 0.5 * (maps[:, 0] - maps[:, 1]).abs().sum(-1)


def head_concentration(c: dict) -> torch.Tensor:
    """(H,) 1 - normalised entropy of each head's subject rows, averaged over the subjects' words."""
    per_head, _ = head_rows(c)
    entropy = -(per_head * per_head.clamp_min(1e-12).log()).sum(-1) / math.log(per_head.shape[-1])
    return (1 - entropy).mean(-1)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)


def coherence(c: dict, maps: torch.Tensor) -> float:
    """Share of 4-neighbour token pairs with the same argmax owner: how spatially whole the raw ownership is."""
    owner = maps.argmax(0).view(*c["grid"])
    same = (owner[1:] == owner[:-1]).float().sum() + (owner[:, 1:] == owner[:, :-1]).float().sum()
    h, w = c["grid"]
    return float(same / ((h - 1) * w + h * (w - 1)))


def margin(c: dict, maps: torch.Tensor) -> float:
    """Mean over tokens of |M_1 - M_2| / (M_1 + M_2) of the normalised maps: how decisively tokens are owned."""
    m = normalised(maps)
    return float(((m[0] - m[1]).abs() / (m[0] + m[1]).clamp_min(1e-12)).mean())


def separation(maps: torch.Tensor) -> float:
    m = normalised(maps)
    return float(0.5 * (m[0] - m[1]).abs().sum())


def analyse(path: Path) -> dict[str, float]:
    captures = torch.load(path, weights_only=False)
    blocks = sorted({b for b, _ in captures})
    steps = sorted({s for _, s in captures})
    n = len(captures[(blocks[0], steps[0])])
    results: dict[str, list[float]] = {}

    def add(name, value):
        results.setdefault(name, []).append(value)

    for i in range(n):
        maps = {}  # (block, step) -> the paper's (L, N) maps, for the block choices below
        for key, records in captures.items():
            c = records[i]
            maps[key] = paper_maps(c)
            by_separation = paper_maps(c, head_separation(c) ** 2)
            by_concentration = paper_maps(c, head_concentration(c))
            add(f"paper, block {key[0]}, step {key[1]}", iou(c, masks_of(c, maps[key])))
            add(f"heads by separation^2, block {key[0]}, step {key[1]}", iou(c, masks_of(c, by_separation)))
            add(f"heads by concentration, block {key[0]}, step {key[1]}", iou(c, masks_of(c, by_concentration)))
        for step in steps:
            c = captures[(blocks[-1], step)][i]
            keys = [(b, step) for b in blocks]
            signals = {
                "coherence": {k: coherence(captures[k][i], maps[k]) for k in keys},
                "margin": {k: margin(captures[k][i], maps[k]) for k in keys},
                "separation": {k: separation(maps[k]) for k in keys},
            }
            for signal_name, value in signals.items():
                best = max(keys, key=value.__getitem__)
                add(f"block chosen by {signal_name}, step {step}", iou(c, masks_of(c, maps[best])))
            mean = torch.stack([normalised(maps[k]) for k in keys]).mean(0)
            add(f"mean of blocks, step {step}", iou(c, masks_of(c, mean)))
        for block in blocks:
            c = captures[(block, 5)][i] if (block, 5) in captures else captures[(block, steps[-1])][i]
            mean = torch.stack([normalised(maps[(block, s)]) for s in steps]).mean(0)
            add(f"mean of steps, block {block}", iou(c, masks_of(c, mean)))
    return {name: float(np.mean(v)) for name, v in results.items()}


def analyse_steps(path: Path) -> dict[str, float]:
    """Per block and capture step s: the paper's masks at s, and the masks of the maps (Eq. 5-10) averaged over
    steps 1..s and over the last 3 steps up to s, voted once on s's x0 (what `average_steps` does for 1..s). Two
    measures each: IoU against the true halves, and figure accuracy (figures read from the latest step's x0)."""
    captures = torch.load(path, weights_only=False)
    blocks = sorted({b for b, _ in captures})
    steps = sorted({s for _, s in captures})
    n = len(captures[(blocks[0], steps[0])])
    results: dict[str, list[float]] = {}
    for i in range(n):
        for block in blocks:
            figure = figure_tokens(captures[(block, steps[-1])][i])
            maps = {s: normalised(paper_maps(captures[(block, s)][i])) for s in steps}
            for s in steps:
                c = captures[(block, s)][i]
                windows = {"paper": [s], "mean of steps 1..s": [t for t in steps if t <= s],
                           "mean of last 3": [t for t in steps if s - 3 < t <= s]}  # fmt: skip
                for name, window in windows.items():
                    masks = masks_of(c, torch.stack([maps[t] for t in window]).mean(0))
                    results.setdefault(f"{name}, block {block}, step {s}: IoU", []).append(iou(c, masks))
                    accuracy = figure_accuracy(c, masks, figure)
                    results.setdefault(f"{name}, block {block}, step {s}: figure accuracy", []).append(accuracy)
    return {name: float(np.mean(v)) for name, v in results.items()}


CONFIG_VARIANTS = {
    "paper": {},
    "contrastive seeds, strongest": {"contrastive": "strongest"},
    "contrastive seeds, authors": {"contrastive": "authors"},
    "self-attention seeds 0.5%": {"self_attention_top_fraction": 0.005},
    "self-attention seeds 3%": {"self_attention_top_fraction": 0.03},
    "self-attention seeds 10%": {"self_attention_top_fraction": 0.1},
}


def analyse_configs(path: Path, step: int = 5) -> dict[str, float]:
    """Per block at `step`: extract_masks with each MaskConfig change of CONFIG_VARIANTS, IoU and figure accuracy
    (figures from the latest captured step's x0)."""
    from dataclasses import replace

    from lib_freefuse.core import extract_masks

    captures = torch.load(path, weights_only=False)
    blocks = sorted({b for b, _ in captures})
    last = max(s for _, s in captures)
    results: dict[str, list[float]] = {}
    for block in blocks:
        for i, c in enumerate(captures[(block, step)]):
            figure = figure_tokens(captures[(block, last)][i])
            for name, change in CONFIG_VARIANTS.items():
                config = replace(c["config"], **change)
                masks = extract_masks(c["q"], c["k"], c["subject_tokens"], c["grid"], c["image"], config)
                results.setdefault(f"{name}, block {block}: IoU", []).append(iou(c, masks))
                results.setdefault(f"{name}, block {block}: figure accuracy", []).append(
                    figure_accuracy(c, masks, figure)
                )
    return {name: float(np.mean(v)) for name, v in results.items()}


def analyse_blocks(path: Path, step: int = 5, seed_rules: tuple[str, ...] = ("off",)) -> dict[str, float]:
    """At `step`: each block's masks and the masks of the mean of every block's maps (what `average_blocks` does,
    voted on the last block's capture), IoU and figure accuracy (figures from that step's x0), per rule of Eq. 9's
    seeds; with several rules also per prompt (the captures hold the first prompt's images, then the second's) and
    the largest mask's share of the image (one subject taking both figures shows there)."""
    captures = torch.load(path, weights_only=False)
    blocks = sorted(b for b, s in captures if s == step)
    n_images = len(captures[(blocks[0], step)])
    results: dict[str, list[float]] = {}
    for i in range(n_images):
        records = {b: captures[(b, step)][i] for b in blocks}
        last = records[blocks[-1]]
        figure = figure_tokens(last)
        prompt = "P1" if i < n_images // 2 else "P2"
        for rule in seed_rules:
            maps = {b: paper_maps(c, contrastive=rule) for b, c in records.items()}
            variants = {f"block {b}": (records[b], maps[b]) for b in blocks}
            variants["mean of blocks"] = (last, torch.stack([maps[b] for b in reversed(blocks)]).mean(0))
            for name, (c, m) in variants.items():
                masks = masks_of(c, m)
                name = name if seed_rules == ("off",) else f"seeds {rule}, {name}"
                measured = {"IoU": iou(c, masks), "figure accuracy": figure_accuracy(c, masks, figure)}
                if seed_rules != ("off",):
                    measured["largest mask's share"] = float((masks > 0.5).float().mean(dim=(1, 2)).max())
                    measured.update({f"{k} {prompt}": v for k, v in list(measured.items())})
                for key, value in measured.items():
                    results.setdefault(f"{name}: {key}", []).append(value)
    return {name: float(np.mean(v)) for name, v in results.items()}


def analyse_seeds(path: Path) -> dict[str, float]:
    """analyse_blocks with the paper's seeds and the seeds where a subject leads (`contrastive` "leading")."""
    return analyse_blocks(path, seed_rules=("off", "leading"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--world", choices=("1", "2"), required=True)
    c.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    c.add_argument("--python", default=os.environ.get("FORGE_PYTHON"))
    c.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--blocks", help="capture blocks, comma-separated (default: every double block)")
    c.add_argument("--steps", default=",".join(map(str, STEPS)), help="capture steps, comma-separated")
    a = sub.add_parser("analyse")
    a.add_argument("files", type=Path, nargs="+")
    a.add_argument("--steps-only", action="store_true", help="only the windows over capture steps")
    a.add_argument("--configs", action="store_true", help="only the mask settings of CONFIG_VARIANTS, at step 5")
    a.add_argument("--blocks", action="store_true", help="only each block and the mean of blocks, at step 5")
    a.add_argument("--seeds", action="store_true", help="as --blocks, for the paper's seeds and the leading ones")
    args = parser.parse_args(argv)
    if args.command == "collect":
        blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
        steps = [int(s) for s in args.steps.split(",")]
        if args.world == "1":
            collect_first(args.forge.resolve(), args.python, args.seeds, args.out, blocks, steps)
        else:
            collect_second(args.forge.resolve(), args.seeds, args.out, blocks, steps)
        return
    analysis = analyse_steps if args.steps_only else analyse
    analysis = analyse_blocks if args.blocks else analysis
    analysis = analyse_configs if args.configs else analysis
    analysis = analyse_seeds if args.seeds else analysis
    tables = {path.name: analysis(path) for path in args.files}
    names = list(dict.fromkeys(n for t in tables.values() for n in t))
    print("| variant | " + " | ".join(tables) + " |")
    print("|---|" + "---|" * len(tables))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{t[name]:.3f}" if name in t else "" for t in tables.values()) + " |")


if __name__ == "__main__":
    main()
