"""Fixtures of the forge tier: Forge's backend imported on CPU, a tiny FLUX and its UnetPatcher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from forge_locator import find_forge

sys.path.insert(0, str(Path(__file__).resolve().parent))  # forge_env


@pytest.fixture(scope="session")
def forge_root():
    root, why = find_forge()
    if root is None:
        pytest.skip(why)
    return root


@pytest.fixture(scope="session")
def forge(forge_root):
    """The forge_env helper module, with Forge's backend importable."""
    import forge_env

    forge_env.setup(forge_root)
    return forge_env


@pytest.fixture
def tiny_unet(forge):
    """A fresh tiny FLUX in a UnetPatcher; object patches are undone after the test."""
    unet = forge.make_unet_patcher(forge.make_tiny_flux())
    yield unet
    forge.unload(unet)
