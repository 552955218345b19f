"""The seams between FreeFuse and Forge's FLUX: attention capture, LoRA application, step tracking.

Everything is installed on a *clone* of the job's UnetPatcher with `add_object_patch` and the model-function
wrapper, which Forge undoes itself when another patcher loads; the one global swap (the FLUX module's
`attention` function, for the capture block during the capture call only) is undone in a `finally`. Both hosts
share this patcher API and FLUX's module layout; what differs (the LoRA store, the modulation's return value) is
asked of the host adapter (lib_freefuse/hosts).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from ..hosts import Host, SubjectPatches, for_unet
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch, SubjectWeightDelta

# Which tokens a layer sees, by its path under `diffusion_model`.
_STREAMS = (
    (re.compile(r"^(double_blocks\.\d+\.img_(attn\.(qkv|proj)|mlp\.[02])|img_in|final_layer\.linear)$"), "image"),
    (re.compile(r"^(double_blocks\.\d+\.txt_(attn\.(qkv|proj)|mlp\.[02])|txt_in)$"), "text"),
    (re.compile(r"^single_blocks\.\d+\.linear[12]$"), "joint"),
)
_MODULATIONS = (
    (re.compile(r"^(double_blocks\.\d+\.img_mod)\.lin$"), "image"),
    (re.compile(r"^(double_blocks\.\d+\.txt_mod)\.lin$"), "text"),
    (re.compile(r"^(single_blocks\.\d+\.modulation)\.lin$"), "joint"),
)

SubjectDeltas = Mapping[str, Sequence[tuple[int, SubjectWeightDelta]]]  # module path -> (subject, delta)


def flux_model(unet) -> torch.nn.Module | None:
    """The FLUX transformer inside a UnetPatcher, or None when the model is not FLUX-shaped."""
    model = getattr(getattr(unet, "model", None), "diffusion_model", None)
    if model is None or not hasattr(model, "double_blocks") or not hasattr(model, "single_blocks"):
        return None
    return model


def layer_stream(module: str) -> str:
    """ "image", "text", "joint" (single blocks), "modulation:<stream>" or "vector" (one value per image)."""
    for pattern, stream in _STREAMS:
        if pattern.match(module):
            return stream
    for pattern, stream in _MODULATIONS:
        if pattern.match(module):
            return f"modulation:{stream}"
    return "vector"


def patch_unet(
    unet,
    job: FreeFuseJob,
    subject_deltas: SubjectDeltas,
    capture_block: int,
    merged: Sequence[SubjectPatches] = (),
    host: Host | None = None,
):
    """A clone of `unet` that runs FreeFuse for one sampling run.

    subject_deltas: every weight change of the subject LoRAs, by module. merged: the subject LoRAs the host merged
    from the prompt's tags (Host.merged_lora), taken out of the clone's merge. host: the adapter (default: the one
    whose LoRA store `unet` has).
    """
    model = flux_model(unet)
    if model is None:
        raise ValueError("unet: not a FLUX model (no double_blocks/single_blocks)")
    if not 0 <= capture_block < len(model.double_blocks):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(model.double_blocks)} blocks")
    host = host or for_unet(unet)
    clone = unet.clone()
    if merged:
        host.take_out(clone, merged)

    block = f"diffusion_model.double_blocks.{capture_block}.forward"
    clone.add_object_patch(block, CaptureBlock(_unpatched(clone, block), job))
    for module, deltas in subject_deltas.items():
        stream = layer_stream(module)
        if stream.startswith("modulation:"):
            parent = module.rsplit(".", 1)[0]
            lin_forward = _unpatched(clone, f"diffusion_model.{module}.forward")
            modulation = clone.get_model_object(f"diffusion_model.{parent}")
            pack = partial(host.modulation_output, modulation)
            patch = PerTokenModulation(lin_forward, modulation.multiplier, deltas, job, stream.split(":", 1)[1], pack)
            clone.add_object_patch(f"diffusion_model.{parent}.forward", patch)
        else:
            name = f"diffusion_model.{module}.forward"
            source = job.vector_masks if stream == "vector" else _stream_masks(job, stream)
            patch = MaskedLinearPatch(_unpatched(clone, name), deltas, source, on_error=job.layer_failed)
            clone.add_object_patch(name, patch)
    previous = clone.model_options.get("model_function_wrapper")
    clone.set_model_unet_function_wrapper(ModelCallTracker(job, previous, host.reference_tokens))
    return clone


def _unpatched(unet, name: str):
    """The method `name` as this patcher means it: its own object patch (another extension's), else the class's
    method. Never the live attribute, which may still be an earlier job's patch: Forge undoes a loaded
    patcher's object patches only when another patcher of the model loads."""
    if name in unet.object_patches:
        return unet.object_patches[name]
    owner_path, method = name.rsplit(".", 1)
    owner = unet.get_model_object(owner_path)
    return getattr(type(owner), method).__get__(owner)


def _stream_masks(job: FreeFuseJob, stream: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
    return lambda x: job.masks_for(stream, x)


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


class CaptureBlock:
    """Forward of the capture block: during the capture call, hands q and k (after QK-norm and RoPE) to the job.
    Takes whatever the host's block takes (classic: img, txt, vec, pe; Neo adds attn_mask, transformer_options)."""

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
    """Swap backend.nn.flux.attention (looked up at call time, once per block) for one that also stores q, k.
    Both hosts hand it q and k after QK-norm and before RoPE and apply RoPE inside with the module's `apply_rope`.
    A failure to store goes to on_error; the block's attention is computed as usual either way."""
    import backend.nn.flux as flux

    original = flux.attention

    def attention(q, k, v, pe, *args, **kwargs):
        try:
            store(*flux.apply_rope(q, k, pe))  # (B, H, L_txt + N_img, D), as the block's attention sees them
        except Exception as error:  # reported once by the job; this image is made without masks
            on_error(error)
        return original(q, k, v, pe, *args, **kwargs)

    flux.attention = attention
    try:
        yield
    finally:
        flux.attention = original


class PerTokenModulation:
    """Forward of a FLUX Modulation whose `lin` a subject LoRA touches: the base shift/scale/gate chunks plus each
    subject's modulation delta where its mask is, so the chunks become (B, T, D) instead of (B, 1, D) and broadcast
    in the block as before (ALGORITHM.md stage 2, modulation layers)."""

    def __init__(self, lin_forward, multiplier: int, deltas, job: FreeFuseJob, stream: str, pack=tuple):
        """pack(chunks) -> what the host's Modulation.forward returns (Host.modulation_output)."""
        self.lin_forward = lin_forward
        self.multiplier = multiplier
        self.deltas = list(deltas)
        self.job = job
        self.stream = stream
        self.pack = pack
        self._cast: dict = {}

    def __call__(self, vec: torch.Tensor):
        if vec.ndim == 3:  # Neo's blocks may pass (B, 1, D)
            vec = vec[:, 0]
        hidden = F.silu(vec)
        base = self.lin_forward(hidden)  # (B, M*D), with every non-subject LoRA merged as the host does
        try:
            return self.pack(self._with_subjects(hidden, base))
        except Exception as error:  # reported once by the job; the block gets the base modulation
            self.job.layer_failed(error)
            return self.pack(base[:, None, :].chunk(self.multiplier, dim=-1))

    def _with_subjects(self, hidden: torch.Tensor, base: torch.Tensor):
        mode, masks = self.job.modulation_masks(self.stream)
        if mode == "none":
            out = base[:, None, :]
        else:
            per_subject = self.subject_outputs(hidden, base.shape[-1])  # (B, L, M*D)
            if mode == "global":
                out = (base + per_subject.sum(dim=1))[:, None, :]
            else:
                out = _per_token(base, per_subject, masks.to(per_subject))  # (B, T, M*D)
        return out.chunk(self.multiplier, dim=-1)

    def subject_outputs(self, hidden: torch.Tensor, width: int) -> torch.Tensor:
        """Each subject's delta of the lin output: (B, L, M*D)."""
        out = hidden.new_zeros(hidden.shape[0], self.job.plan.n_subjects, width)
        for subject, delta in self.deltas:
            rows = slice(None) if delta.rows is None else slice(delta.rows[0], delta.rows[0] + delta.rows[1])
            out[:, subject, rows] += _delta_output(delta, hidden, self._cast)
        return out


def _per_token(base: torch.Tensor, per_subject: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """base (B, W) + masks (B|1, T, L) @ per_subject (B, L, W) -> (B, T, W).

    Hard masks (0/1, at most one subject per token) give each token one of L + 1 rows, base + subject l's delta or
    base alone, so the rows are computed once and copied per token; soft masks take the weighted sum.
    """
    batch, n_subjects = per_subject.shape[0], per_subject.shape[1]
    owned = masks.sum(dim=-1)  # (B|1, T)
    if not (bool(((masks == 0) | (masks == 1)).all()) and bool((owned <= 1).all())):
        return torch.baddbmm(base[:, None, :], masks, per_subject)
    owner = torch.where(owned > 0, masks.argmax(dim=-1), n_subjects).expand(batch, -1)  # (B, T), L = nobody
    rows = torch.cat([base[:, None, :] + per_subject, base[:, None, :]], dim=1)  # (B, L + 1, W)
    offsets = torch.arange(batch, device=owner.device)[:, None] * (n_subjects + 1)
    return rows.flatten(0, 1).index_select(0, (owner + offsets).flatten()).view(batch, owner.shape[1], -1)


def _delta_output(delta: SubjectWeightDelta, x: torch.Tensor, cache: dict) -> torch.Tensor:
    """x (B, d_in) -> (B, rows): the weight change's contribution, in x's dtype/device."""
    key = (id(delta), x.dtype, x.device)
    if key not in cache:
        cast = lambda t: None if t is None else t.to(device=x.device, dtype=x.dtype)  # noqa: E731
        cache[key] = (cast(delta.down), cast(delta.up), cast(delta.dense), cast(delta.bias))
    down, up, dense, bias = cache[key]
    out = (x @ down.T @ up.T) * delta.scale if dense is None else x @ dense.T
    return out if bias is None else out + bias
