"""What every family's patches share: the unpatched method of a clone, a job's masks as a layer's mask source."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .job import FreeFuseJob
from .lora_layers import SubjectWeightDelta

SubjectDeltas = Mapping[str, Sequence[tuple[int, SubjectWeightDelta]]]  # module path -> (subject, delta)


def unpatched(unet, name: str):
    """The method `name` as this patcher means it: its own object patch (another extension's), else the class's
    method. Never the live attribute, which may still be an earlier job's patch: Forge undoes a loaded
    patcher's object patches only when another patcher of the model loads."""
    if name in unet.object_patches:
        return unet.object_patches[name]
    owner_path, method = name.rsplit(".", 1)
    owner = unet.get_model_object(owner_path)
    return getattr(type(owner), method).__get__(owner)


def stream_masks(job: FreeFuseJob, stream: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """x -> the job's (B|1, T, L) masks for a layer of `stream` whose input is x, or None."""
    return lambda x: job.masks_for(stream, x)
