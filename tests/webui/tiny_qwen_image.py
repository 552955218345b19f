"""Tiny random Qwen-Image for the webui tier (Forge Neo only): an all-in-one checkpoint in the layout Neo's loader
splits for Qwen-Image, the pipeline configs it reads beside it, and Qwen-Image LoRAs.

- `write_configs`: Neo's backend/huggingface/Qwen/Qwen-Image copied with tiny transformer, Qwen2.5-VL and Wan VAE
  configs, as <configs>/Qwen-Image-tiny ("qwen" in the name: Neo's LoRA key map for Qwen-Image);
  webui_hook/tiny_qwen_image_hook.py points the guess of a tiny Qwen-Image at it
  ($FREEFUSE_TEST_TINY_QWEN_IMAGE_CONFIGS) and fits Neo's fixed-size Qwen2.5-VL class to its text_encoder config.
- `write_checkpoint`: `model.diffusion_model.*` (Neo's QwenImageTransformer2DModel, the forge tier's tiny config with
  this text width), `vae.*` (Neo's Wan 2.1 VAE, backend/nn/wan_vae.py, which Neo builds from the folder's vae config
  when the checkpoint has no 2-D `post_quant_conv`), `text_encoders.qwen25_7b.*` (Neo's Qwen25_7BVLI at the tiny
  config, no vision tower). The text width (48) is above 34, so Neo's engine drops the template's `user\\n` as it does
  for the real 3584-wide encoder (its strip_template tests the width).
- `write_lora`: LoRAs on image-stream, text-stream, feed-forward and modulation layers: A in kohya's names, B in the
  `transformer.<module>` names Neo maps for Qwen-Image only.

Run with Neo's Python: `python tiny_qwen_image.py --forge FORGE --checkpoint FILE --lora-dir DIR --configs DIR`
prints a JSON manifest.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "forge"))  # qwen_image_env: the forge tier's tiny Qwen-Image config

import qwen_image_env  # noqa: E402
from tiny_models import _randomize, setup_forge, writer_main  # noqa: E402

FORGE_PIPELINE = Path("backend", "huggingface", "Qwen", "Qwen-Image")
PIPELINE_NAME = "Qwen-Image-tiny"
LORA_NAMES = ("tiny_qwen_image_a", "tiny_qwen_image_b")
QWEN25 = dict(
    vocab_size=151680,  # the tokenizer's 151665 ids, rounded up to 64
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=24,
    rope_dims=[4, 4, 4],  # Qwen2.5-VL's M-RoPE sections (16, 24, 24 of 64), for head_dim 24; text-only uses 1-D
)
TRANSFORMER = {**qwen_image_env.QWEN_CONFIG, "joint_attention_dim": QWEN25["hidden_size"]}
VAE = dict(base_dim=16, num_res_blocks=1)  # Wan 2.1's 16 latent channels, 8x downsampling, as the real one
H = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
LORA_TARGETS = (  # (module path, out, in)
    ("transformer_blocks.0.attn.to_q", H, H),
    ("transformer_blocks.1.attn.add_k_proj", H, H),
    ("transformer_blocks.2.img_mlp.net.0.proj", 4 * H, H),
    ("transformer_blocks.1.img_mod.1", 6 * H, H),
)


def hook():
    """webui_hook/tiny_qwen_image_hook.py (its Qwen2.5-VL fitting), as a module."""
    path = HERE / "webui_hook" / "tiny_qwen_image_hook.py"
    spec = importlib.util.spec_from_file_location("freefuse_tiny_qwen_image_hook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_configs(forge_root: Path, configs_root: Path) -> Path:
    source = Path(forge_root) / FORGE_PIPELINE
    target = Path(configs_root) / PIPELINE_NAME
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    for folder in ("scheduler", "tokenizer"):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    transformer = {**TRANSFORMER, "axes_dims_rope": list(TRANSFORMER["axes_dims_rope"])}
    for folder, overrides in (("text_encoder", QWEN25), ("vae", VAE), ("transformer", transformer)):
        config = json.loads((source / folder / "config.json").read_text())
        config.update(overrides)
        config.pop("text_config", None)  # the 7B's nested copy of its sizes (Neo reads the top level)
        config.pop("vision_config", None)
        (target / folder).mkdir(exist_ok=True)
        (target / folder / "config.json").write_text(json.dumps(config, indent=2))
    return target


def build_state_dict(forge_root: Path, configs: Path, seed: int = 0) -> dict:
    import torch

    setup_forge(Path(forge_root))
    import backend.nn.llm.llama as llama
    from backend import memory_management
    from backend.nn.wan_vae import WanVAE
    from backend.operations import using_forge_operations

    hook().fit_qwen25(llama, json.loads((configs / "text_encoder" / "config.json").read_text()))
    transformer = qwen_image_env.make_tiny_qwen_image(seed, joint_attention_dim=QWEN25["hidden_size"])
    vae = WanVAE.from_config(WanVAE.load_config(str(configs / "vae")))  # as backend/loader.py builds it
    _randomize(vae, seed * 100 + 1)  # its convolutions are Forge's operations: created empty
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=True):
        qwen25 = llama.Qwen25_7BVLI({})  # as backend/loader.py builds it: its layers are Forge's operations
    _randomize(qwen25, seed * 100 + 2)
    state_dict = {"model.diffusion_model." + k: v for k, v in transformer.state_dict().items()}
    state_dict |= {"vae." + k: v for k, v in vae.state_dict().items()}
    state_dict |= {"text_encoders.qwen25_7b." + k: v for k, v in qwen25.state_dict().items()}
    state_dict = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
    g = torch.Generator().manual_seed(seed)
    for key in (k for k in state_dict if k.startswith("vae.") and k.endswith(".gamma")):  # RMS norm scales near 1
        state_dict[key] = 1.0 + 0.1 * torch.randn(state_dict[key].shape, generator=g)
    for key in ("vae.decoder.head.2.weight", "vae.decoder.head.2.bias"):
        state_dict[key] = state_dict[key] * 0.5  # keeps the decoded image off the [-1, 1] clamp
    return state_dict


def write_checkpoint(forge_root: Path, configs: Path, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(build_state_dict(forge_root, configs, seed), str(path))
    return path


def write_lora(path: Path, seed: int, prefix: str, rank: int = 4) -> Path:
    """`prefix` "kohya": lora_unet_<module with underscores>; "transformer": transformer.<module>."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, out_f, in_f in LORA_TARGETS:
        key = "lora_unet_" + module.replace(".", "_") if prefix == "kohya" else f"transformer.{module}"
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5 / rank**0.5
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_all(forge_root: Path, checkpoint: Path, lora_dir: Path, configs_root: Path) -> dict:
    configs = write_configs(forge_root, configs_root)
    write_checkpoint(forge_root, configs, checkpoint)
    loras = {
        name: str(write_lora(lora_dir / f"{name}.safetensors", seed=51 + i, prefix=prefix))
        for i, (name, prefix) in enumerate(zip(LORA_NAMES, ("kohya", "transformer"), strict=True))
    }
    return {"checkpoint": str(checkpoint), "checkpoint_name": checkpoint.stem, "configs": str(configs), "loras": loras}


def main(argv=None) -> None:
    writer_main(write_all, __doc__, argv)


if __name__ == "__main__":
    main()
