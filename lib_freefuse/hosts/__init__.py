"""The Forges FreeFuse runs in, one package each behind `Host` (base.py), chosen by capability checks.

`detect()` runs once when the script is imported and names the host in the console; `for_unet(unet)` picks the
adapter whose LoRA store the job's patcher has (the same answer inside a webui; tests build patchers directly).
A third host is a new package here and one line in KNOWN.
"""

from __future__ import annotations

from .base import Host, HostUnsupported, PatchEntry, SubjectPatches
from .classic import ClassicForge
from .neo import ForgeNeo

__all__ = ["KNOWN", "Host", "HostUnsupported", "PatchEntry", "SubjectPatches", "detect", "for_unet"]

KNOWN: tuple[type[Host], ...] = (ForgeNeo, ClassicForge)


def detect() -> Host:
    """The adapter of the running Forge; HostUnsupported naming what each known adapter misses otherwise."""
    reasons = []
    for host in KNOWN:
        try:
            lacking = host.matches()
        except Exception as error:  # an import that fails is as good as a missing attribute
            lacking = f"{type(error).__name__}: {error}"
        if lacking is None:
            return host()
        reasons.append(f"{host.name}: no {lacking}")
    raise HostUnsupported(f"this Forge is not one FreeFuse knows ({'; '.join(reasons)})")


def for_unet(unet) -> Host:
    """The adapter whose LoRA store `unet` (a Forge UnetPatcher) has; HostUnsupported if none has it."""
    for host in KNOWN:
        adapter = host()
        if adapter.owns(unet):
            return adapter
    raise HostUnsupported(
        f"the model's patcher ({type(unet).__name__}) keeps its LoRAs in a way FreeFuse does not know "
        f"(neither {' nor '.join(host.name for host in KNOWN)})"
    )
