"""Tiny random SDXL for the webui tier: an all-in-one checkpoint in SDXL's layout that Forge's own loader reads,
the pipeline configs it reads beside it, and SDXL LoRAs (with LoCon convolutions) for it.

- `write_configs`: Forge's backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0 copied with tiny CLIP-L,
  CLIP-G and VAE configs (Forge reads those configs there, not from the checkpoint); webui_hook/sitecustomize.py
  points the guess of a tiny SDXL at it ($FREEFUSE_TEST_TINY_SDXL_CONFIGS).
- `write_checkpoint`: `model.diffusion_model.*` (Forge's UNet in SDXL's layout, tiny), `conditioner.embedders.0.
  transformer.*` (CLIP-L), `conditioner.embedders.1.model.*` (CLIP-G in open_clip's layout, written by the host's
  own SDXL.process_clip_state_dict_for_saving), `first_stage_model.*` (VAE).
- `write_lora`: kohya-style SDXL LoRAs on attention, feed-forward and resnet convolutions.

Run with Forge's Python: `python tiny_sdxl.py --forge FORGE --checkpoint FILE --lora-dir DIR --configs DIR` prints a
JSON manifest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_models import _randomize, setup_forge, writer_main  # noqa: E402

FORGE_PIPELINE = Path("backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0")
PIPELINE_NAME = "stable-diffusion-xl-base-1.0-tiny"
LORA_NAMES = ("tiny_sdxl_a", "tiny_sdxl_b")
CLIP_L = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, projection_dim=64)
CLIP_G = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, projection_dim=64)
VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
ADM = CLIP_G["projection_dim"] + 6 * 256  # pooled CLIP-G and six size embeddings of 256, as Forge's SDXL engine
UNET = dict(
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=[1, 1, 1],
    channel_mult=[1, 2, 2],
    num_head_channels=16,
    use_spatial_transformer=True,
    transformer_depth=[0, 1, 2],
    transformer_depth_output=[0, 0, 1, 1, 2, 2],
    transformer_depth_middle=2,
    context_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
    use_linear_in_transformer=True,
    num_classes="sequential",
    adm_in_channels=ADM,
)
LORA_TARGETS = (  # (module path, kind, out, in, kernel)
    ("input_blocks.3.1.transformer_blocks.0.attn1.to_q", "linear", 64, 64, 0),
    ("input_blocks.3.1.transformer_blocks.0.attn2.to_k", "linear", 64, 128, 0),
    ("input_blocks.3.1.transformer_blocks.0.attn2.to_v", "linear", 64, 128, 0),
    ("middle_block.1.transformer_blocks.1.attn2.to_k", "linear", 64, 128, 0),
    ("middle_block.1.transformer_blocks.1.attn2.to_v", "linear", 64, 128, 0),
    ("middle_block.1.transformer_blocks.0.ff.net.2", "linear", 64, 256, 0),
    ("output_blocks.4.1.transformer_blocks.0.attn2.to_out.0", "linear", 64, 64, 0),
    ("input_blocks.1.0.in_layers.2", "conv", 32, 32, 3),
    ("middle_block.2.out_layers.3", "conv", 64, 64, 3),
)


def write_configs(forge_root: Path, configs_root: Path) -> Path:
    source = Path(forge_root) / FORGE_PIPELINE
    target = Path(configs_root) / PIPELINE_NAME
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    for folder in ("scheduler", "tokenizer", "tokenizer_2"):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    for folder, overrides in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G), ("vae", VAE)):
        config = json.loads((source / folder / "config.json").read_text())
        config.update(overrides)
        (target / folder).mkdir(exist_ok=True)
        (target / folder / "config.json").write_text(json.dumps(config, indent=2))
    (target / "unet").mkdir(exist_ok=True)
    (target / "unet" / "config.json").write_text(json.dumps(UNET, indent=2))  # for people; unread
    return target


def build_state_dict(forge_root: Path, configs: Path, seed: int = 0) -> dict:
    import torch

    setup_forge(Path(forge_root))
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from huggingface_guess import model_list
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = IntegratedUNet2DConditionModel(**UNET)
    vae = IntegratedAutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    clip_l = IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    clip_g = IntegratedCLIP(
        CLIPTextModel, CLIPTextConfig.from_pretrained(configs / "text_encoder_2"), add_text_projection=True
    )
    for index, module in enumerate((unet, vae, clip_l, clip_g)):
        _randomize(module, seed * 100 + index)
    state_dict = {}
    for key, value in unet.state_dict().items():
        state_dict["model.diffusion_model." + key] = value
    for key, value in vae.state_dict().items():
        state_dict["first_stage_model." + key] = value
    for key, value in clip_l.state_dict().items():
        if key.startswith("transformer.text_model."):
            state_dict["conditioner.embedders.0." + key] = value
    g = {f"clip_g.{k}": v for k, v in clip_g.state_dict().items() if k.startswith("transformer.")}
    state_dict.update(model_list.SDXL(dict(UNET)).process_clip_state_dict_for_saving(g))
    state_dict = {
        k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items() if "position_ids" not in k
    }
    for key in ("first_stage_model.decoder.conv_out.weight", "first_stage_model.decoder.conv_out.bias"):
        state_dict[key] = state_dict[key] * 0.1  # keeps the decoded image off the [-1, 1] clamp
    return state_dict


def write_checkpoint(forge_root: Path, configs: Path, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        build_state_dict(forge_root, configs, seed),
        str(path),
        metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"},
    )
    return path


def write_lora(path: Path, seed: int, rank: int = 4) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, kind, out_f, in_f, kernel in LORA_TARGETS:
        key = "lora_unet_" + module.replace(".", "_")
        if kind == "linear":
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5 / rank**0.5
        else:
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, kernel, kernel, generator=g) / (in_f * 9) ** 0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, 1, 1, generator=g) * 0.5 / rank**0.5
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    return path


def write_all(forge_root: Path, checkpoint: Path, lora_dir: Path, configs_root: Path) -> dict:
    configs = write_configs(forge_root, configs_root)
    write_checkpoint(forge_root, configs, checkpoint)
    loras = {name: str(write_lora(lora_dir / f"{name}.safetensors", seed=31 + i)) for i, name in enumerate(LORA_NAMES)}
    return {"checkpoint": str(checkpoint), "checkpoint_name": checkpoint.stem, "configs": str(configs), "loras": loras}


def main(argv=None) -> None:
    writer_main(__doc__.splitlines()[0], write_all, argv)


if __name__ == "__main__":
    main()
