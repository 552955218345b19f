"""The forge tier's own ground: Forge's tiny FLUX runs and samples on CPU through its UnetPatcher."""

from __future__ import annotations

import torch


def test_tiny_flux_samples_finite_latents(forge, tiny_unet):
    out = forge.sample(tiny_unet, steps=3)
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()


def test_sampling_is_deterministic(forge, tiny_unet):
    assert torch.equal(forge.sample(tiny_unet, steps=2), forge.sample(tiny_unet, steps=2))
