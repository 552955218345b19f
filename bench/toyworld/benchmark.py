"""The toy-world benchmark: two character LoRAs through a real Forge webui, scored per half, with 95% intervals.

    FORGE_DIR=... FORGE_PYTHON=<forge webui python> python bench/toyworld/benchmark.py [--seeds 32] [--iou]

Starts Forge's webui on 127.0.0.1 (CPU) with the committed toy world (model/), generates seeds x both prompts
("zorb on the left and quil on the right" and the swap) for every configuration, reads each half with the scorer
and prints one table: present, identity, both right, wrong-character colour (mean +- 95% interval over images),
and the share of the oracle's identity gain over merged use that FreeFuse's own masks reach. --iou adds the mask
IoU against the true halves for every capture block and several capture steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import world
from scorer import load_scorer, read_halves, score_image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODEL = HERE / "model"
SEAM = HERE / "webui_seam"
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "webui")]
from lib_freefuse.args import PAPER_SETTINGS  # noqa: E402

STEPS = 24
BATCH = 8  # images per API call (consecutive seeds, as Forge numbers a batch)
LAST_BLOCK = 2  # the toy transformer has 3 double blocks: the paper's late block (17 of 19) is the last here
METRICS = ("present", "identity", "both_right", "wrong_colour")


# The paper's rules where the extension's defaults (0.5.0: own words, b = 5; 0.6.0; 0.7.0: fill holes) go beyond it:
# every "paper" row and its variants pin them, so that they measure what they measured before the defaults changed.
PAPER = PAPER_SETTINGS


def freefuse(**settings) -> dict:
    """alwayson_scripts of FreeFuse with the paper's settings, then `settings`."""
    return extension_defaults(**{**PAPER, **settings})


# The extension's defaults of 0.7.0 where 0.8.0 changed them: the rows "  defaults + ..." measured with 0.7.0 pin
# them, as their committed JSONs were made (0.8.0 gave the places no subject clearly leads to the nearest clear one).
DEFAULTS_0_7 = {"surroundings": "vote"}
# The extension's defaults of 0.5.0 (own words, b = 5) where 0.6.0 and later changed them: the rows "  defaults + ..."
# pin them, as their committed JSONs were made (0.6.0 added the blocks' average and the seeds where a subject leads).
DEFAULTS_0_5 = {**DEFAULTS_0_7, "average_blocks": False, "contrastive": "off", "fill_holes": 0.0}


def defaults_0_5(**settings) -> dict:
    """alwayson_scripts of FreeFuse with the defaults of 0.5.0, then `settings`."""
    return extension_defaults(**{**DEFAULTS_0_5, **settings})


def defaults_0_7(**settings) -> dict:
    """alwayson_scripts of FreeFuse with the defaults of 0.7.0, then `settings`."""
    return extension_defaults(**{**DEFAULTS_0_7, **settings})


def extension_defaults(**settings) -> dict:
    """alwayson_scripts of FreeFuse with the extension's own defaults, then `settings`."""
    args = {
        "enabled": True,
        "subjects": [{"lora": "toy_zorb", "words": "zorb"}, {"lora": "toy_quil", "words": "quil"}],
        "capture_block": LAST_BLOCK,
    }
    args.update(settings)
    return {"FreeFuse": {"args": [args]}}


TAGS = {
    "none": "",
    "zorb": " <lora:toy_zorb:1>",
    "quil": " <lora:toy_quil:1>",
    "both": " <lora:toy_zorb:1> <lora:toy_quil:1>",
}
# name -> (LoRA tags, alwayson_scripts or None, oracle masks: True for the true halves, "figures" for the figure
# tokens of each half alone, read from the capture's x0, a mode of world.MIXED_ORACLES for the extracted masks with
# the figure tokens, or all the others, put right)
CONFIGS = {
    "base": ("none", None, False),
    "ZORB LoRA alone": ("zorb", None, False),
    "QUIL LoRA alone": ("quil", None, False),
    "both merged": ("both", None, False),
    "FreeFuse (paper defaults)": ("both", freefuse(), False),
    "FreeFuse (defaults)": ("both", extension_defaults(), False),
    "FreeFuse (0.5.0 defaults)": ("both", defaults_0_5(), False),
    "FreeFuse (0.6.0 defaults)": ("both", defaults_0_7(fill_holes=0.0), False),
    "FreeFuse (0.7.0 defaults)": ("both", defaults_0_7(), False),
    "  sink filter off": ("both", freefuse(sink_filter=False), False),
    "  self-attention off": ("both", freefuse(self_attention=False), False),
    "  superpixel vote off": ("both", freefuse(superpixel_vote=False), False),
    "  modulation global": ("both", freefuse(modulation="global"), False),
    "  modulation off": ("both", freefuse(modulation="off"), False),
    "  joint + restart": ("both", freefuse(restart=True), False),
    "  LoRAs off before masks": ("both", freefuse(pre_mask="off"), False),
    "  off before masks + restart": ("both", freefuse(pre_mask="off", restart=True), False),
    "  image-query attention": ("both", freefuse(cross_attention="image_queries"), False),
    "  image-query attention, off before + restart": (
        "both",
        freefuse(cross_attention="image_queries", pre_mask="off", restart=True),
        False,
    ),
    "  image-query, modulation off, off before + restart": (
        "both",
        freefuse(cross_attention="image_queries", modulation="off", pre_mask="off", restart=True),
        False,
    ),
    "  text tokens: no subject LoRA": ("both", freefuse(text_loras="none"), False),
    "  text tokens: own words only": ("both", freefuse(text_loras="own_words"), False),
    "  image-query, off before + restart, text none": (
        "both",
        freefuse(cross_attention="image_queries", pre_mask="off", restart=True, text_loras="none"),
        False,
    ),
    "  contrastive seeds (beats each other)": ("both", freefuse(contrastive="strongest"), False),
    "  contrastive seeds (authors)": ("both", freefuse(contrastive="authors"), False),
    "  contrastive seeds (where it leads)": ("both", freefuse(contrastive="leading"), False),
    "  0.5.0 defaults + seeds where it leads": ("both", defaults_0_5(contrastive="leading"), False),
    "  0.5.0 defaults + average blocks + seeds where it leads (0.6.0)": (
        "both",
        defaults_0_5(average_blocks=True, contrastive="leading"),
        False,
    ),
    "  background from end-of-text": ("both", freefuse(background="tokens"), False),
    "  background threshold": ("both", freefuse(background="threshold"), False),
    "  fill holes 0.01": ("both", freefuse(fill_holes=0.01), False),
    "  defaults + fill holes 0.01": ("both", defaults_0_7(fill_holes=0.01), False),
    "  defaults + average steps": ("both", defaults_0_7(average_steps=True, fill_holes=0.0), False),
    "  defaults + average steps (0.7.0)": ("both", defaults_0_7(average_steps=True), False),
    "  defaults + nearest 1 (0.6.0)": (
        "both",
        defaults_0_7(background="nearest", background_threshold=1.0, fill_holes=0.0),
        False,
    ),
    "  all three remedies": (
        "both",
        freefuse(contrastive="strongest", background="tokens", fill_holes=0.01),
        False,
    ),
    "  average steps up to the capture": ("both", freefuse(average_steps=True), False),
    "  average blocks up to the capture": ("both", freefuse(average_blocks=True), False),
    "  defaults + average blocks": ("both", defaults_0_5(average_blocks=True), False),
    "  defaults + nearest 0.5": ("both", defaults_0_5(background="nearest"), False),
    "  defaults + nearest 1": ("both", defaults_0_5(background="nearest", background_threshold=1.0), False),
    "  defaults + nearest 2": ("both", defaults_0_5(background="nearest", background_threshold=2.0), False),
    "  defaults + average blocks + nearest 2": (
        "both",
        defaults_0_5(average_blocks=True, background="nearest", background_threshold=2.0),
        False,
    ),
    "  self-attention seeds 3%": ("both", freefuse(self_attention_top_fraction=0.03), False),
    "  attention bias 2": ("both", freefuse(attention_bias=2.0), False),
    "  attention bias 5": ("both", freefuse(attention_bias=5.0), False),
    "  own words + attention bias 5": ("both", freefuse(text_loras="own_words", attention_bias=5.0), False),
    "  defaults + LoRAs off before masks": ("both", defaults_0_7(pre_mask="off"), False),
    "  defaults + off before + restart": ("both", defaults_0_7(pre_mask="off", restart=True), False),
    "  defaults + restart": ("both", defaults_0_7(restart=True), False),
    "oracle masks (defaults, restart)": ("both", extension_defaults(restart=True), True),
    "oracle masks (paper timing)": ("both", freefuse(), True),
    "oracle masks (defaults)": ("both", extension_defaults(), True),
    "oracle figures (defaults)": ("both", extension_defaults(), "figures"),
    "FreeFuse, truth on figures (defaults)": ("both", defaults_0_7(), "truth on figures"),
    "FreeFuse, truth off figures (defaults)": ("both", defaults_0_7(), "truth off figures"),
    "oracle masks (defaults, off before)": ("both", extension_defaults(pre_mask="off"), True),
    "oracle masks (defaults, off before + restart)": ("both", extension_defaults(pre_mask="off", restart=True), True),
    "oracle masks + attention bias 5": ("both", freefuse(attention_bias=5.0), True),
    "oracle masks + joint + restart": ("both", freefuse(restart=True), True),
    "oracle masks + off before + restart": ("both", freefuse(pre_mask="off", restart=True), True),
    "oracle masks, text none + off before + restart": (
        "both",
        freefuse(pre_mask="off", restart=True, text_loras="none"),
        True,
    ),
    "oracle masks, text own words": ("both", freefuse(text_loras="own_words"), True),
    "oracle masks, modulation off + off before + restart": (
        "both",
        freefuse(modulation="off", pre_mask="off", restart=True),
        True,
    ),
}


def start_webui(forge: Path, python: str, data_dir: Path, model: Path = MODEL, extra_loras: dict | None = None):
    """Forge's webui with the toy world's checkpoint and LoRAs (and `extra_loras`, name -> file), this extension,
    and the benchmark seam."""
    import importlib.util

    import tiny_models

    spec = importlib.util.spec_from_file_location("webui_tier_conftest", ROOT / "tests" / "webui" / "conftest.py")
    webui_tier = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = webui_tier  # dataclasses look their module up
    spec.loader.exec_module(webui_tier)

    models = data_dir / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Lora").mkdir(parents=True)
    shutil.copyfile(model / "toyworld_flux.safetensors", models / "Stable-diffusion" / "toyworld_flux.safetensors")
    for name in world.CHARACTERS:
        shutil.copyfile(model / f"toy_{name}.safetensors", models / "Lora" / f"toy_{name}.safetensors")
    for name, path in (extra_loras or {}).items():
        shutil.copyfile(path, models / "Lora" / f"{name}.safetensors")
    configs = tiny_models.write_pipeline_configs(forge, data_dir / "configs")
    (data_dir / "extensions").mkdir()
    (data_dir / "extensions" / webui_tier.EXTENSION_NAME).symlink_to(ROOT, target_is_directory=True)
    env = webui_tier._server_env(data_dir, str(configs), "")
    for test_only in ("FREEFUSE_TEST_FAULT_FILE", "FREEFUSE_TEST_TENSOR_LOG"):  # the webui tier's hooks: not here
        env.pop(test_only, None)
    env["PYTHONPATH"] = str(SEAM)
    env["FREEFUSE_TOY_DUMP_DIR"] = str(data_dir / "masks")
    env["FREEFUSE_TOY_ORACLE_FILE"] = str(data_dir / "oracle")
    port = webui_tier.free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "webui.log"
    command = [python, "launch.py", *webui_tier.server_flags(forge), "--data-dir", str(data_dir), "--server-name",
               "127.0.0.1", "--port", str(port)]  # fmt: skip
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=forge, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        webui_tier._wait_for_api(process, url, log_path, "toyworld_flux")
    except BaseException:
        webui_tier._stop(process)
        raise
    manifest = {"checkpoint_name": "toyworld_flux", "loras": {f"toy_{n}": "" for n in world.CHARACTERS}}
    client = webui_tier.WebUI(url, data_dir, log_path, manifest, time.monotonic() - started, pid=process.pid)
    return client, process, webui_tier._stop


def generate(webui, prompt: str, seed: int, n: int, steps: int, scripts: dict | None) -> torch.Tensor:
    """(n, 256, 256, 3) images in [0, 1] for seeds seed .. seed + n - 1."""
    overrides = dict(width=world.IMAGE_PX, height=world.IMAGE_PX, steps=steps, seed=seed, batch_size=n)
    if scripts is not None:
        overrides["alwayson_scripts"] = scripts
    result = webui.txt2img(prompt, **overrides)
    images = [im for im in result.images if (im.width, im.height) == (world.IMAGE_PX, world.IMAGE_PX)][:n]
    if len(images) != n:
        raise RuntimeError(f"asked for {n} images, got {len(images)}: {result.infotext}")
    if scripts is not None and ("FreeFuse warnings" in result.infotext or "FreeFuse coverage" not in result.infotext):
        raise RuntimeError(f"FreeFuse did not run cleanly: {result.infotext}")
    arrays = [np.frombuffer(im.pixels, np.uint8).reshape(im.height, im.width, im.channels)[..., :3] for im in images]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval."""
    a = np.asarray(values, dtype=np.float64)
    half = 1.96 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return float(a.mean()), float(half)


def seed_batches(first_seed: int, seeds: int, batch: int = BATCH) -> list[tuple[int, int]]:
    """(start, count) of each batch of at most `batch` consecutive seeds from first_seed, `seeds` in all."""
    return [(start, min(batch, first_seed + seeds - start)) for start in range(first_seed, first_seed + seeds, batch)]


def run_config(webui, scorer, name, seeds, steps, data_dir, sheet=None, first_seed=0) -> dict:
    tags, scripts, oracle = CONFIGS[name]
    return run_images(webui, scorer, name, TAGS[tags], scripts, oracle, seeds, steps, data_dir, sheet, first_seed)


def run_images(webui, scorer, name, tags, scripts, oracle, seeds, steps, data_dir, sheet=None, first_seed=0) -> dict:
    """One table row: seeds x both prompts (each + `tags`), with `scripts`, oracle masks if `oracle`, scored. The
    seeds are 1000 + first_seed onwards: a run from first_seed N continues one of N seeds (batches of BATCH
    consecutive seeds, so N a multiple of BATCH gives the same images as one longer run)."""
    oracle_file = data_dir / "oracle"
    scores = {key: [] for key in ("P1", "P2")}
    if oracle:
        oracle_file.write_text(oracle if isinstance(oracle, str) else "on")  # "figures": the seam's other oracle
    try:
        for key, (prompt, left) in world.benchmark_prompts().items():
            for start, n in seed_batches(first_seed, seeds):
                images = generate(webui, prompt + tags, 1000 + start, n, steps, scripts)
                if sheet is not None and start == first_seed:
                    sheet.append((name, key, images[:4]))
                scores[key] += [score_image(h, left) for h in read_halves(scorer, images)]
    finally:
        oracle_file.unlink(missing_ok=True)
    return table_row(scores)


def table_row(scores: dict[str, list[dict]]) -> dict:
    """One configuration's row from its images' score_image results per prompt ("P1", "P2")."""
    every = scores["P1"] + scores["P2"]
    row = {m: interval([s[m] for s in every]) for m in METRICS}
    row["identity_P1"] = interval([s["identity"] for s in scores["P1"]])[0]
    row["identity_P2"] = interval([s["identity"] for s in scores["P2"]])[0]
    row["images"] = len(every)
    row["identity_values"] = [s["identity"] for s in every]  # per image, in seed order: paired across configurations
    row["both_right_values"] = [s["both_right"] for s in every]
    return row


def ordered_masks(record: dict) -> np.ndarray:
    """(2, h, w) bool: the extraction's masks, the first-mentioned subject's (the left one's) first."""
    masks = (record["masks"] > 0.5).numpy()
    first = min(range(len(record["subject_tokens"])), key=lambda i: min(record["subject_tokens"][i]))
    return masks[[first, 1 - first]]


def mask_iou(record: dict) -> float:
    """Mean IoU over subjects of the masks against the true halves (first-mentioned subject on the left)."""
    return world.halves_iou(ordered_masks(record))


def mask_scores(records: list[dict], images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per extraction: IoU against the true halves, and figure accuracy against the figures of its finished image."""
    ious = [mask_iou(r) for r in records]
    figures = [world.figure_accuracy(ordered_masks(r), world.figure_tokens(image.numpy(), r["masks"].shape[-2:]))
               for r, image in zip(records, images, strict=True)]  # fmt: skip
    return ious, figures


IOU_VARIANTS = {
    "Eq. 5, LoRAs joint before masks (paper)": {},
    "image queries, LoRAs off before masks": {"cross_attention": "image_queries", "pre_mask": "off"},
}


def iou_sweep(webui, seeds: int, steps: int, capture_steps: list[int], data_dir: Path) -> dict:
    """Per variant, capture block and capture step: {"iou": mask IoU against the true halves, "figure": figure
    accuracy}, each (mean, half-width of its 95% interval)."""
    dump = data_dir / "masks"
    table = {}
    for variant, settings in IOU_VARIANTS.items():
        for block in range(LAST_BLOCK + 1):
            for step in capture_steps:
                ious, figures = [], []
                for prompt, _ in world.benchmark_prompts().values():
                    for start in range(0, seeds, BATCH):
                        shutil.rmtree(dump, ignore_errors=True)
                        dump.mkdir()
                        n = min(BATCH, seeds - start)
                        scripts = freefuse(capture_block=block, capture_step=step, **settings)
                        images = generate(webui, prompt + TAGS["both"], 1000 + start, n, steps, scripts)
                        records = [torch.load(p) for p in sorted(dump.glob("*.pt"))]
                        if len(records) != n:
                            raise RuntimeError(f"expected {n} mask extractions, found {len(records)}")
                        scores = mask_scores(records, images)
                        ious, figures = ious + scores[0], figures + scores[1]
                table[(variant, block, step)] = {"iou": interval(ious), "figure": interval(figures)}
                print(f"  {variant}, block {block}, step {step}: IoU {np.mean(ious):.3f}, figures "
                      f"{np.mean(figures):.3f}", flush=True)  # fmt: skip
    shutil.rmtree(dump, ignore_errors=True)
    return table


def print_iou(iou: dict, seeds: int, blocks: int) -> None:
    """The mask table of iou_sweep: per variant and capture block, one column per capture step, each cell "IoU against
    the true halves / figure accuracy"."""
    steps = sorted({s for _, _, s in iou})
    print(f"\nmask IoU against the true halves / share of the figures' tokens in their own subject's mask ({seeds} "
          "seeds x 2 prompts; FreeFuse defaults otherwise):")  # fmt: skip
    print("| masks from | capture block | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for variant in IOU_VARIANTS:
        for block in range(blocks):
            cells = " | ".join(f"{iou[(variant, block, s)]['iou'][0]:.2f} / {iou[(variant, block, s)]['figure'][0]:.2f}"
                               for s in steps)  # fmt: skip
            print(f"| {variant} | double_blocks.{block} | {cells} |")


def print_results(rows: dict, iou: dict, iou_seeds: int, blocks: int) -> None:
    """The table, each configuration's share of its oracle's gain (SHARES) with its interval, and the IoU table."""
    print(format_table(rows))
    for name, oracle in SHARES:
        for metric in SHARE_METRICS:
            share = oracle_share(rows, name, oracle, metric)
            if share is not None:
                bounds = oracle_share_interval(rows, name, oracle, metric)
                spread = f" (95% bootstrap interval {bounds[0]:.0%} to {bounds[1]:.0%})" if bounds else ""
                what = metric.replace("_", " ")
                print(f"\n{name.strip()}: {share:.0%} of the {what} gain of '{oracle}' over merged use{spread}")
    if iou:
        print_iou(iou, iou_seeds, blocks)


def write_json(path: Path, rows: dict, iou: dict, seeds: int) -> None:
    payload = {"rows": rows, "iou": {f"{v} | {b} | {s}": x for (v, b, s), x in iou.items()}, "seeds": seeds}
    path.write_text(json.dumps(payload, indent=1))


def format_table(rows: dict) -> str:
    lines = ["| configuration | present | identity | both right | wrong-character colour | identity P1 / P2 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        cells = [f"{row[m][0]:.2f} ± {row[m][1]:.2f}" for m in METRICS]
        lines.append(f"| {name.strip() if not name.startswith('  ') else '↳ ' + name.strip()} | "
                     + " | ".join(cells) + f" | {row['identity_P1']:.2f} / {row['identity_P2']:.2f} |")  # fmt: skip
    return "\n".join(lines)


# (configuration, the oracle row with the same timing) whose share of the oracle's identity gain is printed
SHARES = (
    ("FreeFuse (paper defaults)", "oracle masks (paper timing)"),
    ("FreeFuse (defaults)", "oracle masks (defaults)"),
    ("FreeFuse (0.5.0 defaults)", "oracle masks (defaults)"),
    ("FreeFuse (0.6.0 defaults)", "oracle masks (defaults)"),
    ("FreeFuse (0.7.0 defaults)", "oracle masks (defaults)"),
    ("  own words + attention bias 5", "oracle masks (defaults)"),
    ("  joint + restart", "oracle masks + joint + restart"),
    ("  off before masks + restart", "oracle masks + off before + restart"),
    ("  attention bias 5", "oracle masks + attention bias 5"),
    ("  text tokens: own words only", "oracle masks, text own words"),
    ("  defaults + off before + restart", "oracle masks (defaults, off before + restart)"),
    ("  defaults + restart", "oracle masks (defaults, restart)"),
    ("FreeFuse, truth on figures (defaults)", "oracle masks (defaults)"),
    ("FreeFuse, truth off figures (defaults)", "oracle masks (defaults)"),
)


SHARE_METRICS = ("identity", "both_right")  # the oracle's gain is shared out on both (issue 17)


def oracle_share(rows: dict, name: str, oracle: str, metric: str = "identity") -> float | None:
    """(configuration - merged) / (oracle - merged) of `metric`'s mean; None without those rows or a gain."""
    merged = rows.get("both merged", {}).get(metric, (None,))[0]
    if merged is None or name not in rows or oracle not in rows:
        return None
    gain = rows[oracle][metric][0] - merged
    return (rows[name][metric][0] - merged) / gain if gain > 0 else None


def oracle_share_interval(
    rows: dict, name: str, oracle: str, metric: str = "identity", draws: int = 4000
) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of oracle_share: the same images (seed, prompt) resampled in all three
    configurations at once, since every configuration scores the same seeds."""
    try:
        values = np.array([rows[n][f"{metric}_values"] for n in ("both merged", name, oracle)], dtype=np.float64)
    except KeyError:
        return None
    picks = np.random.default_rng(0).integers(values.shape[1], size=(draws, values.shape[1]))
    merged, own, best = (values[i][picks].mean(1) for i in range(3))
    gain = best - merged
    shares = (own - merged)[gain > 0] / gain[gain > 0]
    if len(shares) < draws * 0.9:
        return None
    low, high = np.percentile(shares, [2.5, 97.5])
    return float(low), float(high)


def save_sheet(sheet, path: Path) -> None:
    from PIL import Image

    rows = [torch.cat(list(images), dim=1) for _, _, images in sheet]
    grid = torch.cat(rows, dim=0).clamp(0, 1).mul(255).byte().numpy()
    Image.fromarray(grid).save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    parser.add_argument("--python", default=os.environ.get("FORGE_PYTHON"), help="the Python of Forge's webui")
    parser.add_argument("--seeds", type=int, default=32, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=0, help="start there (continue a run of that many seeds)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--configs", help="a subset: names as printed, stripped, separated by ';'")
    parser.add_argument("--iou", action="store_true", help="also mask IoU per capture block and step")
    parser.add_argument("--iou-seeds", type=int, default=8)
    parser.add_argument("--sheet", type=Path, help="write a PNG of the first images of every configuration")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--model", type=Path, default=MODEL, help="an assembled world (default: the committed one)")
    parser.add_argument("--worlds", default="1,2", help="which worlds: 1 (this one, in the webui), 2 (the second "
                        "world, bench/toyworld2/benchmark2.py, on Forge's backend) or both (default)")  # fmt: skip
    args = parser.parse_args(argv)
    worlds = set(args.worlds.split(","))
    if not worlds or worlds - {"1", "2"}:
        parser.error(f"--worlds: expected 1, 2 or 1,2, got {args.worlds!r}")
    if not args.python:
        raise SystemExit("FORGE_PYTHON (or --python): the Python of a Forge webui install")
    names = list(CONFIGS)
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(";")}
        names = [n for n in names if n.strip() in wanted]
    torch.set_num_threads(1)
    if "1" in worlds:
        run_first_world(args, names)
    if "2" in worlds:
        run_second_world(args, names)


def run_second_world(args, names: list[str]) -> None:
    """The same configurations in the second world, with the Forge python (its benchmark prints its own table)."""
    command = [args.python, str(HERE.parent / "toyworld2" / "benchmark2.py"), "--forge", str(args.forge.resolve()),
               "--seeds", str(args.seeds), "--first-seed", str(args.first_seed), "--steps", str(args.steps),
               "--configs", ";".join(n.strip() for n in names)]  # fmt: skip
    if args.iou:
        command += ["--iou", "--iou-seeds", str(args.iou_seeds)]
    if args.json:
        command += ["--json", str(args.json.with_name(args.json.stem + "_second_world.json"))]
    print("\n# The second world (bench/toyworld2)\n", flush=True)
    subprocess.run(command, check=True)


def run_first_world(args, names: list[str]) -> None:
    """The configurations in this world, through Forge's webui: prints the table (and writes --json, --sheet)."""
    scorer = load_scorer(args.model / "scorer.safetensors")
    data_dir = Path(tempfile.mkdtemp(prefix="toyworld-webui-"))
    webui, process, stop = start_webui(args.forge.resolve(), args.python, data_dir, args.model.resolve())
    print(f"webui up in {webui.startup_s:.0f} s at {webui.url} (log {webui.log_path})", flush=True)
    rows, sheet, started = {}, [], time.monotonic()
    try:
        for name in names:
            t = time.monotonic()
            rows[name] = run_config(webui, scorer, name, args.seeds, args.steps, data_dir, sheet, args.first_seed)
            print(
                f"{name.strip()}: identity {rows[name]['identity'][0]:.3f} ({time.monotonic() - t:.0f} s)", flush=True
            )
        iou = iou_sweep(webui, args.iou_seeds, args.steps, [2, 5, 8], data_dir) if args.iou else {}
    finally:
        stop(process)
    print(
        f"\n{args.seeds} seeds x 2 prompts, {args.steps} Euler steps, 256 x 256, {time.monotonic() - started:.0f} s\n"
    )
    print_results(rows, iou, args.iou_seeds, LAST_BLOCK + 1)
    if args.sheet:
        save_sheet(sheet, args.sheet)
    if args.json:
        write_json(args.json, rows, iou, args.seeds)
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
