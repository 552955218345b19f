"""The model-family seam without any host (lib_freefuse/families) and the job's SDXL path fed a fake sequence of
model calls: which tokens each layer sees, the grids, the capture of a cross-attention block, masks per level."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lib_freefuse.core import MaskConfig, extract_cross_masks
from lib_freefuse.families import FLUX1, KNOWN, SDXL_FAMILY, detect, unsupported
from lib_freefuse.forge.job import FreeFuseJob, JobPlan

pytestmark = pytest.mark.core


class BasicTransformerBlock(torch.nn.Module):
    """Named as the hosts' class: the SDXL family finds its capture sites by this class name."""


def tiny_unet():
    """An SDXL-shaped module tree (input, middle, output blocks and the ADM label embedding)."""
    model = torch.nn.Module()
    model.label_emb = torch.nn.Linear(2, 2)
    for part, count in (("input_blocks", 2), ("middle_block", 1), ("output_blocks", 2)):
        blocks = torch.nn.ModuleList()
        for _ in range(count):
            transformer = torch.nn.Module()
            transformer.transformer_blocks = torch.nn.ModuleList([BasicTransformerBlock(), BasicTransformerBlock()])
            blocks.append(torch.nn.ModuleList([torch.nn.Identity(), transformer]))
        setattr(model, part, blocks)
    return model


def test_families_are_told_apart_by_structure():
    flux = SimpleNamespace(double_blocks=[0] * 19, single_blocks=[0] * 38)
    sd15 = SimpleNamespace(input_blocks=[], middle_block=[], output_blocks=[])  # no ADM embedding
    assert detect(flux) is FLUX1 and detect(tiny_unet()) is SDXL_FAMILY
    assert detect(sd15) is None and detect(None) is None
    assert unsupported(sd15) == (
        "the model (SimpleNamespace) is none of FLUX.1, SDXL, Chroma, FLUX.2 Klein, Qwen-Image, Z-Image"
    )
    assert [f.name for f in KNOWN] == ["FLUX.1", "SDXL", "Chroma", "FLUX.2 Klein", "Qwen-Image", "Z-Image"]


@pytest.mark.parametrize(
    ("module", "stream", "modulation", "parent"),
    [
        ("double_blocks.3.img_attn.qkv", "image", False, None),
        ("double_blocks.3.txt_mlp.2", "text", False, None),
        ("single_blocks.0.linear1", "joint", False, None),
        ("double_blocks.3.img_mod.lin", "image", True, "double_blocks.3.img_mod"),
        ("single_blocks.2.modulation.lin", "joint", True, "single_blocks.2.modulation"),
        ("time_in.in_layer", "vector", False, None),
    ],
)
def test_flux_roles(module, stream, modulation, parent):
    role = FLUX1.layer_role(module)
    assert (role.stream, role.modulation, role.parent, role.cross_kv) == (stream, modulation, parent, False)


@pytest.mark.parametrize(
    ("module", "stream", "cross_kv"),
    [
        ("middle_block.1.transformer_blocks.9.attn2.to_k", "text", True),
        ("output_blocks.4.1.transformer_blocks.0.attn2.to_v", "text", True),
        ("output_blocks.4.1.transformer_blocks.0.attn2.to_q", "image", False),
        ("input_blocks.4.1.transformer_blocks.1.attn1.to_out.0", "image", False),
        ("input_blocks.4.1.proj_in", "image", False),
        ("input_blocks.1.0.in_layers.2", "image", False),
        ("input_blocks.0.0", "image", False),
        ("out.2", "image", False),
        ("input_blocks.1.0.emb_layers.1", "vector", False),
        ("time_embed.0", "vector", False),
        ("label_emb.0.2", "vector", False),
    ],
)
def test_sdxl_roles(module, stream, cross_kv):
    role = SDXL_FAMILY.layer_role(module)
    assert (role.stream, role.cross_kv) == (stream, cross_kv)
    if cross_kv:
        assert role.parent == module.rsplit(".", 1)[0]


def test_grids_and_capture_sites():
    assert FLUX1.mask_grid((25, 32)) == (13, 16) and FLUX1.token_grids((25, 32)) == [(13, 16)]
    assert SDXL_FAMILY.mask_grid((25, 32)) == (25, 32)
    assert SDXL_FAMILY.token_grids((25, 32))[:3] == [(25, 32), (13, 16), (7, 8)]  # stride-2 convs: ceil(side / 2)
    model = tiny_unet()
    sites = SDXL_FAMILY.capture_sites(model)
    assert len(sites) == 10 and sites[4] == "middle_block.0.1.transformer_blocks.0"
    assert SDXL_FAMILY.default_capture_site(model) == 5  # the middle block's last transformer block
    assert FLUX1.default_capture_site(SimpleNamespace(double_blocks=[0] * 3)) == 2


def sdxl_job(capture_step: int = 0, **fields) -> FreeFuseJob:
    plan = JobPlan(
        word_positions=(((1, 2), (5,)),),
        text_length=77,
        capture_step=capture_step,
        mask_config=MaskConfig(superpixel_vote=False),
        **fields,
    )
    return FreeFuseJob(plan, decode=None, family=SDXL_FAMILY)


def test_the_job_makes_sdxl_masks_on_the_latent_grid_from_a_cross_attention_capture():
    """A CFG call (uncond, cond) of one image: the cond rows of the capture make the masks (extract_cross_masks of
    them, returned on the latent grid); every level and convolution then gets them at its own size."""
    g = torch.Generator().manual_seed(0)
    job = sdxl_job()
    latent = torch.zeros(2, 4, 12, 16)
    job.begin_call(latent, torch.tensor([5.0, 5.0]), [1, 0], 77)
    assert job.capturing
    image_q, text_k = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 77, 8, generator=g)
    self_q, self_k = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)  # 3x4: level 2
    job.store_cross_attention(image_q, text_k, self_q, self_k)
    job.end_call(torch.zeros(2, 4, 12, 16))
    assert job.failure is None and job.capture_count == 1
    expected = extract_cross_masks(
        image_q[1], text_k[1], self_q[1], self_k[1], [[1, 2], [5]], (3, 4), None, job.plan.mask_config, (12, 16)
    )
    torch.testing.assert_close(job.masks[0], expected)
    job.begin_call(latent, torch.tensor([1.0, 1.0]), [1, 0], 77)
    for tokens, grid in ((192, (12, 16)), (48, (6, 8)), (12, (3, 4))):
        masks = job.masks_for("image", torch.zeros(2, tokens, 8))
        assert tuple(masks.shape) == (2, tokens, 2)
        assert torch.equal(masks[0], masks[1])  # image masks for uncond and cond alike
        resized = torch.nn.functional.interpolate(job.masks, size=grid, mode="nearest-exact")
        torch.testing.assert_close(masks[1], resized[0].flatten(1).T)
    spatial = job.spatial_masks(torch.zeros(2, 32, 6, 8))
    assert tuple(spatial.shape) == (2, 2, 6, 8)
    text = job.masks_for("text", torch.zeros(2, 77, 8))
    assert text[0].min() == 1 and text[1, 1, 1] == 0 and text[1, 5, 0] == 0  # uncond: all; cond: not others' words
    assert job.failure is None
    job.masks_for("image", torch.zeros(2, 50, 8))  # no level has 50 tokens: named once, unmasked from then on
    assert job.failure == "a image layer saw 50 tokens, the masks have 192"


def test_before_masks_sdxl_layers_get_every_subject_or_none():
    job = sdxl_job(capture_step=5)
    job.begin_call(torch.zeros(1, 4, 12, 16), torch.tensor([5.0]), [0], 77)
    assert torch.equal(job.spatial_masks(torch.zeros(1, 8, 6, 8)), torch.ones(1, 2, 1, 1))
    assert torch.equal(job.masks_for("image", torch.zeros(1, 48, 8)), torch.ones(1, 48, 2))
    off = sdxl_job(capture_step=5, pre_mask="off")
    off.begin_call(torch.zeros(1, 4, 12, 16), torch.tensor([5.0]), [0], 77)
    assert off.spatial_masks(torch.zeros(1, 8, 6, 8)) is None and off.masks_for("image", torch.zeros(1, 48, 8)) is None


def test_a_capture_whose_tokens_form_no_grid_is_refused():
    job = sdxl_job()
    job.begin_call(torch.zeros(1, 4, 12, 16), torch.tensor([5.0]), [0], 77)
    q = torch.zeros(1, 2, 10, 8)
    with pytest.raises(ValueError, match="10 image tokens form no grid"):
        job.store_cross_attention(q, torch.zeros(1, 2, 77, 8), q, q)


def test_only_t5_families_name_an_end_of_text_token_for_the_background():
    """Background "tokens" reads T5's </s> (FLUX.1, Chroma); the others' contexts (CLIP chunks, Qwen chat templates)
    have none that means "the rest of the picture", so the hosts fall back to the threshold with a warning."""
    assert {f.name for f in KNOWN if f.end_of_text} == {"FLUX.1", "Chroma"}
