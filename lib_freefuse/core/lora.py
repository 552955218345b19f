"""Stage 2 of FreeFuse: subject LoRA outputs masked per token, in rank space (ALGORITHM.md stage 2)."""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from numbers import Real

import torch

__all__ = ["StackedLoRA", "masked_lora_delta", "per_masks"]


class StackedLoRA:
    """The subject LoRAs of one linear layer, stacked along the rank axis.

    downs[i]: (r_i, d_in), ups[i]: (d_out, r_i), scales[i] = strength * alpha / rank. Stacked once into
    A_all (R, d_in) and B_all (d_out, R), R = sum of r_i, so that every call is one low-rank product.
    subjects[i]: the mask column (subject) of LoRA i; by default LoRA i is subject i. Several LoRAs may share a
    subject, and a subject may have none here (a layer that only some subject LoRAs touch).
    """

    def __init__(
        self,
        downs: Sequence[torch.Tensor],
        ups: Sequence[torch.Tensor],
        scales: Sequence[float],
        subjects: Sequence[int] | None = None,
    ):
        _check_factors(downs, ups, scales)
        ranks = [d.shape[0] for d in downs]
        device = downs[0].device
        subjects = list(range(len(downs))) if subjects is None else list(subjects)
        if len(subjects) != len(downs) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in subjects):
            raise ValueError(f"subjects: expected {len(downs)} non-negative mask columns, got {subjects!r}")
        self.n_subjects = max(subjects) + 1  # masks need at least this many columns
        self.d_in = downs[0].shape[1]
        self.d_out = ups[0].shape[0]
        self.down = torch.cat([d.to(device) for d in downs])  # (R, d_in)
        self.up = torch.cat([u.to(device) for u in ups], dim=1)  # (d_out, R)
        self.rank_subject = torch.repeat_interleave(torch.tensor(subjects), torch.tensor(ranks))  # (R,)
        self.rank_scale = torch.repeat_interleave(torch.tensor([float(s) for s in scales]), torch.tensor(ranks))
        # Equal ranks (the usual case): the (B, T, R) activations scale as (B, T, n_loras, r) by one weight per LoRA,
        # computed from n_loras mask values per token instead of R.
        self.rank = ranks[0] if len(set(ranks)) == 1 else None
        self.lora_subject = torch.tensor(subjects)  # (n_loras,)
        self.lora_scale = torch.tensor([float(s) for s in scales])  # (n_loras,)
        # What the per-token weights depend on besides the masks: layers with the same LoRAs share them.
        self._weights_key = (tuple(subjects), tuple(float(s) for s in scales), tuple(ranks))
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def factors(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A_all, B_all, rank->subject index and rank scales in the given dtype/device (cached)."""
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = (
                self.down.to(device=device, dtype=dtype),
                self.up.to(device=device, dtype=dtype),
                self.rank_subject.to(device),
                self.rank_scale.to(device=device, dtype=dtype),
            )
        return self._cast[key]

    def _lora_weights(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA -> subject index (n_loras,) and scales (n_loras,) in the given dtype/device (cached)."""
        key = ("lora", dtype, device)
        if key not in self._cast:
            self._cast[key] = (self.lora_subject.to(device), self.lora_scale.to(device=device, dtype=dtype))
        return self._cast[key]

    def __call__(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """sum_l masks[..., l] * s_l * B_l A_l x as ((x A^T) * m_rank) B^T. x: (B, T, d_in), masks: (B|1, T, L)."""
        return self._masked_hidden(x, masks) @ self.factors(x.dtype, x.device)[1].T  # (B, T, d_out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """out += the masked delta, written in place (no d_out-wide temporary); returns out.

        out: (B, T, d_out) in x's dtype, e.g. the base layer's output or a column slice of it.
        """
        shape = (*x.shape[:2], self.d_out)
        if out.shape != shape or out.dtype != x.dtype:
            raise ValueError(f"out: expected a {x.dtype} tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        hidden = self._masked_hidden(x, masks)
        up = self.factors(x.dtype, x.device)[1]
        # (B, T, d_out) folds into (B*T, d_out) rows when rows are evenly spaced: contiguous, or a column slice.
        if out.stride(2) == 1 and out.stride(0) == out.shape[1] * out.stride(1):
            out.view(-1, self.d_out).addmm_(hidden.view(-1, hidden.shape[-1]), up.T)
        else:
            out.add_(hidden @ up.T)
        return out

    def _masked_hidden(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(x A^T) scaled per rank by its subject's mask and scale: (B, T, R)."""
        _check_call(x, masks, self.d_in, self.n_subjects)
        down = self.factors(x.dtype, x.device)[0]
        weight = per_masks(masks, (self._weights_key, x.dtype, x.device), lambda: self._token_weights(x, masks))
        hidden = torch.nn.functional.linear(x, down)  # (B, T, R)
        # equal ranks: (B, T, n_loras, r) scaled by one weight per LoRA (B|1, T, n_loras, 1); else (B, T, R)
        scaled = hidden if self.rank is None else hidden.view(*hidden.shape[:2], -1, self.rank)
        chunks = _serial_chunks(x.device, hidden.shape[1], hidden.shape[0] * hidden.shape[2])
        if len(chunks) == 1:
            scaled.mul_(weight)
        else:
            for rows in chunks:
                scaled[:, rows].mul_(weight[:, rows])
        return hidden

    def _token_weights(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Each token's weight per LoRA (B|1, T, n_loras, 1) for equal ranks, else per rank (B|1, T, R)."""
        masks = masks.to(device=x.device, dtype=x.dtype)
        if self.rank is None:
            _, _, rank_subject, rank_scale = self.factors(x.dtype, x.device)
            return masks.index_select(-1, rank_subject) * rank_scale
        lora_subject, lora_scale = self._lora_weights(x.dtype, x.device)
        return (masks.index_select(-1, lora_subject) * lora_scale).unsqueeze(-1)


class _PerMasks:
    """Values computed from one masks tensor, shared by every layer given that same tensor (a model call hands one
    masks tensor to all the layers of a stream), held while the tensor lives and for at most KEEP keys."""

    KEEP = 64

    def __init__(self):
        self._values: OrderedDict[tuple, tuple[weakref.ref, object, int | None]] = OrderedDict()

    def get(self, masks: torch.Tensor, key: tuple, make: Callable[[], object]):
        slot = (id(masks), key)
        held = self._values.get(slot)
        if held is not None and held[0]() is masks and _version(masks) == held[2]:
            return held[1]
        value = make()
        self._values[slot] = (weakref.ref(masks), value, _version(masks))
        while len(self._values) > self.KEEP:
            self._values.popitem(last=False)
        return value


_PER_MASKS = _PerMasks()


def _version(t: torch.Tensor) -> int | None:
    """t's in-place change counter; None for an inference tensor (made under torch.inference_mode, as Forge samples),
    which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


def per_masks(masks: torch.Tensor, key: tuple, make: Callable[[], object]):
    """make(), computed once per masks tensor (while it lives and is not changed in place) and key: what every layer
    of a model call would otherwise derive again from the same masks."""
    return _PER_MASKS.get(masks, key, make)


def masked_lora_delta(
    x: torch.Tensor,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    scales: Sequence[float],
    masks: torch.Tensor,
) -> torch.Tensor:
    """(B, T, d_out) = sum_l masks[..., l, None] * scales[l] * (x @ downs[l].T @ ups[l].T), one stacked product.

    x: (B, T, d_in); downs[l]: (r_l, d_in); ups[l]: (d_out, r_l); masks: (B, T, L) (or (1, T, L), shared by the
    batch). The mask is applied to the rank-r activations, never to the d_out-wide output; x's dtype/device.

    One call, nothing kept: beyond the two products of the unmasked stacked LoRA it copies the factors into one
    stack (R * (d_in + d_out) values) and scales the (B, T, R) activations once, in place. StackedLoRA is for
    factors used again and again.
    """
    _check_factors(downs, ups, scales)
    _check_call(x, masks, downs[0].shape[1], len(downs))
    ranks = [d.shape[0] for d in downs]
    down = _stacked([d.to(device=x.device) for d in downs], ranks, x.dtype, along_rows=True)  # (R, d_in)
    up = _stacked([u.to(device=x.device) for u in ups], ranks, x.dtype, along_rows=False)  # (d_out, R)
    # Per-token weights of L values, not R, computed before the products so that only the in-place scaling of the
    # (B, T, R) activations comes between them: (B|1, T, L, 1) when the ranks are equal, else (B|1, T, R).
    weight = masks[..., : len(downs)].to(device=x.device, dtype=x.dtype) * torch.tensor(
        [float(s) for s in scales], device=x.device, dtype=x.dtype
    )
    same_rank = len(set(ranks)) == 1
    weight = weight.unsqueeze(-1) if same_rank else weight.repeat_interleave(torch.tensor(ranks, device=x.device), -1)
    hidden = x @ down.T  # (B, T, R)
    scaled = hidden.view(*hidden.shape[:2], len(ranks), ranks[0]) if same_rank else hidden  # (B, T, L, r) or (B, T, R)
    for rows in _serial_chunks(x.device, hidden.shape[1], hidden.shape[0] * hidden.shape[2]):
        scaled[:, rows].mul_(weight[:, rows])
    return hidden @ up.T  # (B, T, d_out)


# ATen runs an elementwise op (copy, mul) of fewer elements than its grain size (at::internal::GRAIN_SIZE) on the
# calling thread, and splits a larger one over its thread pool. The stacking and the mask scaling above are
# microseconds of work: on a loaded machine a pool round trip costs far more (a descheduled worker holds it up for
# a scheduler tick), so on the CPU they run as a few ops below that size instead.
_SERIAL_NUMEL = 32768


def _serial_chunks(device: torch.device, rows: int, row_numel: int) -> list[slice]:
    """Slices of `rows` rows of `row_numel` elements each, every one below the grain size on the CPU."""
    step = rows if device.type != "cpu" else max(1, _SERIAL_NUMEL // max(1, row_numel))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _stacked(factors: list[torch.Tensor], ranks: list[int], dtype: torch.dtype, *, along_rows: bool) -> torch.Tensor:
    """The factors in one tensor: downs (r_l, d_in) one below the other, or ups (d_out, r_l) side by side."""
    if len(factors) == 1 and factors[0].dtype == dtype:
        return factors[0]
    first = factors[0]
    width = first.shape[1] if along_rows else first.shape[0]
    stack = torch.empty((sum(ranks), width) if along_rows else (width, sum(ranks)), device=first.device, dtype=dtype)
    offset = 0
    for factor, rank in zip(factors, ranks, strict=True):
        if along_rows:
            for rows in _serial_chunks(first.device, rank, width):
                stack[offset + rows.start : offset + rows.stop].copy_(factor[rows])
        else:
            for rows in _serial_chunks(first.device, width, rank):
                stack[rows, offset : offset + rank].copy_(factor[rows])
        offset += rank
    return stack


def _check_factors(downs, ups, scales) -> None:
    for name, seq in (("downs", downs), ("ups", ups), ("scales", scales)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise ValueError(f"{name}: expected a list with one entry per subject LoRA, got {type(seq).__name__}")
    if len(downs) == 0:
        raise ValueError("downs: no subject LoRAs given")
    if not len(downs) == len(ups) == len(scales):
        raise ValueError(f"ups, scales: expected {len(downs)} entries like downs, got {len(ups)} and {len(scales)}")
    d_in = d_out = None
    for index, (down, up, scale) in enumerate(zip(downs, ups, scales, strict=True)):
        for name, t in ((f"downs[{index}]", down), (f"ups[{index}]", up)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                raise ValueError(f"{name}: expected a 2-D float tensor, got {t!r:.80}")
        d_in = down.shape[1] if d_in is None else d_in
        d_out = up.shape[0] if d_out is None else d_out
        if down.shape[1] != d_in:
            raise ValueError(f"downs[{index}]: input width {down.shape[1]} differs from downs[0]'s {d_in}")
        if up.shape[0] != d_out:
            raise ValueError(f"ups[{index}]: output width {up.shape[0]} differs from ups[0]'s {d_out}")
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"ups[{index}]: rank {up.shape[1]} differs from downs[{index}]'s rank {down.shape[0]}")
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
            raise ValueError(f"scales[{index}]: expected a finite number, got {scale!r}")


def _check_call(x: torch.Tensor, masks: torch.Tensor, d_in: int, n_subjects: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor of shape (batch, tokens, {d_in}), got {x!r:.80}")
    if x.shape[2] != d_in:
        raise ValueError(f"x: last dimension {x.shape[2]} differs from the LoRA input width {d_in}")
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3:
        raise ValueError(f"masks: expected a tensor of shape (batch, tokens, {n_subjects}), got {masks!r:.80}")
    batch, tokens, _ = x.shape
    if masks.shape[1] != tokens or masks.shape[2] < n_subjects or masks.shape[0] not in (1, batch):
        raise ValueError(
            f"masks: expected shape ({batch}, {tokens}, {n_subjects}) (or batch 1; more subject columns allowed), "
            f"got {tuple(masks.shape)}"
        )
