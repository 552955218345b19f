"""FLUX.2 Klein on Forge Neo (tier "forge"): a tiny random Klein from Neo's own FLUX class with FLUX.2's flags, its
LoRA key map and merge, its sampling path and its Qwen3 text engine. Classic Forge has no FLUX.2: every test skips
there."""

from __future__ import annotations

from types import SimpleNamespace

import klein_env
import pytest
import torch
from test_chroma import _rows, capture_with_inputs, manual_qk
from test_host import manual_rope

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.core import MaskConfig
from lib_freefuse.families import CHROMA, FLUX1, FLUX2_KLEIN, detect
from lib_freefuse.forge.host import diffusion_model
from lib_freefuse.forge.processing import RunState, _subject_words, start_run

H, MLP = 256, 768  # hidden size, the MLP's width (ratio 3; its first layer is twice as wide: SwiGLU)
LATENT = GRID = (6, 8)  # 1x1 patches: the token grid is the latent
NO_NEO = "classic Forge has no FLUX.2 (Forge Neo's backend/nn/flux.py global_modulation)"
MODULATIONS = {
    "double_stream_modulation_img_lin": 6 * H,
    "double_stream_modulation_txt_lin": 6 * H,
    "single_stream_modulation_lin": 3 * H,
}


@pytest.fixture
def klein_unet(forge):
    if forge.HOST != "neo":
        pytest.skip(NO_NEO)
    unet = klein_env.make_klein_patcher(klein_env.make_tiny_klein())
    yield unet
    forge.unload(unet)


def lora_sd(seed: int, text: bool = True, modulation: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA in the two styles Neo's key map takes for Klein: kohya (lora_unet_*) and diffusers (transformer.*,
    the image q as a slice of double block 1's fused qkv). text: also text-stream and single-block layers.
    modulation: also the shared modulations (image; with text, the text and single-stream ones)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_2_img_mlp_0": (2 * MLP, H)}
    if text:
        shapes |= {
            "double_blocks_0_txt_attn_qkv": (3 * H, H),
            "single_blocks_0_linear1": (3 * H + 2 * MLP, H),
            "single_blocks_1_linear2": (H, H + MLP),
        }
    if modulation:
        shapes |= {k: (v, H) for k, v in MODULATIONS.items() if text or "img" in k}
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = 0.2 * torch.randn(out_f, 4, generator=g)
        sd[f"lora_unet_{name}.lora_down.weight"] = 0.2 * torch.randn(4, in_f, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    sd["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"] = 0.2 * torch.randn(4, H, generator=g)
    sd["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"] = 0.2 * torch.randn(H, 4, generator=g)
    return sd


def with_loras(forge, unet, sds: dict[str, dict], strength: float = 0.9):
    merged, _, unmatched = forge.with_loras(unet, sds, strength)
    assert not unmatched
    return merged


def freefuse_unet(forge, merged_unet, names, masks: torch.Tensor | None, modulation="per_token", **plan_fields):
    """forge_env.freefuse_unet for Klein."""
    return forge.freefuse_unet(merged_unet, names, masks, FLUX2_KLEIN, modulation=modulation, **plan_fields)


def test_klein_is_detected_by_its_structure_and_flux_and_chroma_stay_theirs(forge, klein_unet):
    import chroma_env

    model = diffusion_model(klein_unet)
    assert detect(model) is FLUX2_KLEIN
    assert detect(forge.make_tiny_flux()) is FLUX1
    assert detect(chroma_env.make_tiny_chroma()) is CHROMA
    assert FLUX2_KLEIN.capture_sites(model) == ["double_blocks.0", "double_blocks.1", "double_blocks.2"]
    assert FLUX2_KLEIN.default_capture_site(model) == 1  # the second-to-last double block
    assert FLUX2_KLEIN.mask_grid(LATENT) == GRID
    role = FLUX2_KLEIN.layer_role("double_stream_modulation_txt.lin")
    assert role.modulation and role.stream == "text" and role.parent == "double_stream_modulation_txt"
    assert FLUX2_KLEIN.layer_role("double_blocks.1.img_mlp.2").stream == "image"
    assert FLUX2_KLEIN.layer_role("final_layer.adaLN_modulation.1").stream == "vector"


SIZES = ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim")
EMBEDDERS = {"time_in.in_layer", "time_in.out_layer", "final_layer.adaLN_modulation.1"}  # one value per image


@pytest.mark.parametrize(("size", "site"), [("4B", "double_blocks.3"), ("9B", "double_blocks.6")])
def test_real_klein_shapes_through_neos_detection(forge, forge_root, size, site):
    """Klein 4B/9B at their real shapes (meta tensors, from Neo's pipeline configs) go through Neo's own detection:
    Flux2K4B/K9B with the flags the tiny test model has; the model Neo builds from that config is FLUX.2 Klein to
    FreeFuse, with its default site, and every Linear layer has a token role but the embedders."""
    if forge.HOST != "neo":
        pytest.skip(NO_NEO)
    import json

    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from huggingface_guess import detection, model_list

    path = f"backend/huggingface/black-forest-labs/FLUX.2-klein-{size}/transformer/config.json"
    hf = json.loads((forge_root / path).read_text())
    real = klein_env.klein_config(
        hidden_size=128 * hf["num_attention_heads"],
        num_heads=hf["num_attention_heads"],
        depth=hf["num_layers"],
        depth_single_blocks=hf["num_single_layers"],
        context_in_dim=hf["joint_attention_dim"],
    )
    constructor = {k: v for k, v in real.items() if k != "image_model"}
    with torch.device("meta"):
        checkpoint = IntegratedFluxTransformer2DModel(**constructor).state_dict()
    state_dict = {f"model.diffusion_model.{k}": v for k, v in checkpoint.items()}
    guess = detection.model_config_from_unet(state_dict, detection.unet_prefix_from_state_dict(state_dict))
    assert type(guess) is getattr(model_list, f"Flux2K{size}")
    detected = dict(guess.unet_config)
    flags = {k: v for k, v in klein_env.KLEIN_CONFIG.items() if k not in SIZES}
    assert {k: detected[k] for k in flags} == flags  # the tiny model is Klein but for its sizes
    with torch.device("meta"):
        model = IntegratedFluxTransformer2DModel(**{k: v for k, v in detected.items() if k != "image_model"})
    assert detect(model) is FLUX2_KLEIN
    assert FLUX2_KLEIN.capture_sites(model)[FLUX2_KLEIN.default_capture_site(model)] == site
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    vectors = {name for name in linears if FLUX2_KLEIN.layer_role(name).stream == "vector"}
    assert vectors == EMBEDDERS
    # embedders and txt_in/img_in, 8 per double block, 2 per single block, the final layer's 2, 3 shared modulations
    assert len(linears) == 4 + 8 * hf["num_layers"] + 2 * hf["num_single_layers"] + 2 + 3


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("modulation", ["per_token", "global"])
def test_all_ones_masks_equal_neos_merged_loras(forge, klein_unet, cfg_scale, modulation):
    """Text, image and single-block layers and the three shared modulations (kohya and diffusers keys, a slice of a
    fused qkv): all-ones masks from the first step give Neo's merged image, at CFG 3 with a negative prompt of
    another length."""
    sds = {"ka.safetensors": lora_sd(1), "kb.safetensors": lora_sd(2)}
    merged = with_loras(forge, klein_unet, sds)
    run = dict(steps=3, cfg_scale=cfg_scale, latent_hw=LATENT, tokens=8, uncond_tokens=4)
    expected = klein_env.sample(forge, merged, **run)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), modulation)
    got = klein_env.sample(forge, unet, **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    plain = klein_env.sample(forge, klein_unet, **run)
    assert (expected - plain).abs().max() > 1e-2  # the LoRAs do change the image


def test_shared_modulation_deltas_act_per_token_by_subject(forge, klein_unet):
    """LoRAs on the shared modulations alone (A: all three; B: the image one): A's mask over the whole image and B's
    empty give the merge of A alone. Each token's shift/scale/gate carries its own subjects' deltas in every block:
    image tokens A's, text tokens (no words: every subject) A's, B's image modulation reaching no text token."""
    a = {k: v for k, v in lora_sd(1).items() if "modulation" in k}
    b = {k: v for k, v in lora_sd(2).items() if "modulation_img" in k}
    sds = {"ma.safetensors": a, "mb.safetensors": b}
    merged = with_loras(forge, klein_unet, sds)
    run = dict(steps=3, latent_hw=LATENT)
    masks = torch.zeros(1, 2, *GRID)
    masks[:, 0] = 1
    unet, job = freefuse_unet(forge, merged, list(sds), masks)
    got = klein_env.sample(forge, unet, **run)
    expected = klein_env.sample(forge, with_loras(forge, klein_unet, {"ma_alone.safetensors": a}), **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (expected - klein_env.sample(forge, merged, **run)).abs().max() > 1e-3  # B's delta matters where it acts


def test_zero_masks_equal_no_lora(forge, klein_unet):
    """Image-stream layers and the image modulation, with masks that give them nothing."""
    sds = {"za.safetensors": lora_sd(1, text=False), "zb.safetensors": lora_sd(2, text=False)}
    merged = with_loras(forge, klein_unet, sds)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.zeros(1, 2, *GRID))
    got = klein_env.sample(forge, unet, steps=3, latent_hw=LATENT)
    expected = klein_env.sample(forge, klein_unet, steps=3, latent_hw=LATENT)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_captured_qk_equal_the_blocks_own(forge, klein_unet, cfg_scale):
    """q, k handed to the job = a recomputation from the block's weights (no biases), the shared modulation's slices
    it was handed, RoPE from first principles (text positions on the 4th axis); at CFG 3 the prompt (4 tokens) is
    repeated to the negative prompt's 8 in the batched call."""

    model = diffusion_model(klein_unet)
    block_index = 1

    def run(unet):
        klein_env.sample(
            forge, unet, steps=3, batch=2, cfg_scale=cfg_scale, latent_hw=(5, 6), tokens=4, uncond_tokens=8
        )

    job, inputs = capture_with_inputs(klein_unet, block_index, FLUX2_KLEIN, run)

    assert len(job.stored) == 1 and job.failure is None and job.masks.shape == (2, 2, 5, 6)
    q, k = job.stored[0]
    img, txt, vec, mask = inputs[1]  # step 1: one batched call per step
    assert mask is None  # Neo's Klein passes no attention mask
    text = txt.shape[1]
    assert text == (8 if cfg_scale > 1 else 4) and img.shape[1] == 30  # one token per latent pixel
    cond = slice(2, 4) if cfg_scale > 1 else slice(0, 2)
    vec = tuple(tuple(_rows(m, cond) for m in pair) for pair in vec)
    with torch.no_grad():
        mq, mk = manual_qk(model.double_blocks[block_index], img[cond], txt[cond], vec, heads=2)
    axes = klein_env.KLEIN_CONFIG["axes_dim"]
    torch.testing.assert_close(q, manual_rope(mq, (5, 6), text, axes, theta=2000, text_axis=3), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, manual_rope(mk, (5, 6), text, axes, theta=2000, text_axis=3), atol=2e-5, rtol=1e-4)


def test_reference_image_tokens_get_every_subject_and_stay_out_of_the_masks(forge, klein_unet):
    """Klein's editing (img2img: Neo's Flux2 engine hands the init latent over as a reference): the reference's
    1x1-patch tokens follow the image's. All-ones masks still equal Neo's merge, and the capture reads the generated
    image's tokens only (counting the reference in 2x2 patches, as FLUX.1 Kontext's, would misplace every mask)."""
    from backend.args import dynamic_args

    sds = {"ra.safetensors": lora_sd(1), "rb.safetensors": lora_sd(2)}
    merged = with_loras(forge, klein_unet, sds)
    saved = dynamic_args.ref_latents
    try:
        dynamic_args.ref_latents = []
        without_reference = klein_env.sample(forge, merged, steps=3, latent_hw=LATENT)
        dynamic_args.ref_latents = [torch.randn(1, 128, 4, 5, generator=torch.Generator().manual_seed(4))]
        expected = klein_env.sample(forge, merged, steps=3, latent_hw=LATENT)
        assert (expected - without_reference).abs().max() > 1e-3  # the reference image is read
        unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID))
        got = klein_env.sample(forge, unet, steps=3, latent_hw=LATENT)
        assert job.failure is None
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
        words = {
            "word_positions": (((1, 2), (5,)),),
            "capture_step": 1,
            "mask_config": MaskConfig(superpixel_vote=False),
        }
        unet, job = freefuse_unet(forge, merged, list(sds), None, **words)
        klein_env.sample(forge, unet, steps=3, latent_hw=LATENT)
        assert job.failure is None and job.capture_count == 1
        assert job.masks is not None and tuple(job.masks.shape) == (1, 2, *GRID)
    finally:
        dynamic_args.ref_latents = saved


def test_no_state_left_after_a_freefuse_job(forge, klein_unet):
    import backend.nn.flux as flux

    sds = {"sa.safetensors": lora_sd(1), "sb.safetensors": lora_sd(2)}
    merged = with_loras(forge, klein_unet, sds)
    run = dict(steps=3, cfg_scale=3.0, latent_hw=LATENT, uncond_tokens=4, seed=3)
    fresh = klein_env.sample(forge, merged, **run)
    masks = torch.zeros(1, 2, *GRID)
    masks[:, 0, :, :4], masks[:, 1, :, 4:] = 1, 1
    unet, _ = freefuse_unet(forge, merged, list(sds), masks)
    assert not torch.equal(klein_env.sample(forge, unet, **run), fresh)
    after = klein_env.sample(forge, merged, **run)  # the next job, FreeFuse off
    assert torch.equal(after, fresh)
    model = diffusion_model(klein_unet)
    modulations = [model.double_stream_modulation_img, model.double_stream_modulation_txt]
    assert all(type(m).forward is getattr(m.forward, "__func__", None) for m in [*model.double_blocks, *modulations])
    assert flux.attention.__module__ == "backend.nn.flux" and flux.attention.__name__ == "attention"


# -- words, through Neo's Klein text engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip(NO_NEO)
    return klein_env.klein_engine(forge_root)


def positions(engine, prompt: str, words: list[str]):
    state = RunState()
    subjects = [SimpleNamespace(lora=f"s{i}", words=w) for i, w in enumerate(words)]
    p = SimpleNamespace(sd_model=SimpleNamespace(text_processing_engine_gemma=engine))
    found, length = _subject_words(p, [prompt], subjects, state, FLUX2_KLEIN)
    return [found.get(f"s{i}", [None])[0] for i in range(len(words))], length, state


def text_at(engine, prompt: str, at) -> str:
    """The text of the engine's tokens of `prompt` at positions `at`."""
    tokens = engine.tokenize_line(prompt)[0].tokens
    return engine.tokenizer.decode([tokens[i] for i in at])


def context_length(engine, prompt: str) -> int:
    """Tokens of the context Neo's Klein engine gives the model (its call, a stand-in Qwen3 encoder)."""
    (context,) = engine([prompt])
    return int(context.shape[0])


def test_words_index_the_chat_templated_context(engine):
    """The prompt inside Qwen3's chat template, padded to 512: the words index that context, not the prompt alone."""
    prompt = "zorbo the knight and quill the wizard"
    (knight, wizard), length, state = positions(engine, prompt, ["zorbo the knight", "quill"])
    assert length == 512 == context_length(engine, prompt) and not state.warnings
    assert text_at(engine, prompt, knight).strip() == "zorbo the knight" and text_at(engine, prompt, wizard) == " quill"
    assert knight[0] == 3  # after <|im_start|>, "user", "\n"


def test_emphasis_pieces_each_in_a_template_and_non_ascii_words(engine):
    """Neo's Klein engine wraps each emphasis piece in the template on its own: the words still index the model's
    context; a word of several bytes per character (byte-level BPE) is found whole."""
    prompt = "(zorbo the knight:1.3) and [quill] at the café"
    (knight, wizard, cafe), length, state = positions(engine, prompt, ["zorbo the knight", "quill", "café"])
    assert not state.warnings and length == 512 == context_length(engine, prompt)
    assert text_at(engine, prompt, knight) == "zorbo the knight" and text_at(engine, prompt, wizard) == "quill"
    assert text_at(engine, prompt, cafe).strip() == "café"
    assert wizard[0] > knight[-1] + 10  # another template in between


def test_template_role_words_and_break(engine):
    """ "user"/"assistant" of the template are not the prompt's words; BREAK is a word to the Klein engine (one
    chunk), so words after it count, without the FLUX.1 warning."""
    prompt = "a user BREAK quill the wizard"
    (user, assistant, wizard), _, state = positions(engine, prompt, ["user", "assistant", "wizard"])
    assert text_at(engine, prompt, user) == " user" and len(user) == 1
    assert assistant is None and wizard is not None
    assert state.warnings == ["the words of s1 (assistant) are not in the prompt: s1 acts as an ordinary LoRA"]


# -- the webui hook's path --------------------------------------------------------------------------------------------


def test_a_klein_job_is_patched_makes_masks_and_leaves_nothing(forge, klein_unet, engine, monkeypatch):
    """processing.start_run with Neo's patcher, LoRA loader and merge and the Klein engine; only the LoRA
    extension's name lookup (`networks`) stands in. 4 steps (Klein's preset): masks from step 1, used in 2-4."""
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    merged, paths, _ = forge.with_loras(klein_unet, sds, 0.8)
    forge.stand_in_networks(monkeypatch, {"xa": paths[0], "xb": paths[1]})
    prompt = "zorbo the knight and (quill the wizard:1.2) in a hall"
    p = SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=merged), text_processing_engine_gemma=engine),
        prompts=[prompt],
        steps=4,
    )
    subjects = [{"lora": "xa", "words": "zorbo the knight"}, {"lora": "xb", "words": "quill the wizard"}]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects, "superpixel_vote": False})
    run = dict(steps=4, latent_hw=LATENT, tokens=512, seed=2)
    before = klein_env.sample(forge, merged, **run)
    job = start_run(p, args, torch.zeros(1, 128, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    assert job.family is FLUX2_KLEIN and job.plan.text_length == 512 and job.plan.capture_step == 0
    patched = p.sd_model.forge_objects.unet
    assert patched.freefuse_base is merged
    out = klein_env.sample(forge, patched, **run)
    assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
    assert tuple(job.masks.shape) == (1, 2, *GRID)
    assert not torch.allclose(out, before, atol=1e-4)  # the masks changed the image
    assert torch.equal(klein_env.sample(forge, merged, **run), before)


def test_the_attention_bias_reaches_kleins_blocks_once_the_masks_exist(forge, klein_unet):
    """Klein's blocks call FLUX's attention (FLUX.1's install): the phase-2 bias changes the image, and the host's
    attention function is as before after the job."""
    sds = {"za.safetensors": lora_sd(1), "zb.safetensors": lora_sd(2)}
    merged = with_loras(forge, klein_unet, sds)
    forge.assert_attention_bias_acts(
        lambda unet: klein_env.sample(forge, unet, steps=3, latent_hw=LATENT),
        lambda masks, **fields: freefuse_unet(forge, merged, list(sds), masks, **fields),
        GRID,
    )
