"""Chroma in Forge Neo (backend/nn/chroma.py): FLUX.1's double/single blocks with the modulation given from outside,
so the capture and the block layers are FLUX.1's; the global modulation MLP's layers are one vector per image.
`install` puts the patches on a clone; lib_freefuse/families/chroma.py says which layer sees which tokens."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..families import CHROMA
from ..hosts import Host
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch
from .patching import SubjectDeltas, stream_masks, unpatched


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """The capture block's patch and every masked layer of the subject LoRAs, as object patches on `clone`."""
    if not 0 <= capture_block < len(model.double_blocks):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(model.double_blocks)} blocks")
    block = f"diffusion_model.double_blocks.{capture_block}.forward"
    clone.add_object_patch(block, CaptureBlock(unpatched(clone, block), job))
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


class CaptureBlock:
    """Forward of the capture double block: during the capture call, hands q and k (after QK-norm and RoPE) to the
    job. Neo's Chroma passes img, txt, vec (the block's slices of the global modulation), pe, attn_mask and
    transformer_options by name."""

    def __init__(self, original_forward, job: FreeFuseJob):
        self.original_forward = original_forward
        self.job = job

    def __call__(self, *args, **kwargs):
        if not self.job.capturing:
            return self.original_forward(*args, **kwargs)
        with _capturing_attention(self.job.store_attention, self.job.capture_failed):
            return self.original_forward(*args, **kwargs)


@contextmanager
def _capturing_attention(store: Callable[[torch.Tensor, torch.Tensor], None], on_error: Callable[[Exception], None]):
    """Swap backend.nn.flux.attention (the blocks look it up at call time) for one that also stores q, k with RoPE
    applied, as the attention sees them. An attention mask (Neo's Chroma passes none: its engine gives no mask)
    that hides keys from the softmax, which FreeFuse's maps read in full, makes the capture refused (on_error)
    rather than read wrongly; the block's attention is computed as usual either way."""
    import backend.nn.flux as flux

    original = flux.attention

    def attention(q, k, v, pe, mask=None, *args, **kwargs):
        try:
            if _hides_keys(mask):
                raise ValueError(f"the capture block's attention hides keys (a mask {tuple(mask.shape)})")
            store(*flux.apply_rope(q, k, pe))  # (B, H, L_txt + N_img, D)
        except Exception as error:  # reported once by the job; this image is made without masks
            on_error(error)
        return original(q, k, v, pe, mask, *args, **kwargs)

    flux.attention = attention
    try:
        yield
    finally:
        flux.attention = original


def _hides_keys(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask (boolean: False hides; additive: negative hides) hides any key."""
    if mask is None:
        return False
    return bool((~mask).any()) if mask.dtype == torch.bool else bool((mask < 0).any())
