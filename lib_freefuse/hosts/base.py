"""The one small interface a Forge host implements for FreeFuse, and the LoRA patch data it hands over.

Everything FreeFuse does inside a sampling run (attention capture, masked layers, step tracking) goes through
Forge's patcher API that both hosts share (`clone`, `add_object_patch`, the model-function wrapper); what differs
between hosts is the LoRA store: how the prompt's LoRAs are kept on the patcher, read, taken out of the merge and
loaded, how a base weight is read, and what FLUX's modulation layer returns. A host adapter is one package under
`lib_freefuse/hosts/` that implements `Host`; nothing else in the tree names a host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

ADDITIVE_KINDS = frozenset({"lora", "loha", "lokr", "diff"})  # their change does not depend on the weight


class HostUnsupported(RuntimeError):
    """This Forge is not one FreeFuse knows, or lacks what its adapter uses: the message names both."""


@dataclass(frozen=True, eq=False)
class PatchEntry:
    """One LoRA patch of one model parameter, read out of the host's own entry.

    kind: "lora", "loha", "lokr", "glora", "diff", "set", "nested" or the host's name of another kind.
    low_rank: (up (rows, r), down (r, d_in), alpha or None) for a plain 2-D LoRA without mid, DoRA or reshape, or
    (up (C_out, r), down (r, C_in, kh, kw), alpha) for a plain convolution LoRA (LoCon: a kernel, then 1x1); None
    for anything that needs the host's merge. offset: (dim, start, length) into the parameter, or None.
    raw: the host's own entry, handed back to the host's merge function unchanged.
    """

    strength: float
    kind: str
    strength_model: float = 1.0
    offset: tuple[int, int, int] | None = None
    function: Callable | None = None
    low_rank: tuple[torch.Tensor, torch.Tensor, float | None] | None = None
    dora: bool = False
    mid: bool = False
    raw: object = None

    @property
    def additive(self) -> bool:
        """Whether the change does not depend on the weight it is merged into (so deltas on the base add up)."""
        return (self.kind in ADDITIVE_KINDS or self.kind == "nested") and not self.dora and self.strength_model == 1.0


def read_entry(raw) -> PatchEntry:
    """A host's patch entry (strength, patch, strength_model, offset, function[, online_mode]) as a PatchEntry. Both
    hosts order the first five fields alike; the patch is a ComfyUI weight adapter (Neo: `.name`, `.weights`), a
    nested list, a 1-tuple diff or a (kind, data) pair. A LoRA's factors are (up, down, alpha, mid, dora_scale
    [, reshape]); the other kinds keep their DoRA scale last."""
    strength, value, strength_model, offset, function = raw[:5]
    data = None
    if hasattr(value, "calculate_weight") and hasattr(value, "weights"):
        kind, data = value.name, tuple(value.weights)
    elif isinstance(value, list):
        kind = "nested"
    elif len(value) == 1:
        kind = "diff"
    elif len(value) == 2 and isinstance(value[0], str):
        kind, data = value
    else:
        kind = "unknown"
    dora = (kind == "lora" and data[4] is not None) or (kind in ("loha", "lokr", "glora") and data[-1] is not None)
    mid = kind == "lora" and data[3] is not None
    reshaped = kind == "lora" and len(data) > 5 and data[5] is not None
    low_rank = None
    if kind == "lora" and not (dora or mid or reshaped) and data[0].ndim == 2 and data[1].ndim == 2:
        low_rank = (data[0], data[1], data[2])
    elif kind == "lora" and not (dora or mid or reshaped) and _conv_factors(data[0], data[1]):
        low_rank = (data[0].flatten(1), data[1], data[2])  # up (C_out, r, 1, 1) -> (C_out, r); down stays a kernel
    return PatchEntry(
        strength=float(strength),
        kind=kind,
        strength_model=float(strength_model),
        offset=None if offset is None else tuple(offset),
        function=function,
        low_rank=low_rank,
        dora=dora,
        mid=mid,
        raw=raw,
    )


def _conv_factors(up, down) -> bool:
    """Whether (up, down) are a convolution LoRA's: up (C_out, r, 1, 1), down (r, C_in, kh, kw)."""
    return (
        isinstance(up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and up.ndim == 4
        and down.ndim == 4
        and tuple(up.shape[2:]) == (1, 1)
        and up.shape[1] == down.shape[0]
    )


class SubjectPatches(dict):
    """{parameter key: [PatchEntry, ...]} of one subject LoRA, plus unmatched (file keys that matched no layer),
    skipped (mapped keys that are no model parameter), strength (the weight it was loaded or merged at) and source
    (the host's handle on the merged patches, for `Host.take_out`; None for a LoRA FreeFuse loaded itself)."""

    def __init__(
        self,
        entries: Mapping[str, Sequence[PatchEntry]],
        unmatched: Sequence[str] = (),
        skipped: Sequence[str] = (),
        strength: float | None = None,
        source: object = None,
    ):
        super().__init__({key: list(value) for key, value in entries.items()})
        self.unmatched = tuple(unmatched)
        self.skipped = tuple(skipped)
        self.strength = strength
        self.source = source


class Host(ABC):
    """A Forge that FreeFuse runs in. Its methods take the job's diffusion patcher (`UnetPatcher`)."""

    name: str = "a Forge"

    @abstractmethod
    def owns(self, unet) -> bool:
        """Whether `unet` keeps its LoRAs the way this host does (so this adapter is the one to ask)."""

    @abstractmethod
    def missing(self, unet) -> str | None:
        """Why FreeFuse cannot run on this patcher of this host (one phrase), or None when it can."""

    @abstractmethod
    def merged_lora(self, unet, filename: str) -> SubjectPatches | None:
        """The patches the host merged for the LoRA file `filename` (from the prompt's tag), or None if it has none."""

    @abstractmethod
    def load_lora(self, unet, filename: str, strength: float) -> SubjectPatches:
        """The diffusion-model part of a LoRA file at `strength`, read with the host's own loader (`unet` unchanged)."""

    @abstractmethod
    def take_out(self, clone, taken: Sequence[SubjectPatches]) -> None:
        """Remove the merged LoRAs `taken` (from `merged_lora` of the clone's origin) from the clone's merge."""

    @abstractmethod
    def base_weight(self, unet) -> Callable[[str], torch.Tensor]:
        """key -> the parameter before any LoRA merge, dequantised (GGUF and other quantised storage)."""

    @abstractmethod
    def modulation_output(self, modulation, chunks: Sequence[torch.Tensor]):
        """What the host's FLUX `Modulation.forward` returns, made of its `multiplier` chunks (B, T, D)."""

    def reference_tokens(self, conditioning: dict, patch_size: int = 2) -> int:
        """Reference-image tokens the host's FLUX (patches of patch_size) appends after the image's in this model
        call (Kontext); none."""
        return 0

    def merge(self, entries: Sequence[PatchEntry], weight: torch.Tensor, key: str) -> torch.Tensor:
        """The host's own merge of `entries` into a float32 copy of `weight` (both hosts share the function name)."""
        from backend.patcher.lora import merge_lora_to_weight

        return merge_lora_to_weight([e.raw for e in entries], weight, key, computation_dtype=torch.float32)
