"""The seams between FreeFuse and Forge's diffusion model: the model-call tracker, and one clone patched per run.

Everything is installed on a *clone* of the job's UnetPatcher with `add_object_patch` and the model-function
wrapper, which Forge undoes itself when another patcher loads; a family's one global swap (an attention function,
in the capture block during the capture call only) is undone in a `finally`. Both hosts share this patcher API and
the models' module layouts; what differs between hosts (the LoRA store, FLUX's modulation return value) is asked
of the host adapter (lib_freefuse/hosts), what differs between model families (capture, which layer sees which
tokens) of the family (lib_freefuse/families) and its patches here (flux1.py, sdxl.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from ..families import FLUX1, Family, detect
from ..hosts import Host, SubjectPatches, for_unet
from . import chroma, flux1, flux2, qwen_image, sdxl, zimage
from .flux1 import CaptureBlock, PerTokenModulation
from .job import FreeFuseJob
from .patching import SubjectDeltas

__all__ = ["CaptureBlock", "ModelCallTracker", "PerTokenModulation", "flux_model", "layer_stream", "patch_unet"]

_INSTALL = {
    "FLUX.1": flux1.install,
    "SDXL": sdxl.install,
    "Chroma": chroma.install,
    "FLUX.2 Klein": flux2.install,
    "Qwen-Image": qwen_image.install,
    "Z-Image": zimage.install,
}


def diffusion_model(unet) -> torch.nn.Module | None:
    """The diffusion model inside a UnetPatcher, or None."""
    return getattr(getattr(unet, "model", None), "diffusion_model", None)


def flux_model(unet) -> torch.nn.Module | None:
    """The FLUX transformer inside a UnetPatcher, or None when the model is not FLUX-shaped."""
    model = diffusion_model(unet)
    return model if FLUX1.matches(model) else None


def layer_stream(module: str) -> str:
    """FLUX.1: "image", "text", "joint" (single blocks), "modulation:<stream>" or "vector" (one value per image)."""
    role = FLUX1.layer_role(module)
    return f"modulation:{role.stream}" if role.modulation else role.stream


def patch_unet(
    unet,
    job: FreeFuseJob,
    subject_deltas: SubjectDeltas,
    capture_block: int,
    merged: Sequence[SubjectPatches] = (),
    host: Host | None = None,
    family: Family | None = None,
):
    """A clone of `unet` that runs FreeFuse for one sampling run.

    subject_deltas: every weight change of the subject LoRAs, by module. capture_block: index into the family's
    capture sites. merged: the subject LoRAs the host merged from the prompt's tags (Host.merged_lora), taken out
    of the clone's merge. host: the adapter (default: the one whose LoRA store `unet` has). family: the model's
    (default: detected; FLUX.1 and SDXL).
    """
    model = diffusion_model(unet)
    family = family or detect(model)
    if family is None:
        raise ValueError("unet: not a FLUX model (no double_blocks/single_blocks) nor an SDXL UNet")
    host = host or for_unet(unet)
    clone = unet.clone()
    if merged:
        host.take_out(clone, merged)
    _INSTALL[family.name](clone, model, job, subject_deltas, capture_block, host)
    previous = clone.model_options.get("model_function_wrapper")
    patch_size = getattr(model, "patch_size", 2)  # FLUX.1: 2x2 patches; FLUX.2 Klein: 1x1
    references = partial(host.reference_tokens, patch_size=patch_size)
    clone.set_model_unet_function_wrapper(ModelCallTracker(job, previous, references))
    return clone


class ModelCallTracker:
    """The model-function wrapper: tells the job about each call (step, batch layout) and its denoised x0."""

    def __init__(self, job: FreeFuseJob, previous=None, reference_tokens=None):
        """reference_tokens(c) -> reference-image tokens in this call (Host.reference_tokens); default none."""
        self.job = job
        self.previous = previous  # another extension's wrapper, kept in the chain
        self.reference_tokens = reference_tokens or (lambda c: 0)

    def __deepcopy__(self, memo):
        return self  # UnetPatcher.clone() deep-copies model_options: the job must stay the one the patches use

    def __call__(self, apply_model, args: dict):
        def tracked(x, t, **c):
            context = c.get("c_crossattn")
            references = self.reference_tokens(c)
            self.job.begin_call(x, t, args.get("cond_or_uncond") or [], context.shape[1], references)
            try:
                denoised = apply_model(x, t, **c)
            except BaseException:
                self.job.abort_call()
                raise
            self.job.end_call(denoised)
            return denoised

        if self.previous is not None:
            return self.previous(tracked, args)
        return tracked(args["input"], args["timestep"], **args["c"])
