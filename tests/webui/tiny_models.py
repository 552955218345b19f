"""Tiny random FLUX for the webui tier: an all-in-one checkpoint that Forge's own loader reads, and LoRAs for it.

Everything is built here from Forge's own module classes with random weights (nothing is downloaded):

- `write_checkpoint`: one .safetensors with the four parts of a FLUX.1-dev all-in-one file, keyed as
  backend/loader.py splits them: `model.diffusion_model.*` (BFL transformer layout), `vae.*` (LDM VAE layout),
  `text_encoders.clip_l.transformer.*` (CLIP-L, transformers layout) and `text_encoders.t5xxl.transformer.*` (T5).
- `write_pipeline_configs`: the folder that stands in for Forge's backend/huggingface/black-forest-labs/FLUX.1-dev
  with tiny CLIP-L, T5 and VAE configs (Forge reads those configs there, not from the checkpoint) and Forge's own
  tokenizers and scheduler config copied. webui_hook/sitecustomize.py points the loader at it.
- `write_lora`: kohya-style FLUX LoRAs (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, ...).

Run with Forge's Python (torch, safetensors, transformers and Forge's backend): the conftest calls
`python tiny_models.py --forge FORGE --checkpoint FILE --lora-dir DIR --configs DIR`, which prints a JSON manifest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORGE_PIPELINE = Path("backend", "huggingface", "black-forest-labs", "FLUX.1-dev")
PIPELINE_NAME = "FLUX.1-dev-tiny"  # keeps "flux" (Forge's LoRA key mapper looks for it), never "schnell"

CHECKPOINT_NAME = "tiny_flux"
LORA_NAMES = ("tiny_lora_a", "tiny_lora_b")

CLIP_L = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, projection_dim=64)
T5 = dict(d_model=64, d_kv=32, d_ff=128, num_heads=2, num_layers=2, num_decoder_layers=2)
VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)  # 4 levels: 8x down; Forge's GroupNorm is 32


def _hook():
    """webui_hook/sitecustomize.py as a module: the tiny transformer is built with the shapes its hook reads back."""
    spec = importlib.util.spec_from_file_location("freefuse_webui_hook", HERE / "webui_hook" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEAD_DIM = 64
TRANSFORMER = dict(
    in_channels=16,  # FLUX latent channels
    vec_in_dim=CLIP_L["hidden_size"],  # CLIP-L pooled output
    context_in_dim=T5["d_model"],  # T5 hidden states
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=128 // HEAD_DIM,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[8, 28, 28],  # = sitecustomize.axes_dim_for(64), checked in write_checkpoint
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,  # FLUX.1-dev (distilled guidance)
)


# Linear layers a LoRA may target, as (module path, in_features, out_features) for TRANSFORMER.
def lora_targets(config: dict = TRANSFORMER) -> list[tuple[str, int, int]]:
    hidden = config["hidden_size"]
    mlp = int(hidden * config["mlp_ratio"])
    targets = []
    for i in range(config["depth"]):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            targets += [
                (f"{block}_attn.qkv", hidden, 3 * hidden),
                (f"{block}_attn.proj", hidden, hidden),
                (f"{block}_mlp.0", hidden, mlp),
                (f"{block}_mlp.2", mlp, hidden),
            ]
    for i in range(config["depth_single_blocks"]):
        targets += [
            (f"single_blocks.{i}.linear1", hidden, 3 * hidden + mlp),
            (f"single_blocks.{i}.linear2", hidden + mlp, hidden),
        ]
    return targets


def kohya_key(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def is_neo(forge_root: Path) -> bool:
    """Forge Neo keeps its bundled packages (ComfyUI's LoRA code, huggingface_guess) under modules_forge/packages."""
    return (Path(forge_root) / "modules_forge" / "packages" / "comfy").is_dir()


def setup_forge(forge_root: Path) -> None:
    """Forge's backend importable on CPU: its paths on sys.path, backend.args parsed for the CPU (classic Forge's
    --always-cpu, Neo's --cpu)."""
    if is_neo(forge_root):
        paths, flag = (forge_root, forge_root / "modules_forge" / "packages"), "--cpu"
    else:
        paths = (forge_root, forge_root / "packages_3rdparty", forge_root / "repositories" / "huggingface_guess")
        flag = "--always-cpu"
    for path in paths:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    if "backend.args" not in sys.modules:
        saved, sys.argv = sys.argv, [sys.argv[0], flag]
        try:
            import backend.args  # noqa: F401
        finally:
            sys.argv = saved


def write_pipeline_configs(forge_root: Path, configs_root: Path) -> Path:
    """<configs_root>/FLUX.1-dev-tiny: Forge's FLUX.1-dev folder with the text encoders and VAE made tiny."""
    source = Path(forge_root) / FORGE_PIPELINE
    target = Path(configs_root) / PIPELINE_NAME
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    for folder in ("scheduler", "tokenizer", "tokenizer_2"):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    for folder, overrides in (("text_encoder", CLIP_L), ("text_encoder_2", T5), ("vae", VAE)):
        config = json.loads((source / folder / "config.json").read_text())
        config.update(overrides)
        (target / folder).mkdir(exist_ok=True)
        (target / folder / "config.json").write_text(json.dumps(config, indent=2))
    (target / "transformer").mkdir(exist_ok=True)
    (target / "transformer" / "config.json").write_text(json.dumps(TRANSFORMER, indent=2))  # for people; unread
    return target


def _randomize(module, seed: int, scale_jitter: float = 0.1, bias_std: float = 0.02) -> None:
    """Deterministic random weights; norm scales near 1 (Forge creates T5's layer-norm weights with torch.empty)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = leaf == "scale" or ("norm" in name and leaf == "weight")
            if is_norm:
                parameter.copy_(1.0 + scale_jitter * torch.randn(parameter.shape, generator=generator))
            elif leaf == "bias":
                parameter.copy_(bias_std * torch.randn(parameter.shape, generator=generator))
            elif parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def build_state_dict(forge_root: Path, configs: Path, seed: int = 0) -> dict:
    """The all-in-one state dict: Forge's classes built with the tiny configs and random weights."""
    import torch

    setup_forge(Path(forge_root))
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    extra = dict(out_channels=TRANSFORMER["in_channels"], patch_size=2) if is_neo(forge_root) else {}
    parts = {
        "model.diffusion_model.": IntegratedFluxTransformer2DModel(**TRANSFORMER, **extra),
        "vae.": IntegratedAutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text())),
        "text_encoders.clip_l.": IntegratedCLIP(
            CLIPTextModel, CLIPTextConfig.from_pretrained(configs / "text_encoder"), add_text_projection=True
        ),
        "text_encoders.t5xxl.": IntegratedT5(json.loads((configs / "text_encoder_2" / "config.json").read_text())),
    }
    state_dict = {}
    for index, (prefix, module) in enumerate(parts.items()):
        _randomize(module, seed * 100 + index)
        for key, value in module.state_dict().items():
            if key == "logit_scale":
                continue  # CLIP/T5 training leftovers Forge ignores
            if prefix == "model.diffusion_model." and key.endswith(("query_norm.weight", "key_norm.weight")):
                key = key.removesuffix("weight") + "scale"  # BFL's name, as FLUX files have it (Neo renames on load)
            state_dict[prefix + key] = value.detach().to(torch.float32).contiguous()
    # A bounded VAE output keeps the decoded image away from the [-1, 1] clamp, so pixels differ between inputs.
    for key in ("vae.decoder.conv_out.weight", "vae.decoder.conv_out.bias"):
        state_dict[key] = state_dict[key] * 0.1
    return state_dict


def write_checkpoint(forge_root: Path, configs: Path, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    state_dict = build_state_dict(forge_root, configs, seed)
    derived = _hook().flux_config_from_shapes(state_dict, "model.diffusion_model.")
    if derived != TRANSFORMER:
        raise AssertionError(f"the webui hook would read {derived} back from a checkpoint built as {TRANSFORMER}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata={"modelspec.architecture": "flux-1-dev"})  # one key: see write_lora
    return path


def lora_state_dict(seed: int, rank: int = 4, alpha: float = 4.0, up_std: float = 0.05, targets=None) -> dict:
    """Kohya/BFL-keyed LoRA for every target: Forge merges strength * alpha / rank * up @ down into each weight."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for path, in_features, out_features in targets or lora_targets():
        key = kohya_key(path)
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) * up_std / rank**0.5
        state_dict[f"{key}.lora_down.weight"] = down.contiguous()
        state_dict[f"{key}.lora_up.weight"] = up.contiguous()
        state_dict[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state_dict


def write_lora(
    path: Path, seed: int, rank: int = 4, alpha: float = 4.0, targets=None, metadata=None, up_std: float = 0.05
) -> Path:
    """A LoRA file; same arguments, same bytes (so the same hash in Forge's infotext) as long as `metadata` has at
    most one key: safetensors writes the metadata in hash-map order, which changes from process to process."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"modelspec.architecture": "flux-1-dev/lora"} if metadata is None else metadata  # Forge: SdVersion.Flux
    save_file(lora_state_dict(seed, rank, alpha, up_std, targets), str(path), metadata=metadata or None)
    return path


def write_linear_loras(lora_dir: Path, names, targets, first_seed: int, rank: int = 4) -> dict[str, str]:
    """{name: file} of kohya LoRAs on (module path, out, in) Linears, alpha = rank, up_std 0.5, no metadata, one seed
    each from first_seed (tiny_klein.py's and tiny_chroma.py's)."""
    targets = [(module, in_f, out_f) for module, out_f, in_f in targets]
    return {
        name: str(write_lora(lora_dir / f"{name}.safetensors", first_seed + i, rank, rank, targets, {}, up_std=0.5))
        for i, name in enumerate(names)
    }


def write_all(forge_root: Path, checkpoint: Path, lora_dir: Path, configs_root: Path) -> dict:
    configs = write_pipeline_configs(forge_root, configs_root)
    write_checkpoint(forge_root, configs, checkpoint)
    loras = {name: str(write_lora(lora_dir / f"{name}.safetensors", seed=11 + i)) for i, name in enumerate(LORA_NAMES)}
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_name": checkpoint.stem,
        "configs": str(configs),
        "loras": loras,
        "lora_keys": len(lora_targets()),
        "transformer": TRANSFORMER,
    }


def writer_main(write_all, description: str, argv=None) -> None:
    """The command line of a tiny checkpoint writer (this file, tiny_sdxl.py, tiny_klein.py, tiny_qwen_image.py,
    tiny_zimage.py, tiny_chroma.py):
    write_all(forge, checkpoint, lora_dir, configs) on the resolved paths; prints its JSON manifest."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--forge", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="models/Stable-diffusion/<name>.safetensors")
    parser.add_argument("--lora-dir", type=Path, required=True)
    parser.add_argument("--configs", type=Path, required=True, help="gets the pipeline folder with the tiny configs")
    args = parser.parse_args(argv)
    paths = (args.forge, args.checkpoint, args.lora_dir, args.configs)
    print(json.dumps(write_all(*(path.resolve() for path in paths))))


def main(argv=None) -> None:
    writer_main(write_all, __doc__, argv)


if __name__ == "__main__":
    main()
