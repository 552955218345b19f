"""Screen candidate character LoRAs in a toy world through Forge's webui: each alone, merged, FreeFuse, oracle.

    FORGE_DIR=... FORGE_PYTHON=<forge webui python> python bench/toyworld/screen_loras.py --model work/model_names \
        --candidates work/gpu5/prior25@1000 work/gpu5/prior25 [--seeds 8] [--configs "alone;merged"]

A candidate is a train.py output folder, optionally @STEP for its checkpoint (lora_zorb_STEP.safetensors,
written by --lora-save-every); without a step, the final lora_zorb/lora_quil files. Every candidate runs in one
webui (the world's checkpoint and scorer from --model), on the benchmark's prompts and seeds, and gets one row per
configuration: "alone" (each LoRA by itself: a good character LoRA draws its character in its own half and keeps
the other figure, identity up to 0.5), "merged", "freefuse" (paper defaults), "oracle" (true halves, paper timing),
or any FreeFuse configuration of benchmark.py by its name ("joint + restart", "oracle masks + joint + restart").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import benchmark
import torch
import world
from scorer import load_scorer

GROUPS = ("alone", "merged", "freefuse", "oracle")
# the short groups that are benchmark.py configurations: group -> (row name, configuration)
GROUP_CONFIGS = {
    "freefuse": ("FreeFuse", "FreeFuse (paper defaults)"),
    "oracle": ("oracle", "oracle masks (paper timing)"),
}
# a configuration with FreeFuse's own masks -> the oracle with the same timing (its share of the gain is printed)
ORACLE_OF = {
    "FreeFuse": "oracle",
    "image-query attention": "oracle",
    "joint + restart": "oracle masks + joint + restart",
    "off before masks + restart": "oracle masks + off before + restart",
    "image-query attention, off before + restart": "oracle masks + off before + restart",
    "image-query, off before + restart, text none": "oracle masks, text none + off before + restart",
}


def candidate_files(spec: str) -> tuple[str, dict[str, Path]]:
    """ "DIR[@STEP]" -> (label, {character: LoRA file}); names the missing file if there is one."""
    folder, _, step = spec.partition("@")
    suffix = f"_{step}" if step else ""
    files = {name: Path(folder) / f"lora_{name}{suffix}.safetensors" for name in world.CHARACTERS}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise SystemExit(f"candidate {spec}: no {', '.join(missing)}")
    return f"{Path(folder).name}@{step or 'final'}", files


def rows_for(label: str, index: int, groups: list[str]) -> list[tuple[str, str, dict | None, bool]]:
    """(row name, LoRA tags, alwayson_scripts, oracle) for one candidate, its LoRAs named c{index}_zorb/_quil."""
    zorb, quil = f"c{index}_zorb", f"c{index}_quil"
    both = f" <lora:{zorb}:1> <lora:{quil}:1>"
    rows = []
    if "alone" in groups:
        rows += [(f"{label} ZORB alone", f" <lora:{zorb}:1>", None, False)]
        rows += [(f"{label} QUIL alone", f" <lora:{quil}:1>", None, False)]
    if "merged" in groups:
        rows += [(f"{label} merged", both, None, False)]
    for group in groups:
        if group in ("alone", "merged"):
            continue
        row, config = GROUP_CONFIGS.get(group, (group, group))
        _, scripts, oracle = benchmark_config(config)
        scripts = copy.deepcopy(scripts)
        for subject, lora in zip(scripts["FreeFuse"]["args"][0]["subjects"], (zorb, quil), strict=True):
            subject["lora"] = lora
        rows += [(f"{label} {row}", both, scripts, oracle)]
    return rows


def benchmark_config(name: str) -> tuple:
    """A FreeFuse configuration of benchmark.py by its (stripped) name: (tags, alwayson_scripts, oracle)."""
    found = {n.strip(): config for n, config in benchmark.CONFIGS.items() if config[1] is not None}
    if name not in found:
        raise SystemExit(f"--configs: unknown {name!r}; choose from {', '.join(GROUPS)} or one of {sorted(found)}")
    return found[name]


def shares(results: dict, label: str) -> list[str]:
    """One line per configuration of `label` whose oracle ran too: its share of the oracle's gain over merged use."""
    rows = {name[len(label) + 1 :]: row for name, row in results.items() if name.startswith(label + " ")}
    rows["both merged"] = rows.get("merged", {})
    lines = []
    for own, oracle in ORACLE_OF.items():
        share = benchmark.oracle_share(rows, own, oracle) if rows["both merged"] else None
        if share is not None:
            bounds = benchmark.oracle_share_interval(rows, own, oracle)
            spread = f" (95% bootstrap {bounds[0]:.0%} to {bounds[1]:.0%})" if bounds else ""
            lines.append(f"{label} {own}: {share:.0%} of the gain of '{oracle}' over merged{spread}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    parser.add_argument("--python", default=os.environ.get("FORGE_PYTHON"), help="the Python of Forge's webui")
    parser.add_argument("--model", type=Path, default=benchmark.MODEL, help="the world's checkpoint and scorer")
    parser.add_argument("--candidates", nargs="+", required=True, help="DIR[@STEP] ...")
    parser.add_argument("--configs", default="alone;merged", help=f"';'-separated: {', '.join(GROUPS)}, or a "
                        "FreeFuse configuration of benchmark.py by name")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--sheet", type=Path, help="write a PNG of each row's first images")
    args = parser.parse_args(argv)
    if not args.python:
        raise SystemExit("FORGE_PYTHON (or --python): the Python of a Forge webui install")
    groups = [g.strip() for g in args.configs.split(";")]
    for group in set(groups) - set(GROUPS):
        benchmark_config(group)  # names the unknown one
    candidates = [candidate_files(spec) for spec in args.candidates]
    extra = {f"c{i}_{name}": path for i, (_, files) in enumerate(candidates) for name, path in files.items()}

    torch.set_num_threads(1)
    scorer = load_scorer(args.model / "scorer.safetensors")
    data_dir = Path(tempfile.mkdtemp(prefix="toyworld-screen-"))
    webui, process, stop = benchmark.start_webui(args.forge.resolve(), args.python, data_dir, args.model, extra)
    results, sheet, started = {}, [], time.monotonic()
    try:
        for i, (label, _) in enumerate(candidates):
            for name, tags, scripts, oracle in rows_for(label, i, groups):
                row = benchmark.run_images(webui, scorer, name, tags, scripts, oracle, args.seeds, 24, data_dir, sheet)
                results[name] = row
                print(f"{name}: present {row['present'][0]:.2f} identity {row['identity'][0]:.3f} "
                      f"(P1 {row['identity_P1']:.2f}, P2 {row['identity_P2']:.2f}) both {row['both_right'][0]:.2f} "
                      f"wrong colour {row['wrong_colour'][0]:.2f}", flush=True)  # fmt: skip
    finally:
        stop(process)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\n{args.seeds} seeds x 2 prompts, {time.monotonic() - started:.0f} s\n")
    print(benchmark.format_table(results))
    for label, _ in candidates:
        print("\n".join(shares(results, label)))
    if args.sheet:
        benchmark.save_sheet(sheet, args.sheet)
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "seeds": args.seeds, "model": str(args.model)}, indent=1))


if __name__ == "__main__":
    main()
