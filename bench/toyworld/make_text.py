"""Step 1 of making the toy world: frozen random text encoders and every caption's conditioning through Forge.

The text encoders are tiny random CLIP-L and T5 (the webui tier's configs, real tokenizers, seed TEXT_SEED),
stored in float16. Each caption of world.all_captions() is encoded by Forge's own FLUX engine (its T5 and CLIP
text-processing engines, as the webui does for a prompt), so the transformer is trained on exactly what Forge
will feed it. Writes WORK/text_encoders.safetensors, WORK/conditioning.safetensors, WORK/vae_config.json and
WORK/word_positions.json (each caption's words -> their T5 token positions, for train.py's attention loss).

    FORGE_DIR=... <forge webui python> bench/toyworld/make_text.py [--word-positions-only]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import world
from forge_engine import load_engine, tiny_models
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
TEXT_SEED = 7


def text_only_checkpoint(forge_root: Path, configs: Path) -> tuple[dict, dict]:
    """(all-in-one state dict, its text encoders): the tiny configs with seed TEXT_SEED, CLIP-L and T5 in
    float16. Only the text encoders are kept; the transformer and VAE are placeholders for Forge's loader."""
    full = tiny_models().build_state_dict(forge_root, configs, seed=TEXT_SEED)
    text = {k: v.to(torch.float16) for k, v in full.items() if k.startswith("text_encoders.")}
    return {**full, **text}, text


def word_positions(forge_root: Path, captions: list[str]) -> dict[str, list[list]]:
    """caption -> [[word, [T5 token positions]], ...] for the words that name a figure (colour or character)."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(
        str(forge_root / "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2")
    )
    names = set(world.COLOURS) | set(world.CHARACTERS) | set(world.NAMES) | set(world.HELD_OUT_NAMES)
    positions = {}
    for text in captions:
        ids = tokenizer(text).input_ids
        found, cursor = [], 0
        for word in (w for w in text.split() if w in names):
            piece = tokenizer(word, add_special_tokens=False).input_ids
            start = next(i for i in range(cursor, len(ids)) if ids[i : i + len(piece)] == piece)
            found.append([word, list(range(start, start + len(piece)))])
            cursor = start + len(piece)
        positions[text] = found
    return positions


def write_word_positions(forge_root: Path, work: Path, names: bool = False) -> None:
    positions = word_positions(forge_root, world.all_captions(names))
    (work / "word_positions.json").write_text(json.dumps(positions, indent=0))


def full_conditioning(engine, captions: list[str]) -> dict[str, torch.Tensor]:
    """Forge's conditioning of every caption: crossattn (N, 256, 64) from T5, vector (N, 64) from CLIP-L."""
    cond = engine.get_learned_conditioning(captions)
    return {"crossattn": cond["crossattn"].float().contiguous(), "vector": cond["vector"].float().contiguous()}


def names_conditioning(engine, captions: list[str], checked: int = 48) -> dict[str, torch.Tensor]:
    """With --names (~19k captions, too many to ship as T5 outputs): CLIP-L's vector (N, 64), Forge's T5 token ids
    (N, 256) int16, and Forge's T5 output for `checked` captions (the benchmark's among them) with their rows, so
    that train.py's own T5 pass through Forge's T5 class is checked against Forge's engine where it runs."""
    _, vector = engine.text_processing_engine_l(captions)
    ids = [engine.text_processing_engine_t5.tokenize_line(text)[0][0].tokens for text in captions]
    rows = sorted(
        {captions.index(p) for p, _ in world.benchmark_prompts().values()}
        | set(range(0, len(captions), len(captions) // checked))
    )
    reference = engine.text_processing_engine_t5([captions[r] for r in rows])
    return {
        "vector": vector.float().contiguous(),
        "t5_ids": torch.tensor(ids, dtype=torch.int16),
        "reference_rows": torch.tensor(rows),
        "reference_crossattn": reference.float().contiguous(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, default=Path(os.environ.get("FORGE_DIR", "")))
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--word-positions-only", action="store_true", help="write only word_positions.json")
    parser.add_argument("--names", action="store_true", help="also the captions of train.py --base-names")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    write_word_positions(args.forge, args.work, args.names)
    if args.word_positions_only:
        return
    configs = tiny_models().write_pipeline_configs(args.forge, args.work / "configs")
    placeholder, text = text_only_checkpoint(args.forge, configs)
    save_file(text, str(args.work / "text_encoders.safetensors"))
    checkpoint = args.work / "text_only.safetensors"
    save_file(placeholder, str(checkpoint), metadata={"modelspec.architecture": "flux-1-dev"})
    engine = load_engine(args.forge, configs, checkpoint)
    captions = world.all_captions(args.names)
    with torch.no_grad():
        tensors = names_conditioning(engine, captions) if args.names else full_conditioning(engine, captions)
    save_file(tensors, str(args.work / "conditioning.safetensors"), metadata={"captions": json.dumps(captions)})
    (args.work / "vae_config.json").write_text((configs / "vae" / "config.json").read_text())
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    print(f"{len(captions)} captions -> {shapes}")


if __name__ == "__main__":
    main()
