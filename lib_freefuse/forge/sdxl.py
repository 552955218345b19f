"""SDXL in Forge (both hosts share backend/nn/unet.py): the capture transformer block, masked linear and
convolution layers, and the cross-attentions whose keys and values subject LoRAs change. `install` puts them on a
clone; lib_freefuse/families/sdxl.py says which layer sees which tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core.lora import per_masks
from ..families import SDXL_FAMILY
from ..hosts import Host
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch, SubjectWeightDelta, delta_output
from .patching import SubjectDeltas, stream_masks, unpatched

MAX_ROUTES = 16  # distinct mask rows per image that the cross-attention routes exactly; softer masks are blended


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """The capture block's patch and every masked layer of the subject LoRAs, as object patches on `clone`."""
    sites = SDXL_FAMILY.capture_sites(model)
    if not 0 <= capture_block < len(sites):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(sites)} transformer blocks")
    block = f"diffusion_model.{sites[capture_block]}.forward"
    clone.add_object_patch(block, CaptureTransformerBlock(unpatched(clone, block), job))
    cross: dict[str, dict[str, list]] = {}
    for module, deltas in subject_deltas.items():
        role = SDXL_FAMILY.layer_role(module)
        if role.cross_kv:
            cross.setdefault(role.parent, {})[module.rsplit(".", 1)[1]] = list(deltas)
            continue
        name = f"diffusion_model.{module}.forward"
        layer = clone.get_model_object(f"diffusion_model.{module}")
        if isinstance(layer, torch.nn.Conv2d):
            patch = MaskedConvPatch(unpatched(clone, name), deltas, job.spatial_masks, layer, job.layer_failed)
        else:
            source = job.vector_masks if role.stream == "vector" else stream_masks(job, "image")
            patch = MaskedLinearPatch(unpatched(clone, name), deltas, source, on_error=job.layer_failed)
        clone.add_object_patch(name, patch)
    for parent, kv in cross.items():
        name = f"diffusion_model.{parent}.forward"
        attention = clone.get_model_object(f"diffusion_model.{parent}")
        patch = MaskedCrossAttention(unpatched(clone, name), attention, kv.get("to_k", ()), kv.get("to_v", ()), job)
        clone.add_object_patch(name, patch)


class CaptureTransformerBlock:
    """Forward of the capture transformer block: during the capture call, hands its self-attention's q, k and its
    cross-attention's image queries and text keys (as the attention function sees them) to the job."""

    def __init__(self, original_forward, job: FreeFuseJob):
        self.original_forward = original_forward
        self.job = job

    def __call__(self, *args, **kwargs):
        if not self.job.capturing:
            return self.original_forward(*args, **kwargs)
        calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        with _recording_attention(calls):
            out = self.original_forward(*args, **kwargs)
        try:
            if len(calls) < 2:
                raise RuntimeError(f"the block computed {len(calls)} attention(s), expected attn1 then attn2")
            (self_q, self_k, self_heads), (cross_q, cross_k, cross_heads) = calls[:2]
            cross = (_heads(cross_q, cross_heads), _heads(cross_k, cross_heads))
            self.job.store_cross_attention(*cross, _heads(self_q, self_heads), _heads(self_k, self_heads))
        except Exception as error:  # reported once by the job; this image is made without masks
            self.job.capture_failed(error)
        return out


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) as the attention function takes it -> (B, H, N, D)."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


@contextmanager
def _recording_attention(calls: list):
    """Swap backend.nn.unet.attention_function (looked up at call time by CrossAttention.forward in both hosts) for
    one that also records (q, k, heads) of each call; undone in `finally`."""
    import backend.nn.unet as unet_module

    original = unet_module.attention_function

    def attention_function(q, k, v, heads, *args, **kwargs):
        calls.append((q.detach(), k.detach(), int(heads)))
        return original(q, k, v, heads, *args, **kwargs)

    unet_module.attention_function = attention_function
    try:
        yield
    finally:
        unet_module.attention_function = original


class MaskedConvPatch:
    """Forward of a Conv2d: y = conv(x) + sum_l m_l * conv_l(x), each subject's change under its mask at y's
    resolution. Low-rank (LoCon) changes in rank space: (conv(x, A_all) * per-rank mask and scale) then 1x1 B_all;
    dense changes (other kinds) as conv(x, dW_l) * m_l; bias changes as m_l * b_l."""

    def __init__(
        self,
        original_forward,
        deltas: Sequence[tuple[int, SubjectWeightDelta]],
        mask_source: Callable[[torch.Tensor], torch.Tensor | None],
        conv: torch.nn.Conv2d,
        on_error: Callable[[Exception], None],
    ):
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("conv: only zero-padded convolutions without groups take masked deltas")
        self.original_forward = original_forward
        self.mask_source = mask_source
        self.on_error = on_error
        self.geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        low = [(s, d) for s, d in deltas if d.low_rank and d.down.ndim == 4 and d.down.shape[0] > 0]
        self.down = torch.cat([d.down for _, d in low]) if low else None  # (R, C_in, kh, kw)
        self.up = torch.cat([d.up for _, d in low], dim=1) if low else None  # (C_out, R)
        ranks = [d.down.shape[0] for _, d in low]
        self.rank_subject = torch.repeat_interleave(torch.tensor([s for s, _ in low]), torch.tensor(ranks))
        self.rank_scale = torch.repeat_interleave(torch.tensor([float(d.scale) for _, d in low]), torch.tensor(ranks))
        self._weights_key = ("conv rank weights", tuple(self.rank_subject.tolist()), tuple(self.rank_scale.tolist()))
        self.dense = [(s, d.dense) for s, d in deltas if d.dense is not None]
        self.bias = [(s, d.bias) for s, d in deltas if d.bias is not None]
        self._cast: dict = {}

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.original_forward(x, *args, **kwargs)
        try:
            masks = self.mask_source(y)  # (B|1, L, h, w) or None
            return y if masks is None else self._add_deltas(x, y, masks.to(y))
        except Exception as error:  # reported once by the job; this layer answers as if unpatched
            self.on_error(error)
            return self.original_forward(x, *args, **kwargs)  # y may hold part of the deltas: recompute

    def _add_deltas(self, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """y + the masked deltas; the low-rank part added into y in place when y allows it (x's dtype, contiguous)."""
        down, up, rank_subject, rank_scale, dense, bias = self._factors(x.dtype, x.device)
        out = 0
        if down is not None:
            hidden = F.conv2d(x, down, None, **self.geometry)  # (B, R, h, w)
            key = (self._weights_key, x.dtype, x.device)
            weight = per_masks(masks, key, lambda: masks.to(x.dtype).index_select(1, rank_subject) * rank_scale)
            hidden.mul_(weight)  # (B|1, R, h|1, w|1): each rank's subject mask times its scale
            batch, rank = hidden.shape[:2]
            if y.dtype == x.dtype and y.is_contiguous() and y.shape[0] == batch:
                y.view(batch, y.shape[1], -1).baddbmm_(up.expand(batch, -1, -1), hidden.view(batch, rank, -1))
            else:
                out = F.conv2d(hidden, up[:, :, None, None])  # (B, C_out, h, w)
        for subject, kernel in dense:
            out = out + F.conv2d(x, kernel, None, **self.geometry) * masks[:, subject : subject + 1]
        for subject, vector in bias:
            out = out + vector[None, :, None, None] * masks[:, subject : subject + 1]
        return y if isinstance(out, int) else y + out.to(y.dtype)

    def _factors(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, device)
        if key not in self._cast:
            cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            self._cast[key] = (
                cast(self.down),
                cast(self.up),
                self.rank_subject.to(device),
                cast(self.rank_scale)[None, :, None, None],
                [(s, cast(t)) for s, t in self.dense],
                [(s, cast(t)) for s, t in self.bias],
            )
        return self._cast[key]


class MaskedCrossAttention:
    """Forward of a cross-attention (attn2) whose keys or values subject LoRAs change. The keys and values are
    shared by every image token, so a per-token mask cannot act on them: each image token n instead reads
    k_n = k + sum_l m[n, l] * dk_l and v_n likewise (dk_l: subject l's change of the keys, times its text-token
    mask), the attention computed once per distinct mask row. All-ones masks are the merged LoRAs; zero masks no
    subject LoRA; a partition gives each region its own subject's keys and values."""

    def __init__(self, original_forward, attention, k_deltas, v_deltas, job: FreeFuseJob):
        self.original_forward = original_forward
        self.attention = attention  # the host's CrossAttention module (to_q, to_k, to_v, to_out, heads)
        self.k_deltas = list(k_deltas)
        self.v_deltas = list(v_deltas)
        self.job = job
        self._cast: dict = {}

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 - the host's
        if context is None or mask is not None:  # not a cross-attention call as SDXL's blocks make it
            options = transformer_options
            return self.original_forward(x, context=context, value=value, mask=mask, transformer_options=options)
        import backend.nn.unet as unet_module

        module = self.attention
        q = module.to_q(x)
        k = module.to_k(context)
        v = module.to_v(context if value is None else value)
        try:
            image = self.job.masks_for("image", x)  # (B|1, N, L) or None
            if image is None:
                out = unet_module.attention_function(q, k, v, module.heads, None)
            else:
                text = self.job.masks_for("text", context)  # (B, T, L)
                dk = self._subject_changes(self.k_deltas, context, text, k)  # L x (B, T, C) or None
                dv = self._subject_changes(self.v_deltas, context if value is None else value, text, v)
                out = self._routed(unet_module.attention_function, q, k, v, dk, dv, image.to(q))
        except Exception as error:  # reported once by the job; this layer answers without the subject deltas
            self.job.layer_failed(error)
            out = unet_module.attention_function(q, k, v, module.heads, None)
        return module.to_out(out)

    def _subject_changes(self, deltas, source: torch.Tensor, text: torch.Tensor, like: torch.Tensor) -> list:
        """Each subject's change of the projection of `source` times its text-token mask: L x (B, T, C), None for a
        subject without a delta here."""
        n_subjects = self.job.plan.n_subjects
        columns = self.job.call_cached(  # the text masks' columns (B, T, 1), once per call, size and dtype
            ("text columns", tuple(text.shape), like.dtype), lambda: [c[..., None] for c in text.to(like).unbind(-1)]
        )
        out: list[torch.Tensor | None] = [None] * n_subjects
        for subject, delta in deltas:
            change = delta_output(delta, source.to(like.dtype), self._cast)
            out[subject] = change if out[subject] is None else out[subject] + change
        return [None if change is None else change.mul_(columns[s]) for s, change in enumerate(out)]

    def _routed(self, attend, q, k, v, dk: list, dv: list, image: torch.Tensor) -> torch.Tensor:
        """Each image token's attention over the keys and values of its mask row: (B, N, C). The rows and the
        tokens of each are found once per call and token count (cached by the job), not once per layer."""
        heads = self.attention.heads
        batch = q.shape[0]
        shared = self.job.call_cached(  # the job gives every layer of one call and token count the same masks
            ("shared routes", image.shape[1]),
            lambda: image.shape[0] == 1 or all(torch.equal(image[0], image[b]) for b in range(1, image.shape[0])),
        )
        if shared:  # every image of the batch has the same mask rows (cond and uncond of one image): batched
            rows, groups, weights = self.job.call_cached(("routes", image.shape[1]), lambda: _routes(image[0]))
            if rows.shape[0] > MAX_ROUTES:
                return torch.cat(
                    [
                        self._blended(attend, q[b : b + 1], k[b], v[b], _of(dk, b), _of(dv, b), image[0])
                        for b in range(batch)
                    ]
                )
            if rows.shape[0] == 1:  # one row for every token (unmasked, or masks not split)
                return attend(q, _shifted(k, dk, weights[0]), _shifted(v, dv, weights[0]), heads, None)
            out = torch.empty(batch, q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
            for row, tokens in zip(weights, groups, strict=True):
                out[:, tokens] = attend(q[:, tokens], _shifted(k, dk, row), _shifted(v, dv, row), heads, None)
            return out
        out = torch.empty(batch, q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
        for b in range(batch):
            rows, groups, weights = _routes(image[b])
            dk_b, dv_b = _of(dk, b), _of(dv, b)
            if rows.shape[0] > MAX_ROUTES:  # soft masks: blend the outputs of no subject and of each one alone
                out[b] = self._blended(attend, q[b : b + 1], k[b], v[b], dk_b, dv_b, image[b])
                continue
            for row, tokens in zip(weights, groups, strict=True):
                k_r, v_r = _shifted(k[b], dk_b, row), _shifted(v[b], dv_b, row)
                out[b, tokens] = attend(q[b : b + 1, tokens], k_r[None], v_r[None], heads, None)[0]
        return out

    def _blended(self, attend, q, k, v, dk: list, dv: list, image: torch.Tensor) -> torch.Tensor:
        """(1 - sum_l m_l) * attention without subjects + sum_l m_l * attention with subject l alone: (N, C)."""
        heads = self.attention.heads
        out = attend(q, k[None], v[None], heads, None)[0] * (1 - image.sum(-1, keepdim=True)).clamp_min(0)
        for subject in range(image.shape[-1]):
            alone_k, alone_v = _shifted(k, dk, _one_hot(subject, len(dk))), _shifted(v, dv, _one_hot(subject, len(dv)))
            alone = attend(q, alone_k[None], alone_v[None], heads, None)[0]
            out = out + alone * image[:, subject : subject + 1]
        return out


def _shifted(base: torch.Tensor, changes: list, weights: list[float]) -> torch.Tensor:
    """base + sum_l weights[l] * changes[l] (keys or values of one mask row), zero weights and absent changes
    skipped."""
    out = base
    for weight, change in zip(weights, changes, strict=False):
        if weight != 0 and change is not None:
            out = out + (change if weight == 1 else weight * change)
    return out


def _of(changes: list, b: int) -> list:
    """The changes of batch row b: L x (T, C) or None."""
    return [None if change is None else change[b] for change in changes]


def _one_hot(index: int, length: int) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(length)]


def _routes(rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[list[float]]]:
    """The distinct rows of (N, L) masks, for each the indices of the tokens that have it, and the rows as lists."""
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    groups = [(inverse == r).nonzero().squeeze(1) for r in range(distinct.shape[0])]
    return distinct, groups, distinct.tolist()
