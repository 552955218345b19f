"""Test-only guess of a tiny Chroma for the webui tier (Forge Neo), for sitecustomize.py's huggingface_guess wrapper.

huggingface_guess takes any checkpoint with FLUX.1's blocks and `distilled_guidance_layer.norms.0.scale` as Chroma,
but writes the modulation MLP's real sizes into the config (in_dim 64, out_dim 3072, hidden_dim 5120, n_layers 5;
detection.py ~186), so a tiny Chroma cannot be built from its guess. For a Chroma checkpoint whose MLP is not
Chroma's real one, `tiny_chroma_guess` keeps huggingface_guess's own detected config, reads the MLP's sizes off its
tensors and points the guess at the tiny pipeline configs in $FREEFUSE_TEST_TINY_CHROMA_CONFIGS (tiny_chroma.py).
A real Chroma checkpoint is left exactly as Forge guesses it. Imports nothing of Forge until it is called.
"""

from __future__ import annotations

import os

CHROMA_CONFIGS_ENV = "FREEFUSE_TEST_TINY_CHROMA_CONFIGS"
CHROMA_TEST_KEY = "distilled_guidance_layer.norms.0.scale"  # the key huggingface_guess detects Chroma by
CHROMA_OUT_DIM = 3072  # Chroma's modulation vectors (hidden 3072): left to huggingface_guess as it is
PREFIX = "model.diffusion_model."


def approximator_config(state_dict, prefix: str = PREFIX) -> dict:
    """The modulation MLP's sizes (Neo's backend/nn/chroma.py Approximator) read off its tensors."""
    hidden_dim, in_dim = state_dict[prefix + "distilled_guidance_layer.in_proj.weight"].shape
    out_dim = state_dict[prefix + "distilled_guidance_layer.out_proj.weight"].shape[0]
    layers = prefix + "distilled_guidance_layer.layers."
    n_layers = len({k[len(layers) :].split(".", 1)[0] for k in state_dict if k.startswith(layers)})
    return {"in_dim": int(in_dim), "out_dim": int(out_dim), "hidden_dim": int(hidden_dim), "n_layers": n_layers}


def tiny_chroma_guess(state_dict):
    """model_list.Chroma with huggingface_guess's detected config but the MLP's own sizes, pointed at the tiny
    pipeline configs; None for any other checkpoint (a real Chroma included)."""
    configs = os.environ.get(CHROMA_CONFIGS_ENV)
    if not configs or PREFIX + CHROMA_TEST_KEY not in state_dict:
        return None
    if state_dict[PREFIX + "distilled_guidance_layer.out_proj.weight"].shape[0] == CHROMA_OUT_DIM:
        return None
    from huggingface_guess import detection, model_list

    result = model_list.Chroma(detection.detect_unet_config(state_dict, PREFIX))
    result.unet_config.update(approximator_config(state_dict))
    result.unet_key_prefix = [PREFIX]
    result.unet_config.pop("image_model", None)  # as huggingface_guess.guess leaves it
    result.huggingface_repo = os.path.abspath(configs)
    print(f"[freefuse-test] tiny Chroma: {result.unet_config} with configs from {result.huggingface_repo}")
    return result
