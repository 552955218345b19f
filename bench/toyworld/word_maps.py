"""Do a trained toy world's word-to-image attention maps find their figures? IoU on rendered true pictures.

For a caption "A on the left and B on the right" and a picture drawn to match it, the picture is encoded by the
world's VAE, noised to a sigma, and run once through the transformer (Forge's class, no webui); at each double block
the maps of A's and B's T5 tokens are read in both directions (Eq. 5's text queries over image keys; image queries
over the words' keys, head-averaged), each image token goes to the word whose (normalised) map is larger, and the
result is scored against the true halves (mean IoU of the two; two random halves score about 0.33, a swap 0).
This separates the model from FreeFuse: a map that does not find a drawn figure cannot make a mask.

    <forge python> bench/toyworld/word_maps.py --forge FORGE_DIR --trained work/trained [--loras both] [--work W]

--trained: a train.py output folder (transformer, vae, LoRAs); --loras merges none, zorb, quil or both at strength 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import train
import world
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
GRID = train.GRID


def merge_lora(model, path: Path) -> None:
    """Add a kohya LoRA (alpha = rank: scale 1) into the model's weights."""
    lora = load_file(str(path))
    params = {name[: -len(".weight")].replace(".", "_"): p for name, p in model.named_parameters()}
    for key in {k.split(".")[0] for k in lora}:
        with torch.no_grad():
            params[key[len("lora_unet_") :]] += lora[f"{key}.lora_up.weight"] @ lora[f"{key}.lora_down.weight"]


def split_iou(first: np.ndarray, second: np.ndarray) -> float:
    """(TOKENS,) maps of the left and the right word -> mean IoU of the argmax split against the true halves."""
    left_wins = (first / first.sum() > second / second.sum()).reshape(GRID, GRID)
    return world.halves_iou(np.stack([left_wins, ~left_wins]))


class WordMaps:
    def __init__(self, forge: Path, trained: Path, work: Path, loras: tuple[str, ...], captions: list[str]):
        flux_cls, vae_cls = train.import_forge(forge, "cpu")
        import backend.nn.flux

        self.recorder = train.AttentionRecorder(backend.nn.flux)
        self.captions, self.cond, _ = train.load_conditioning(work, "cpu", captions)
        self.positions = json.loads((work / "word_positions.json").read_text())
        self.vae = vae_cls(**train.vae_kwargs(json.loads((work / "vae_config.json").read_text()), vae_cls))
        self.vae.load_state_dict(load_file(str(trained / "vae.safetensors")))
        self.model = flux_cls(**train.TRANSFORMER)
        self.model.load_state_dict(load_file(str(trained / "transformer.safetensors")))
        for name in loras:
            merge_lora(self.model, trained / f"lora_{name}.safetensors")
        self.vae.eval()
        self.model.eval()

    @torch.no_grad()
    def ious(self, caption: str, figures, sigma: float, seed: int) -> list[tuple[float, float]]:
        """[(text-query IoU, image-query IoU)] per double block for one noised true picture."""
        picture = world.render(figures, np.random.default_rng(seed))
        latents = train.encode(self.vae, torch.from_numpy(picture)[None])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        i = self.captions.index(caption)
        self.recorder.records.clear()
        self.recorder.on = True
        try:
            self.model(
                (1 - sigma) * latents + sigma * noise,
                torch.tensor([sigma]),
                self.cond["crossattn"][i : i + 1],
                self.cond["vector"][i : i + 1],
                torch.tensor([3.5]),
            )
        finally:
            self.recorder.on = False
        (_, left), (_, right) = self.positions[caption][:2]
        n_txt = self.cond["crossattn"].shape[1]
        out = []
        for q, k in self.recorder.records[: len(self.model.double_blocks)]:
            scale = q.shape[-1] ** -0.5
            text_q = torch.softmax(q[0, :, :n_txt] @ k[0].transpose(-1, -2) * scale, -1)[:, :, n_txt:].mean(0)
            image_q = torch.softmax(q[0, :, n_txt:] @ k[0].transpose(-1, -2) * scale, -1)[:, :, :n_txt].mean(0)
            out.append(
                (
                    split_iou(text_q[left].mean(0).numpy(), text_q[right].mean(0).numpy()),
                    split_iou(image_q[:, left].mean(1).numpy(), image_q[:, right].mean(1).numpy()),
                )
            )
        self.recorder.records.clear()
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, required=True)
    parser.add_argument("--trained", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=HERE / "work", help="make_text.py's output folder")
    parser.add_argument("--loras", choices=("none", "zorb", "quil", "both"), default="none")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--sigmas", default="0.9,0.7,0.5")
    args = parser.parse_args(argv)
    loras = {"none": (), "both": tuple(world.CHARACTERS)}.get(args.loras, (args.loras,))
    plain = lambda colour, shape: world.Sprite(shape, colour, "plain", "white")  # noqa: E731
    cases = [
        ("green", "orange", plain("green", "disc"), plain("orange", "square")),
        ("orange", "green", plain("orange", "square"), plain("green", "disc")),
        ("zorb", "quil", world.ZORB, world.QUIL),
        ("quil", "zorb", world.QUIL, world.ZORB),
    ]
    first, second = world.HELD_OUT_NAMES  # never trained on, drawn as generic figures (a --names world only)
    if world.caption([(first, "left"), (second, "right")]) in train.caption_table(args.work):
        cases += [
            (first, second, plain("purple", "triangle"), plain("yellow", "diamond")),
            (second, first, plain("purple", "triangle"), plain("yellow", "diamond")),
        ]
    captions = [world.caption([(left, "left"), (right, "right")]) for left, right, _, _ in cases]
    maps = WordMaps(args.forge.resolve(), args.trained, args.work, loras, captions)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    blocks = len(maps.model.double_blocks)
    print(f"LoRAs merged: {args.loras}; {args.seeds} seeds; cell = text-query / image-query IoU")
    print("| caption | sigma | " + " | ".join(f"double_blocks.{b}" for b in range(blocks)) + " |")
    print("|---|---|" + "---|" * blocks)
    for caption, (_, _, left_sprite, right_sprite) in zip(captions, cases, strict=True):
        for sigma in sigmas:
            figures = [(left_sprite, "left"), (right_sprite, "right")]
            runs = [maps.ious(caption, figures, sigma, seed) for seed in range(args.seeds)]
            mean = np.array(runs).mean(0)
            print(f"| {caption} | {sigma} | " + " | ".join(f"{t:.2f} / {i:.2f}" for t, i in mean) + " |")


if __name__ == "__main__":
    main()
