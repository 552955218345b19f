"""Subject LoRAs as masked per-token weight deltas (ALGORITHM.md stage 2, FORGE.md "LoRA").

A subject LoRA is never merged into the model's weights. Each weight it changes becomes a SubjectWeightDelta: plain
LoRA stays low-rank (exact), every other kind becomes a dense delta computed by the host's own merge function, so
that what a mask of all ones gives is exactly what the host's merge would give. MaskedLinearPatch adds the deltas to
one Linear's output token by token, each subject's under its own mask column. The patches come as host-neutral
PatchEntry objects (lib_freefuse/hosts): nothing here knows which Forge it runs in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..core.lora import StackedLoRA
from ..hosts.base import PatchEntry

__all__ = ["MaskedLinearPatch", "SubjectWeightDelta", "delta_output", "subject_deltas"]

MODEL_PREFIX = "diffusion_model."  # Forge's parameter keys: "diffusion_model.<module>.weight"
MaskSource = Callable[[torch.Tensor], "torch.Tensor | None"]
Merge = Callable[[Sequence[PatchEntry], torch.Tensor, str], torch.Tensor]  # the host's merge: entries, float32 weight
Rows = tuple[int, int] | None  # (start, length) of the output features, None = all

_TYPE_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "diff": "full diff", "set": "set"}
_DENSE = "applied as a dense masked delta, slower"
_NOTE_MODULES = 8  # modules named per note before "and N more"


@dataclass(frozen=True, eq=False)
class SubjectWeightDelta:
    """One subject LoRA's change to one Linear or Conv2d weight (and bias) of the diffusion model.

    module: path under `diffusion_model`, e.g. "double_blocks.0.img_attn.qkv". rows: (start, length) of the output
    features it changes (Forge's offset (0, start, length), e.g. to_k into the fused qkv), None = all d_out rows.
    Low-rank (plain LoRA): down (r, d_in), up (rows, r), scale = strength * alpha / rank; r may be 0 for a change of
    the bias only. Dense (every other kind): dense (rows, d_in) with the scale folded in, scale 1. bias: (rows,).
    A convolution's (`conv`): down (r, C_in, kh, kw) with up (C_out, r) (a kernel, then 1x1), or dense
    (C_out, C_in, kh, kw); rows None.
    """

    module: str
    rows: tuple[int, int] | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self):
        low_rank = self.down is not None and self.up is not None
        if low_rank == (self.dense is not None) or (self.down is None) != (self.up is None):
            raise ValueError(f"{self.module}: give either down and up (low-rank) or dense, not both or neither")
        if low_rank and (self.down.ndim not in (2, 4) or self.up.ndim != 2 or self.up.shape[1] != self.down.shape[0]):
            raise ValueError(f"{self.module}: up {tuple(self.up.shape)} and down {tuple(self.down.shape)} don't chain")
        if self.dense is not None and self.dense.ndim not in (2, 4):
            raise ValueError(
                f"{self.module}: dense must be (rows, d_in) or a kernel (C_out, C_in, kh, kw), got "
                f"{tuple(self.dense.shape)}"
            )
        if self.rows is not None and (len(self.rows) != 2 or self.rows[1] != self.width or self.rows[0] < 0):
            raise ValueError(f"{self.module}: rows {self.rows} don't match the delta's {self.width} output features")
        if self.bias is not None and tuple(self.bias.shape) != (self.width,):
            raise ValueError(f"{self.module}: bias must be ({self.width},), got {tuple(self.bias.shape)}")

    @property
    def low_rank(self) -> bool:
        """True for a plain LoRA kept as scale * up @ down."""
        return self.dense is None

    @property
    def conv(self) -> bool:
        """True for a convolution's change (a 4-D kernel)."""
        return (self.down if self.dense is None else self.dense).ndim == 4

    @property
    def width(self) -> int:
        """Number of output features changed (rows' length, or the layer's d_out when rows is None)."""
        return (self.up if self.dense is None else self.dense).shape[0]

    @property
    def d_in(self) -> int:
        """Input features of the layer."""
        return (self.down if self.dense is None else self.dense).shape[1]

    def weight(self) -> torch.Tensor:
        """The (rows, d_in) weight change it stands for (a kernel for a convolution): scale * up @ down, or dense."""
        if self.dense is not None:
            return self.dense
        return (self.scale * (self.up @ self.down.flatten(1))).reshape(self.up.shape[0], *self.down.shape[1:])


def delta_output(delta: SubjectWeightDelta, x: torch.Tensor, cache: dict) -> torch.Tensor:
    """x (..., d_in) -> (..., width): the weight change applied to x (no mask), in x's dtype/device; the factors
    cast once per dtype/device into `cache` (the caller's)."""
    key = (id(delta), x.dtype, x.device)
    if key not in cache:
        cast = lambda t: None if t is None else t.to(device=x.device, dtype=x.dtype)  # noqa: E731
        cache[key] = (cast(delta.down), cast(delta.up), cast(delta.dense), cast(delta.bias))
    down, up, dense, bias = cache[key]
    out = (x @ down.T @ up.T) * delta.scale if dense is None else x @ dense.T
    return out if bias is None else out + bias


def subject_deltas(
    patches: Mapping[str, Sequence[PatchEntry]], base_weight: Callable[[str], torch.Tensor], merge: Merge
) -> tuple[list[SubjectWeightDelta], list[str]]:
    """One subject LoRA's patches -> (the weight deltas of its Linear layers, notes on dense or left-out parts).

    patches: {key: [PatchEntry, ...]} with keys such as "diffusion_model.double_blocks.0.img_attn.qkv.weight".
    base_weight(key): the unmerged base parameter (weight (d_out, d_in) or bias (d_out,)); called for dense kinds
    and bias changes only. merge: the host's merge (Host.merge). Base + the deltas' weight() placed in rows equals
    the host's merge of the same entries.
    """
    notes: dict[str, list[str]] = {}
    weights: dict[str, list[SubjectWeightDelta]] = {}
    biases: dict[str, list[tuple[Rows, torch.Tensor]]] = {}
    for key, entries in patches.items():
        entries = list(entries)
        module, param = _split_key(key)
        if module is None:
            notes.setdefault("not a Linear weight or bias of the diffusion model: left out", []).append(key)
        elif param == "bias":
            biases.setdefault(module, []).extend(_bias_changes(module, key, entries, base_weight, merge, notes))
        else:
            weights.setdefault(module, []).extend(_weight_deltas(module, key, entries, base_weight, merge, notes))
    for module, changes in biases.items():
        weights[module] = _attach_biases(module, weights.get(module, []), changes, base_weight)
    deltas = [delta for module_deltas in weights.values() for delta in module_deltas]
    return deltas, [_format_note(reason, modules) for reason, modules in notes.items()]


class MaskedLinearPatch:
    """Replacement `forward` of one Linear: y = original_forward(x) + sum_l masks[..., l] * (subject l's delta)(x).

    deltas: (subject index = mask column, delta) pairs, all of this module. mask_source(x) -> masks (B|1, T, L) for
    x (B, T, d_in) (or (B|1, 1, L) / (B|1, L) for a 2-D x (B, d_in)), or None: no subject delta now. Low-rank deltas
    are stacked once per `rows` into StackedLoRA objects; dense and bias deltas are cast lazily and cached.
    """

    def __init__(
        self,
        original_forward: Callable[..., torch.Tensor],
        deltas: Sequence[tuple[int, SubjectWeightDelta]],
        mask_source: MaskSource,
        on_error: Callable[[Exception], None] | None = None,
    ):
        if not deltas:
            raise ValueError("deltas: no subject deltas for this layer")
        self.original_forward = original_forward
        self.mask_source = mask_source
        self.on_error = on_error  # given: a failure is reported there and the layer answers without the deltas
        self.n_subjects = 1 + max(_subject(subject) for subject, _ in deltas)
        self.stacks = _stack_low_rank(deltas)  # [(rows, StackedLoRA)]
        self._dense = [(subject, d.rows, d.dense) for subject, d in deltas if d.dense is not None]
        self._bias = [(subject, d.rows, d.bias) for subject, d in deltas if d.bias is not None]
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[list, list]] = {}

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y (B, T, d_out) or (B, d_out), the subject deltas added in place under their masks."""
        y = self.original_forward(x, *args, **kwargs)
        if self.on_error is None:
            return self._add_deltas(x, y)
        try:
            return self._add_deltas(x, y)
        except Exception as error:  # reported once by the job; this layer answers as if unpatched
            self.on_error(error)
            return self.original_forward(x, *args, **kwargs)  # y may hold part of the deltas: recompute

    def _add_deltas(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        masks = self.mask_source(x)
        if masks is None:
            return y
        x3, y3 = (x, y) if x.ndim == 3 else (x.unsqueeze(1), y.unsqueeze(1))  # (B, T, d_in), (B, T, d_out)
        if x.ndim == 2 and masks.ndim == 2:
            masks = masks.unsqueeze(1)  # (B|1, L) -> (B|1, 1, L)
        self._check_masks(masks, x3)
        masks = masks.to(device=x.device, dtype=x.dtype)
        out = y3 if y3.dtype == x.dtype else torch.zeros(y3.shape, dtype=x.dtype, device=x.device)
        for rows, stacked in self.stacks:
            stacked.add_to(_columns(out, rows), x3, masks)
        if self._dense or self._bias:
            dense, bias = self._extras(x.dtype, x.device)
            for subject, rows, weight in dense:
                _columns(out, rows).addcmul_(x3 @ weight.T, masks[..., subject : subject + 1])
            for subject, rows, vector in bias:
                _columns(out, rows).addcmul_(masks[..., subject : subject + 1], vector)
        if out is not y3:
            y3.add_(out.to(y3.dtype))
        return y

    def _check_masks(self, masks: torch.Tensor, x3: torch.Tensor) -> None:
        batch, tokens = x3.shape[:2]
        if masks.ndim != 3 or masks.shape[1] != tokens or masks.shape[0] not in (1, batch):
            raise ValueError(f"masks: expected ({batch}|1, {tokens}, >={self.n_subjects}), got {tuple(masks.shape)}")
        if masks.shape[2] < self.n_subjects:
            raise ValueError(f"masks: {masks.shape[2]} columns, but the deltas need {self.n_subjects} subjects")

    def _extras(self, dtype: torch.dtype, device: torch.device) -> tuple[list, list]:
        """Dense and bias deltas in x's dtype/device (cached per dtype/device)."""
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = tuple(
                [(subject, rows, t.to(device=device, dtype=dtype)) for subject, rows, t in group]
                for group in (self._dense, self._bias)
            )
        return self._cast[key]


def _subject(subject: int) -> int:
    if isinstance(subject, bool) or not isinstance(subject, int) or subject < 0:
        raise ValueError(f"subject: expected a non-negative mask column, got {subject!r}")
    return subject


def _stack_low_rank(deltas: Sequence[tuple[int, SubjectWeightDelta]]) -> list[tuple[Rows, StackedLoRA]]:
    """Low-rank deltas (rank > 0) grouped by rows, each group one StackedLoRA with its subjects."""
    groups: dict[Rows, list[tuple[int, SubjectWeightDelta]]] = {}
    for subject, delta in deltas:
        if delta.low_rank and delta.down.shape[0] > 0:
            groups.setdefault(delta.rows, []).append((subject, delta))
    return [
        (
            rows,
            StackedLoRA(
                [d.down for _, d in group],
                [d.up for _, d in group],
                [d.scale for _, d in group],
                subjects=[subject for subject, _ in group],
            ),
        )
        for rows, group in groups.items()
    ]


def _columns(out: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The output features `rows` of out (B, T, d_out): a view (B, T, length)."""
    return out if rows is None else out.narrow(-1, rows[0], rows[1])


def _split_key(key: str) -> tuple[str | None, str | None]:
    """ "diffusion_model.<module>.weight|bias" -> (module, "weight"|"bias"); anything else -> (None, None)."""
    if isinstance(key, str) and key.startswith(MODEL_PREFIX):
        module, _, param = key[len(MODEL_PREFIX) :].rpartition(".")
        if module and param in ("weight", "bias"):
            return module, param
    return None, None


def _low_rank(module: str, entry: PatchEntry) -> SubjectWeightDelta | None:
    """A plain LoRA entry as scale * up @ down in its rows, or None when it needs the host's merge (dense)."""
    if entry.low_rank is None or entry.function is not None or entry.strength_model != 1.0:
        return None
    if entry.offset is not None and entry.offset[0] != 0:
        return None
    up, down, alpha = entry.low_rank
    rows = None if entry.offset is None else (int(entry.offset[1]), int(entry.offset[2]))
    scale = entry.strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)  # alpha None -> 1
    return SubjectWeightDelta(module, rows, down=down, up=up, scale=scale)


def _dense_reason(entries: Sequence[PatchEntry]) -> str:
    """Why entries need a dense delta, e.g. "LoHa" or "DoRA" or "LoRA, key function swap_scale_shift"."""
    reasons = []
    for entry in entries:
        kind = entry.kind
        name = "nested patch list" if kind == "nested" else _TYPE_NAMES.get(kind, f"patch type {kind!r}")
        if entry.dora:
            name = "DoRA" if kind == "lora" else f"{name} with DoRA"
        elif entry.mid:
            name = "LoRA with a mid (Tucker) factor"
        if entry.function is not None:
            name += f", key function {getattr(entry.function, '__name__', repr(entry.function))}"
        if entry.strength_model != 1.0:
            name += f", strength_model {entry.strength_model} (scales the base weight)"
        if entry.offset is not None and entry.offset[0] != 0:
            name += f", offset along dim {entry.offset[0]}"
        reasons.append(name)
    return " + ".join(dict.fromkeys(reasons))


def _merged_change(
    key: str, entries: Sequence[PatchEntry], base_weight: Callable[[str], torch.Tensor], merge: Merge
) -> torch.Tensor:
    """The host's merge of entries into the base parameter, minus the base: (d_out, d_in) or (d_out,), float32
    math, returned in the base's dtype (float32 for a non-float base)."""
    base = base_weight(key)
    base32 = base.detach().to(torch.float32)
    merged = merge(entries, base32.clone(), key)
    if merged.shape != base32.shape:
        raise ValueError(f"{key}: the host's merge changes the shape {tuple(base32.shape)} -> {tuple(merged.shape)}")
    dtype = base.dtype if base.is_floating_point() else torch.float32
    return (merged - base32).to(dtype)


def _common_rows(entries: Sequence[PatchEntry]) -> Rows:
    """The rows all entries address (one offset along dim 0), else None (the whole weight)."""
    offsets = {entry.offset for entry in entries}
    if len(offsets) != 1:
        return None
    (offset,) = offsets
    return None if offset is None or offset[0] != 0 else (int(offset[1]), int(offset[2]))


def _dense_delta(
    module: str,
    key: str,
    entries: list[PatchEntry],
    base_weight: Callable[[str], torch.Tensor],
    merge: Merge,
    notes: dict,
) -> SubjectWeightDelta | None:
    """One dense delta for entries merged together by the host, narrowed to their common rows."""
    change = _merged_change(key, entries, base_weight, merge)
    if change.ndim not in (2, 4):
        notes.setdefault(f"{_dense_reason(entries)} on a non-Linear weight: left out", []).append(module)
        return None
    rows = _common_rows(entries)
    dense = change if rows is None else change.narrow(0, rows[0], rows[1])
    notes.setdefault(f"{_dense_reason(entries)}: {_DENSE}", []).append(module)
    return SubjectWeightDelta(module, rows, dense=dense.contiguous())


def _weight_deltas(
    module: str,
    key: str,
    entries: list[PatchEntry],
    base_weight: Callable[[str], torch.Tensor],
    merge: Merge,
    notes: dict,
) -> list[SubjectWeightDelta]:
    """The deltas of one weight key: plain LoRA low-rank, others dense; entries that don't add up (DoRA, set,
    GLoRA, strength_model != 1) and share the key with others are merged together, in the host's order."""
    if len(entries) > 1 and not all(e.additive for e in entries):
        delta = _dense_delta(module, key, entries, base_weight, merge, notes)
        return [] if delta is None else [delta]
    deltas = []
    for entry in entries:
        delta = _low_rank(module, entry) or _dense_delta(module, key, [entry], base_weight, merge, notes)
        if delta is not None:
            deltas.append(delta)
    return deltas


def _bias_changes(
    module: str,
    key: str,
    entries: list[PatchEntry],
    base_weight: Callable[[str], torch.Tensor],
    merge: Merge,
    notes: dict,
) -> list[tuple[Rows, torch.Tensor]]:
    """(rows, bias change (rows,)) of one bias key, computed by the host's merge."""
    groups = [entries] if len(entries) > 1 and not all(e.additive for e in entries) else [[e] for e in entries]
    changes = []
    for group in groups:
        change = _merged_change(key, group, base_weight, merge)
        rows = _common_rows(group)
        changes.append((rows, change if rows is None else change.narrow(0, rows[0], rows[1]).contiguous()))
        reason = _dense_reason(group).replace("full diff", "bias diff", 1)
        notes.setdefault(f"{reason}: applied as a masked per-token bias delta", []).append(module)
    return changes


def _attach_biases(
    module: str,
    deltas: list[SubjectWeightDelta],
    changes: list[tuple[Rows, torch.Tensor]],
    base_weight: Callable[[str], torch.Tensor],
) -> list[SubjectWeightDelta]:
    """Each bias change joins a weight delta of the same rows that has none yet, else a rank-0 delta of its own."""
    deltas = list(deltas)
    for rows, change in changes:
        index = next((i for i, d in enumerate(deltas) if d.rows == rows and d.bias is None), None)
        if index is not None:
            deltas[index] = dataclasses.replace(deltas[index], bias=change)
            continue
        d_in = deltas[0].d_in if deltas else base_weight(f"{MODEL_PREFIX}{module}.weight").shape[1]
        down = change.new_zeros(0, d_in)
        up = change.new_zeros(change.shape[0], 0)
        deltas.append(SubjectWeightDelta(module, rows, down=down, up=up, scale=1.0, bias=change))
    return deltas


def _format_note(reason: str, modules: list[str]) -> str:
    """ "<reason>: a, b, c and N more"."""
    named = ", ".join(modules[:_NOTE_MODULES])
    more = f" and {len(modules) - _NOTE_MODULES} more" if len(modules) > _NOTE_MODULES else ""
    return f"{reason}: {named}{more}"
