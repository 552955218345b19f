"""The host adapter against the host's own classes (tier "forge"): detection, and what it refuses to run on."""

from __future__ import annotations

import pytest

from lib_freefuse import hosts


def test_the_running_forge_and_its_patcher_pick_the_same_adapter(forge, tiny_unet):
    detected = hosts.detect()
    assert detected.name == {"neo": "Forge Neo", "classic": "classic Forge"}[forge.HOST]
    assert type(hosts.for_unet(tiny_unet)) is type(detected)
    assert detected.missing(tiny_unet) is None


def test_a_nunchaku_model_is_named_and_left_alone(forge, tiny_unet):
    """Neo's Nunchaku models keep their LoRAs inside the quantised layers (NunchakuPatcher, diffusion_model.loras):
    FreeFuse cannot mask them and says so."""
    if forge.HOST != "neo":
        pytest.skip("Nunchaku models exist in Forge Neo only")
    from backend.patcher.unet import NunchakuPatcher

    model = tiny_unet.model
    patcher = NunchakuPatcher(model, load_device=tiny_unet.load_device, offload_device=tiny_unet.offload_device)
    adapter = hosts.for_unet(patcher)
    assert adapter.name == "Forge Neo"
    assert "Nunchaku" in adapter.missing(patcher) and "no mask can reach them" in adapter.missing(patcher)
