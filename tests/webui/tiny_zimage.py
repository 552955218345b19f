"""Tiny random Z-Image for the webui tier (Forge Neo only): an all-in-one checkpoint in the layout Neo's loader splits
for Z-Image, the pipeline configs it reads beside it, and Z-Image LoRAs.

- `write_configs`: Neo's backend/huggingface/Tongyi-MAI/Z-Image-Turbo copied with tiny Qwen3 and VAE configs, as
  <configs>/Z-Image-Turbo-tiny ("z-image" in the name: Neo's LoRA key map); webui_hook/sitecustomize.py points the
  guess of a tiny Z-Image at it ($FREEFUSE_TEST_TINY_ZIMAGE_CONFIGS) and fits Neo's fixed-size Qwen3 class to its
  text_encoder config (the tiny Klein's: tiny_klein.QWEN3, so one fitted class serves both).
- `write_checkpoint`: `model.diffusion_model.*` (Neo's NextDiT with Z-Image's modulation, the forge tier's tiny
  config), `vae.*` (Neo's FLUX.1-type AutoencoderKL, tiny_models.py's VAE), `text_encoders.qwen3_4b.transformer.*`
  (Neo's Qwen3 class at the tiny config).
- LoRAs: tiny_models.write_lora (kohya keys) on joint-layer (a joint adaLN Linear among them), caption and
  image-refiner layers.

Run with Neo's Python: `python tiny_zimage.py --forge FORGE --checkpoint FILE --lora-dir DIR --configs DIR` prints a
JSON manifest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "forge"))  # zimage_env: the forge tier's tiny Z-Image config

import tiny_klein  # noqa: E402
import tiny_models  # noqa: E402
import zimage_env  # noqa: E402

FORGE_PIPELINE = Path("backend", "huggingface", "Tongyi-MAI", "Z-Image-Turbo")
PIPELINE_NAME = "Z-Image-Turbo-tiny"
LORA_NAMES = ("tiny_zimage_a", "tiny_zimage_b")
PREFIX = "model.diffusion_model."
# huggingface_guess's Z-Image config at the forge tier's tiny size, as the webui hook reads it back: what detection
# leaves out is NextDiT's default (FFN multiple_of 256, 2 refiners of each kind, norm eps 1e-5), so the checkpoint is
# built with those; the caption embedder takes the tiny Qwen3's hidden states.
NEXTDIT_DEFAULTS = ("multiple_of", "n_refiner_layers", "norm_eps")
TRANSFORMER = {k: v for k, v in zimage_env.ZIMAGE_CONFIG.items() if k not in NEXTDIT_DEFAULTS}
TRANSFORMER["cap_feat_dim"] = tiny_klein.QWEN3["hidden_size"]
D = TRANSFORMER["dim"]
FFN = -(-int(D * 8 / 3) // 256) * 256  # FeedForward's hidden width: 8/3 of dim rounded up to a multiple of 256
LORA_TARGETS = (  # (module path, in, out): joint layers, a joint adaLN, the caption embedder, an image refiner
    ("layers.0.attention.qkv", D, 3 * D),
    ("layers.1.adaLN_modulation.0", 256, 4 * D),  # its input: the timestep embedding, min(dim, 256) wide
    ("layers.1.attention.out", D, D),
    ("layers.2.feed_forward.w1", D, FFN),
    ("cap_embedder.1", TRANSFORMER["cap_feat_dim"], D),
    ("noise_refiner.0.attention.qkv", D, 3 * D),
)


def write_configs(forge_root: Path, configs_root: Path) -> Path:
    source = Path(forge_root) / FORGE_PIPELINE
    target = Path(configs_root) / PIPELINE_NAME
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    for folder in ("scheduler", "tokenizer"):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    for folder, overrides in (("text_encoder", tiny_klein.QWEN3), ("vae", tiny_models.VAE), ("transformer", {})):
        config = json.loads((source / folder / "config.json").read_text())
        config.update(overrides)
        (target / folder).mkdir(exist_ok=True)
        (target / folder / "config.json").write_text(json.dumps(config, indent=2))  # transformer's: for people
    return target


def build_state_dict(forge_root: Path, configs: Path, seed: int = 0) -> dict:
    import torch

    tiny_models.setup_forge(Path(forge_root))
    import backend.nn.llm.llama as llama
    from backend import memory_management
    from backend.nn.lumina import NextDiT
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations

    tiny_klein.hook().fit_qwen3(llama, json.loads((configs / "text_encoder" / "config.json").read_text()))
    torch.manual_seed(seed)
    transformer = NextDiT(**TRANSFORMER)
    vae = IntegratedAutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=True):
        qwen3 = llama.Qwen3_06B({})  # as backend/loader.py builds it: its layers are Forge's operations
    for index, module in enumerate((transformer, vae, qwen3)):
        tiny_models._randomize(module, seed * 100 + index)
    state_dict = {PREFIX + k: v for k, v in transformer.state_dict().items()}
    state_dict |= {"vae." + k: v for k, v in vae.state_dict().items()}
    state_dict |= {"text_encoders.qwen3_4b.transformer." + k: v for k, v in qwen3.state_dict().items()}
    state_dict = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
    for key in ("vae.decoder.conv_out.weight", "vae.decoder.conv_out.bias"):
        state_dict[key] = state_dict[key] * 0.1  # keeps the decoded image off the [-1, 1] clamp
    return state_dict


def write_checkpoint(forge_root: Path, configs: Path, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    state_dict = build_state_dict(forge_root, configs, seed)
    derived = tiny_klein.hook().zimage_config_from_shapes(state_dict, PREFIX)
    derived.pop("image_model")  # as huggingface_guess.guess leaves it
    if derived != TRANSFORMER:
        raise AssertionError(f"the webui hook would read {derived} back from a checkpoint built as {TRANSFORMER}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    return path


def write_all(forge_root: Path, checkpoint: Path, lora_dir: Path, configs_root: Path) -> dict:
    configs = write_configs(forge_root, configs_root)
    write_checkpoint(forge_root, configs, checkpoint)
    loras = {}
    for i, name in enumerate(LORA_NAMES):  # alpha 10x the rank: strong enough to show in the tiny model's image
        path = lora_dir / f"{name}.safetensors"
        loras[name] = str(tiny_models.write_lora(path, 61 + i, alpha=40.0, targets=LORA_TARGETS, metadata={}))
    return {"checkpoint": str(checkpoint), "checkpoint_name": checkpoint.stem, "configs": str(configs), "loras": loras}


def main(argv=None) -> None:
    tiny_models.writer_main(write_all, __doc__, argv)


if __name__ == "__main__":
    main()
