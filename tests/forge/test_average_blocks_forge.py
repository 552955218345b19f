"""`average_blocks` in each joint-attention family's own model (tiny, random, the host's classes): every block before
the capture block hands its q, k over in the capture call (the same q, k that block hands over when it is itself the
capture block), and the masks are the owners of the mean of the blocks' score maps (Eq. 5-10, vote off)."""

from __future__ import annotations

import chroma_env
import klein_env
import pytest
import qwen_image_env
import torch
import zimage_env

from lib_freefuse.core import MaskConfig, joint_score_maps
from lib_freefuse.families import CHROMA, FLUX1, FLUX2_KLEIN, QWEN_IMAGE, Z_IMAGE
from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan

NO_VOTE = MaskConfig(superpixel_vote=False)
WORDS = (((1, 2), (3,)), ((0,), (2,)))  # two images, two subjects each
TOKENS = 4


class KeepingJob(FreeFuseJob):
    """A FreeFuseJob that keeps the (q, k) it kept of each block in the capture call, in the order handed over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def store_block_maps(self, q, k):
        self.handed.append(("block", *(t.clone() for t in self._kept_rows(q, k))))
        super().store_block_maps(q, k)

    def store_attention(self, q, k):
        super().store_attention(q, k)
        self.handed.append(("capture", *(t.clone() for t in self._captured)))
        self.grid = self._call.grid_hw


FAMILIES = {
    "flux1": (FLUX1, False),
    "chroma": (CHROMA, True),
    "klein": (FLUX2_KLEIN, True),
    "qwen_image": (QWEN_IMAGE, True),
    "zimage": (Z_IMAGE, True),
}


def make(forge, name: str):
    """(patcher, sample(unet), text length) of the family's tiny model."""
    run = dict(steps=3, batch=2, cfg_scale=3.0)
    if name == "flux1":
        return forge.make_unet_patcher(forge.make_tiny_flux()), lambda u: forge.sample(u, latent_hw=(10, 12), **run), 8
    if name == "chroma":
        unet = chroma_env.make_chroma_patcher(chroma_env.make_tiny_chroma())
        return unet, lambda u: chroma_env.sample(forge, u, tokens=TOKENS, uncond_tokens=TOKENS, **run), TOKENS
    if name == "klein":
        unet = klein_env.make_klein_patcher(klein_env.make_tiny_klein())
        sample = lambda u: klein_env.sample(forge, u, latent_hw=(5, 6), tokens=TOKENS, uncond_tokens=TOKENS, **run)  # noqa: E731
        return unet, sample, TOKENS
    if name == "qwen_image":
        unet = qwen_image_env.make_qwen_patcher(qwen_image_env.make_tiny_qwen_image())
        sample = lambda u: qwen_image_env.sample(  # noqa: E731
            forge, u, latent_hw=(10, 12), tokens=TOKENS, uncond_tokens=TOKENS, **run
        )
        return unet, sample, TOKENS
    unet = zimage_env.make_zimage_patcher(zimage_env.make_tiny_zimage())
    sample = lambda u: zimage_env.sample(forge, u, latent_hw=(10, 14), tokens=TOKENS, uncond_tokens=TOKENS, **run)  # noqa: E731
    return unet, sample, TOKENS


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_block_up_to_the_capture_counts_once_in_the_masks(forge, name):
    family, neo_only = FAMILIES[name]
    if neo_only and forge.HOST != "neo":
        pytest.skip(f"classic Forge has no {family.name}")
    unet, sample, text_length = make(forge, name)
    try:
        jobs = {}
        for block, average in ((0, False), (1, True)):
            plan = JobPlan(word_positions=WORDS, text_length=text_length, capture_step=1, mask_config=NO_VOTE,
                           average_blocks=average)  # fmt: skip
            jobs[block] = KeepingJob(plan, decode=None, family=family)
            sample(patch_unet(unet, jobs[block], {}, capture_block=block, family=family))
    finally:
        forge.unload(unet)
    alone, averaged = jobs[0], jobs[1]
    assert alone.failure is None and averaged.failure is None, (alone.failure, averaged.failure)
    assert [kind for kind, *_ in averaged.handed] == ["block", "capture"] and averaged.capture_count == 1
    (_, q0, k0), ((_, qb, kb), (_, q1, k1)) = alone.handed[0], averaged.handed
    assert torch.equal(qb, q0) and torch.equal(kb, k0)  # block 0 handed over what it hands as the capture block
    for b in range(2):
        maps = [joint_score_maps(q[b], k[b], WORDS[b], averaged.grid, NO_VOTE) for q, k in ((q1, k1), (q0, k0))]
        owner = torch.stack(maps).mean(dim=0).argmax(dim=0)
        expected = torch.stack([(owner == subject).float() for subject in range(2)])
        assert torch.equal(averaged.masks[b], expected), (name, b)
