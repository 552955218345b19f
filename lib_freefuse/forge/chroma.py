"""Chroma in Forge Neo (backend/nn/chroma.py): FLUX.1's double/single blocks with the modulation given from outside,
so the capture and the block layers are FLUX.1's; the global modulation MLP's layers are one vector per image.
`install` puts the patches on a clone; lib_freefuse/families/chroma.py says which layer sees which tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..families import CHROMA
from ..hosts import Host
from .flux1 import CaptureBlock, install_attention_bias  # Chroma's double blocks are FLUX.1's: the same capture
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch
from .patching import SubjectDeltas, stream_masks, unpatched


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """The capture block's patch and every masked layer of the subject LoRAs, as object patches on `clone`."""
    if not 0 <= capture_block < len(model.double_blocks):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(model.double_blocks)} blocks")
    block = f"diffusion_model.double_blocks.{capture_block}.forward"
    clone.add_object_patch(block, CaptureBlock(unpatched(clone, block), job))
    install_attention_bias(clone, job)
    for module, deltas in subject_deltas.items():
        role = CHROMA.layer_role(module)
        source = vector_masks(job) if role.stream == "vector" else stream_masks(job, role.stream)
        name = f"diffusion_model.{module}.forward"
        clone.add_object_patch(name, MaskedLinearPatch(unpatched(clone, name), deltas, source, job.layer_failed))


def vector_masks(job: FreeFuseJob) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """x -> masks of a one-vector-per-image layer (job.vector_masks), over every row of x: the modulation MLP's
    input is (B, 344, d), one row per modulation slot of the image, none of them a token."""

    def source(x: torch.Tensor) -> torch.Tensor | None:
        masks = job.vector_masks(x)  # (1, 1, L) or None
        if masks is None or x.ndim == 2:
            return masks
        return masks.expand(1, x.shape[1], masks.shape[-1])

    return source
