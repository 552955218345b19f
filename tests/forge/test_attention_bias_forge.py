"""The phase-2 attention bias in the host's own FLUX: the biased attention against a from-scratch softmax, and
through Forge's sampling (it acts once the masks exist, and the host's attention is as before afterwards)."""

from __future__ import annotations

import forge_env
import pytest
import torch
from test_masked_sampling import GRID, LATENT, lora_sd, with_loras

from lib_freefuse.families import FLUX1


def reference(flux, q, k, v, pe, bias):
    """softmax(RoPE(q) RoPE(k)^T / sqrt(d) + bias) v, as (B, L, H * D)."""
    q, k = flux.apply_rope(q, k, pe)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    out = torch.softmax(logits, dim=-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def rope_inputs(seed=0, batch=2, heads=2, length=10, dim=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))
    angles = torch.randn(batch, 1, length, dim // 2, generator=g)
    cos, sin = torch.cos(angles), torch.sin(angles)
    pe = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(batch, 1, length, dim // 2, 2, 2)  # FLUX's rope layout
    return q, k, v, pe


def test_the_biased_attention_equals_a_from_scratch_softmax(forge):
    import backend.nn.flux as flux

    from lib_freefuse.forge.flux1 import _biased_attention

    q, k, v, pe = rope_inputs()
    bias = torch.randn(2, 1, 10, 10) * 3
    original = flux.attention
    failures = []
    with _biased_attention(lambda length, dtype, device: bias.to(dtype), failures.append):
        assert flux.attention is not original
        got = flux.attention(q, k, v, pe)
        hidden = torch.ones(10, 10, dtype=torch.bool)
        hidden[:, 7] = False  # a host mask (L, L) that hides key 7 (Neo's `mask` argument) adds to the bias
        masked = flux.attention(q, k, v, pe, mask=hidden)
    assert flux.attention is original and not failures
    torch.testing.assert_close(got, reference(flux, q, k, v, pe, bias), atol=1e-5, rtol=1e-5)
    hides = torch.zeros(10).index_fill_(0, torch.tensor([7]), float("-inf"))
    torch.testing.assert_close(masked, reference(flux, q, k, v, pe, bias + hides), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(original(q, k, v, pe), reference(flux, q, k, v, pe, 0.0), atol=1e-5, rtol=1e-5)


def test_no_bias_leaves_the_hosts_attention_and_a_failure_is_reported(forge):
    import backend.nn.flux as flux

    from lib_freefuse.forge.flux1 import _biased_attention

    q, k, v, pe = rope_inputs(seed=1)
    expected = flux.attention(q, k, v, pe)
    failures = []

    def broken(length, dtype, device):
        raise ValueError("no bias today")

    with _biased_attention(lambda length, dtype, device: None, failures.append):
        assert torch.equal(flux.attention(q, k, v, pe), expected)
    with _biased_attention(broken, failures.append):
        assert torch.equal(flux.attention(q, k, v, pe), expected)
    assert [str(f) for f in failures] == ["no bias today"]


def bias_run(forge, tiny_unet, bias, masks, cfg_scale=1.0, **plan):
    sds = {"a.safetensors": lora_sd(1, image_only=True), "b.safetensors": lora_sd(2, image_only=True)}
    merged = with_loras(tiny_unet, sds)
    words = {"word_positions": (((1, 2), (5,)),), "attention_bias": bias}
    unet, job = forge_env.freefuse_unet(merged, list(sds), masks, FLUX1, **words, **plan)
    return forge.sample(unet, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT), job


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_the_bias_changes_the_image_once_the_masks_exist(forge, tiny_unet, cfg_scale):
    import backend.nn.flux as flux

    original = flux.attention
    masks = torch.zeros(1, 2, *GRID)
    masks[0, 0, :, :4] = 1
    masks[0, 1, :, 4:] = 1
    plain, _ = bias_run(forge, tiny_unet, 0.0, masks, cfg_scale)
    biased, job = bias_run(forge, tiny_unet, 5.0, masks, cfg_scale)
    assert job.failure is None and flux.attention is original
    assert (biased - plain).abs().max() > 1e-3
    again, _ = bias_run(forge, tiny_unet, 0.0, masks, cfg_scale)
    assert torch.equal(again, plain)  # nothing of the biased run is left in the host


def test_no_masks_no_bias(forge, tiny_unet):
    """Before the masks exist (here: never, the capture step is beyond the run) the bias does nothing."""
    plain, _ = bias_run(forge, tiny_unet, 0.0, None)
    biased, job = bias_run(forge, tiny_unet, 5.0, None)
    assert job.masks is None and job.failure is None
    assert torch.equal(biased, plain)
