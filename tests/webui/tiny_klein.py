"""Tiny random FLUX.2 Klein for the webui tier (Forge Neo only): an all-in-one checkpoint in the layout Neo's loader
splits for Klein, the pipeline configs it reads beside it, and Klein LoRAs.

- `write_configs`: Neo's backend/huggingface/black-forest-labs/FLUX.2-klein-4B copied with tiny Qwen3 and VAE
  configs, as <configs>/FLUX.2-klein-4B-tiny ("flux" in the name: Neo's LoRA key map; "klein": Neo's Klein
  scheduler switch); webui_hook/sitecustomize.py points the guess of a tiny Klein at it
  ($FREEFUSE_TEST_TINY_KLEIN_CONFIGS) and fits Neo's fixed-size Qwen3 class to its text_encoder config.
- `write_checkpoint`: `model.diffusion_model.*` (Neo's FLUX class with FLUX.2's flags, tiny), `vae.*`
  (AutoencoderKLFlux2, tiny), `text_encoders.qwen3_4b.transformer.*` (Neo's Qwen3 class at the tiny config: 28
  layers, as the Klein engine reads layers 9, 18 and 27).
- LoRAs (tiny_models.write_linear_loras): kohya-style, on block layers and the shared image modulation.

Run with Neo's Python: `python tiny_klein.py --forge FORGE --checkpoint FILE --lora-dir DIR --configs DIR` prints a
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
sys.path.insert(0, str(HERE.parent / "forge"))  # klein_env: the forge tier's tiny Klein config

import klein_env  # noqa: E402
import tiny_models  # noqa: E402
from tiny_models import _randomize, setup_forge, writer_main  # noqa: E402

FORGE_PIPELINE = Path("backend", "huggingface", "black-forest-labs", "FLUX.2-klein-4B")
PIPELINE_NAME = "FLUX.2-klein-4B-tiny"
LORA_NAMES = ("tiny_klein_a", "tiny_klein_b")
QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1)
QWEN3["head_dim"] = 16
VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
H = 256
TRANSFORMER = {  # huggingface_guess's FLUX.2 flags as the forge tier's tiny Klein has them, at this size
    k: v
    for k, v in klein_env.klein_config(
        hidden_size=H, depth=2, depth_single_blocks=2, context_in_dim=3 * QWEN3["hidden_size"]
    ).items()
    if k != "image_model"
}
LORA_TARGETS = (  # (module path, out, in)
    ("double_blocks.0.img_attn.qkv", 3 * H, H),
    ("double_blocks.1.img_mlp.0", 6 * H, H),
    ("double_blocks.1.txt_attn.proj", H, H),
    ("single_blocks.0.linear1", 3 * H + 6 * H, H),
    ("double_stream_modulation_img.lin", 6 * H, H),
)


def hook():
    """webui_hook/sitecustomize.py as a module (its Qwen3 fitting), without running it as the site hook."""
    spec = importlib.util.spec_from_file_location("freefuse_webui_hook", HERE / "webui_hook" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_configs(forge_root: Path, configs_root: Path) -> Path:
    source = Path(forge_root) / FORGE_PIPELINE
    target = Path(configs_root) / PIPELINE_NAME
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    for folder in ("scheduler", "tokenizer", "transformer"):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    for folder, overrides in (("text_encoder", QWEN3), ("vae", VAE)):
        config = json.loads((source / folder / "config.json").read_text())
        config.update(overrides)
        (target / folder).mkdir(exist_ok=True)
        (target / folder / "config.json").write_text(json.dumps(config, indent=2))
    return target


def build_state_dict(forge_root: Path, configs: Path, seed: int = 0) -> dict:
    import torch

    setup_forge(Path(forge_root))
    import backend.nn.llm.llama as llama
    from backend import memory_management
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.vae import AutoencoderKLFlux2
    from backend.operations import using_forge_operations

    hook().fit_qwen3(llama, json.loads((configs / "text_encoder" / "config.json").read_text()))
    torch.manual_seed(seed)
    transformer = IntegratedFluxTransformer2DModel(**TRANSFORMER)
    vae = AutoencoderKLFlux2.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32, manual_cast_enabled=True):
        qwen3 = llama.Qwen3_06B({})  # as backend/loader.py builds it: its layers are Forge's operations
    for index, module in enumerate((transformer, vae, qwen3)):
        _randomize(module, seed * 100 + index)
    state_dict = {"model.diffusion_model." + k: v for k, v in transformer.state_dict().items()}
    state_dict |= {"vae." + k: v for k, v in vae.state_dict().items()}
    state_dict |= {"text_encoders.qwen3_4b.transformer." + k: v for k, v in qwen3.state_dict().items()}
    state_dict = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
    for key in ("vae.decoder.conv_out.weight", "vae.decoder.conv_out.bias"):
        state_dict[key] = state_dict[key] * 0.1  # keeps the decoded image off the [-1, 1] clamp
    state_dict["vae.bn.running_var"] = torch.ones_like(state_dict["vae.bn.running_var"])
    return state_dict


def write_checkpoint(forge_root: Path, configs: Path, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(build_state_dict(forge_root, configs, seed), str(path))
    return path


def write_all(forge_root: Path, checkpoint: Path, lora_dir: Path, configs_root: Path) -> dict:
    configs = write_configs(forge_root, configs_root)
    write_checkpoint(forge_root, configs, checkpoint)
    loras = tiny_models.write_linear_loras(lora_dir, LORA_NAMES, LORA_TARGETS, first_seed=41)
    return {"checkpoint": str(checkpoint), "checkpoint_name": checkpoint.stem, "configs": str(configs), "loras": loras}


def main(argv=None) -> None:
    writer_main(write_all, __doc__, argv)


if __name__ == "__main__":
    main()
