"""The second toy world's benchmark: FreeFuse's own job on Forge's backend (no webui), scored per half.

    FORGE_DIR=<forge> <forge python> bench/toyworld2/benchmark2.py [--seeds 32] [--configs "..."] [--iou] [--json F]

Builds the second world's transformer with Forge's own classes and UnetPatcher, merges its LoRA files through
Forge's LoRA loader (as the prompt's tags do), and for FreeFuse makes a job as the extension's start_run does
(lib_freefuse.forge.processing): the settings dict of the API form, word positions from the caption (one word = one
token), capture at the last double block, Forge's Euler sampler, 24 steps, distilled guidance 3.5. The
configurations and the table are the first world's (bench/toyworld/benchmark.py), so both worlds print the same
rows; oracle masks are the true halves put in place of the extracted masks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import world2
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODEL = HERE / "model"
SCORER = ROOT / "bench" / "toyworld" / "model" / "scorer.safetensors"  # the first world's: same sprites, same cells
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "forge"), str(ROOT / "bench" / "toyworld")]
import benchmark as first  # noqa: E402  (the first world's configurations and table)
import forge_env  # noqa: E402
import world  # noqa: E402
from scorer import load_scorer, read_halves, score_image  # noqa: E402

STEPS = 24
BATCH = 8
GUIDANCE = 3.5
LORAS = {name: f"toy2_{name}.safetensors" for name in world.CHARACTERS}
TAGS = {"none": [], "zorb": ["zorb"], "quil": ["quil"], "both": ["zorb", "quil"]}  # the first world's tags: merged


def load_model(model_dir: Path):
    """The second world's transformer as Forge's loader builds it: ForgeOperations, then the trained state dict."""
    config = forge_env.model_config(**world2.TRANSFORMER)
    if forge_env.HOST == "neo":
        config["out_channels"] = world2.TRANSFORMER["in_channels"]
    return forge_env.flux_from_state_dict(config, load_file(str(model_dir / "transformer.safetensors")))


def conditions(prompt: str, batch: int):
    """Forge's compiled conditions of the prompt for a batch: the second world's text, guidance 3.5."""
    from backend.sampling.condition import compile_conditions

    text = world2.encode([prompt])
    return compile_conditions({
        "crossattn": text["crossattn"].expand(batch, -1, -1).clone(),
        "vector": text["vector"].expand(batch, -1).clone(),
        "guidance": torch.full((batch,), GUIDANCE),
    })  # fmt: skip


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Model space (B, 3, CELLS, CELLS) -> (B, 256, 256, 3) pixels in [0, 1], as the first world's images."""
    return torch.from_numpy(world.upscale(world2.to_cells(latents).cpu().numpy()))


def freefuse_patcher(merged_unet, characters: list[str], settings: dict, prompt: str, batch: int, steps: int):
    """A FreeFuse clone of merged_unet (the characters' LoRA files merged) for one sampling run, made as start_run
    makes it: each character's LoRA bound to its name. Returns (clone, job)."""
    from lib_freefuse.args import FreeFuseArgs
    from lib_freefuse.families import FLUX1
    from lib_freefuse.forge.host import patch_unet
    from lib_freefuse.forge.job import FreeFuseJob, JobPlan

    subjects = [{"lora": Path(LORAS[c]).stem, "words": c} for c in characters]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects, "capture_block": world2.CAPTURE_BLOCK,
                                   **settings})  # fmt: skip
    deltas, merged = forge_env.subject_deltas_of(merged_unet, [LORAS[c] for c in characters])
    positions = tuple((world2.word_position(prompt, s["words"]),) for s in subjects)
    plan = JobPlan(
        word_positions=(positions,) * batch,
        text_length=world2.TEXT_TOKENS,
        capture_step=args.resolved_capture_step(steps) - 1,
        mask_config=args.mask,
        pre_mask=args.pre_mask,
        modulation=args.modulation,
        text_loras=args.text_loras,
        restart=args.restart,
        background_positions=((world2.end_position(prompt),),) * batch if args.mask.background == "tokens" else (),
        attention_bias=args.attention_bias,
        average_steps=args.average_steps,
        average_blocks=args.average_blocks,
    )
    job = FreeFuseJob(plan, decode, family=FLUX1)
    return patch_unet(merged_unet, job, deltas, args.capture_block, merged, forge_env.host_adapter(), FLUX1), job


@contextlib.contextmanager
def mask_seam(oracle: bool | str, dump: list | None, keep_inputs: bool = False):
    """While open: the job's masks are the true halves (oracle), and/or every extraction is appended to dump (with
    keep_inputs, also its q, k, grid, image and mask config)."""
    import lib_freefuse.forge.job as job_module

    original = job_module.extract_masks

    def extract_masks(q, k, subject_tokens, grid_hw, image=None, config=None, *args, **kwargs):
        if oracle:
            h, w = grid_hw
            order = sorted(range(len(subject_tokens)), key=lambda i: min(subject_tokens[i]))
            masks = torch.zeros(len(subject_tokens), h, w, device=q.device)
            masks[order[0], :, : w // 2] = 1
            masks[order[1], :, w // 2 :] = 1
            if oracle == "figures" or oracle in world.MIXED_ORACLES:
                figure = torch.from_numpy(world.figure_tokens(np.asarray(image, np.float32), grid_hw)).to(masks)
                if oracle == "figures":  # each half's figure tokens alone (benchmark.CONFIGS)
                    masks *= figure
                else:  # the extraction with one part put right
                    extracted = original(q, k, subject_tokens, grid_hw, image, config, *args, **kwargs)
                    masks = world.mixed_masks(extracted, masks, figure, oracle)
        else:
            masks = original(q, k, subject_tokens, grid_hw, image, config, *args, **kwargs)
        if dump is not None:
            record = {"masks": masks.detach().cpu(), "subject_tokens": [list(map(int, t)) for t in subject_tokens]}
            if keep_inputs:
                record.update(q=q.clone(), k=k.clone(), grid=tuple(grid_hw), image=image, config=config)
            dump.append(record)
        return masks

    job_module.extract_masks = extract_masks
    try:
        yield
    finally:
        job_module.extract_masks = original


class World:
    """The second world loaded in Forge: its base patcher, the LoRA files written where the host finds them."""

    def __init__(self, model_dir: Path, steps: int = STEPS):
        self.base = forge_env.make_unet_patcher(load_model(model_dir))
        self.loras = {name: load_file(str(model_dir / file)) for name, file in LORAS.items()}
        self.steps = steps

    def images(self, tags, settings: dict | None, oracle: bool, prompt: str, seed: int, n: int, dump=None, keep=False):
        """(n, 256, 256, 3) images of one batch: the LoRAs of `tags` merged, FreeFuse with `settings` if given; each
        mask extraction appended to `dump` (with `keep`, its inputs too: mask_seam)."""
        names = TAGS[tags]
        unet = self.base
        if names:
            unet, _, unmatched = forge_env.with_loras(self.base, {LORAS[c]: self.loras[c] for c in names})
            if unmatched:
                raise RuntimeError(f"LoRA keys Forge did not match: {sorted(unmatched)[:4]}")
        job = None
        if settings is not None:
            unet, job = freefuse_patcher(unet, names, settings, prompt, n, self.steps)
        cond = conditions(prompt, n)

        def run():
            return forge_env.sample(unet, steps=self.steps, batch=n, latent_hw=(world.CELLS, world.CELLS), seed=seed,
                                    cond=cond, uncond=cond, channels=world2.TRANSFORMER["in_channels"],
                                    on_sigmas=job.steps.use_schedule if job else None)  # fmt: skip

        with mask_seam(oracle, dump, keep), contextlib.redirect_stdout(io.StringIO()):  # Forge prints every model load
            latents = job.run(run) if job is not None else run()
        forge_env.unload(unet)
        if job is not None and (job.failure is not None or job.masks is None):
            raise RuntimeError(f"FreeFuse did not run cleanly: {job.failure or 'no masks were made'}")
        return decode(latents)


def settings_of(scripts: dict | None) -> dict | None:
    """The first world's alwayson_scripts -> the settings dict, capture at this world's last double block."""
    if scripts is None:
        return None
    args = dict(scripts["FreeFuse"]["args"][0])
    for key in ("enabled", "subjects"):
        args.pop(key)
    args["capture_block"] = world2.CAPTURE_BLOCK
    return args


def run_config(w: World, scorer, name: str, seeds: int, first_seed: int = 0) -> dict:
    """One table row, seeds 1000 + first_seed onwards (as benchmark.run_images)."""
    tags, scripts, oracle = first.CONFIGS[name]
    scores = {"P1": [], "P2": []}
    for key, (prompt, left) in world.benchmark_prompts().items():
        for start, n in first.seed_batches(first_seed, seeds, BATCH):
            images = w.images(tags, settings_of(scripts), oracle, prompt, 1000 + start, n)
            scores[key] += [score_image(h, left) for h in read_halves(scorer, images)]
    return first.table_row(scores)


def iou_sweep(w: World, seeds: int, capture_steps: list[int]) -> dict:
    """Per variant, capture block and capture step: mask IoU against the true halves and figure accuracy
    (the first world's iou_sweep)."""
    table = {}
    for variant, settings in first.IOU_VARIANTS.items():
        for block in range(world2.TRANSFORMER["depth"]):
            for step in capture_steps:
                ious, figures = [], []
                for prompt, _ in world.benchmark_prompts().values():
                    for start in range(0, seeds, BATCH):
                        dump = []
                        n = min(BATCH, seeds - start)
                        chosen = {**settings, "capture_block": block, "capture_step": step}
                        images = w.images("both", chosen, False, prompt, 1000 + start, n, dump)
                        scores = first.mask_scores(dump, images)
                        ious, figures = ious + scores[0], figures + scores[1]
                table[(variant, block, step)] = {"iou": first.interval(ious), "figure": first.interval(figures)}
                print(f"  {variant}, block {block}, step {step}: IoU {np.mean(ious):.3f}, figures "
                      f"{np.mean(figures):.3f}", flush=True)  # fmt: skip
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    parser.add_argument("--seeds", type=int, default=32, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=0, help="start there (continue a run of that many seeds)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--configs", help="a subset: names as printed, stripped, separated by ';'")
    parser.add_argument("--iou", action="store_true", help="also mask IoU per capture block and step")
    parser.add_argument("--iou-seeds", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--model", type=Path, default=MODEL, help="a trained second world (default: the committed)")
    args = parser.parse_args(argv)
    if not (args.forge / "backend").is_dir():
        raise SystemExit("FORGE_DIR (or --forge): a Forge checkout (classic or Neo)")
    forge_env.setup(args.forge.resolve())
    names = list(first.CONFIGS)
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(";")}
        names = [n for n in names if n.strip() in wanted]
        if missing := wanted - {n.strip() for n in names}:
            raise SystemExit(f"--configs: unknown {sorted(missing)}")
    scorer = load_scorer(SCORER)
    w = World(args.model, args.steps)
    rows, started = {}, time.monotonic()
    with torch.inference_mode():
        for name in names:
            t = time.monotonic()
            rows[name] = run_config(w, scorer, name, args.seeds, args.first_seed)
            seconds = time.monotonic() - t
            print(f"{name.strip()}: identity {rows[name]['identity'][0]:.3f} ({seconds:.0f} s)", flush=True)
        iou = iou_sweep(w, args.iou_seeds, [2, 5, 8]) if args.iou else {}
    seconds = time.monotonic() - started
    print(f"\nsecond world: {args.seeds} seeds x 2 prompts, {args.steps} Euler steps, {seconds:.0f} s\n")
    first.print_results(rows, iou, args.iou_seeds, world2.TRANSFORMER["depth"])
    if args.json:
        first.write_json(args.json, rows, iou, args.seeds)


if __name__ == "__main__":
    main()
