"""Qwen-Image on Forge Neo (tier "forge"): a tiny random Qwen-Image from Neo's own class, its LoRA key map and merge,
its sampling path (a 5-D Wan latent) and its Qwen text engine with the real tokenizer. Classic Forge has no
Qwen-Image: every test skips there."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import qwen_image_env
import torch
import torch.nn.functional as F

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.core import MaskConfig
from lib_freefuse.families import CHROMA, FLUX1, QWEN_IMAGE, detect
from lib_freefuse.forge import qwen_image as forge_qwen
from lib_freefuse.forge.host import diffusion_model, patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.forge.lora_layers import subject_deltas
from lib_freefuse.forge.processing import RunState, _subject_words, start_run

H = qwen_image_env.HIDDEN  # 64
CTX = qwen_image_env.QWEN_CONFIG["joint_attention_dim"]
LATENT = (12, 16)  # a 6x8 token grid
GRID = (6, 8)
NOT_ON_CLASSIC = "classic Forge has no Qwen-Image (Forge Neo's backend/nn/qwen.py)"


@pytest.fixture
def qwen_unet(forge):
    if forge.HOST != "neo":
        pytest.skip(NOT_ON_CLASSIC)
    unet = qwen_image_env.make_qwen_patcher(qwen_image_env.make_tiny_qwen_image())
    yield unet
    forge.unload(unet)


def lora_sd(seed: int, text: bool = True, modulation: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA in the key styles Neo's key map takes for Qwen-Image (modules_forge/packages/comfy/lora.py,
    model_lora_keys_unet: "qwen"): kohya (lora_unet_*, lora_up/down + alpha), diffusers/ai-toolkit (transformer.*,
    lora_A/B), ComfyUI (diffusion_model.*), bare module paths and SimpleTuner lycoris_*. text: also text-stream
    layers; modulation: also img_mod/txt_mod (the timestep vector's shift/scale/gate layers)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {}
    kohya = {"transformer_blocks_0_attn_to_q": (H, H), "transformer_blocks_2_img_mlp_net_0_proj": (4 * H, H)}
    if text:
        kohya |= {"transformer_blocks_0_attn_add_v_proj": (H, H), "txt_in": (H, CTX)}
    if modulation:
        kohya |= {"transformer_blocks_1_img_mod_1": (6 * H, H), "transformer_blocks_1_txt_mod_1": (6 * H, H)}
    for name, (out_f, in_f) in kohya.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = r(out_f, 4)
        sd[f"lora_unet_{name}.lora_down.weight"] = r(4, in_f)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    styled = {
        "transformer.transformer_blocks.1.attn.to_k": (H, H),
        "diffusion_model.transformer_blocks.1.attn.to_out.0": (H, H),
    }
    styled |= {"transformer_blocks.2.img_mlp.net.2": (H, 4 * H)}
    if text:
        styled |= {"transformer.transformer_blocks.1.attn.to_add_out": (H, H)}
        styled |= {"diffusion_model.transformer_blocks.2.txt_mlp.net.0.proj": (4 * H, H)}
    for name, (out_f, in_f) in styled.items():
        sd[f"{name}.lora_A.weight"] = r(4, in_f)
        sd[f"{name}.lora_B.weight"] = r(out_f, 4)
    sd["lycoris_proj_out.lora_up.weight"] = r(4 * 16, 4)
    sd["lycoris_proj_out.lora_down.weight"] = r(4, H)
    return sd


def with_loras(forge, unet, sds: dict[str, dict], strength: float = 0.9):
    merged, _, unmatched = forge.with_loras(unet, sds, strength)
    assert not unmatched
    return merged


def freefuse_unet(forge, merged_unet, names, masks: torch.Tensor | None, modulation="per_token", capture_step=10**6):
    """A FreeFuse clone of a patcher with the subject LoRAs merged: they come out of the merge and act masked, with
    the given (B_img, L, h, w) masks from the first step (no words: text tokens get every LoRA)."""
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
    images = 1 if masks is None else masks.shape[0]
    plan = JobPlan(
        word_positions=tuple(((),) * len(names) for _ in range(images)),
        text_length=8,
        capture_step=capture_step,
        modulation=modulation,
        initial_masks=masks,
    )
    job = FreeFuseJob(plan, decode=None, family=QWEN_IMAGE)
    return patch_unet(merged_unet, job, deltas, capture_block=0, merged=merged), job


def test_qwen_image_is_detected_by_its_structure(forge, qwen_unet):
    model = diffusion_model(qwen_unet)
    assert detect(model) is QWEN_IMAGE
    assert detect(forge.make_tiny_flux()) is FLUX1
    assert QWEN_IMAGE.capture_sites(model) == [f"transformer_blocks.{i}" for i in range(3)]
    assert QWEN_IMAGE.default_capture_site(model) == 2  # round(0.6 * 3); 36 of Qwen-Image's 60
    assert QWEN_IMAGE.layer_role("transformer_blocks.4.attn.to_out.0").stream == "image"
    assert QWEN_IMAGE.layer_role("transformer_blocks.4.attn.to_add_out").stream == "text"
    assert QWEN_IMAGE.layer_role("transformer_blocks.4.img_mod.1").modulation
    assert QWEN_IMAGE.layer_role("norm_out.linear").stream == "vector"
    assert not CHROMA.matches(model) and not FLUX1.matches(model)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("modulation", ["per_token", "global"])
def test_all_ones_masks_equal_neos_merged_loras(forge, qwen_unet, cfg_scale, modulation):
    """Image, text, modulation and top-level layers in five key styles: all-ones masks from the first step give
    Neo's merged image, with a negative prompt of another length (brought to a common length by repetition) at
    CFG 3."""
    sds = {"qa.safetensors": lora_sd(1, modulation=True), "qb.safetensors": lora_sd(2, modulation=True)}
    merged = with_loras(forge, qwen_unet, sds)
    run = dict(steps=3, cfg_scale=cfg_scale, latent_hw=LATENT, tokens=8, uncond_tokens=4)
    expected = qwen_image_env.sample(forge, merged, **run)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), modulation)
    got = qwen_image_env.sample(forge, unet, **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    plain = qwen_image_env.sample(forge, qwen_unet, **run)
    assert (expected - plain).abs().max() > 1e-2  # the LoRAs do change the image


def naive_modulated_block(block, token_masks: torch.Tensor, image_deltas: list, text_delta: torch.Tensor):
    """Neo's QwenImageTransformerBlock.forward written out with per-token modulation: image token t's shift/scale/
    gate from img_mod.1's weight plus each subject's full delta matrix weighted by token_masks (T, L), one token at a
    time; text tokens' from txt_mod.1's weight plus text_delta (no words: every subject, the text rule)."""

    def modulate(x, params):
        shift, scale, gate = params.chunk(3, -1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift, gate

    def forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None):
        s = F.silu(temb)  # (B, D)
        img_w, img_b = block.img_mod[1].weight, block.img_mod[1].bias
        rows = [
            F.linear(s, img_w + sum(m * d for m, d in zip(token_masks[t], image_deltas, strict=True)), img_b)
            for t in range(token_masks.shape[0])
        ]
        img_params = torch.stack(rows, 1)  # (B, T, 6D)
        txt_params = F.linear(s, block.txt_mod[1].weight + text_delta, block.txt_mod[1].bias)[:, None]  # (B, 1, 6D)
        (img1, img2), (txt1, txt2) = img_params.chunk(2, -1), txt_params.chunk(2, -1)
        img, img_gate1 = modulate(hidden_states, img1)
        txt, txt_gate1 = modulate(encoder_hidden_states, txt1)
        img_attn, txt_attn = block.attn(
            hidden_states=img,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
        )
        hidden_states = hidden_states + img_gate1 * img_attn
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn
        img, img_gate2 = modulate(hidden_states, img2)
        hidden_states = hidden_states + img_gate2 * block.img_mlp(img)
        txt, txt_gate2 = modulate(encoder_hidden_states, txt2)
        encoder_hidden_states = encoder_hidden_states + txt_gate2 * block.txt_mlp(txt)
        return encoder_hidden_states, hidden_states

    return forward


def lora_delta(sd: dict, key: str, strength: float = 0.9) -> torch.Tensor:
    """A kohya LoRA's full weight delta, as Neo merges it: strength x alpha / rank x up @ down."""
    up, down = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"]
    return strength * float(sd[f"{key}.alpha"]) / down.shape[0] * up @ down


@pytest.mark.parametrize("soft", [False, True])
def test_modulation_deltas_act_per_token_as_a_naive_block(forge, qwen_unet, soft):
    """LoRAs on block 1's img_mod/txt_mod alone: each image token's shift/scale/gate carries its own subjects'
    deltas weighted by its masks (A left, B right; soft: overlapping ramps), text tokens every subject's; the image
    equals sampling with that block written out naively (full delta matrices, one token at a time)."""
    sds = {f"m{n}.safetensors": {k: v for k, v in lora_sd(n, modulation=True).items() if "_mod_" in k} for n in (1, 2)}
    merged = with_loras(forge, qwen_unet, sds)
    cols = torch.arange(GRID[1]).float()
    a = (cols < GRID[1] // 2).float() if not soft else 1 - cols / (GRID[1] - 1)
    b = 1 - a if not soft else 0.25 + 0.5 * cols / (GRID[1] - 1)
    masks = torch.stack([a, b])[None, :, None, :].expand(1, 2, *GRID).contiguous()
    run = dict(steps=3, latent_hw=LATENT)
    unet, job = freefuse_unet(forge, merged, list(sds), masks)
    got = qwen_image_env.sample(forge, unet, **run)

    lora = [sds[f"m{n}.safetensors"] for n in (1, 2)]
    image = [lora_delta(sd, "lora_unet_transformer_blocks_1_img_mod_1") for sd in lora]
    text = sum(lora_delta(sd, "lora_unet_transformer_blocks_1_txt_mod_1") for sd in lora)
    reference = qwen_unet.clone()
    block = diffusion_model(qwen_unet).transformer_blocks[1]
    naive = naive_modulated_block(block, masks.flatten(2).transpose(1, 2)[0], image, text)
    reference.add_object_patch("diffusion_model.transformer_blocks.1.forward", naive)
    expected = qwen_image_env.sample(forge, reference, **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (expected - qwen_image_env.sample(forge, merged, **run)).abs().max() > 1e-3  # not the merge
    assert (expected - qwen_image_env.sample(forge, qwen_unet, **run)).abs().max() > 1e-3  # nor no LoRA


def test_zero_masks_equal_no_lora(forge, qwen_unet):
    """Image-stream and top-level image layers, and img_mod (image tokens' modulation)."""
    image_mod = {k: v for k, v in lora_sd(1, text=False, modulation=True).items() if "txt_mod" not in k}
    sds = {"qa.safetensors": image_mod, "qb.safetensors": lora_sd(2, text=False)}
    merged = with_loras(forge, qwen_unet, sds)
    unet, _ = freefuse_unet(forge, merged, list(sds), torch.zeros(1, 2, *GRID))
    got = qwen_image_env.sample(forge, unet, steps=3, latent_hw=LATENT)
    expected = qwen_image_env.sample(forge, qwen_unet, steps=3, latent_hw=LATENT)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_text_stream_layers_follow_the_text_rule(forge, qwen_unet):
    """With zero image masks and no words, text tokens keep every subject LoRA (text_loras "all", FLUX.1's rule):
    the image equals Neo's merge of the text-stream layers alone (add_*_proj, to_add_out, txt_mlp, txt_in)."""
    sds = {"qa.safetensors": lora_sd(1), "qb.safetensors": lora_sd(2)}
    merged = with_loras(forge, qwen_unet, sds)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.zeros(1, 2, *GRID))
    run = dict(steps=3, latent_hw=LATENT)
    got = qwen_image_env.sample(forge, unet, **run)
    text_only = {f"text_{n}": {k: v for k, v in sd.items() if "add_" in k or "txt_" in k} for n, sd in sds.items()}
    expected = qwen_image_env.sample(forge, with_loras(forge, qwen_unet, text_only), **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (expected - qwen_image_env.sample(forge, qwen_unet, **run)).abs().max() > 1e-3


# -- the capture ------------------------------------------------------------------------------------------------------


def rope(x: torch.Tensor, ids: torch.Tensor, axes, theta: int = 10000) -> torch.Tensor:
    """RoPE from first principles: x (B, H, L, D), ids (L, 3); each axis rotates its pairs by id / theta^(2i/d)."""
    angles = torch.cat(
        [
            ids[:, a, None].double() / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            for a, d in enumerate(axes)
        ],
        -1,
    )
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def qwen_ids(text_tokens: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Qwen-Image's position ids (Neo's forward): the image grid centred (row - h//2, col - w//2, axis 0 the image
    index 0), then text ids t0, t0+1, ... on all three axes with t0 = max(h//2, w//2); text first in the sequence."""
    h, w = grid_hw
    rows, cols = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    start = max(h // 2, w // 2)
    text = torch.arange(start, start + text_tokens)[:, None].expand(-1, 3)
    return torch.cat([text, image]).float()


def manual_qk(block, img, txt, temb, heads):
    """q, k of a Qwen-Image block (text then image, no RoPE) from its weights: LayerNorm, the first shift/scale of
    img_mod/txt_mod, the stream's projection, its RMS norm."""

    def stream(mod, to_q, to_k, norm_q, norm_k, x):
        params = F.linear(F.silu(temb), mod[1].weight, mod[1].bias)
        shift, scale, _ = params.chunk(2, -1)[0].chunk(3, -1)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * s  # noqa: E731
        q = F.linear(x, to_q.weight, to_q.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = F.linear(x, to_k.weight, to_k.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
        return rms(q, norm_q.weight), rms(k, norm_k.weight)

    a = block.attn
    tq, tk = stream(block.txt_mod, a.add_q_proj, a.add_k_proj, a.norm_added_q, a.norm_added_k, txt)
    iq, ik = stream(block.img_mod, a.to_q, a.to_k, a.norm_q, a.norm_k, img)
    return torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)


class SpyJob(FreeFuseJob):
    """A FreeFuseJob that keeps the q, k it was handed (the conditional rows it kept)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored = []

    def store_attention(self, q, k):
        super().store_attention(q, k)
        self.stored.append(tuple(t.clone() for t in self._captured))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_captured_qk_equal_the_blocks_own(forge, qwen_unet, cfg_scale):
    """q, k handed to the job = a recomputation from the block's weights and inputs, RoPE from first principles with
    Qwen-Image's centred ids; at CFG 3 the prompt (4 tokens) is repeated to the negative prompt's 8."""
    model = diffusion_model(qwen_unet)
    block_index, inputs = 1, []
    recorder = qwen_unet.clone()
    name = f"diffusion_model.transformer_blocks.{block_index}.forward"
    original = recorder.get_model_object(name)

    def record(*args, **kwargs):
        inputs.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return original(*args, **kwargs)

    recorder.add_object_patch(name, record)
    words = (((1, 2), (3,)), ((0,), (2,)))  # two images
    plan = JobPlan(word_positions=words, text_length=4, capture_step=1, mask_config=MaskConfig(superpixel_vote=False))
    job = SpyJob(plan, decode=None, family=QWEN_IMAGE)
    unet = patch_unet(recorder, job, {}, capture_block=block_index)
    qwen_image_env.sample(
        forge, unet, steps=3, batch=2, cfg_scale=cfg_scale, latent_hw=(10, 12), tokens=4, uncond_tokens=8
    )

    assert len(job.stored) == 1 and job.failure is None and job.masks.shape == (2, 2, 5, 6)
    q, k = job.stored[0]
    seen = inputs[1]  # step 1: one batched call per step
    assert seen["encoder_hidden_states_mask"] is None  # Neo's engine gives no text attention mask
    text = seen["encoder_hidden_states"].shape[1]
    assert text == (8 if cfg_scale > 1 else 4)
    cond = slice(2, 4) if cfg_scale > 1 else slice(0, 2)
    with torch.no_grad():
        mq, mk = manual_qk(
            model.transformer_blocks[block_index],
            seen["hidden_states"][cond],
            seen["encoder_hidden_states"][cond],
            seen["temb"][cond],
            heads=2,
        )
    ids, axes = qwen_ids(text, (5, 6)), qwen_image_env.QWEN_CONFIG["axes_dims_rope"]
    torch.testing.assert_close(q, rope(mq, ids, axes), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, rope(mk, ids, axes), atol=2e-5, rtol=1e-4)


def test_a_mask_that_hides_keys_refuses_the_capture_and_attention_is_unchanged(forge, qwen_unet):
    import backend.nn.qwen as qwen

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2 * 32, generator=g) for _ in range(3))
    hides = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    hides[..., 5] = False
    for mask, stores in ((None, 1), (torch.ones(1, 1, 6, 6, dtype=torch.bool), 1), (hides, 0)):
        stored, errors = [], []
        expected = qwen.attention_function(q, k, v, 2, mask)
        with forge_qwen._capturing_attention(lambda a, b, into=stored: into.append((a, b)), errors.append):
            got = qwen.attention_function(q, k, v, 2, mask)
        torch.testing.assert_close(got, expected)
        assert len(stored) == stores and len(errors) == 1 - stores
    assert stored == [] and "hides keys" in str(errors[0])
    assert qwen.attention_function.__module__ == "backend.attention"


def test_no_state_left_after_a_freefuse_job(forge, qwen_unet):
    import backend.nn.qwen as qwen

    original_attention = qwen.attention_function
    sds = {"qa.safetensors": lora_sd(1, modulation=True), "qb.safetensors": lora_sd(2, modulation=True)}
    merged = with_loras(forge, qwen_unet, sds)
    run = dict(steps=3, cfg_scale=3.0, latent_hw=LATENT, uncond_tokens=4, seed=3)
    fresh = qwen_image_env.sample(forge, merged, **run)
    unet, job = freefuse_unet(forge, merged, list(sds), None, capture_step=1)  # masks made at step 2
    job.plan = JobPlan((((1, 2), (5,)),), text_length=8, capture_step=1, mask_config=MaskConfig(superpixel_vote=False))
    assert not torch.equal(qwen_image_env.sample(forge, unet, **run), fresh)
    assert job.capture_count == 1 and job.masks is not None and job.failure is None
    after = qwen_image_env.sample(forge, merged, **run)  # the next job, FreeFuse off
    assert torch.equal(after, fresh)
    model = diffusion_model(qwen_unet)
    for block in model.transformer_blocks:
        for owner, name in ((block, "forward"), (block, "_modulate"), (block.img_mod, "forward")):
            assert getattr(type(owner), name) is getattr(getattr(owner, name), "__func__", None), name
    assert qwen.attention_function is original_attention


# -- words, through Neo's Qwen text engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip(NOT_ON_CLASSIC)
    return qwen_image_env.qwen_engine(forge_root)


def positions(engine, prompt: str, words: list[str]):
    state = RunState()
    subjects = [SimpleNamespace(lora=f"s{i}", words=w) for i, w in enumerate(words)]
    p = SimpleNamespace(sd_model=SimpleNamespace(text_processing_engine_qwen=engine))
    found, length = _subject_words(p, [prompt], subjects, state, QWEN_IMAGE)
    return [found.get(f"s{i}", [None])[0] for i in range(len(words))], length, state


def test_words_index_the_context_after_the_template_is_dropped(engine):
    """The context is the prompt's tokens, then the template's closing (<|im_end|>, a newline, <|im_start|>assistant
    and a newline): the words index it, and nothing of the template's system prompt is left."""
    prompt = "zorbo the knight and quill the wizard"
    (knight, wizard), length, state = positions(engine, prompt, ["zorbo the knight", "quill"])
    ids = qwen_image_env.context_ids(engine, prompt)
    assert length == len(ids) and not state.warnings
    tail = engine.tokenizer.convert_ids_to_tokens(ids[-5:])
    assert tail == ["<|im_end|>", "\u010a", "<|im_start|>", "assistant", "\u010a"]
    assert engine.tokenizer.decode([ids[i] for i in knight]) == "zorbo the knight"
    assert engine.tokenizer.decode([ids[i] for i in wizard]) == " quill"


def test_words_are_not_found_in_the_template_text(engine):
    """Emphasis wraps each weighted part in the whole template (its system prompt names "objects" and "background"):
    those words in the template are not the prompt's, and the words' positions still index Neo's context."""
    prompt = "(zorbo the knight:1.3) and [quill] near the objects"
    (knight, quill, objects), length, state = positions(engine, prompt, ["zorbo the knight", "quill", "objects"])
    ids = qwen_image_env.context_ids(engine, prompt)
    assert length == len(ids) > 100  # three copies of the template
    assert engine.tokenizer.decode([ids[i] for i in knight]) == "zorbo the knight"
    assert engine.tokenizer.decode([ids[i] for i in quill]) == "quill"
    assert len(objects) == 1 and engine.tokenizer.decode([ids[objects[0]]]) == " objects"
    (background,), _, state = positions(engine, prompt, ["background"])
    assert background is None and "are not in the prompt" in state.warnings[0]


def test_words_in_chinese_are_found(engine):
    """Byte-level pieces are read as text: a CJK word split over pieces is found (no word boundaries in CJK)."""
    prompt = "一只猫和一只狗在草地上"
    (cat, dog), length, _ = positions(engine, prompt, ["猫", "狗"])
    ids = qwen_image_env.context_ids(engine, prompt)
    assert length == len(ids)
    assert "猫" in engine.tokenizer.decode([ids[i] for i in cat])
    assert "狗" in engine.tokenizer.decode([ids[i] for i in dog])


# -- the webui hook's path --------------------------------------------------------------------------------------------


def _job(forge, merged, paths, engine, prompt, monkeypatch):
    networks = types.ModuleType("networks")
    networks.available_network_aliases = {
        "xa": SimpleNamespace(filename=paths[0]),
        "xb": SimpleNamespace(filename=paths[1]),
    }
    networks.available_networks = {}
    monkeypatch.setitem(sys.modules, "networks", networks)
    return SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=merged), text_processing_engine_qwen=engine),
        prompts=[prompt],
        steps=4,
    )


def test_a_qwen_image_job_is_patched_makes_masks_and_leaves_nothing(forge, qwen_unet, engine, monkeypatch):
    """processing.start_run with Neo's patcher, LoRA loader and merge and its Qwen engine; only the LoRA extension's
    name lookup (`networks`) stands in."""
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    merged, paths, _ = forge.with_loras(qwen_unet, sds, 0.8)
    prompt = "zorbo the knight and (quill the wizard:1.2) in a hall"
    p = _job(forge, merged, paths, engine, prompt, monkeypatch)
    subjects = [{"lora": "xa", "words": "zorbo the knight"}, {"lora": "xb", "words": "quill the wizard"}]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects, "superpixel_vote": False})
    tokens = len(qwen_image_env.context_ids(engine, prompt))
    run = dict(steps=4, cfg_scale=3.0, latent_hw=LATENT, tokens=tokens, uncond_tokens=4, seed=2)
    before = qwen_image_env.sample(forge, merged, **run)
    job = start_run(p, args, torch.zeros(1, 16, 1, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    assert job.family is QWEN_IMAGE and job.plan.text_length == tokens
    patched = p.sd_model.forge_objects.unet
    assert patched.freefuse_base is merged
    out = qwen_image_env.sample(forge, patched, **run)
    assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
    assert tuple(job.masks.shape) == (1, 2, *GRID)
    assert not torch.allclose(out, before, atol=1e-4)  # the masks changed the image
    assert torch.equal(qwen_image_env.sample(forge, merged, **run), before)


def test_an_edit_job_with_reference_images_is_refused_with_one_warning(forge, qwen_unet, engine, monkeypatch):
    from backend.args import dynamic_args

    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    merged, paths, _ = forge.with_loras(qwen_unet, sds, 0.8)
    p = _job(forge, merged, paths, engine, "zorbo the knight and quill the wizard", monkeypatch)
    subjects = [{"lora": "xa", "words": "zorbo the knight"}, {"lora": "xb", "words": "quill the wizard"}]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects})
    monkeypatch.setattr(dynamic_args, "ref_latents", [torch.zeros(1, 16, 1, 8, 8)], raising=False)
    assert start_run(p, args, torch.zeros(1, 16, 1, *LATENT)) is None
    assert p.sd_model.forge_objects.unet is merged
    assert p.freefuse_state.warnings == [
        "Qwen-Image with reference images (Edit) puts their vision tokens into the text context: "
        "FreeFuse does nothing for this job"
    ]


def test_the_slic_decoder_takes_neos_5d_latents(forge):
    """Neo's Qwen-Image decode_first_stage takes the (B, 16, 1, H, W) latent and gives (B, 1, 3, H_px, W_px) (its
    engine's decode, movedim(-1, 2)); the SLIC image is (B, H_px, W_px, 3) in [0, 1]."""
    from lib_freefuse.forge.processing import _decoder

    if forge.HOST != "neo":
        pytest.skip(NOT_ON_CLASSIC)
    seen = []

    def decode_first_stage(x):
        seen.append(tuple(x.shape))
        return torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 1, 3, 8, 8)

    p = SimpleNamespace(sd_model=SimpleNamespace(decode_first_stage=decode_first_stage))
    images = _decoder(p, "vae")(torch.zeros(2, 16, 1, 1, 1))
    assert seen == [(2, 16, 1, 1, 1)] and images.shape == (2, 8, 8, 3)
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
