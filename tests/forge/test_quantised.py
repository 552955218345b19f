"""FreeFuse on quantised FLUX layers (tier "forge"): Forge's GGUF Linear for real, bitsandbytes 4-bit via a stand-in.

GGUF: the tiny FLUX is built the way backend/loader.py builds a GGUF checkpoint (ForgeOperationsGGUF under
using_forge_operations(bnb_dtype="gguf"), then a state dict of Forge's ParameterGGUF, quantised with the gguf
package Forge vendors in packages_3rdparty/gguf), and Forge bakes it when it loads it for sampling. Its reference is
the same FLUX in float32 holding the dequantised weights: FreeFuse on the GGUF model must equal FreeFuse on that.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import forge_env
import pytest
import torch
import torch.nn.functional as F
from test_lora_layers import naive, other_kinds_lora, random_deltas
from test_masked_sampling import LATENT, lora_sd, with_loras

from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.forge.lora_layers import MaskedLinearPatch, subject_deltas

WORDS = (((1, 2), (5,)),)  # one image; subject 0 at text tokens 1-2, subject 1 at token 5 (8 text tokens)


def _finish(forge, model, storage_dtype):
    """The attributes backend/loader.py gives a loaded diffusion model."""
    from backend import memory_management

    model.config = forge.model_config()
    model.storage_dtype, model.computation_dtype = storage_dtype, torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    return model


def gguf_flux(forge, qtype_name: str):
    """(UnetPatcher of a GGUF tiny FLUX, UnetPatcher of the same FLUX in float32 with its dequantised weights).

    Every 2-D weight (all Linear layers) is quantised; norms and biases stay float32, as in GGUF FLUX files."""
    import gguf
    from backend import memory_management
    from backend.operations import using_forge_operations
    from backend.operations_gguf import ParameterGGUF, dequantize_tensor
    from backend.state_dict import load_state_dict

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    reference = forge.make_tiny_flux(seed=7).state_dict()
    quantised = {}
    for key, value in reference.items():
        if value.ndim == 2:
            data = gguf.quants.quantize(value.float().numpy(), qtype)  # as a GGUFReader tensor holds it
            if forge.HOST == "neo":  # Neo's loader hands over the raw bytes and the shape (backend/utils.py)
                quantised[key] = ParameterGGUF(torch.from_numpy(data), tensor_type=qtype, tensor_shape=value.shape)
            else:
                reader_tensor = SimpleNamespace(data=data, tensor_type=qtype, shape=list(reversed(value.shape)))
                quantised[key] = ParameterGGUF(reader_tensor)
        else:
            quantised[key] = value
    cpu = memory_management.cpu
    with using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=False, bnb_dtype="gguf"):
        model = forge.flux_class()(**forge.constructor_args(forge.model_config()))
    load_state_dict(model, quantised)
    memory_management.bake_gguf_model(model)  # what loading it for sampling does first
    baked = dict(model.named_parameters())  # the GGUF weights; Forge's GGUF Linear keeps its bias as a plain tensor
    dequantised = {
        key: dequantize_tensor(baked[key]).float() if key in baked else value for key, value in reference.items()
    }
    with using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=False):
        plain = forge.flux_class()(**forge.constructor_args(forge.model_config()))
    load_state_dict(plain, dequantised)
    return (
        forge.make_unet_patcher(_finish(forge, model, "gguf")),
        forge.make_unet_patcher(_finish(forge, plain, torch.float32)),
    )


@pytest.fixture(params=["Q8_0", "Q4_0"])
def gguf_pair(forge, request):

    quantised, plain = gguf_flux(forge, request.param)
    assert type(quantised.model.diffusion_model.double_blocks[0].img_attn.qkv).__qualname__ == (
        "ForgeOperationsGGUF.Linear"
    )
    assert getattr(quantised.model.diffusion_model.double_blocks[0].img_attn.qkv.weight, "gguf_cls", None)
    yield quantised, plain
    forge_env.unload(quantised)
    forge_env.unload(plain)


def subject_patches(unet, sds: dict[str, dict]):
    """The merged clone, and the host's patches of each subject LoRA on it (as the prompt's tags load them)."""
    merged = with_loras(unet, sds)
    return merged, [forge_env.merged_patches(merged, str(forge_env.lora_dir() / name)) for name in sds]


def test_dense_deltas_are_taken_against_the_dequantised_gguf_weights(forge, gguf_pair):
    """LoHa, LoKr, GLoRA and DoRA change a weight by an amount that depends on it (or are merged by Forge's own
    function): on a GGUF model FreeFuse must read the base weight dequantised, as Forge's merge does."""
    deltas = []
    for unet in gguf_pair:
        merged, (patches,) = subject_patches(unet, {"kinds.safetensors": other_kinds_lora()})
        host = forge_env.host_adapter()
        found, _ = subject_deltas(patches, host.base_weight(merged), host.merge)
        deltas.append(found)
    quantised, plain = deltas
    assert len(quantised) == len(plain) > 5 and any(not d.low_rank for d in quantised)
    for q, p in zip(quantised, plain, strict=True):
        assert (q.module, q.rows, q.low_rank) == (p.module, p.rows, p.low_rank)
        # a dense delta keeps the dtype of the weight it was taken against: GGUF dequantises to float16
        torch.testing.assert_close(q.weight().float(), p.weight().float(), atol=2e-4, rtol=2e-3)


def freefuse_run(forge, unet, sds: dict[str, dict], masks=None, dense_dtype=None):
    """One FreeFuse sampling run with the subject LoRAs `sds` (as the prompt's tags load them): (latents, job).
    masks None: captured at step 2 and made by SLIC; else these (B_img, L, h, w) masks from the first step.
    dense_dtype: the dense deltas rounded to this dtype first."""
    merged, subjects = subject_patches(unet, sds)
    host = forge_env.host_adapter()
    base = host.base_weight(merged)  # what processing.start_run uses
    deltas: dict[str, list] = {}
    for index, patches in enumerate(subjects):
        for delta in subject_deltas(patches, base, host.merge)[0]:
            if dense_dtype is not None and delta.dense is not None:
                delta = dataclasses.replace(delta, dense=delta.dense.to(dense_dtype))
            deltas.setdefault(delta.module, []).append((index, delta))
    plan = JobPlan(word_positions=WORDS, text_length=8, capture_step=1, initial_masks=masks)
    job = FreeFuseJob(plan, forge.decode)
    return forge.sample(patch_unet(merged, job, deltas, 1, subjects), steps=3, latent_hw=LATENT), job


def test_freefuse_on_a_gguf_flux_equals_freefuse_on_its_dequantised_weights(forge, gguf_pair):
    """A whole FreeFuse run with plain LoRAs (capture in a GGUF block, SLIC, masked deltas on every GGUF Linear layer
    the LoRAs touch, per-token modulation): the same masks and bit-identical latents as on the float32 model that
    holds the dequantised weights."""
    sds = {"a.safetensors": lora_sd(1, image_only=False), "b.safetensors": lora_sd(2, image_only=False)}
    (q_out, q_job), (p_out, p_job) = (freefuse_run(forge, unet, sds) for unet in gguf_pair)
    assert q_job.failure is None and q_job.masks is not None and q_job.capture_count == 1
    assert torch.equal(q_job.masks, p_job.masks)
    assert torch.equal(q_out, p_out)
    plain_gguf = forge.sample(gguf_pair[0], steps=3, latent_hw=LATENT)
    assert (q_out - plain_gguf).abs().max() > 1e-2  # the subject LoRAs did act


def test_dense_kinds_on_a_gguf_flux_follow_the_dequantised_model(forge, gguf_pair):
    """LoHa, LoKr, GLoRA, DoRA and a full weight diff as a subject on the GGUF model, with fixed masks: bit-identical
    to the float32 model's run once its dense deltas are rounded to float16, the dtype in which a GGUF model's are
    kept (a dense delta keeps the dtype of the weight it was taken against, and GGUF dequantises to float16)."""
    from test_masked_sampling import GRID

    masks = torch.zeros(1, 2, *GRID)
    masks[0, 0, :, :4] = 1
    masks[0, 1, :, 4:] = 1
    # Forge's GGUF Linear keeps its bias as a plain tensor, not a parameter, so Forge's add_patches drops a bias
    # patch on a GGUF model (for its own merge as well): the kinds' bias diff is left out of this comparison.
    kinds = {key: value for key, value in other_kinds_lora().items() if not key.endswith(".diff_b")}
    sds = {"a.safetensors": lora_sd(1, image_only=False), "b.safetensors": kinds}
    q_out, q_job = freefuse_run(forge, gguf_pair[0], sds, masks)
    p_out, _ = freefuse_run(forge, gguf_pair[1], sds, masks, dense_dtype=torch.float16)
    assert q_job.failure is None
    assert torch.equal(q_out, p_out)


def test_masked_deltas_on_one_gguf_linear_match_a_naive_computation(forge, gguf_pair):
    quantised, plain = (u.model.diffusion_model.double_blocks[0].img_attn.qkv for u in gguf_pair)
    g = torch.Generator().manual_seed(9)
    x, masks = torch.randn(2, 5, 128, generator=g), torch.rand(2, 5, 3, generator=g)
    deltas = random_deltas()
    with torch.no_grad():
        got = MaskedLinearPatch(quantised.forward, deltas, lambda _: masks)(x)
        torch.testing.assert_close(got.double(), naive(plain.forward, deltas, x, masks), atol=1e-5, rtol=1e-5)


class FourBitLinearStandIn(torch.nn.Module):
    """Stand-in for Forge's ForgeOperationsBNB4bits.Linear. That class derives from bitsandbytes' Params4bit
    machinery, and backend/operations_bnb.py imports bitsandbytes at module level, which Forge's CPU environment
    lacks (bitsandbytes' 4-bit kernels need CUDA): it cannot be constructed here. This stand-in follows the same
    forward path for a layer without online LoRAs, `functional_linear_4bits(x, self.weight, self.bias)`, i.e.
    x @ dequantize_4bit(weight).T + bias, with a blockwise absmax 4-bit quantiser written in torch in place of
    bitsandbytes' kernel; its weight carries `bnb_quantized` as ForgeParams4bit does. FreeFuse wraps that forward
    without looking inside it, so what is checked is the contract: the patched output is the layer's own output plus
    the masked deltas."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, block: int = 64):
        super().__init__()
        blocks = weight.reshape(-1, block)
        scale = blocks.abs().amax(dim=1, keepdim=True) / 7
        self.codes = torch.round(blocks / scale).clamp(-8, 7).to(torch.int8)
        self.absmax, self.shape = scale, weight.shape
        self.weight = torch.nn.Parameter(self.codes.float(), requires_grad=False)
        self.weight.bnb_quantized = True
        self.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() * self.absmax).reshape(self.shape)

    def forward(self, x):
        return F.linear(x, self.dequantize().to(x.dtype), self.bias.to(x.dtype))  # functional_linear_4bits


def test_masked_deltas_on_a_4bit_linear_stand_in_match_a_naive_computation(forge):
    g = torch.Generator().manual_seed(11)
    layer = FourBitLinearStandIn(torch.randn(3 * 128, 128, generator=g) / 11, torch.randn(3 * 128, generator=g))
    x, masks = torch.randn(2, 5, 128, generator=g), torch.rand(2, 5, 3, generator=g)
    deltas = random_deltas()
    dequantised = torch.nn.Linear(128, 3 * 128)
    with torch.no_grad():
        dequantised.weight.copy_(layer.dequantize())
        dequantised.bias.copy_(layer.bias)
        got = MaskedLinearPatch(layer.forward, deltas, lambda _: masks)(x)
        torch.testing.assert_close(got.double(), naive(dequantised.forward, deltas, x, masks), atol=1e-5, rtol=1e-5)
