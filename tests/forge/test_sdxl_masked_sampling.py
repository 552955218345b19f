"""SDXL through the whole FreeFuse path with the host's own UNet classes (tier "forge"): the capture of a cross-
attention block against a recomputation, masked linear, convolution and cross-attention layers against the host's
merged LoRAs, and no state left behind."""

from __future__ import annotations

import pytest
import sdxl_env
import torch

from lib_freefuse.core import MaskConfig, extract_cross_masks
from lib_freefuse.families import SDXL_FAMILY, detect
from lib_freefuse.forge.host import patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.forge.lora_layers import subject_deltas

LATENT = (24, 32)  # UNet levels 24x32, 12x16, 6x8
RANK = 4
BLOCK = "middle_block.1.transformer_blocks"
TOKEN_LAYERS = {  # kohya (ldm-style) name -> (out, in)
    "input_blocks_3_1_proj_in": (64, 64),
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q": (64, 64),
    "input_blocks_3_1_transformer_blocks_0_attn1_to_v": (64, 64),
    "input_blocks_3_1_transformer_blocks_0_attn2_to_q": (64, 64),
    "input_blocks_3_1_transformer_blocks_0_attn2_to_k": (64, 48),
    "input_blocks_3_1_transformer_blocks_0_attn2_to_v": (64, 48),
    "middle_block_1_transformer_blocks_1_attn2_to_k": (64, 48),
    "middle_block_1_transformer_blocks_1_attn2_to_v": (64, 48),
    "middle_block_1_transformer_blocks_1_attn2_to_out_0": (64, 64),
    "middle_block_1_transformer_blocks_0_ff_net_0_proj": (512, 64),
    "output_blocks_2_1_transformer_blocks_0_attn2_to_v": (64, 48),
    "output_blocks_2_1_transformer_blocks_0_ff_net_2": (64, 256),
    "output_blocks_2_1_proj_out": (64, 64),
}
CONV_LAYERS = {  # LoCon: (out, in, kernel)
    "input_blocks_0_0": (32, 4, 3),
    "input_blocks_1_0_in_layers_2": (32, 32, 3),
    "input_blocks_2_0_op": (32, 32, 3),
    "input_blocks_3_0_skip_connection": (64, 32, 1),
    "middle_block_2_out_layers_3": (64, 64, 3),
    "output_blocks_1_2_conv": (64, 64, 3),
    "out_2": (4, 32, 3),
}
VECTOR_LAYERS = {"time_embed_0": (128, 32), "label_emb_0_0": (128, 24), "input_blocks_5_0_emb_layers_1": (64, 128)}


def lora_sd(seed: int, vectors: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA with LoCon convolutions; `vectors` adds layers with one value per image."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    layers = {**TOKEN_LAYERS, **(VECTOR_LAYERS if vectors else {})}
    for name, (out_f, in_f) in layers.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = 0.3 * torch.randn(out_f, RANK, generator=g)
        sd[f"lora_unet_{name}.lora_down.weight"] = 0.3 * torch.randn(RANK, in_f, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(RANK))
    for name, (out_c, in_c, kernel) in CONV_LAYERS.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = 0.3 * torch.randn(out_c, RANK, 1, 1, generator=g)
        sd[f"lora_unet_{name}.lora_down.weight"] = 0.1 * torch.randn(RANK, in_c, kernel, kernel, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(RANK))
    return sd


@pytest.fixture
def sdxl_unet(forge):
    unet = sdxl_env.make_sdxl_patcher(forge, sdxl_env.make_tiny_sdxl(forge))
    yield unet
    forge.unload(unet)


def with_loras(forge, unet, sds: dict[str, dict], strength: float = 0.8):
    merged, _, unmatched = forge.with_loras(unet, sds, strength)
    assert not unmatched
    return merged


def freefuse_unet(forge, merged_unet, names, masks, modulation="per_token", **plan_fields):
    """A FreeFuse clone of a patcher with the subject LoRAs merged, with (B_img, L, h, w) masks from the start."""
    params = dict(merged_unet.model.named_parameters())
    host = forge.host_adapter()
    deltas: dict[str, list] = {}
    merged = []
    for index, name in enumerate(names):
        patches = forge.merged_patches(merged_unet, str(forge.lora_dir() / name))
        merged.append(patches)
        found, notes = subject_deltas(patches, lambda k: params[k], host.merge)
        assert notes == []  # every layer low-rank, the convolutions too
        for delta in found:
            deltas.setdefault(delta.module, []).append((index, delta))
    images = 1 if masks is None else masks.shape[0]
    fields = {
        "word_positions": tuple(((),) * len(names) for _ in range(images)),
        "text_length": sdxl_env.TEXT_TOKENS,
        "capture_step": 10**6,
        "modulation": modulation,
        "initial_masks": masks,
        **plan_fields,
    }
    job = FreeFuseJob(JobPlan(**fields), decode=forge.decode, family=SDXL_FAMILY)
    site = SDXL_FAMILY.default_capture_site(merged_unet.model.diffusion_model)
    return patch_unet(merged_unet, job, deltas, site, merged=merged), job


def test_the_tiny_unet_is_sdxl_and_its_layers_have_roles(sdxl_unet):
    model = sdxl_unet.model.diffusion_model
    assert detect(model) is SDXL_FAMILY
    sites = SDXL_FAMILY.capture_sites(model)
    assert sites[SDXL_FAMILY.default_capture_site(model)] == f"{BLOCK}.1"
    assert len(sites) == 1 + 2 + 2 + 2 + 2 + 2  # input 1 + 2, middle 2, output 2 + 2 + 2 (the host pops depths)
    role = SDXL_FAMILY.layer_role
    assert role(f"{BLOCK}.1.attn2.to_k").cross_kv and role(f"{BLOCK}.1.attn2.to_k").parent == f"{BLOCK}.1.attn2"
    assert role(f"{BLOCK}.1.attn2.to_q").stream == "image" and role("input_blocks.2.0.op").stream == "image"
    assert role("input_blocks.5.0.emb_layers.1").stream == "vector" and role("label_emb.0.0").stream == "vector"


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize(("modulation", "vectors"), [("per_token", False), ("global", True)])
def test_all_ones_masks_equal_the_hosts_merged_loras(forge, sdxl_unet, cfg_scale, modulation, vectors):
    """Linear, LoCon convolution, cross-attention key/value and (with global modulation) per-image layers: masks of
    all ones give what the host's merged LoRAs give, through sampling, with CFG and a negative prompt too."""
    sds = {"xa.safetensors": lora_sd(1, vectors), "xb.safetensors": lora_sd(2, vectors)}
    merged = with_loras(forge, sdxl_unet, sds)
    expected = sdxl_env.sample(forge, merged, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *LATENT), modulation)
    got = sdxl_env.sample(forge, unet, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    plain = sdxl_env.sample(forge, sdxl_unet, steps=3, cfg_scale=cfg_scale, latent_hw=LATENT)
    assert (expected - plain).abs().max() > 1e-2  # the LoRAs do change the image


def test_zero_masks_equal_no_lora(forge, sdxl_unet):
    sds = {"xa.safetensors": lora_sd(1, vectors=True), "xb.safetensors": lora_sd(2, vectors=True)}
    unet, job = freefuse_unet(forge, with_loras(forge, sdxl_unet, sds), list(sds), torch.zeros(1, 2, *LATENT))
    got = sdxl_env.sample(forge, unet, steps=3, cfg_scale=3.0, latent_hw=LATENT)
    assert job.failure is None
    expected = sdxl_env.sample(forge, sdxl_unet, steps=3, cfg_scale=3.0, latent_hw=LATENT)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_each_image_gets_its_own_subject_at_every_resolution(forge, sdxl_unet):
    """A batch of two with CFG: image 0 wholly subject A, image 1 wholly B. Each equals a run with only its own
    LoRA merged: the masks reach every level (latent, 1/2, 1/4), the convolutions and the cross-attention's keys."""
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    masks = torch.zeros(2, 2, *LATENT)
    masks[0, 0] = 1
    masks[1, 1] = 1
    unet, job = freefuse_unet(forge, with_loras(forge, sdxl_unet, sds), list(sds), masks)
    got = sdxl_env.sample(forge, unet, steps=3, batch=2, cfg_scale=3.0, latent_hw=LATENT)
    assert job.failure is None
    for index, name in enumerate(sds):
        only = with_loras(forge, sdxl_unet, {name: sds[name]})
        alone = sdxl_env.sample(forge, only, steps=3, batch=2, cfg_scale=3.0, latent_hw=LATENT)
        torch.testing.assert_close(got[index], alone[index], atol=2e-4, rtol=1e-4)


def test_a_split_image_differs_from_either_subject_alone(forge, sdxl_unet):
    """Left half A, right half B: each half is nearer its own subject's merged run than the other's."""
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    masks = torch.zeros(1, 2, *LATENT)
    masks[0, 0, :, :16] = 1
    masks[0, 1, :, 16:] = 1
    unet, _ = freefuse_unet(forge, with_loras(forge, sdxl_unet, sds), list(sds), masks)
    got = sdxl_env.sample(forge, unet, steps=3, latent_hw=LATENT)
    runs = [sdxl_env.sample(forge, with_loras(forge, sdxl_unet, {n: sds[n]}), steps=3, latent_hw=LATENT) for n in sds]
    left, right = (
        (slice(None), slice(None), slice(None), slice(2, 14)),
        (slice(None), slice(None), slice(None), slice(18, 30)),
    )
    assert (got - runs[0])[left].abs().mean() < (got - runs[1])[left].abs().mean()
    assert (got - runs[1])[right].abs().mean() < (got - runs[0])[right].abs().mean()


def test_captured_attention_equals_a_recomputation(forge, sdxl_unet):
    """The capture block's self-attention q, k and cross-attention image queries and text keys, as handed to the
    job in the capture call (CFG 3, cond and uncond in one batch), equal the block's projections recomputed from
    its inputs; the masks are extract_cross_masks of them, on the latent grid."""
    import backend.nn.unet as unet_module

    original_attention = unet_module.attention_function
    model = sdxl_unet.model.diffusion_model
    block = model.middle_block[1].transformer_blocks[1]
    inputs = {"attn1": [], "attn2": []}
    hooks = [
        block.attn1.register_forward_hook(lambda m, a, kw, out: inputs["attn1"].append(a[0]), with_kwargs=True),
        block.attn2.register_forward_hook(
            lambda m, a, kw, out: inputs["attn2"].append((a[0], kw["context"])), with_kwargs=True
        ),
    ]
    config = MaskConfig(superpixel_vote=False)
    plan = JobPlan(word_positions=(((1, 2), (5,)),), text_length=77, capture_step=1, mask_config=config)
    job = FreeFuseJob(plan, decode=forge.decode, family=SDXL_FAMILY)
    stored = []
    store = job.store_cross_attention

    def spy(*tensors):
        stored.append((tensors, len(inputs["attn1"]) - 1))
        store(*tensors)

    job.store_cross_attention = spy
    try:
        site = SDXL_FAMILY.default_capture_site(model)
        sdxl_env.sample(forge, patch_unet(sdxl_unet, job, {}, site), steps=3, cfg_scale=3.0, latent_hw=LATENT)
    finally:
        for hook in hooks:
            hook.remove()
    assert job.failure is None and job.capture_count == 1 and len(stored) == 1
    (image_q, text_k, self_q, self_k), call = stored[0]
    n1 = inputs["attn1"][call]
    n2, context = inputs["attn2"][call]
    assert n1.shape[0] == 2  # uncond and cond in one batch; the cond rows were stored

    def heads(t, module):
        return t.view(t.shape[0], t.shape[1], module.heads, -1).transpose(1, 2)

    with torch.no_grad():
        expected = [
            heads(block.attn2.to_q(n2), block.attn2),
            heads(block.attn2.to_k(context), block.attn2),
            heads(block.attn1.to_q(n1), block.attn1),
            heads(block.attn1.to_k(n1), block.attn1),
        ]
    for got, want in zip((image_q, text_k, self_q, self_k), expected, strict=True):
        torch.testing.assert_close(got, want)
    # the job makes the masks from the cond chunk alone: the second of the batch in this call (uncond, cond)
    made = extract_cross_masks(*(t[1] for t in expected), [[1, 2], [5]], (6, 8), None, config, LATENT)
    torch.testing.assert_close(job.masks[0], made)
    assert tuple(job.masks.shape) == (1, 2, *LATENT) and 0 < float(job.masks[0, 0].mean()) < 1
    assert unet_module.attention_function is original_attention  # the recording swap was undone


def test_no_state_is_left_after_a_freefuse_job(forge, sdxl_unet):
    """A FreeFuse job with capture and masks, then the same job without FreeFuse: bit-identical to before, the
    attention function put back, no patch left on the model."""
    import backend.nn.unet as unet_module

    original_attention = unet_module.attention_function
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    merged = with_loras(forge, sdxl_unet, sds)
    before = sdxl_env.sample(forge, merged, steps=3, cfg_scale=3.0, latent_hw=LATENT, seed=4)
    words = {"word_positions": (((1, 2), (5,)),), "capture_step": 1, "mask_config": MaskConfig()}
    unet, job = freefuse_unet(forge, merged, list(sds), None, **words)
    sdxl_env.sample(forge, unet, steps=3, cfg_scale=3.0, latent_hw=LATENT, seed=4)
    assert job.failure is None and job.masks is not None and job.capture_count == 1
    assert unet_module.attention_function is original_attention
    after = sdxl_env.sample(forge, merged, steps=3, cfg_scale=3.0, latent_hw=LATENT, seed=4)
    assert torch.equal(after, before)
    assert merged.object_patches == {}


def test_cross_attention_routing_equals_a_token_by_token_recomputation(forge, sdxl_unet):
    """The masked attn2 of a block whose to_k/to_v both LoRAs change, in a CFG call (uncond, cond) of one image with
    three kinds of token (subject A, subject B, neither): each token's output equals softmax(q_n k_n^T) v_n with
    k_n = k + sum_l m[n, l] * dk_l (dk_l zeroed on the other subject's words in the cond text), then to_out."""
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    masks = torch.zeros(1, 2, *LATENT)
    masks[0, 0, :, :10] = 1
    masks[0, 1, :, 20:] = 1
    words = {"word_positions": (((1, 2), (5,)),)}
    merged = with_loras(forge, sdxl_unet, sds)
    unet, job = freefuse_unet(forge, merged, list(sds), masks, **words)
    name = f"{BLOCK}.1.attn2"
    patch = unet.object_patches[f"diffusion_model.{name}.forward"]
    attn2 = sdxl_unet.model.diffusion_model.middle_block[1].transformer_blocks[1].attn2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 48, 64, generator=g)  # the middle block's 6x8 tokens, uncond then cond
    context = torch.randn(2, 77, 48, generator=g)
    job.begin_call(torch.zeros(2, 4, *LATENT), torch.tensor([5.0, 5.0]), [1, 0], 77)
    with torch.no_grad():
        got = patch(x, context=context)
        params = dict(merged.model.named_parameters())
        deltas = {
            part: [
                d
                for n in sds
                for d in subject_deltas(forge.merged_patches(merged, str(forge.lora_dir() / n)), params.get, None)[0]
                if d.module == f"{name}.{part}"
            ]
            for part in ("to_k", "to_v")
        }
        text = torch.ones(2, 77, 2)
        text[1, [1, 2], 1] = 0  # cond: subject B's change off A's words, A's off B's
        text[1, 5, 0] = 0
        image = torch.nn.functional.interpolate(masks, size=(6, 8), mode="nearest-exact").flatten(2).transpose(1, 2)
        heads, dim = attn2.heads, 64 // attn2.heads
        q = attn2.to_q(x)
        expected = torch.empty_like(q)
        for b in range(2):
            k0, v0 = attn2.to_k(context[b]), attn2.to_v(context[b])
            dk = [
                d.scale * (context[b] @ d.down.T @ d.up.T) * text[b, :, i : i + 1] for i, d in enumerate(deltas["to_k"])
            ]
            dv = [
                d.scale * (context[b] @ d.down.T @ d.up.T) * text[b, :, i : i + 1] for i, d in enumerate(deltas["to_v"])
            ]
            for n in range(48):
                k_n = k0 + sum(image[0, n, i] * dk[i] for i in range(2))
                v_n = v0 + sum(image[0, n, i] * dv[i] for i in range(2))
                for h in range(heads):
                    cols = slice(h * dim, (h + 1) * dim)
                    weights = torch.softmax(q[b, n, cols] @ k_n[:, cols].T / dim**0.5, dim=-1)
                    expected[b, n, cols] = weights @ v_n[:, cols]
        expected = attn2.to_out(expected)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    plain = attn2(x, context=context)
    assert (got - plain).abs().max() > 1e-3
