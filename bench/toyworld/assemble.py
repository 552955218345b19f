"""Step 3 of making the toy world: the Forge-loadable files in model/, checked through Forge's own loader.

Writes model/toyworld_flux.safetensors (all-in-one: trained transformer and VAE, the frozen random text encoders
of make_text.py), model/toy_zorb.safetensors and model/toy_quil.safetensors (kohya-keyed FLUX LoRAs), the scorer
and the training log; then loads the checkpoint with Forge's loader and checks that Forge's text engines give
exactly the conditioning the transformer was trained on, and that Forge's VAE encodes a picture to the training
latents. Token-embedding rows that no toy caption uses are zeroed (the file compresses to a fraction in git);
the check above proves that changes nothing the toy world uses.

    FORGE_DIR=... <forge webui python> bench/toyworld/assemble.py [--trained WORK/trained] [--lora-no-text]

--lora-runs DIR ... takes each LoRA from the first of these train.py output folders that has it (LoRAs trained in
their own runs on the frozen base, train.py --resume --base-steps 0 --characters NAME); the written training log then
holds the base's run and each LoRA's. --lora-no-text leaves the LoRAs' double-block text layers (txt_attn, txt_mlp,
txt_mod) out of the written files, as a LoRA trained with kohya's txt_*_dim = 0 has none (bench/toyworld/README.md:
they undo the base's routing by place).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import world
from forge_engine import load_engine, tiny_models
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
MODEL = HERE / "model"
CHECKPOINT = "toyworld_flux.safetensors"
LORAS = {name: f"toy_{name}.safetensors" for name in world.CHARACTERS}
EMBEDDINGS = {
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": "tokenizer",
    "text_encoders.t5xxl.transformer.shared.weight": "tokenizer_2",
}


def used_token_ids(configs: Path, folder: str, captions: list[str]) -> set[int]:
    """Every token id the captions (or padding) give with the tokenizer in configs/folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(configs / folder))
    ids = {i for ids in tokenizer(captions)["input_ids"] for i in ids}
    ids |= {i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None}
    return ids


def text_encoders(work: Path, configs: Path) -> dict[str, torch.Tensor]:
    from train import caption_table

    tensors = load_file(str(work / "text_encoders.safetensors"))
    captions = caption_table(work)  # every caption the transformer was trained on
    for key, folder in EMBEDDINGS.items():
        keep = torch.zeros(tensors[key].shape[0], dtype=torch.bool)
        keep[sorted(used_token_ids(configs, folder, captions))] = True
        tensors[key] = torch.where(keep[:, None], tensors[key], torch.zeros_like(tensors[key]))
    return tensors


def checkpoint_state_dict(trained: Path, work: Path, configs: Path) -> dict[str, torch.Tensor]:
    state = {"model.diffusion_model." + k: v for k, v in load_file(str(trained / "transformer.safetensors")).items()}
    state |= {"vae." + k: v for k, v in load_file(str(trained / "vae.safetensors")).items()}
    state |= text_encoders(work, configs)
    return {k: v.contiguous() for k, v in state.items()}


def check_with_forge(forge: Path, configs: Path, work: Path, trained: Path, checkpoint: Path) -> dict:
    """Forge's loader, text engines and VAE on the written checkpoint against what training used."""
    engine = load_engine(forge, configs, checkpoint)
    from train import load_conditioning

    captions, trained_cond, _ = load_conditioning(work, "cpu")  # a --names file: T5 outputs computed by train.py
    with torch.no_grad():
        cond = engine.get_learned_conditioning(captions)
    text_error = max((cond[k].float() - trained_cond[k]).abs().max().item() for k in trained_cond)

    from backend.nn.vae import IntegratedAutoencoderKL  # the class Forge loaded, for the training-side encoder
    from train import to_pixels, vae_kwargs, vae_moments

    config = json.loads((work / "vae_config.json").read_text())
    vae = IntegratedAutoencoderKL(**vae_kwargs(config, IntegratedAutoencoderKL))
    vae.load_state_dict(load_file(str(trained / "vae.safetensors")))
    rng = np.random.default_rng(5)
    cells = torch.from_numpy(np.stack([world.base_example(rng)[0] for _ in range(4)]))
    pixels = to_pixels(cells)  # (4, 3, 256, 256) in [-1, 1]
    with torch.no_grad():
        expected = vae.process_in(vae_moments(vae, pixels)[0])
        got = engine.encode_first_stage(pixels)
        decoded = engine.decode_first_stage(got)
    latent_error = (got.float() - expected).abs().max().item()
    decode_error = ((decoded.float() - pixels).abs().mean() / 2).item()
    return {
        "text_max_abs_difference": text_error,
        "latent_max_abs_difference": round(latent_error, 5),
        "latent_std": round(expected.std().item(), 4),
        "decode_mean_abs_error": round(decode_error, 5),
    }


def is_text_layer(key: str) -> bool:
    """A kohya FLUX LoRA key of a double block's text stream (lora_unet_double_blocks_N_txt_...)."""
    return re.match(r"lora_unet_double_blocks_\d+_txt_", key) is not None


def lora_sources(trained: Path, runs: list[Path]) -> dict[str, Path]:
    """Character -> the folder its LoRA comes from: the first of `runs` holding lora_NAME, else `trained`."""
    found = {}
    for name in LORAS:
        found[name] = next((run for run in runs if (run / f"lora_{name}.safetensors").is_file()), trained)
        if not (found[name] / f"lora_{name}.safetensors").is_file():
            raise SystemExit(f"no lora_{name}.safetensors in {[str(r) for r in [*runs, trained]]}")
    return found


def training_log(trained: Path, sources: dict[str, Path]) -> dict:
    """The log of a world whose LoRAs come from other runs: {"base_run": trained's log without its LoRA phases
    (not used), "lora_NAME_run": each LoRA run's log without the base log it resumed from}."""
    log = json.loads((trained / "train_log.json").read_text())
    log["phases"] = {k: v for k, v in log["phases"].items() if not k.startswith("lora_")}
    combined = {"base_run": log}
    for name, source in sources.items():
        run = json.loads((source / "train_log.json").read_text())
        run.pop("resumed_from", None)
        combined[f"lora_{name}_run"] = run
    return combined


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--trained", type=Path, help="train.py's output folder (default WORK/trained)")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--lora-runs", type=Path, nargs="*", default=[], help="folders to take the LoRAs from")
    parser.add_argument("--lora-no-text", action="store_true", help="leave out the LoRAs' double-block txt_* layers")
    args = parser.parse_args(argv)
    trained = args.trained or args.work / "trained"
    configs = tiny_models().write_pipeline_configs(args.forge, args.work / "configs")
    args.model.mkdir(parents=True, exist_ok=True)
    checkpoint = args.model / CHECKPOINT
    save_file(checkpoint_state_dict(trained, args.work, configs), str(checkpoint),
              metadata={"modelspec.architecture": "flux-1-dev"})  # fmt: skip
    sources = lora_sources(trained, args.lora_runs)
    for name, filename in LORAS.items():
        lora = load_file(str(sources[name] / f"lora_{name}.safetensors"))
        if args.lora_no_text:
            lora = {key: value for key, value in lora.items() if not is_text_layer(key)}
        save_file(lora, str(args.model / filename), metadata={"modelspec.architecture": "flux-1-dev/lora"})
    shutil.copyfile(trained / "scorer.safetensors", args.model / "scorer.safetensors")
    if all(source == trained for source in sources.values()):
        shutil.copyfile(trained / "train_log.json", args.model / "train_log.json")
    else:
        (args.model / "train_log.json").write_text(json.dumps(training_log(trained, sources), indent=1))
    checks = check_with_forge(args.forge, configs, args.work, trained, checkpoint)
    if args.lora_no_text:
        checks["lora_text_layers"] = "left out (--lora-no-text)"
    (args.model / "assemble_log.json").write_text(json.dumps(checks, indent=1) + "\n")
    print(json.dumps(checks))
    if checks["text_max_abs_difference"] > 1e-3 or checks["latent_max_abs_difference"] > 0.1:
        raise SystemExit("Forge does not reproduce what the toy world was trained on: see assemble_log.json")


if __name__ == "__main__":
    main()
