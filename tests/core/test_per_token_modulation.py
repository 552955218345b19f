"""Per-token modulation's rows: base + masks @ per-subject deltas, copied per token when the masks are hard."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse.forge.flux1 import _per_token

pytestmark = pytest.mark.core


def hard_masks(owner: torch.Tensor, n_subjects: int) -> torch.Tensor:
    """(B, T) owner indices, n_subjects = nobody -> (B, T, L) 0/1 masks."""
    return torch.nn.functional.one_hot(owner, n_subjects + 1)[..., :n_subjects].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_batch", [1, 2])
def test_hard_masks_give_exactly_the_weighted_sum(dtype, mask_batch):
    g = torch.Generator().manual_seed(0)
    base, per_subject = torch.randn(2, 24, generator=g).to(dtype), torch.randn(2, 3, 24, generator=g).to(dtype)
    owner = torch.randint(0, 4, (mask_batch, 10), generator=g)  # index 3: a token no subject owns
    masks = hard_masks(owner, 3).to(dtype)
    expected = torch.baddbmm(base[:, None, :], masks.expand(2, -1, -1), per_subject)
    out = _per_token(base, per_subject, masks)
    assert out.shape == (2, 10, 24)
    assert torch.equal(out, expected)
    for b in range(2):
        for t in range(10):
            subject = int(owner[min(b, mask_batch - 1), t])
            row = base[b] if subject == 3 else base[b] + per_subject[b, subject]
            assert torch.equal(out[b, t], row)


@pytest.mark.parametrize("masks", [torch.full((1, 6, 2), 0.5), torch.ones(1, 6, 2)])  # soft; two subjects per token
def test_other_masks_take_the_weighted_sum(masks):
    g = torch.Generator().manual_seed(1)
    base, per_subject = torch.randn(1, 8, generator=g), torch.randn(1, 2, 8, generator=g)
    expected = base[:, None, :] + (masks[..., None] * per_subject[:, None]).sum(dim=2)
    torch.testing.assert_close(_per_token(base, per_subject, masks), expected)
