"""Tiny random Chroma for the webui tier (Forge Neo only): an all-in-one checkpoint in the layout Neo's loader
splits for Chroma, the pipeline configs it reads beside it, and Chroma LoRAs.

- `write_configs`: Neo's backend/huggingface/Chroma copied as <configs>/Chroma-tiny ("chroma" in the name: Neo's
  LoRA key map adds its diffusers keys for it) with tiny T5 and VAE configs. Its tokenizer folder is a copy of
  Neo's backend/huggingface/black-forest-labs/FLUX.1-schnell/tokenizer_2 (FLUX.1's T5 tokenizer): this Neo tree's
  Chroma/tokenizer has the same tokenizer_config.json and special_tokens_map.json (byte-identical) but no
  vocabulary, so T5TokenizerFast cannot load it. webui_hook/tiny_chroma_hook.py points the guess of a tiny Chroma
  at this folder ($FREEFUSE_TEST_TINY_CHROMA_CONFIGS).
- `write_checkpoint`: `model.diffusion_model.*` (Neo's IntegratedChromaTransformer2DModel, tiny, with RMS norm
  scales keyed `.scale` as Chroma files have them), `vae.*` (FLUX's AutoencoderKL, tiny) and
  `text_encoders.t5xxl.transformer.*` (Neo's IntegratedT5, tiny).
- LoRAs (tiny_models.write_linear_loras): kohya-style, on block layers and on a layer of the modulation MLP.

Run with Neo's Python: `python tiny_chroma.py --forge FORGE --checkpoint FILE --lora-dir DIR --configs DIR` prints a
JSON manifest.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "forge"))  # chroma_env: the forge tier's tiny Chroma config

import chroma_env  # noqa: E402
import tiny_models  # noqa: E402
from tiny_models import T5, VAE, _randomize, setup_forge, writer_main  # noqa: E402

FORGE_PIPELINE = Path("backend", "huggingface", "Chroma")
T5_TOKENIZER = Path("backend", "huggingface", "black-forest-labs", "FLUX.1-schnell", "tokenizer_2")
PIPELINE_NAME = "Chroma-tiny"
LORA_NAMES = ("tiny_chroma_a", "tiny_chroma_b")
H = 256  # huggingface_guess reads Chroma's heads as hidden // 128 (FLUX.1's RoPE axes [16, 56, 56])
TRANSFORMER = {  # the forge tier's tiny Chroma at the head size huggingface_guess assumes
    **chroma_env.CHROMA_CONFIG,
    "context_in_dim": T5["d_model"],
    "hidden_size": H,
    "num_heads": 2,
    "axes_dim": [16, 56, 56],
    "depth": 2,
    "depth_single_blocks": 2,
    "out_dim": H,
}
LORA_TARGETS = (  # (module path, out, in)
    ("double_blocks.0.img_attn.qkv", 3 * H, H),
    ("double_blocks.1.img_mlp.0", 4 * H, H),
    ("double_blocks.1.txt_attn.proj", H, H),
    ("single_blocks.0.linear1", 3 * H + 4 * H, H),
    ("distilled_guidance_layer.layers.0.out_layer", TRANSFORMER["hidden_dim"], TRANSFORMER["hidden_dim"]),
)


def hook():
    """webui_hook/tiny_chroma_hook.py as a module: the checkpoint is checked against what it reads back."""
    spec = importlib.util.spec_from_file_location("tiny_chroma_hook", HERE / "webui_hook" / "tiny_chroma_hook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_configs(forge_root: Path, configs_root: Path) -> Path:
    source = Path(forge_root) / FORGE_PIPELINE
    target = Path(configs_root) / PIPELINE_NAME
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    shutil.copytree(source / "scheduler", target / "scheduler", dirs_exist_ok=True)
    shutil.copytree(Path(forge_root) / T5_TOKENIZER, target / "tokenizer", dirs_exist_ok=True)
    for folder, overrides in (("text_encoder", T5), ("vae", VAE)):
        config = json.loads((source / folder / "config.json").read_text())
        config.update(overrides)
        (target / folder).mkdir(exist_ok=True)
        (target / folder / "config.json").write_text(json.dumps(config, indent=2))
    return target


def build_state_dict(forge_root: Path, configs: Path, seed: int = 0) -> dict:
    import torch

    setup_forge(Path(forge_root))
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL

    torch.manual_seed(seed)
    transformer = IntegratedChromaTransformer2DModel(**TRANSFORMER)
    vae = IntegratedAutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    t5 = IntegratedT5(json.loads((configs / "text_encoder" / "config.json").read_text()))
    for index, module in enumerate((transformer, vae, t5)):
        _randomize(module, seed * 100 + index)
    rms = {name + ".weight" for name, m in transformer.named_modules() if isinstance(m, torch.nn.RMSNorm)}
    state_dict = {
        "model.diffusion_model." + (k.removesuffix("weight") + "scale" if k in rms else k): v
        for k, v in transformer.state_dict().items()
    }
    state_dict |= {"vae." + k: v for k, v in vae.state_dict().items()}
    state_dict |= {"text_encoders.t5xxl." + k: v for k, v in t5.state_dict().items()}
    state_dict = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
    for key in ("vae.decoder.conv_out.weight", "vae.decoder.conv_out.bias"):
        state_dict[key] = state_dict[key] * 0.1  # keeps the decoded image off the [-1, 1] clamp
    return state_dict


def check_guess(state_dict: dict) -> None:
    """The test hook must read back the config the transformer was built with (else Neo builds another model)."""
    from huggingface_guess import detection

    guessed = detection.detect_unet_config(state_dict, "model.diffusion_model.")
    guessed |= hook().approximator_config(state_dict)
    guessed.pop("image_model", None)
    if guessed != TRANSFORMER:
        raise AssertionError(f"the webui hook would guess {guessed} for a checkpoint built as {TRANSFORMER}")


def write_checkpoint(forge_root: Path, configs: Path, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    state_dict = build_state_dict(forge_root, configs, seed)
    check_guess(state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    return path


def write_all(forge_root: Path, checkpoint: Path, lora_dir: Path, configs_root: Path) -> dict:
    configs = write_configs(forge_root, configs_root)
    write_checkpoint(forge_root, configs, checkpoint)
    loras = tiny_models.write_linear_loras(lora_dir, LORA_NAMES, LORA_TARGETS, first_seed=61)
    return {"checkpoint": str(checkpoint), "checkpoint_name": checkpoint.stem, "configs": str(configs), "loras": loras}


def main(argv=None) -> None:
    writer_main(write_all, __doc__, argv)


if __name__ == "__main__":
    main()
