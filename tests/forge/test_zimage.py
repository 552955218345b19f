"""Z-Image on Forge Neo (tier "forge"): a tiny random NextDiT with Z-Image's modulation from Neo's own class, its LoRA
key map and merge, its sampling path and its Qwen3 text engine. Classic Forge has no Z-Image: every test skips
there."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import zimage_env

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.core import MaskConfig
from lib_freefuse.families import FLUX1, Z_IMAGE, detect
from lib_freefuse.forge import zimage as forge_zimage
from lib_freefuse.forge.host import diffusion_model, patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.forge.lora_layers import subject_deltas
from lib_freefuse.forge.processing import RunState, _subject_words, start_run

D, FFN, HEADS = 256, 704, 4  # model width, feed-forward width (8/3 * 256 rounded up to 32), heads of 64
LATENT = (12, 16)  # a 6x8 token grid: 48 image tokens, padded to 64
GRID = (6, 8)
NO_CLASSIC = "classic Forge has no Z-Image (Forge Neo's backend/nn/lumina.py)"


@pytest.fixture
def zimage_unet(forge):
    if forge.HOST != "neo":
        pytest.skip(NO_CLASSIC)
    unet = zimage_env.make_zimage_patcher(zimage_env.make_tiny_zimage())
    yield unet
    forge.unload(unet)


JOINT = {
    "layers_0_attention_qkv": (3 * D, D),
    "layers_1_feed_forward_w1": (FFN, D),
    "layers_2_feed_forward_w2": (D, FFN),
    "final_layer_linear": (64, D),
}
TEXT = {"context_refiner_0_attention_qkv": (3 * D, D), "context_refiner_0_feed_forward_w3": (FFN, D)}
TEXT_EMBEDDER = {"cap_embedder_1": (D, 64)}
IMAGE = {
    "noise_refiner_0_attention_out": (D, D),
    "noise_refiner_0_feed_forward_w1": (FFN, D),
    "x_embedder": (D, 64),
}
VECTOR = {"t_embedder_mlp_2": (256, 256)}  # one value per image: the vector rule
IMAGE_MODULATION = {"noise_refiner_0_adaLN_modulation_0": (4 * D, 256)}  # per token, over the image's tokens
MODULATION = {  # per token, over the joint sequence (and the image's)
    "layers_1_adaLN_modulation_0": (4 * D, 256),
    "final_layer_adaLN_modulation_1": (D, 256),
    **IMAGE_MODULATION,
}


def lora_sd(seed: int, *groups: dict, diffusers: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA in the styles Neo's key map takes for Z-Image: kohya (lora_unet_*) for the given layer groups, and
    diffusers (transformer.*: layer 1's to_q, a slice of its fused qkv; layer 2's to_out.0)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in {k: v for group in groups for k, v in group.items()}.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = 0.3 * torch.randn(out_f, 4, generator=g)
        sd[f"lora_unet_{name}.lora_down.weight"] = 0.3 * torch.randn(4, in_f, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    if diffusers:
        for key in ("transformer.layers.1.attention.to_q", "transformer.layers.2.attention.to_out.0"):
            sd[f"{key}.lora_A.weight"] = 0.3 * torch.randn(4, D, generator=g)
            sd[f"{key}.lora_B.weight"] = 0.3 * torch.randn(D, 4, generator=g)
    return sd


def with_loras(forge, unet, sds: dict[str, dict], strength: float = 0.9):
    merged, _, unmatched = forge.with_loras(unet, sds, strength)
    assert not unmatched
    return merged


def freefuse_unet(forge, merged_unet, names, masks, modulation="per_token", text_loras="all", capture_step=10**6):
    """A FreeFuse clone of a patcher with the subject LoRAs merged: they come out of the merge and act masked, with
    the given (B_img, L, h, w) masks from the first step (no words)."""
    params = dict(merged_unet.model.named_parameters())
    host = forge.host_adapter()
    deltas: dict[str, list] = {}
    merged = []
    for index, name in enumerate(names):
        patches = forge.merged_patches(merged_unet, str(forge.lora_dir() / name))
        merged.append(patches)
        found, _ = subject_deltas(patches, lambda k: params[k], host.merge)
        for delta in found:
            deltas.setdefault(delta.module, []).append((index, delta))
    plan = JobPlan(
        word_positions=tuple(((),) * len(names) for _ in range(masks.shape[0])),
        text_length=8,
        capture_step=capture_step,
        modulation=modulation,
        text_loras=text_loras,
        initial_masks=masks,
    )
    job = FreeFuseJob(plan, decode=None, family=Z_IMAGE)
    return patch_unet(merged_unet, job, deltas, capture_block=0, merged=merged), job


def test_z_image_is_detected_by_its_structure_and_lumina2_is_not(forge, zimage_unet):
    from backend.nn.lumina import NextDiT

    model = diffusion_model(zimage_unet)
    assert detect(model) is Z_IMAGE
    assert detect(forge.make_tiny_flux()) is FLUX1
    lumina2 = {**zimage_env.ZIMAGE_CONFIG, "z_image_modulation": False, "time_scale": 1.0}
    assert detect(NextDiT(**lumina2)) is None  # Lumina 2: the same NextDiT, a SiLU before its adaLN linears
    assert Z_IMAGE.capture_sites(model) == ["layers.0", "layers.1", "layers.2"]
    assert Z_IMAGE.default_capture_site(model) == 2  # the authors' layers.18, the last where the model has fewer
    found = {name for name, _ in model.named_modules()}
    for group, stream in ((JOINT, "joint"), (TEXT, "text"), (TEXT_EMBEDDER, "text"), (IMAGE, "image")):
        for name in group:
            module = next(m for m in found if m.replace(".", "_") == name)
            assert Z_IMAGE.layer_role(module).stream == stream, module
    assert Z_IMAGE.layer_role("t_embedder.mlp.2").stream == "vector"
    for module, stream in (("layers.1.adaLN_modulation.0", "joint"), ("noise_refiner.0.adaLN_modulation.0", "image")):
        role = Z_IMAGE.layer_role(module)
        assert role.modulation and role.stream == stream and role.parent == module.rsplit(".", 2)[0]
    assert Z_IMAGE.layer_role("final_layer.adaLN_modulation.1").parent == "final_layer"
    assert {"layers.1", "noise_refiner.0", "final_layer"} <= found  # the parents the per-token patches replace


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_all_ones_masks_equal_neos_merged_loras(forge, zimage_unet, cfg_scale):
    """Joint, caption, image and embedder layers (kohya and diffusers keys, a slice of a fused qkv) and the adaLN
    Linears (per token): all-ones masks from the first step give Neo's merged image, with pad tokens on both parts
    and, at CFG 3, a negative prompt of another length (cond and uncond contexts brought to a common length by
    repetition)."""
    sds = {
        "za.safetensors": lora_sd(1, JOINT, TEXT, IMAGE, MODULATION),
        "zb.safetensors": lora_sd(2, JOINT, TEXT_EMBEDDER, IMAGE),
    }
    merged = with_loras(forge, zimage_unet, sds)
    run = dict(steps=3, cfg_scale=cfg_scale, latent_hw=LATENT, tokens=8, uncond_tokens=5)
    expected = zimage_env.sample(forge, merged, **run)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID))
    got = zimage_env.sample(forge, unet, **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    plain = zimage_env.sample(forge, zimage_unet, **run)
    assert (expected - plain).abs().max() > 1e-2  # the LoRAs do change the image


def test_a_checkpoint_without_pad_tokens_works_alike(forge, zimage_unet):
    """A Z-Image checkpoint without cap_pad_token gets no pad_tokens_multiple from Neo's detection: no pad tokens,
    and all-ones masks still give Neo's merged image (CFG 3, a negative prompt of another length)."""
    unet = zimage_env.make_zimage_patcher(zimage_env.make_tiny_zimage(pad_tokens_multiple=None))
    try:
        sds = {"np_a.safetensors": lora_sd(11, JOINT, TEXT, IMAGE), "np_b.safetensors": lora_sd(12, JOINT, IMAGE)}
        merged = with_loras(forge, unet, sds)
        run = dict(steps=3, cfg_scale=3.0, latent_hw=LATENT, tokens=8, uncond_tokens=5)
        expected = zimage_env.sample(forge, merged, **run)
        patched, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID))
        got = zimage_env.sample(forge, patched, **run)
        assert job.failure is None and not hasattr(diffusion_model(unet), "x_pad_token")
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    finally:
        forge.unload(unet)


def test_timestep_embedder_deltas_follow_the_vector_rule(forge, zimage_unet):
    """The timestep embedder gives one vector per image (every block's adaLN input): with modulation "global" its
    deltas act on the whole image (all-ones masks = Neo's merge, the adaLN Linears' deltas too); with "per_token" they
    stop once masks exist while the adaLN Linears' act per token (all-ones masks = the merge of the same LoRAs
    without the embedder's layers)."""
    sds = {"va.safetensors": lora_sd(3, JOINT, VECTOR, MODULATION), "vb.safetensors": lora_sd(4, IMAGE, VECTOR)}
    merged = with_loras(forge, zimage_unet, sds)
    run = dict(steps=3, latent_hw=LATENT)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), "global")
    got = zimage_env.sample(forge, unet, **run)
    torch.testing.assert_close(got, zimage_env.sample(forge, merged, **run), atol=2e-4, rtol=1e-4)
    assert job.failure is None

    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), "per_token")
    got = zimage_env.sample(forge, unet, **run)
    without = {f"novec_{n}": {k: v for k, v in sd.items() if not k.startswith("lora_unet_t_")} for n, sd in sds.items()}
    expected = zimage_env.sample(forge, with_loras(forge, zimage_unet, without), **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (expected - zimage_env.sample(forge, merged, **run)).abs().max() > 1e-3  # those layers do matter


def test_adaln_deltas_act_per_token_by_subject(forge, zimage_unet):
    """LoRAs on the adaLN Linears alone (A: a joint layer's, the image refiner's and the final layer's; B: the image
    refiner's): A's mask over the whole image and B's empty give the merge of A alone. Each token's modulation
    carries its own subjects' deltas: image tokens and their pads A's, caption tokens (no words: every subject) and
    their pads A's, B's image-refiner delta reaching no token."""
    a = lora_sd(21, MODULATION, diffusers=False)
    b = lora_sd(22, IMAGE_MODULATION, diffusers=False)
    sds = {"ma.safetensors": a, "mb.safetensors": b}
    merged = with_loras(forge, zimage_unet, sds)
    run = dict(steps=3, latent_hw=LATENT)
    masks = torch.zeros(1, 2, *GRID)
    masks[:, 0] = 1
    unet, job = freefuse_unet(forge, merged, list(sds), masks)
    got = zimage_env.sample(forge, unet, **run)
    expected = zimage_env.sample(forge, with_loras(forge, zimage_unet, {"ma_alone.safetensors": a}), **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (expected - zimage_env.sample(forge, merged, **run)).abs().max() > 1e-3  # B's delta matters where it acts


class PerTokenJob:
    """Narrow stand-in for a FreeFuseJob in the middle of a model call with masks, modulation "per_token"."""

    def __init__(self, n_subjects: int):
        self.plan = SimpleNamespace(n_subjects=n_subjects)
        self.errors = []

    def modulation_masks(self, stream):
        return "per_token", None

    def call_cached(self, key, make):
        return make()

    def layer_failed(self, error):
        self.errors.append(error)


@dataclass
class FixedMasks:
    """Narrow stand-in for zimage.PaddedMasks: the same (B, T, L) masks for every input."""

    stream: str
    masks: torch.Tensor

    def __call__(self, x):
        return self.masks


def lora_delta(sd: dict, name: str, strength: float = 0.9) -> torch.Tensor:
    """A kohya LoRA's weight change from its file: strength * alpha / rank * up @ down."""
    up, down = sd[f"lora_unet_{name}.lora_up.weight"], sd[f"lora_unet_{name}.lora_down.weight"]
    return strength * float(sd[f"lora_unet_{name}.alpha"]) / down.shape[0] * up @ down


def test_per_token_adaln_equals_a_naive_per_token_computation(forge, zimage_unet):
    """A joint layer and the final layer with two subjects' adaLN LoRAs, patched as a job patches them, against a
    token-by-token computation from the LoRA files: token t's modulation (W + sum_l m_tl dW_l) h + b, then the
    block's equations (backend/nn/lumina.py) with each token's rows; masks hard, soft, shared and empty, other per
    image. Zero masks give the host's own forward, bit for bit."""
    from lib_freefuse.forge.zimage_adaln import PerTokenAdaLN

    sds = {
        "na.safetensors": lora_sd(31, MODULATION, diffusers=False),
        "nb.safetensors": lora_sd(32, MODULATION, diffusers=False),
    }
    merged = with_loras(forge, zimage_unet, sds)
    patched, _ = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID))
    model = diffusion_model(zimage_unet)  # never loaded with the LoRAs: its weights are the plain ones
    g = torch.Generator().manual_seed(5)
    tokens = 7
    x, c = torch.randn(2, tokens, D, generator=g), torch.randn(2, 256, generator=g)
    masks = torch.tensor([[1, 0], [0, 1], [0, 0], [0.3, 0.7], [1, 1], [0, 1], [1, 0]], dtype=torch.float32)
    masks = torch.stack([masks, masks.flip(0)])  # (2, T, 2): each image its own
    ids = torch.zeros(2, tokens, 3)
    ids[..., 0] = torch.arange(tokens) + 1.0
    freqs = model.rope_embedder(ids).movedim(1, 2)

    def rebuilt(parent: str, token_masks: torch.Tensor) -> PerTokenAdaLN:
        """The job's patch of `parent` with its own deltas, in a call whose joint masks are token_masks."""
        patch = patched.object_patches[f"diffusion_model.{parent}.forward"]
        assert isinstance(patch, PerTokenAdaLN)
        job, source = PerTokenJob(2), FixedMasks("joint", token_masks)
        return type(patch)(patch.owner, patch.original_forward, patch.lin_forward, patch.deltas, job, source)

    def modulation(linear, name, h):  # (B, T, out): token t's Linear with its subjects' mask-weighted deltas
        deltas = [lora_delta(sd, name) for sd in sds.values()]
        out = torch.empty(2, tokens, linear.weight.shape[0])
        for i in range(2):
            for t in range(tokens):
                weight = linear.weight + sum(masks[i, t, l] * deltas[l] for l in range(2))
                out[i, t] = weight @ h[i] + linear.bias
        return out

    with torch.no_grad():
        block = model.layers[1]
        got = rebuilt("layers.1", masks)(x, None, freqs, c, transformer_options={})
        rows = modulation(block.adaLN_modulation[0], "layers_1_adaLN_modulation_0", c)
        s_msa, g_msa, s_mlp, g_mlp = rows.chunk(4, dim=-1)  # (B, T, D) each, in the host's chunk order
        attended = block.attention(block.attention_norm1(x) * (1 + s_msa), None, freqs, transformer_options={})
        x1 = x + g_msa.tanh() * block.attention_norm2(attended)
        fed = block.feed_forward(block.ffn_norm1(x1) * (1 + s_mlp))
        expected = x1 + g_mlp.tanh() * block.ffn_norm2(fed)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

        final = model.final_layer
        got = rebuilt("final_layer", masks)(x, c)
        scale = modulation(final.adaLN_modulation[1], "final_layer_adaLN_modulation_1", F.silu(c))
        torch.testing.assert_close(got, final.linear(final.norm_final(x) * (1 + scale)), atol=1e-5, rtol=1e-5)

        zero = torch.zeros_like(masks)
        assert torch.equal(
            rebuilt("layers.1", zero)(x, None, freqs, c, transformer_options={}), block(x, None, freqs, c)
        )
        assert torch.equal(rebuilt("final_layer", zero)(x, c), final(x, c))


@pytest.mark.parametrize("text_loras", ["all", "none"])
def test_zero_masks_equal_no_lora(forge, zimage_unet, text_loras):
    """Zero masks: image layers and the image refiner's adaLN (their pad tokens included) and the vector layers
    (which stop once masks exist) give the image without LoRAs, at CFG 3; with text LoRAs "none", so do the joint
    and caption layers and the joint adaLN Linears (caption pads included), at CFG 1 (a negative prompt's text gets
    every LoRA: its prompt holds no subject's words)."""
    groups = (IMAGE, VECTOR, IMAGE_MODULATION)
    if text_loras == "none":
        groups += (JOINT, TEXT, TEXT_EMBEDDER, MODULATION)
    sds = {f"{text_loras}_za.safetensors": lora_sd(5, *groups), f"{text_loras}_zb.safetensors": lora_sd(6, IMAGE)}
    if text_loras == "all":
        sds = {n: {k: v for k, v in sd.items() if not k.startswith("transformer.")} for n, sd in sds.items()}
    merged = with_loras(forge, zimage_unet, sds)
    run = dict(steps=3, cfg_scale=3.0 if text_loras == "all" else 1.0, latent_hw=LATENT, uncond_tokens=5)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.zeros(1, 2, *GRID), text_loras=text_loras)
    got = zimage_env.sample(forge, unet, **run)
    assert job.failure is None
    torch.testing.assert_close(got, zimage_env.sample(forge, zimage_unet, **run), atol=2e-5, rtol=1e-5)


def test_pad_tokens_get_the_last_caption_tokens_and_the_images_share(forge, zimage_unet):
    """A joint layer's masks in one model call: caption rows (the text rule), caption pads = the caption's last row,
    image rows, image pads = each subject's share of the image; 8 + 24 caption and 48 + 16 image tokens."""
    masks = torch.zeros(1, 2, *GRID)
    masks[:, 0, :, :2], masks[:, 1, :, 2:] = 1, 1  # subject 0 covers a quarter of the image
    plan = JobPlan(word_positions=(((1, 2), (7,)),), text_length=8, capture_step=10**6, initial_masks=masks)
    job = FreeFuseJob(plan, decode=None, family=Z_IMAGE)
    layout = forge_zimage.TokenLayout(patch_size=2, multiple=32)
    layout.record(8, LATENT)
    job.begin_call(torch.zeros(2, 16, *LATENT), torch.ones(2), [1, 0], 8)
    got = forge_zimage.PaddedMasks(job, layout, "joint")(torch.zeros(2, 32 + 64, D))
    assert got.shape == (2, 96, 2)
    text = torch.ones(8, 2)
    text[[1, 2], 1], text[7, 0] = 0, 0  # each subject's LoRA off on the other's words
    image = masks.flatten(2).transpose(1, 2)[0]  # (48, 2)
    cond = torch.cat([text, text[-1:].expand(24, 2), image, torch.tensor([[0.25, 0.75]]).expand(16, 2)])
    uncond = torch.cat([torch.ones(32, 2), image, torch.tensor([[0.25, 0.75]]).expand(16, 2)])
    torch.testing.assert_close(got, torch.stack([uncond, cond]))
    image_only = forge_zimage.PaddedMasks(job, layout, "image")
    assert image_only(torch.zeros(2, 48, D)).shape[1] == 48 and image_only(torch.zeros(2, 64, D)).shape[1] == 64
    with pytest.raises(ValueError, match="layout"):
        image_only(torch.zeros(2, 50, D))


def z_image_rope(x, text, text_padded, grid_hw, axes_dim, theta=256.0):
    """Z-Image's RoPE from first principles on (B, H, T + N, D) rows without pads: caption token i at (i + 1, 0, 0),
    image token (r, c) at (Pc + 1, r, c); a complex rotation per axis."""
    h, w = grid_hw
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    caption = torch.stack([torch.arange(text) + 1.0, torch.zeros(text), torch.zeros(text)], -1)
    image = torch.stack([torch.full_like(rows, text_padded + 1), rows, cols], -1).reshape(-1, 3).double()
    ids = torch.cat([caption.double(), image])
    angles = torch.cat(
        [ids[:, i, None] / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for i, d in enumerate(axes_dim)],
        -1,
    )
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def manual_qk(layer, x, adaln):
    """q, k of a Z-Image joint layer from its weights: RMS norm, adaLN scale, fused qkv, QK RMS norm (no RoPE)."""
    rms = lambda t, w, eps: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    scale = F.linear(adaln, layer.adaLN_modulation[0].weight, layer.adaLN_modulation[0].bias)[:, :D]
    h = rms(x, layer.attention_norm1.weight, 1e-5) * (1 + scale[:, None])
    qkv = F.linear(h, layer.attention.qkv.weight).view(x.shape[0], x.shape[1], 3, HEADS, -1)
    eps = torch.finfo(torch.float32).eps
    q = rms(qkv[:, :, 0], layer.attention.q_norm.weight, eps).transpose(1, 2)
    k = rms(qkv[:, :, 1], layer.attention.k_norm.weight, eps).transpose(1, 2)
    return q, k  # (B, H, Pc + Pi, 64)


class SpyJob(FreeFuseJob):
    """A FreeFuseJob that keeps the q, k it was handed (the conditional rows it kept)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored = []

    def store_attention(self, q, k):
        super().store_attention(q, k)
        self.stored.append(tuple(t.clone() for t in self._captured))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_captured_qk_equal_the_layers_own(forge, zimage_unet, cfg_scale):
    """q, k handed to the job = a recomputation from the layer's weights and its adaLN input, RoPE from first
    principles, the pads dropped; at CFG 3 the prompt (5 tokens) is repeated to the negative prompt's 10 in the
    batched call."""
    model = diffusion_model(zimage_unet)
    layer_index, inputs = 1, []
    recorder = zimage_unet.clone()
    name = f"diffusion_model.layers.{layer_index}.forward"
    original = recorder.get_model_object(name)

    def record(x, x_mask, freqs_cis, adaln_input=None, **kwargs):
        inputs.append((x.clone(), x_mask, adaln_input.clone()))
        return original(x, x_mask, freqs_cis, adaln_input, **kwargs)

    recorder.add_object_patch(name, record)
    words = (((1, 2), (3,)), ((0,), (4,)))  # two images
    plan = JobPlan(word_positions=words, text_length=5, capture_step=1, mask_config=MaskConfig(superpixel_vote=False))
    job = SpyJob(plan, decode=None, family=Z_IMAGE)
    unet = patch_unet(recorder, job, {}, capture_block=layer_index)
    zimage_env.sample(
        forge, unet, steps=3, batch=2, cfg_scale=cfg_scale, latent_hw=(10, 14), tokens=5, uncond_tokens=10
    )

    assert len(job.stored) == 1 and job.failure is None and job.masks.shape == (2, 2, 5, 7)
    q, k = job.stored[0]
    x, mask, adaln = inputs[1]  # step 1: one batched call per step
    assert mask is None  # NextDiT's joint layers attend every token
    text = 10 if cfg_scale > 1 else 5
    assert x.shape[1] == 32 + 64  # caption and image (35 tokens) each padded to 32
    cond = slice(2, 4) if cfg_scale > 1 else slice(0, 2)
    with torch.no_grad():
        mq, mk = manual_qk(model.layers[layer_index], x[cond], adaln[cond])
    keep = torch.cat([torch.arange(text), torch.arange(32, 32 + 35)])
    axes = zimage_env.ZIMAGE_CONFIG["axes_dims"]
    assert q.shape == (2, HEADS, text + 35, 64)
    torch.testing.assert_close(q, z_image_rope(mq[:, :, keep], text, 32, (5, 7), axes), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, z_image_rope(mk[:, :, keep], text, 32, (5, 7), axes), atol=2e-5, rtol=1e-4)


def test_a_mask_that_hides_keys_refuses_the_capture_and_attention_is_unchanged(forge, zimage_unet):
    import backend.nn.lumina as lumina

    g = torch.Generator().manual_seed(0)
    layout = forge_zimage.TokenLayout(patch_size=2, multiple=1)
    layout.record(2, (2, 4))  # 2 caption + 2 image tokens
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    hides = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    hides[..., 3] = False
    for mask, stores in ((None, 1), (torch.ones(1, 1, 4, 4, dtype=torch.bool), 1), (hides, 0)):
        stored, errors = [], []
        expected = lumina.attention_function(q, k, v, 2, mask, skip_reshape=True)
        with forge_zimage._capturing_attention(lambda a, b, into=stored: into.append(a), errors.append, layout):
            got = lumina.attention_function(q, k, v, 2, mask, skip_reshape=True)
        torch.testing.assert_close(got, expected)
        assert len(stored) == stores and len(errors) == 1 - stores
    assert "hides keys" in str(errors[0])
    assert lumina.attention_function.__module__ == "backend.attention"


def test_no_state_left_after_a_freefuse_job(forge, zimage_unet):
    import backend.nn.lumina as lumina

    sds = {"sa.safetensors": lora_sd(7, JOINT, IMAGE, VECTOR, MODULATION), "sb.safetensors": lora_sd(8, JOINT, TEXT)}
    merged = with_loras(forge, zimage_unet, sds)
    run = dict(steps=3, cfg_scale=3.0, latent_hw=LATENT, uncond_tokens=5, seed=3)
    fresh = zimage_env.sample(forge, merged, **run)
    masks = torch.zeros(1, 2, *GRID)
    masks[:, 0, :, :4], masks[:, 1, :, 4:] = 1, 1
    unet, job = freefuse_unet(forge, merged, list(sds), masks)
    assert not torch.equal(zimage_env.sample(forge, unet, **run), fresh) and job.failure is None
    after = zimage_env.sample(forge, merged, **run)  # the next job, FreeFuse off
    assert torch.equal(after, fresh)
    model = diffusion_model(zimage_unet)
    patched = (model, *model.layers, *model.noise_refiner, model.final_layer)
    assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in patched)
    assert lumina.attention_function.__module__ == "backend.attention"


# -- words, through Neo's Z-Image text engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip(NO_CLASSIC)
    return zimage_env.qwen3_engine(forge_root)


def positions(engine, prompt: str, words: list[str]):
    state = RunState()
    subjects = [SimpleNamespace(lora=f"s{i}", words=w) for i, w in enumerate(words)]
    p = SimpleNamespace(sd_model=SimpleNamespace(text_processing_engine_gemma=engine))
    found, length = _subject_words(p, [prompt], subjects, state, Z_IMAGE)
    return [found.get(f"s{i}", [None])[0] for i in range(len(words))], length, state


class _Encoder:
    """A stand-in Qwen3 encoder for the engine's call: embeddings of ones, its hidden states the embeddings."""

    def get_input_embeddings(self):
        return lambda ids: torch.ones(*ids.shape, 4)

    def __call__(self, _, embeds, **kwargs):
        return None, embeds


def context_length(engine, prompt: str) -> int:
    """Tokens of the context Neo's Z-Image conditions on: the engine's call for the prompt (one chunk)."""
    engine.text_encoder = _Encoder()
    (z,) = engine([prompt])
    return int(z.shape[-2])


def decoded(engine, prompt: str, rows) -> str:
    (chunk,) = engine.tokenize_line(prompt)
    return engine.tokenizer.decode([chunk.tokens[i] for i in rows])


def test_words_index_the_chat_templated_qwen3_context(engine):
    """The context is Qwen's chat template around the prompt (no padding); words are found in the prompt's own
    byte-level pieces, CJK and accented words included, never in the template's, and emphasis (each fragment
    templated on its own) keeps them found."""
    prompt = "zorbo the knight and quill the wizard beside 一只猫 in a café"
    (knight, wizard, cat, cafe), length, state = positions(
        engine, prompt, ["zorbo the knight", "quill", "一只猫", "café"]
    )
    (chunk,) = engine.tokenize_line(prompt)
    assert length == len(chunk.tokens) == context_length(engine, prompt) and not state.warnings
    template = engine.tokenizer("<|im_start|>user\n")["input_ids"]
    assert chunk.tokens[: len(template)] == template and knight[0] == len(template)
    assert decoded(engine, prompt, knight).strip() == "zorbo the knight"
    assert decoded(engine, prompt, wizard).strip() == "quill"
    assert decoded(engine, prompt, cat).strip() == "一只猫"
    assert decoded(engine, prompt, cafe).strip() == "café"
    weighted = "(zorbo the knight:1.3) and [quill] the wizard"
    (knight, wizard), length, state = positions(engine, weighted, ["zorbo the knight", "quill"])
    assert length == context_length(engine, weighted) and not state.warnings
    assert decoded(engine, weighted, knight).strip() == "zorbo the knight"
    assert decoded(engine, weighted, wizard).strip() == "quill"
    (user,), _, state = positions(engine, prompt, ["user"])  # the template's "user" is no word of the prompt
    assert user is None and state.warnings[0].startswith("the words of s0 (user) are not in the prompt")


def test_words_after_break_are_found(engine):
    """Neo's Qwen3 engine makes one chunk of a BREAK prompt (BREAK is a templated fragment of its own): words after
    it are in the context and are found, no warning."""
    prompt = "zorbo the knight BREAK quill the wizard"
    (knight, wizard), length, state = positions(engine, prompt, ["knight", "wizard"])
    assert knight is not None and wizard is not None and not state.warnings
    assert length == context_length(engine, prompt)
    assert decoded(engine, prompt, wizard).strip() == "wizard"


# -- the webui hook's path --------------------------------------------------------------------------------------------


def z_image_job(forge, zimage_unet, engine, monkeypatch, prompt: str, **settings):
    """A webui job's p for start_run on the tiny Z-Image with two merged LoRAs (xa, xb) and Neo's Qwen3 engine; only
    the LoRA extension's name lookup (`networks`) stands in; xa also on every adaLN Linear, the capture layer's
    (layers.2) included. Returns (p, args, merged patcher)."""
    capture_adaln = {"layers_2_adaLN_modulation_0": (4 * D, 256)}
    sds = {
        "xa.safetensors": lora_sd(9, JOINT, IMAGE, MODULATION, capture_adaln),
        "xb.safetensors": lora_sd(10, JOINT, TEXT),
    }
    merged, paths, _ = forge.with_loras(zimage_unet, sds, 0.8)
    networks = types.ModuleType("networks")
    networks.available_network_aliases = {
        "xa": SimpleNamespace(filename=paths[0]),
        "xb": SimpleNamespace(filename=paths[1]),
    }
    networks.available_networks = {}
    monkeypatch.setitem(sys.modules, "networks", networks)
    p = SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=merged), text_processing_engine_gemma=engine),
        prompts=[prompt],
        steps=8,
    )
    subjects = [{"lora": "xa", "words": "zorbo the knight"}, {"lora": "xb", "words": "quill the wizard"}]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects, "superpixel_vote": False, **settings})
    return p, args, merged


def test_a_z_image_job_is_patched_makes_masks_and_leaves_nothing(forge, zimage_unet, engine, monkeypatch):
    """processing.start_run with Neo's patcher, LoRA loader and merge and Z-Image's Qwen3 engine. Turbo-like: 8 steps,
    CFG 1, the capture at step 2 in layers.2, whose capture patch wraps its per-token adaLN patch."""
    from lib_freefuse.forge.zimage_adaln import PerTokenLayer

    prompt = "zorbo the knight and (quill the wizard:1.2) in a hall"
    p, args, merged = z_image_job(forge, zimage_unet, engine, monkeypatch, prompt)
    tokens = len(engine.tokenize_line(prompt)[0].tokens)
    run = dict(steps=8, latent_hw=LATENT, tokens=tokens, seed=2)
    before = zimage_env.sample(forge, merged, **run)
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    assert job.family is Z_IMAGE and job.plan.text_length == tokens and job.plan.capture_step == 1
    patched = p.sd_model.forge_objects.unet
    assert patched.freefuse_base is merged
    capture = patched.object_patches["diffusion_model.layers.2.forward"]
    assert isinstance(capture, forge_zimage.CaptureLayer) and isinstance(capture.original_forward, PerTokenLayer)
    out = zimage_env.sample(forge, patched, **run)
    assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
    assert tuple(job.masks.shape) == (1, 2, *GRID)
    assert not torch.allclose(out, before, atol=1e-4)  # the masks changed the image
    assert torch.equal(zimage_env.sample(forge, merged, **run), before)
    assert math.isclose(float(job.masks.sum(1).max()), 1.0)  # disjoint masks


def test_background_tokens_say_z_image_has_no_end_of_text_token(forge, zimage_unet, engine, monkeypatch):
    """Neo's Qwen3 engine names no end-of-text token (`id_end`): background "tokens" is named in one warning and the
    job uses "threshold"."""
    prompt = "zorbo the knight and quill the wizard in a hall"
    p, args, _ = z_image_job(forge, zimage_unet, engine, monkeypatch, prompt, background="tokens")
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and job.plan.mask_config.background == "threshold" and job.plan.background_positions == ()
    assert p.freefuse_state.warnings == [
        "the Z-Image model's context has no end-of-text token to find the background with: places where no subject "
        "scores high stay free instead"
    ]
