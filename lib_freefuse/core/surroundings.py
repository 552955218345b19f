"""Places no subject clearly leads, after the vote (Eq. 11-13): to the subject that clearly leads nearest to them.

Beyond the paper. Where one subject's words attend at least LEAD_RATIO times more than any other subject's, the
vote's owner is clear; elsewhere (the faint background around the figures, places two subjects' words both reach)
the vote follows small differences of weak attention, so a LoRA can act on the far side of the other subject's
figure. There, distance decides instead: each such place goes to the owner of the nearest clear place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy import ndimage  # installed with scikit-image, which is built on it

from .superpixel import give_free_to_nearest

__all__ = ["LEAD_RATIO", "LEAD_REACH", "clear_places", "nearest_lead"]

# A subject clearly leads where its map is at least this many times every other subject's. Chosen from the first toy
# world's captures among 1, 1.5, 2 and 3 (offline mask accuracy); through the job 2 changed nothing in either world,
# 3 won in the first, on seeds no choice had seen too, and leaned the same way in the second (README "The toy
# world"); 4 and above lose the planted leak scene (one seed 0.68 at 4).
LEAD_RATIO = 3.0
# Places a subject owns within this many tokens of one it clearly leads count as clear too: a subject whose map has
# holes, or whose words another subject's also reach, keeps its own region (planted leak and wide canvas: without it
# one seed lost 0.06 and 0.02; with 2 no planted scene loses more than 0.007 on a seed).
LEAD_REACH = 2.0


def clear_places(
    owner: torch.Tensor, maps: torch.Tensor, ratio: float = LEAD_RATIO, reach: float = LEAD_REACH
) -> torch.Tensor:
    """Where the owner is clear: (h, w) bool. owner: (h, w) int64, the subject index of each token (L: nobody);
    maps: (L, h, w) score maps. A token is clear where its owner's map is the largest there and at least `ratio`
    times every other subject's, or where it lies within `reach` tokens (Euclidean) of such a token of its owner."""
    n_subjects = maps.shape[0]
    top2 = maps.topk(2, dim=0).values
    owned = owner < n_subjects
    leads = (maps.argmax(dim=0) == owner) & (top2[0] >= ratio * top2[1]) & owned
    clear = leads.clone()
    if reach > 0:
        for subject in range(n_subjects):
            own_leads = (leads & (owner == subject)).numpy()
            if own_leads.any():
                near = torch.from_numpy(ndimage.distance_transform_edt(~own_leads) <= reach)
                clear |= near & (owner == subject)
    return clear


def nearest_lead(
    masks: torch.Tensor, maps: torch.Tensor, ratio: float = LEAD_RATIO, reach: float = LEAD_REACH
) -> torch.Tensor:
    """Every owned token that is not clear (clear_places) goes wholly to the owner of the nearest clear token.

    masks: (L, h, w) disjoint masks in [0, 1], a token's owner being the subject whose mask is above 0.5 there (none:
    the token is free, background, and stays so); maps: (L, h', w') the score maps the vote used (Eq. 10, or their
    average), taken to (h, w) by nearest-neighbour when the grids differ, `reach` scaled alike (counted in maps'
    tokens). Returns (L, h, w) in masks' dtype: clear tokens and free tokens as they were, the others one-hot. With
    fewer than two subjects, or no clear token, the masks as they are.
    """
    n_subjects, h, w = masks.shape
    if n_subjects < 2:
        return masks
    scores = maps.detach().float().cpu()
    if tuple(scores.shape[-2:]) != (h, w):
        reach = reach * h / scores.shape[-2]
        scores = F.interpolate(scores[None], size=(h, w), mode="nearest-exact")[0]
    values = masks.detach().float().cpu()
    top = values.max(dim=0)
    owner = torch.where(top.values > 0.5, top.indices, torch.full_like(top.indices, n_subjects))
    clear = clear_places(owner, scores, ratio, reach)
    if not bool(clear.any()):
        return masks
    unclear_freed = torch.where(clear, owner, torch.full_like(owner, n_subjects))
    nearest = give_free_to_nearest(unclear_freed, n_subjects)  # each place: the owner of the nearest clear place
    moved = (owner < n_subjects) & (nearest != owner)
    if not bool(moved.any()):
        return masks
    one_hot = F.one_hot(nearest, n_subjects).permute(2, 0, 1).to(values)  # (L, h, w)
    result = torch.where(moved[None], one_hot, values)
    return result.to(device=masks.device, dtype=masks.dtype)
