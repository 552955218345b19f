"""Reliability with Forge's own classes (tier "forge"): a model that is not FLUX, a fault in the attention capture."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from test_host import WORDS, make_job

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.processing import start_run

NOT_FLUX = (
    "the model (IntegratedUNet2DConditionModel) is none of FLUX.1, SDXL, Chroma, FLUX.2 Klein, Qwen-Image, Z-Image: "
    "FreeFuse does nothing for it"
)
SD_CONFIG = dict(  # Forge's SD1.5 UNet layout (IntegratedUNet2DConditionModel), tiny
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    channel_mult=(1, 2),
    num_head_channels=16,
    use_spatial_transformer=True,
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=32,
    use_linear_in_transformer=True,
)


@pytest.fixture
def sd_unet(forge):
    """A tiny SD1.5-shaped UNet in Forge's UnetPatcher, built as backend/diffusion_engine/sd15.py builds it."""
    from backend import memory_management
    from backend.modules.k_prediction import Prediction
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher
    from backend.state_dict import load_state_dict
    from huggingface_guess import model_list

    torch.manual_seed(0)
    state_dict = IntegratedUNet2DConditionModel(**SD_CONFIG).state_dict()
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32):
        model = IntegratedUNet2DConditionModel(**SD_CONFIG)
    load_state_dict(model, state_dict)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    if forge.HOST == "neo":  # Neo's Prediction takes the schedule's numbers explicitly (SD1.5's)
        schedule = dict(sigma_data=1.0, beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
        predictor = Prediction(prediction_type="epsilon", timesteps=1000, **schedule)
    else:
        predictor = Prediction(prediction_type="epsilon")
    unet = UnetPatcher.from_model(
        model=model, diffusers_scheduler=None, k_predictor=predictor, config=model_list.SD15(dict(SD_CONFIG))
    )
    yield unet
    forge.unload(unet)


def sd_denoise(unet) -> torch.Tensor:
    """Forge's sampling path for an SD model, over three sigmas with CFG 3 (sampling_prepare ... cleanup)."""
    from backend.sampling.condition import compile_conditions
    from backend.sampling.sampling_function import sampling_cleanup, sampling_function_inner, sampling_prepare

    g = torch.Generator().manual_seed(1)
    cond = compile_conditions(torch.randn(1, 77, SD_CONFIG["context_dim"], generator=g))
    uncond = compile_conditions(torch.zeros(1, 77, SD_CONFIG["context_dim"]))
    x = torch.randn(1, 4, 8, 8, generator=g)
    sampling_prepare(unet, x)
    try:
        with torch.no_grad():
            return torch.stack(
                [
                    sampling_function_inner(unet.model, x, torch.tensor([s]), uncond, cond, 3.0, unet.model_options)
                    for s in (14.6, 3.0, 0.5)
                ]
            )
    finally:
        sampling_cleanup(unet)


def test_a_model_that_is_not_flux_gets_one_warning_and_stays_untouched(forge, sd_unet, caplog):
    """The script's hook on an SD1.5-shaped model, for every sampling call of a job (three, as for a hires-fix job):
    one warning, nothing patched, and Forge's denoiser gives exactly what it gives without FreeFuse."""
    before = sd_denoise(sd_unet)
    args = FreeFuseArgs.from_dict(
        {"enabled": True, "subjects": [{"lora": "a", "words": "cat"}, {"lora": "b", "words": "dog"}]}
    )
    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=sd_unet)), prompts=["a cat, a dog"])
    with caplog.at_level(logging.INFO, logger="FreeFuse"):
        for _ in range(3):
            assert start_run(p, args, torch.zeros(1, 4, 8, 8)) is None
    assert p.sd_model.forge_objects.unet is sd_unet
    assert sd_unet.object_patches == {} and "model_function_wrapper" not in sd_unet.model_options
    assert p.freefuse_state.warnings == [NOT_FLUX] and p.freefuse_state.jobs == []
    assert [r.getMessage() for r in caplog.records if "FreeFuse" in r.getMessage()] == [f"FreeFuse: {NOT_FLUX}"]
    assert torch.equal(sd_denoise(sd_unet), before)


def test_a_fault_in_the_attention_capture_ends_in_an_image_without_masks(forge, tiny_unet, caplog):
    """store_attention raising inside the capture block: the block's attention is computed as usual, the run goes on
    without masks (the subject LoRAs unmasked), the failure is reported once, and nothing stays patched."""
    import backend.nn.flux as flux

    job = make_job(WORDS, capture_step=1)

    def broken_store(q, k):
        raise RuntimeError("capture exploded")

    job.store_attention = broken_store
    with caplog.at_level(logging.WARNING, logger="FreeFuse"):
        out = forge.sample(patch_unet(tiny_unet, job, {}, capture_block=1), steps=3, seed=5)
    assert torch.isfinite(out).all()
    assert job.masks is None and job.failure == "capturing the attention failed: RuntimeError: capture exploded"
    assert sum("capture exploded" in r.getMessage() for r in caplog.records) == 1
    assert flux.attention.__name__ == "attention"
    torch.testing.assert_close(out, forge.sample(tiny_unet, steps=3, seed=5))  # no subject LoRAs here: plain
