"""Chroma's per-token modulation (Neo's backend/nn/chroma.py): the global modulation MLP (`distilled_guidance_layer`)
run once per distinct subject-mask row, and each token handed the slots of its own row.

Chroma's MLP maps (B, 344, 64) rows (timestep, guidance, slot index) to (B, 344, D) modulation vectors, one per
shift/scale/gate slot; `get_modulations` slices them per block, (B, 1, D) each. The MLP is not linear in its weights,
so a token's modulation is the MLP evaluated with that token's mask-weighted subject deltas in every MLP layer:
mod_t = MLP[W + sum_l m_tl dW_l](x). Tokens sharing a mask row share that evaluation: the distinct rows of the call's
masks (hard masks: nobody, each subject, every subject on the text) are run as one batch of R rows, and
`get_modulations` gives token t the slots of its row, (B, T, D). All-ones masks give Neo's merge, zero masks no LoRA.
Soft masks with more than MAX_ROWS distinct rows take the first-order blend of R = L + 1 runs instead,
mod_t = mod_0 + sum_l m_tl (mod_{e_l} - mod_0) (exact where a token has one subject, or none).
"""

from __future__ import annotations

import dataclasses

import torch

from .job import FreeFuseJob

MAX_ROWS = 16  # distinct mask rows run exactly; beyond, soft masks take the first-order blend
STREAMS = {"double_img": "image", "double_txt": "text", "single": "joint", "final": "image"}
_KEY = ("chroma modulation",)  # the job's per-call cache: this call's MLP rows


class MaskRows:
    """The subject weights (R*B|1, 1, L) of the MLP rows being run; the MLP layers' mask source."""

    def __init__(self):
        self.weights: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (R*B, 344, d) -> (R*B|1, 344, L) masks, or None (no subject delta)."""
        if self.weights is None:
            return None
        return self.weights.to(device=x.device, dtype=x.dtype).expand(-1, x.shape[1], -1)


@dataclasses.dataclass
class _Run:
    """One model call's MLP outputs: mods (R, B, 344, D) for the anchor rows (R, L); exact: anchors are the
    call's distinct mask rows (else: nobody, then each subject alone)."""

    anchors: torch.Tensor
    mods: torch.Tensor
    exact: bool


class PerTokenApproximator:
    """Forward of `distilled_guidance_layer`: (B, 344, in) -> (B, 344, D) with no subject delta; in "per_token"
    mode it runs the MLP once per anchor row (one batch, the zero row among them, which it returns) and leaves the
    rows for PerTokenSlices (the job's call cache)."""

    def __init__(self, original_forward, rows: MaskRows, job: FreeFuseJob):
        self.original_forward = original_forward
        self.rows = rows
        self.job = job

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mode, _ = self.job.modulation_masks("image")
        if mode != "per_token":  # "global": every subject everywhere (the merge); "none": no subject
            n_subjects = self.job.plan.n_subjects
            return self._run(x, None if mode == "none" else torch.ones(1, 1, n_subjects))
        try:
            anchors, exact = anchor_rows([self.job.modulation_masks(s)[1] for s in ("text", "image")])
            weights = anchors.repeat_interleave(x.shape[0], dim=0)[:, None, :]  # (R*B, 1, L)
            mods = self._run(x.repeat(anchors.shape[0], 1, 1), weights)
            mods = mods.view(anchors.shape[0], x.shape[0], *mods.shape[1:])  # (R, B, 344, D)
            self.job.call_cached(_KEY, lambda: _Run(anchors, mods, exact))
            return mods[int((anchors == 0).all(dim=-1).nonzero()[0])]  # the zero row: no subject
        except Exception as error:  # reported once by the job; every block gets the base modulation
            self.job.layer_failed(error)
            return self._run(x, None)

    def _run(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        self.rows.weights = weights
        try:
            return self.original_forward(x)
        finally:
            self.rows.weights = None


def anchor_rows(masks: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The MLP rows (R, L) to run for (B|1, T, L) stream masks, and whether they are the masks' own rows: the
    distinct rows and the all-zero row (the base) when at most MAX_ROWS, else the zero row and each subject alone."""
    n_subjects = masks[0].shape[-1]
    rows = torch.cat([torch.zeros(1, n_subjects)] + [m.reshape(-1, n_subjects).float().cpu() for m in masks])
    distinct = torch.unique(rows, dim=0)
    if distinct.shape[0] <= MAX_ROWS:
        return distinct, True
    return torch.cat([torch.zeros(1, n_subjects), torch.eye(n_subjects)]), False


def coefficients(masks: torch.Tensor, anchors: torch.Tensor, exact: bool) -> torch.Tensor:
    """(B|1, T, L) masks -> (B|1, T, R) weights of the anchor rows for each token: one-hot on its own row (exact),
    else 1 - sum_l m_tl on the zero row and m_tl on subject l's."""
    masks = masks.float().cpu()
    if exact:
        return (masks[..., None, :] == anchors).all(dim=-1).float()
    return torch.cat([1 - masks.sum(dim=-1, keepdim=True), masks], dim=-1)


class PerTokenSlices:
    """`get_modulations`: the model's own slicing, but each slot per token from the token's MLP row when this call
    has rows (PerTokenApproximator), so ModulationOut fields are (B, T, D) instead of (B, 1, D)."""

    def __init__(self, original_get_modulations, job: FreeFuseJob):
        self.original = original_get_modulations
        self.job = job
        self._slots: dict = {}  # (block_type, idx) -> the model's slicing applied to slot numbers

    def __call__(self, tensor: torch.Tensor, block_type: str, *, idx: int = 0):
        run = self.job.call_cached(_KEY, lambda: None)
        if run is None:
            return self.original(tensor, block_type, idx=idx)
        try:
            stream = STREAMS[block_type]
            _, masks = self.job.modulation_masks(stream)
            weights = self.job.call_cached(
                ("chroma coefficients", stream), lambda: coefficients(masks, run.anchors, run.exact)
            )
            weights = weights.to(device=run.mods.device, dtype=run.mods.dtype).expand(run.mods.shape[1], -1, -1)

            def per_token(slot: int) -> torch.Tensor:  # sum_r weights (B, T, R) * mods (R, B, D) -> (B, T, D)
                return torch.einsum("btr,rbd->btd", weights, run.mods[:, :, slot])

            return _map(self._slot_numbers(block_type, idx), per_token)
        except Exception as error:  # reported once by the job; this block gets the base modulation
            self.job.layer_failed(error)
            return self.original(tensor, block_type, idx=idx)

    def _slot_numbers(self, block_type: str, idx: int):
        """The model's get_modulations on a (1, 344, 1) tensor of slot numbers: the same structure, each field
        holding the int slot it takes."""
        key = (block_type, idx)
        if key not in self._slots:
            numbers = torch.arange(344, dtype=torch.float32)[None, :, None]
            self._slots[key] = _map(self.original(numbers, block_type, idx=idx), lambda t: int(t.reshape(-1)[0]))
        return self._slots[key]


def _map(structure, fn):
    """fn applied to every leaf of get_modulations' output (tuples of ModulationOut dataclasses or of tensors)."""
    if isinstance(structure, tuple):
        return tuple(_map(item, fn) for item in structure)
    if dataclasses.is_dataclass(structure):
        return type(structure)(**{f.name: _map(getattr(structure, f.name), fn) for f in dataclasses.fields(structure)})
    return fn(structure)


class PerTokenFinalLayer:
    """Forward of Chroma's LastLayer that also takes per-token (B, N, D) shift and scale (its own squeezes them
    as (B, 1, D)): norm_final(x) * (1 + scale) + shift, then its linear."""

    def __init__(self, original_forward, layer):
        self.original_forward = original_forward
        self.layer = layer

    def __call__(self, x: torch.Tensor, vec) -> torch.Tensor:
        shift, scale = vec
        if shift.shape[1] == 1:
            return self.original_forward(x, vec)
        return self.layer.linear(torch.addcmul(shift, 1 + scale, self.layer.norm_final(x)))
