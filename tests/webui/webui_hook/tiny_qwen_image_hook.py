"""Test-only: lets Forge Neo's unmodified loader take the tiny Qwen-Image of tests/webui/tiny_qwen_image.py.

sitecustomize.py (beside this file, on the webui's PYTHONPATH) calls the two functions below from its own patches;
both do nothing unless $FREEFUSE_TEST_TINY_QWEN_IMAGE_CONFIGS names the tiny pipeline folder:

- `tiny_qwen_image_guess(state_dict)`: huggingface_guess reads only in_channels and num_layers off a Qwen-Image
  checkpoint (huggingface_guess/detection.py); the width (24 heads of 128), the text width 3584 and the RoPE axes are
  the class defaults. For a Qwen-Image transformer of another width, the guess is huggingface_guess's own QwenImage
  with the rest of the tiny folder's transformer/config.json, pointed at that folder (its name holds "qwen": Neo's
  LoRA key map). A real Qwen-Image (3072 wide) is left to huggingface_guess as it is.
- `fit_qwen25(llama)`: Neo builds the text encoder as `Qwen25_7BVLI`, which asserts the checkpoint's config against
  Qwen2.5-VL-7B's fixed one and builds the 32-block, 1280-wide vision tower. That fixed config becomes the tiny
  folder's text_encoder/config.json, and the vision tower an empty module (a text-only prompt never calls it:
  `preprocess_embed` runs for reference images only, which the webui test does not send).

Imports nothing of Forge at import time.
"""

from __future__ import annotations

import json
import os

CONFIGS_ENV = "FREEFUSE_TEST_TINY_QWEN_IMAGE_CONFIGS"
TEST_KEY = "txt_norm.weight"  # huggingface_guess's own Qwen-Image key
FULL_SIZE_HIDDEN = 3072  # Qwen-Image (20B): left to huggingface_guess as it is
TRANSFORMER_KEYS = ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "axes_dims_rope")
TEXT_KEYS = ("head_dim", "rope_dims")  # class attributes of Neo's config (not dataclass fields), read from the file


def _config(configs: str, folder: str) -> dict:
    with open(os.path.join(configs, folder, "config.json"), encoding="utf-8") as file:
        return json.load(file)


def tiny_qwen_image_guess(state_dict):
    """huggingface_guess's QwenImage for a Qwen-Image checkpoint not 3072 wide, with the tiny folder's transformer
    config and pipeline; None for any other checkpoint."""
    configs = os.environ.get(CONFIGS_ENV)
    prefix = "model.diffusion_model."
    if not configs or prefix + TEST_KEY not in state_dict or prefix + "img_in.weight" not in state_dict:
        return None
    if state_dict[prefix + "img_in.weight"].shape[0] == FULL_SIZE_HIDDEN:
        return None
    from huggingface_guess import detection, model_list

    result = model_list.QwenImage(detection.detect_unet_config(state_dict, prefix))
    result.unet_key_prefix = [prefix]
    result.unet_config.pop("image_model", None)  # as huggingface_guess.guess leaves it
    transformer = _config(configs, "transformer")
    result.unet_config.update({key: transformer[key] for key in TRANSFORMER_KEYS})
    result.huggingface_repo = os.path.abspath(configs)  # backend/loader.py joins it onto backend/huggingface/
    print(f"[freefuse-test] tiny Qwen-Image: {result.unet_config} with configs from {result.huggingface_repo}")
    return result


def fit_qwen25(module, config: dict | None = None) -> None:
    """Neo's Qwen25_7BVLI (backend/nn/llm/llama.py) built at the tiny text_encoder config (`config`, else the tiny
    folder's) and without its vision tower."""
    if config is None:
        configs = os.environ.get(CONFIGS_ENV)
        if not configs or not os.path.isfile(os.path.join(configs, "text_encoder", "config.json")):
            return
        config = _config(configs, "text_encoder")
    import dataclasses
    import types

    import torch

    base = module.Qwen25_7BVLI_Config
    fields = {f.name: config.get(f.name, f.default) for f in dataclasses.fields(base)}
    tiny = dataclasses.make_dataclass(
        "TinyQwen25Config", [(name, type(value), value) for name, value in fields.items()], bases=(base,)
    )
    for name in TEXT_KEYS:
        setattr(tiny, name, config[name])
    module.Qwen25_7BVLI_Config = tiny

    class NoVision(torch.nn.Module):
        """Qwen2.5-VL's vision tower (fixed 1280 wide, 32 blocks): a text-only prompt never calls it."""

        def __init__(self, *args, **kwargs):
            super().__init__()

    vision = types.ModuleType(module.qwen_vl.__name__)
    vision.__dict__.update(module.qwen_vl.__dict__)
    vision.Qwen2VLVisionTransformer = NoVision
    module.qwen_vl = vision
