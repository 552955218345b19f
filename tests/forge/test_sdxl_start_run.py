"""The webui hook's path for an SDXL job (processing.start_run) with the host's own patcher, LoRA loader and CLIP
text engine (tier "forge"); only the LoRA extension's name lookup (`networks`) is a stand-in."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import sdxl_env
import torch
from test_sdxl_masked_sampling import LATENT, lora_sd

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.forge.processing import start_run

PROMPT = "zorbo the knight and (quill the wizard:1.2) in a hall"


def sdxl_job(forge, forge_root, unet, monkeypatch, **settings):
    """A webui job's `p` for the tiny SDXL with two tagged LoRAs merged by the host, and FreeFuse's arguments."""
    sds = {"ya.safetensors": lora_sd(1), "yb.safetensors": lora_sd(2)}
    merged, paths, _ = forge.with_loras(unet, sds, 0.8)
    networks = types.ModuleType("networks")
    networks.available_network_aliases = {
        "ya": SimpleNamespace(filename=paths[0]),
        "yb": SimpleNamespace(filename=paths[1]),
    }
    networks.available_networks = {}
    monkeypatch.setitem(sys.modules, "networks", networks)
    model = SimpleNamespace(
        forge_objects=SimpleNamespace(unet=merged), text_processing_engine_l=sdxl_env.clip_engine(forge_root)
    )
    p = SimpleNamespace(sd_model=model, prompts=[PROMPT], steps=4)
    subjects = [{"lora": "ya", "words": "zorbo the knight"}, {"lora": "yb", "words": "quill the wizard"}]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects, "superpixel_vote": False, **settings})
    return p, args, merged


def test_an_sdxl_job_is_patched_makes_masks_and_leaves_nothing(forge, forge_root, monkeypatch):
    unet = sdxl_env.make_sdxl_patcher(forge, sdxl_env.make_tiny_sdxl(forge))
    try:
        p, args, merged = sdxl_job(forge, forge_root, unet, monkeypatch)
        before = sdxl_env.sample(forge, merged, steps=4, cfg_scale=3.0, latent_hw=LATENT, seed=2)
        job = start_run(p, args, torch.zeros(1, 4, *LATENT))
        assert job is not None and p.freefuse_state.warnings == []
        assert job.family.name == "SDXL" and job.plan.text_length == 77
        assert job.plan.word_positions == (((1, 2, 3, 4), (6, 7, 8)),)  # BOS first; "zorbo" two pieces
        patched = p.sd_model.forge_objects.unet
        assert patched is not merged and patched.freefuse_base is merged
        out = sdxl_env.sample(forge, patched, steps=4, cfg_scale=3.0, latent_hw=LATENT, seed=2)
        assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
        assert tuple(job.masks.shape) == (1, 2, *LATENT)
        assert not torch.allclose(out, before, atol=1e-4)  # the masks changed the image
        after = sdxl_env.sample(forge, merged, steps=4, cfg_scale=3.0, latent_hw=LATENT, seed=2)
        assert torch.equal(after, before)  # the merged LoRAs' own job, unchanged after FreeFuse's
    finally:
        forge.unload(unet)


def test_an_sdxl_capture_block_beyond_the_model_is_named_and_the_last_used(forge, forge_root, monkeypatch):
    unet = sdxl_env.make_sdxl_patcher(forge, sdxl_env.make_tiny_sdxl(forge))
    try:
        p, args, _ = sdxl_job(forge, forge_root, unet, monkeypatch, capture_block=40)
        assert start_run(p, args, torch.zeros(1, 4, *LATENT)) is not None
        assert p.freefuse_state.warnings == [
            "capture block 40 does not exist (the SDXL model has 11 transformer blocks): using the last"
        ]
    finally:
        forge.unload(unet)
