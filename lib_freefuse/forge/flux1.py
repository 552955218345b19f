"""FLUX.1 in Forge (both hosts share backend/nn/flux.py's layout): the capture block, masked layers, per-token
modulation. `install` puts them on a clone; lib_freefuse/families/flux1.py says which layer sees which tokens."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from ..families import FLUX1, Family
from ..hosts import Host
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch, delta_output
from .patching import SubjectDeltas, stream_masks, unpatched


def install(
    clone,
    model,
    job: FreeFuseJob,
    subject_deltas: SubjectDeltas,
    capture_block: int,
    host: Host,
    family: Family = FLUX1,
) -> None:
    """The capture block's patch and every masked layer of the subject LoRAs, as object patches on `clone`.
    family: whose layer roles (FLUX.1's, or FLUX.2 Klein's: the same blocks, modulation at the model's level)."""
    if not 0 <= capture_block < len(model.double_blocks):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(model.double_blocks)} blocks")
    install_capture(clone, job, capture_block)
    install_attention_bias(clone, job)
    for module, deltas in subject_deltas.items():
        role = family.layer_role(module)
        if role.modulation:
            lin_forward = unpatched(clone, f"diffusion_model.{module}.forward")
            modulation = clone.get_model_object(f"diffusion_model.{role.parent}")
            pack = partial(host.modulation_output, modulation)
            patch = PerTokenModulation(lin_forward, modulation.multiplier, deltas, job, role.stream, pack)
            clone.add_object_patch(f"diffusion_model.{role.parent}.forward", patch)
        else:
            name = f"diffusion_model.{module}.forward"
            source = job.vector_masks if role.stream == "vector" else stream_masks(job, role.stream)
            patch = MaskedLinearPatch(unpatched(clone, name), deltas, source, on_error=job.layer_failed)
            clone.add_object_patch(name, patch)


def install_capture(clone, job: FreeFuseJob, capture_block: int) -> None:
    """The capture block's patch; with average_blocks, every double block before it hands its maps over too."""
    for index, store in job.capture_stores(capture_block):
        block = f"diffusion_model.double_blocks.{index}.forward"
        clone.add_object_patch(block, CaptureBlock(unpatched(clone, block), job, store=store))


class CaptureBlock:
    """Forward of the capture block: during the capture call, hands q and k (after QK-norm and RoPE) to the job.
    Takes whatever the host's block takes (classic: img, txt, vec, pe; Neo adds attn_mask, transformer_options).
    capturing(store, on_error): the context in which the block's attention also stores q and k (default FLUX.1's
    swap of backend.nn.flux.attention; another family passes its own)."""

    def __init__(self, original_forward, job: FreeFuseJob, capturing=None, store=None):
        self.original_forward = original_forward
        self.job = job
        self.capturing = capturing or _capturing_attention
        self.store = store or job.store_attention

    def __call__(self, *args, **kwargs):
        if not self.job.capturing:
            return self.original_forward(*args, **kwargs)
        with self.capturing(self.store, self.job.capture_failed):
            return self.original_forward(*args, **kwargs)


@contextmanager
def _capturing_attention(store: Callable[[torch.Tensor, torch.Tensor], None], on_error: Callable[[Exception], None]):
    """Swap backend.nn.flux.attention (looked up at call time, once per block) for one that also stores q, k.
    Both hosts hand it q and k after QK-norm and before RoPE and apply RoPE inside with the module's `apply_rope`.
    A failure to store goes to on_error; the block's attention is computed as usual either way. An attention mask
    (Neo's 5th argument, `mask`; Neo's FLUX.1 and Chroma pass none today) that hides keys from the softmax, which
    FreeFuse's maps read in full, makes the capture refused (on_error) rather than read wrongly."""
    import backend.nn.flux as flux

    original = flux.attention

    def attention(q, k, v, pe, *args, **kwargs):
        mask = args[0] if args else kwargs.get("mask")
        try:
            if _hides_keys(mask):
                raise ValueError(f"the capture block's attention hides keys (a mask {tuple(mask.shape)})")
            store(*flux.apply_rope(q, k, pe))  # (B, H, L_txt + N_img, D), as the block's attention sees them
        except Exception as error:  # reported once by the job; this image is made without masks
            on_error(error)
        return original(q, k, v, pe, *args, **kwargs)

    flux.attention = attention
    try:
        yield
    finally:
        flux.attention = original


def install_attention_bias(clone, job: FreeFuseJob) -> None:
    """When the plan asks for it, the phase-2 attention bias on every joint attention of the model (FLUX.1's, FLUX.2
    Klein's and Chroma's blocks all call backend.nn.flux.attention)."""
    if job.plan.attention_bias > 0:
        name = "diffusion_model.forward"
        clone.add_object_patch(name, BiasedAttention(unpatched(clone, name), job))


class BiasedAttention:
    """Forward of the diffusion model: in the calls after the masks exist, every block's joint attention adds the
    job's bias to its logits (softmax(q k^T / sqrt(d) + bias) v, core.attention_bias); before them, as it was."""

    def __init__(self, original_forward, job: FreeFuseJob):
        self.original_forward = original_forward
        self.job = job

    def __call__(self, *args, **kwargs):
        if self.job.masks is None or self.job.failure:
            return self.original_forward(*args, **kwargs)
        with _biased_attention(self.job.attention_bias, self.job.layer_failed):
            return self.original_forward(*args, **kwargs)


@contextmanager
def _biased_attention(bias_for: Callable, on_error: Callable[[Exception], None]):
    """Swap backend.nn.flux.attention for one that adds bias_for(length, dtype, device) (B, 1, L, L) to the logits,
    through PyTorch's scaled_dot_product_attention (the host's attention kernel otherwise); undone in a finally.
    A host's own attention mask (Neo's `mask`, boolean or additive) is added to the bias. A failure to make the bias
    goes to on_error, and that attention is computed without it."""
    import backend.nn.flux as flux

    original = flux.attention

    def attention(q, k, v, pe, *args, **kwargs):
        try:
            bias = bias_for(q.shape[2], q.dtype, q.device)
        except Exception as error:  # reported once by the job; the rest of the image is made without masks
            on_error(error)
            bias = None
        if bias is None:
            return original(q, k, v, pe, *args, **kwargs)
        mask = args[0] if args else kwargs.get("mask")
        if mask is not None:
            bias = bias + _additive(mask, q.dtype)
        if pe is not None:
            q, k = flux.apply_rope(q, k, pe)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, L, D)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # (B, L, H * D), as the host's attention

    flux.attention = attention
    try:
        yield
    finally:
        flux.attention = original


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A host attention mask as additive logits broadcastable to (B, H, L, L): boolean False -> -inf."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(-3)
    return mask.to(dtype)


def _hides_keys(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask (boolean: False hides; additive: negative hides) hides any key."""
    if mask is None:
        return False
    return bool((~mask).any()) if mask.dtype == torch.bool else bool((mask < 0).any())


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
                # Whether the masks are hard is checked once per model call and stream, not in every layer.
                owner = self.job.call_cached(("token owner", self.stream), lambda: token_owner(masks))
                out = _per_token(base, per_subject, masks.to(per_subject), owner)  # (B, T, M*D)
        return out.chunk(self.multiplier, dim=-1)

    def subject_outputs(self, hidden: torch.Tensor, width: int) -> torch.Tensor:
        """Each subject's delta of the lin output: (B, L, M*D)."""
        return subject_outputs(self.deltas, hidden, self.job.plan.n_subjects, width, self._cast)


def subject_outputs(deltas, hidden: torch.Tensor, n_subjects: int, width: int, cast: dict) -> torch.Tensor:
    """Each subject's delta dW_l h of a modulation Linear's output for its input h (B, d): (B, L, width); deltas:
    (subject, SubjectWeightDelta) pairs, a delta of some rows only (a fused layer's slice) filling those rows."""
    out = hidden.new_zeros(hidden.shape[0], n_subjects, width)
    for subject, delta in deltas:
        rows = slice(None) if delta.rows is None else slice(delta.rows[0], delta.rows[0] + delta.rows[1])
        out[:, subject, rows] += delta_output(delta, hidden, cast)
    return out


def token_owner(masks: torch.Tensor) -> torch.Tensor | None:
    """(B|1, T, L) masks -> (B|1, T) the subject owning each token (L = nobody) when the masks are hard (0/1, at most
    one subject per token); None for soft or overlapping masks."""
    owned = masks.sum(dim=-1)  # (B|1, T)
    if not (bool(((masks == 0) | (masks == 1)).all()) and bool((owned <= 1).all())):
        return None
    return torch.where(owned > 0, masks.argmax(dim=-1), masks.shape[-1])


def _per_token(
    base: torch.Tensor, per_subject: torch.Tensor, masks: torch.Tensor, owner: torch.Tensor | None = None
) -> torch.Tensor:
    """base (B, W) + masks (B|1, T, L) @ per_subject (B, L, W) -> (B, T, W).

    Hard masks (0/1, at most one subject per token) give each token one of L + 1 rows, base + subject l's delta or
    base alone, so the rows are computed once and copied per token; soft masks take the weighted sum. owner:
    token_owner(masks) when the caller has it already.
    """
    owner = token_owner(masks) if owner is None else owner
    if owner is None:
        return torch.baddbmm(base[:, None, :], masks, per_subject)
    batch, n_subjects = per_subject.shape[0], per_subject.shape[1]
    owner = owner.to(base.device).expand(batch, -1)  # (B, T), L = nobody
    rows = torch.cat([base[:, None, :] + per_subject, base[:, None, :]], dim=1)  # (B, L + 1, W)
    offsets = torch.arange(batch, device=owner.device)[:, None] * (n_subjects + 1)
    return rows.flatten(0, 1).index_select(0, (owner + offsets).flatten()).view(batch, owner.shape[1], -1)
