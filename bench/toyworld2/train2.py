"""Train the second toy world on a CPU: its base transformer (with the attention loss and made-up names, as the
first world's) and its two character LoRAs (text-stream layers kept). Writes OUT/ with transformer.safetensors (the
EMA), toy2_zorb.safetensors, toy2_quil.safetensors (kohya keys) and train_log.json.

    python bench/toyworld2/train2.py --forge FORGE_DIR --out bench/toyworld2/model [--quick]

Needs torch, numpy, safetensors, einops, psutil, sentencepiece and pyyaml (Forge's backend imports); the first
world's train.py supplies the flow loss, the attention loss, the LoRA layers and the logs. Same seed, same device
type: same numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import world2
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "toyworld"))
import train
import world

FULL = dict(
    base_pool=16384, base_steps=1400, base_batch=64, base_lr=1e-3, ema=0.995,
    lora_pool=2048, lora_steps=500, lora_batch=32, lora_lr=3e-3,
)  # fmt: skip
QUICK = dict(
    base_pool=64, base_steps=3, base_batch=4, base_lr=1e-3, ema=0.9,
    lora_pool=16, lora_steps=3, lora_batch=4, lora_lr=3e-3,
)  # fmt: skip
ATTENTION_LOSS = 0.05
BASE_NAMES = 0.8  # share of base figures named by a made-up name (world.NAMES), so words route by their place
LORA_PAIRED = 0.5  # share of LoRA pictures with a generic figure in the other half
SEED = 20


def figure_words(caption: str) -> list[int]:
    """Token positions of the caption's figure words: the first word of each " and "-joined part."""
    words = caption.split()
    return ([0] if words else []) + [i + 1 for i, w in enumerate(words) if w == "and"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, required=True, help="a Forge checkout (its backend/ is imported)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything: checks the script runs")
    parser.add_argument("--base-steps", type=int, help="override the base's steps")
    parser.add_argument("--lora-steps", type=int, help="override each LoRA's steps")
    parser.add_argument("--lora-lr", type=float, help="override each LoRA's learning rate")
    parser.add_argument("--resume", type=Path, help="a folder with transformer.safetensors: LoRAs only")
    parser.add_argument("--characters", default=",".join(world.CHARACTERS), help="which LoRAs to train")
    parser.add_argument(
        "--image-only", default="", help="characters whose LoRA leaves out the text-stream layers (as world 1's)"
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("base_steps", "lora_steps", "lora_lr"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    flux_cls, _ = train.import_forge(args.forge.resolve(), "cpu")
    import backend.nn.flux

    args.out.mkdir(parents=True, exist_ok=True)
    log = train.Log(args.out / "train_log.json", device="cpu", torch=torch.__version__, seed=SEED,
                    quick=args.quick, transformer=world2.TRANSFORMER, config=cfg, attention_loss=ATTENTION_LOSS,
                    base_names=BASE_NAMES, lora_paired=LORA_PAIRED, text_seed=world2.TEXT_SEED)  # fmt: skip
    started = time.perf_counter()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    table = world.all_captions(names=True)
    cond = world2.encode(table)
    sizes = {"base": cfg["base_pool"], **{name: cfg["lora_pool"] for name in world.CHARACTERS}}
    pools = {
        kind: train.render_pool(kind, n, SEED + i, LORA_PAIRED, BASE_NAMES) for i, (kind, n) in enumerate(sizes.items())
    }
    latents = {k: world2.to_latent(torch.from_numpy(v[0])) for k, v in pools.items()}
    cap_idx = {k: train.caption_index(v[1], table, "cpu") for k, v in pools.items()}

    model = flux_cls(**world2.TRANSFORMER)
    train.zero_init(model)
    log.data["transformer_parameters"] = sum(p.numel() for p in model.parameters())
    if args.resume:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.resume / "transformer.safetensors")))
        base = model.requires_grad_(False)
    else:
        words = torch.full((len(table), 2, 1), -1, dtype=torch.long)
        for c, text in enumerate(table):
            for f, position in enumerate(figure_words(text)[:2]):
                words[c, f, 0] = position
        masks = torch.from_numpy(pools["base"][2])
        attention = (ATTENTION_LOSS, train.AttentionRecorder(backend.nn.flux), words, masks)
        base = train.train_base(model, latents["base"], cap_idx["base"], cond, cfg, log, gen, attention)
        state = {k: v.float().contiguous() for k, v in base.state_dict().items()}
        save_file(state, str(args.out / "transformer.safetensors"))
    for name in args.characters.split(","):
        text_stream = name not in args.image_only.split(",")
        lora = train.train_lora(base, name, latents[name], cap_idx[name], cond, cfg, log, gen, text_stream=text_stream)
        save_file(lora, str(args.out / f"toy2_{name}.safetensors"), metadata={"ss_network_dim": str(train.LORA_RANK)})
    log.data["total_seconds"] = round(time.perf_counter() - started, 1)
    log.path.write_text(__import__("json").dumps(log.data, indent=1))
    print(f"total {log.data['total_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
