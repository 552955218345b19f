"""Chroma in Forge Neo (backend/nn/chroma.py): FLUX.1's double/single blocks with the modulation given from outside,
so the capture and the block layers are FLUX.1's; the global modulation MLP is run per subject-mask row and its
slots handed out per token (chroma_modulation.py).
`install` puts the patches on a clone; lib_freefuse/families/chroma.py says which layer sees which tokens."""

from __future__ import annotations

from ..families import CHROMA
from ..hosts import Host
from .chroma_modulation import MaskRows, PerTokenApproximator, PerTokenFinalLayer, PerTokenSlices
from .flux1 import install_attention_bias, install_capture  # Chroma's double blocks are FLUX.1's: the same capture
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch
from .patching import SubjectDeltas, stream_masks, unpatched


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """The capture block's patch and every masked layer of the subject LoRAs, as object patches on `clone`; the
    modulation MLP's layers are run per mask row (chroma_modulation.py)."""
    if not 0 <= capture_block < len(model.double_blocks):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(model.double_blocks)} blocks")
    install_capture(clone, job, capture_block)
    install_attention_bias(clone, job)
    rows = MaskRows()
    for module, deltas in subject_deltas.items():
        role = CHROMA.layer_role(module)
        source = rows if role.stream == "vector" else stream_masks(job, role.stream)
        name = f"diffusion_model.{module}.forward"
        clone.add_object_patch(name, MaskedLinearPatch(unpatched(clone, name), deltas, source, job.layer_failed))
    if any(CHROMA.layer_role(module).stream == "vector" for module in subject_deltas):
        _install_per_token_modulation(clone, job, rows)


def _install_per_token_modulation(clone, job: FreeFuseJob, rows: MaskRows) -> None:
    """The MLP's forward (runs per mask row), get_modulations (slots per token) and the final layer (takes them)."""
    mlp, slices, final = (
        f"diffusion_model.{name}"
        for name in ("distilled_guidance_layer.forward", "get_modulations", "final_layer.forward")
    )
    clone.add_object_patch(mlp, PerTokenApproximator(unpatched(clone, mlp), rows, job))
    clone.add_object_patch(slices, PerTokenSlices(unpatched(clone, slices), job))
    layer = clone.get_model_object("diffusion_model.final_layer")
    clone.add_object_patch(final, PerTokenFinalLayer(unpatched(clone, final), layer))
