"""Chroma on Forge Neo (tier "forge"): a tiny random Chroma from Neo's own class, its LoRA key map and merge, its
sampling path and its T5 text engine. Classic Forge has no Chroma: every test skips there."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import chroma_env
import pytest
import torch
import torch.nn.functional as F
from test_host import _scale, manual_rope

from lib_freefuse.args import FreeFuseArgs
from lib_freefuse.core import MaskConfig
from lib_freefuse.families import CHROMA, FLUX1, detect
from lib_freefuse.forge import flux1 as forge_flux1
from lib_freefuse.forge.host import diffusion_model, patch_unet
from lib_freefuse.forge.job import FreeFuseJob, JobPlan
from lib_freefuse.forge.processing import RunState, _subject_words, start_run

H, MLP, HID = 128, 512, 64  # hidden size, MLP width, the modulation MLP's width
LATENT = (12, 16)  # a 6x8 token grid
GRID = (6, 8)
APPROXIMATOR = ("distilled_guidance_layer_layers_0_in_layer", "distilled_guidance_layer_out_proj")


@pytest.fixture
def chroma_unet(forge):
    if forge.HOST != "neo":
        pytest.skip("classic Forge has no Chroma (Forge Neo's backend/nn/chroma.py)")
    unet = chroma_env.make_chroma_patcher(chroma_env.make_tiny_chroma())
    yield unet
    forge.unload(unet)


def lora_sd(seed: int, text: bool = True, approximator: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA in the two styles Neo's key map takes for Chroma: kohya (lora_unet_*) and diffusers (transformer.*,
    the image q as a slice of double block 1's fused qkv). text: also text-stream and single-block layers.
    approximator: also layers of the global modulation MLP."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_2_img_mlp_0": (MLP, H)}
    if text:
        shapes |= {
            "double_blocks_0_txt_attn_qkv": (3 * H, H),
            "single_blocks_0_linear1": (3 * H + MLP, H),
            "single_blocks_1_linear2": (H, H + MLP),
        }
    if approximator:
        shapes |= {APPROXIMATOR[0]: (HID, HID), APPROXIMATOR[1]: (H, HID)}
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        sd[f"lora_unet_{name}.lora_up.weight"] = 0.3 * torch.randn(out_f, 4, generator=g)
        sd[f"lora_unet_{name}.lora_down.weight"] = 0.3 * torch.randn(4, in_f, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    sd["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"] = 0.3 * torch.randn(4, H, generator=g)
    sd["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"] = 0.3 * torch.randn(H, 4, generator=g)
    return sd


def with_loras(forge, unet, sds: dict[str, dict], strength: float = 0.9):
    merged, _, unmatched = forge.with_loras(unet, sds, strength)
    assert not unmatched
    return merged


def freefuse_unet(forge, merged_unet, names, masks: torch.Tensor | None, modulation="per_token", **plan_fields):
    """forge_env.freefuse_unet for Chroma."""
    return forge.freefuse_unet(merged_unet, names, masks, CHROMA, modulation=modulation, **plan_fields)


def test_chroma_is_detected_by_its_structure_and_flux_stays_flux(forge, chroma_unet):
    assert detect(diffusion_model(chroma_unet)) is CHROMA
    assert detect(forge.make_tiny_flux()) is FLUX1
    assert CHROMA.capture_sites(diffusion_model(chroma_unet)) == [
        "double_blocks.0",
        "double_blocks.1",
        "double_blocks.2",
    ]
    assert CHROMA.layer_role("double_blocks.1.img_attn.qkv").stream == "image"
    assert CHROMA.layer_role("single_blocks.0.linear1").stream == "joint"
    assert CHROMA.layer_role("distilled_guidance_layer.layers.0.out_layer").stream == "vector"


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("modulation", ["per_token", "global"])
def test_all_ones_masks_equal_neos_merged_loras(forge, chroma_unet, cfg_scale, modulation):
    """Text, image and single-block layers (kohya and diffusers keys, a slice of a fused qkv): all-ones masks from
    the first step give Neo's merged image, with a negative prompt of another length (cond and uncond contexts
    brought to a common length by repetition) at CFG 3."""
    sds = {"ca.safetensors": lora_sd(1), "cb.safetensors": lora_sd(2)}
    merged = with_loras(forge, chroma_unet, sds)
    run = dict(steps=3, cfg_scale=cfg_scale, latent_hw=LATENT, tokens=8, uncond_tokens=4)
    expected = chroma_env.sample(forge, merged, **run)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), modulation)
    got = chroma_env.sample(forge, unet, **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    plain = chroma_env.sample(forge, chroma_unet, **run)
    assert (expected - plain).abs().max() > 1e-2  # the LoRAs do change the image


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_modulation_mlp_all_ones_and_global_equal_the_merge_and_off_leaves_it_out(forge, chroma_unet, cfg_scale):
    """The global modulation MLP's layers: all-ones masks with modulation "per_token" (the MLP run per mask row,
    the slots handed out per token) and "global" give Neo's merge, at CFG 3 with a negative prompt of another length
    too; "off" gives the merge of the same LoRAs without the MLP's layers."""
    sds = {"ca.safetensors": lora_sd(1, approximator=True), "cb.safetensors": lora_sd(2, approximator=True)}
    merged = with_loras(forge, chroma_unet, sds)
    run = dict(steps=3, cfg_scale=cfg_scale, latent_hw=LATENT, tokens=8, uncond_tokens=4)
    expected = chroma_env.sample(forge, merged, **run)
    for modulation in ("per_token", "global"):
        unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), modulation)
        torch.testing.assert_close(chroma_env.sample(forge, unet, **run), expected, atol=2e-4, rtol=1e-4)
        assert job.failure is None

    unet, job = freefuse_unet(forge, merged, list(sds), torch.ones(1, 2, *GRID), "off")
    got = chroma_env.sample(forge, unet, **run)
    without = {n: {k: v for k, v in sd.items() if not k.startswith(("lora_unet_distilled",))} for n, sd in sds.items()}
    without = {f"no_mlp_{n}": sd for n, sd in without.items()}
    expected_off = chroma_env.sample(forge, with_loras(forge, chroma_unet, without), **run)
    assert job.failure is None
    torch.testing.assert_close(got, expected_off, atol=2e-4, rtol=1e-4)
    assert (expected_off - expected).abs().max() > 1e-3  # those layers do matter


def test_zero_masks_equal_no_lora(forge, chroma_unet):
    """Image-stream layers and the modulation MLP, no subject on the text tokens either (text_loras "none"): every
    token's MLP row is the zero row."""
    sds = {"ca.safetensors": lora_sd(1, text=False, approximator=True), "cb.safetensors": lora_sd(2, text=False)}
    merged = with_loras(forge, chroma_unet, sds)
    unet, job = freefuse_unet(forge, merged, list(sds), torch.zeros(1, 2, *GRID), text_loras="none")
    got = chroma_env.sample(forge, unet, steps=3, latent_hw=LATENT)
    expected = chroma_env.sample(forge, chroma_unet, steps=3, latent_hw=LATENT)
    assert job.failure is None
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


APPROXIMATOR_MODULES = {APPROXIMATOR[0]: "layers.0.in_layer", APPROXIMATOR[1]: "out_proj"}  # in the MLP


def approximator_deltas(sds: dict[str, dict], strength: float = 0.9) -> list[dict[str, torch.Tensor]]:
    """Each LoRA's weight deltas on the modulation MLP: {module in the MLP: strength * alpha / rank * up @ down}."""
    deltas = []
    for sd in sds.values():
        one = {}
        for kohya, module in APPROXIMATOR_MODULES.items():
            up, down = sd[f"lora_unet_{kohya}.lora_up.weight"], sd[f"lora_unet_{kohya}.lora_down.weight"]
            one[module] = strength * float(sd[f"lora_unet_{kohya}.alpha"]) / up.shape[1] * up @ down
        deltas.append(one)
    return deltas


def naive_modulation(mlp, deltas, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A copy of the MLP with sum_l row[l] * subject l's deltas added to its weights, on x: (B, 344, D)."""
    mlp = copy.deepcopy(mlp)
    with torch.no_grad():
        for subject, weight in enumerate(row.tolist()):
            for module, delta in deltas[subject].items():
                mlp.get_submodule(module).weight += weight * delta
        return mlp(x)


def modulation_fields(structure) -> list[torch.Tensor]:
    """The tensors of get_modulations' output (a ModulationOut, a tuple of them, or a tuple of tensors), in order."""
    if isinstance(structure, tuple):
        return [t for item in structure for t in modulation_fields(item)]
    if isinstance(structure, torch.Tensor):
        return [structure]
    return [structure.shift, structure.scale, structure.gate]


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_per_token_modulation_equals_a_naive_mlp_per_token(forge, chroma_unet, kind):
    """Every token's shift/scale/gate in a double block (image and text), a single block and the final layer = the
    slots of a copy of the MLP with that token's mask-weighted deltas added to its weights (hard masks: left half
    subject a, right half b, the text tokens both); soft masks (more distinct rows than chroma_modulation.MAX_ROWS):
    the first-order blend mod_0 + sum_l m_l (mod_{e_l} - mod_0) of such copies."""
    sds = {"ca.safetensors": lora_sd(1, text=False, approximator=True), "cb.safetensors": lora_sd(2, approximator=True)}
    merged = with_loras(forge, chroma_unet, sds)
    model = diffusion_model(chroma_unet)
    base_mlp = copy.deepcopy(model.distilled_guidance_layer)  # the weights without any LoRA
    if kind == "hard":
        masks = torch.zeros(1, 2, *GRID)
        masks[:, 0, :, :4], masks[:, 1, :, 4:] = 1, 1
    else:
        masks = torch.rand(1, 2, *GRID, generator=torch.Generator().manual_seed(5))
    unet, job = freefuse_unet(forge, merged, list(sds), masks)
    seen: dict[str, list] = {"x": [], "double": [], "single": [], "final": []}
    spied = (("double", model.double_blocks[1]), ("single", model.single_blocks[0]), ("final", model.final_layer))
    hooks = [model.distilled_guidance_layer.register_forward_pre_hook(lambda m, a: seen["x"].append(a[0].clone()))]
    for key, module in spied:
        spy = lambda m, a, kw, key=key: seen[key].append(kw["vec"])  # noqa: E731
        hooks.append(module.register_forward_pre_hook(spy, with_kwargs=True))
    try:
        chroma_env.sample(forge, unet, steps=1, latent_hw=LATENT, tokens=8)  # one model call, CFG 1
    finally:
        for hook in hooks:
            hook.remove()
    assert job.failure is None and len(seen["x"]) == 1
    deltas, x = approximator_deltas(sds), seen["x"][0]
    image = masks.flatten(2).transpose(1, 2)[0]  # (48, 2): the 6x8 grid row-major
    rows = {"image": image, "text": torch.ones(8, 2), "joint": torch.cat([torch.ones(8, 2), image])}  # no words

    def naive(row: torch.Tensor) -> torch.Tensor:
        if kind == "hard":
            return naive_modulation(base_mlp, deltas, row, x)
        zero = naive_modulation(base_mlp, deltas, torch.zeros(2), x)
        units = [naive_modulation(base_mlp, deltas, torch.eye(2)[s], x) - zero for s in range(2)]
        return zero + row[0] * units[0] + row[1] * units[1]

    mods = {}
    for key, stream, block_type, idx, part in (
        ("double", "image", "double_img", 1, 0),
        ("double", "text", "double_txt", 1, 1),
        ("single", "joint", "single", 0, None),
        ("final", "image", "final", 0, None),
    ):
        got = seen[key][0] if part is None else seen[key][0][part]
        for token, row in enumerate(rows[stream]):
            if tuple(row.tolist()) not in mods:
                mods[tuple(row.tolist())] = naive(row)
            want = type(model).get_modulations(model, mods[tuple(row.tolist())], block_type, idx=idx)
            for g, w in zip(modulation_fields(got), modulation_fields(want), strict=True):
                torch.testing.assert_close(g[:, token], w[:, 0], atol=1e-5, rtol=1e-5)
    left, right = seen["double"][0][0][0].shift[0, 0], seen["double"][0][0][0].shift[0, 7]
    assert (left - right).abs().max() > 1e-4  # the two subjects' tokens do get different modulations


def manual_qk(block, img, txt, vec, heads):
    """q, k of a Chroma double block from its weights and the modulation slices it was handed (no RoPE)."""
    (img_mod, _), (txt_mod, _) = vec

    def stream(attn, mod, x):
        x = (1 + mod.scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + mod.shift
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(x.shape[0], x.shape[1], 3, heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * s  # noqa: E731
        return rms(q, _scale(attn.norm.query_norm)), rms(k, _scale(attn.norm.key_norm))

    (tq, tk), (iq, ik) = stream(block.txt_attn, txt_mod, txt), stream(block.img_attn, img_mod, img)
    return torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)


def _rows(mod, rows):
    """A ModulationOut's rows of the batch."""
    return type(mod)(shift=mod.shift[rows], scale=mod.scale[rows], gate=mod.gate[rows])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_captured_qk_equal_the_blocks_own(forge, chroma_unet, cfg_scale):
    """q, k handed to the job = a recomputation from the block's weights, its modulation slices, RoPE from first
    principles; at CFG 3 the prompt (4 tokens) is repeated to the negative prompt's 8 in the batched call."""
    model = diffusion_model(chroma_unet)
    block_index = 1

    def run(unet):
        chroma_env.sample(
            forge, unet, steps=3, batch=2, cfg_scale=cfg_scale, latent_hw=(10, 12), tokens=4, uncond_tokens=8
        )

    job, inputs = capture_with_inputs(chroma_unet, block_index, CHROMA, run)

    assert len(job.stored) == 1 and job.failure is None and job.masks.shape == (2, 2, 5, 6)
    q, k = job.stored[0]
    img, txt, vec, mask = inputs[1]  # step 1: one batched call per step
    assert mask is None  # Neo's Chroma passes no attention mask
    text = txt.shape[1]
    assert text == (8 if cfg_scale > 1 else 4)
    cond = slice(2, 4) if cfg_scale > 1 else slice(0, 2)
    vec = tuple(tuple(_rows(m, cond) for m in pair) for pair in vec)
    with torch.no_grad():
        mq, mk = manual_qk(model.double_blocks[block_index], img[cond], txt[cond], vec, heads=2)
    axes = chroma_env.CHROMA_CONFIG["axes_dim"]
    torch.testing.assert_close(q, manual_rope(mq, (5, 6), text, axes), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, manual_rope(mk, (5, 6), text, axes), atol=2e-5, rtol=1e-4)


def capture_with_inputs(unet, block_index: int, family, run):
    """A capture at step 1 of double block `block_index` in run(patched unet) with two images' words: the SpyJob
    and what the block was called with at each call (img, txt, vec, attn_mask)."""
    inputs = []
    recorder = unet.clone()
    name = f"diffusion_model.double_blocks.{block_index}.forward"
    original = recorder.get_model_object(name)

    def record(*args, **kwargs):
        inputs.append((kwargs["img"].clone(), kwargs["txt"].clone(), kwargs["vec"], kwargs.get("attn_mask")))
        return original(*args, **kwargs)

    recorder.add_object_patch(name, record)
    words = (((1, 2), (3,)), ((0,), (2,)))  # two images
    plan = JobPlan(word_positions=words, text_length=4, capture_step=1, mask_config=MaskConfig(superpixel_vote=False))
    job = SpyJob(plan, decode=None, family=family)
    run(patch_unet(recorder, job, {}, capture_block=block_index))
    return job, inputs


class SpyJob(FreeFuseJob):
    """A FreeFuseJob that keeps the q, k it was handed (the conditional rows it kept)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored = []

    def store_attention(self, q, k):
        super().store_attention(q, k)
        self.stored.append(tuple(t.clone() for t in self._captured))


def test_a_mask_that_hides_keys_refuses_the_capture_and_attention_is_unchanged(forge, chroma_unet):
    import backend.nn.flux as flux

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 64, generator=g) for _ in range(3))
    pe = diffusion_model(chroma_unet).pe_embedder(torch.zeros(1, 6, 3))
    hides = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    hides[..., 5] = False
    for mask, stores in ((None, 1), (torch.ones(1, 1, 6, 6, dtype=torch.bool), 1), (hides, 0)):
        stored, errors = [], []
        expected = flux.attention(q, k, v, pe=pe, mask=mask)
        with forge_flux1._capturing_attention(lambda a, b, into=stored: into.append(a), errors.append):
            got = flux.attention(q, k, v, pe=pe, mask=mask)
        torch.testing.assert_close(got, expected)
        assert len(stored) == stores and len(errors) == 1 - stores
    assert "hides keys" in str(errors[0])
    assert flux.attention.__module__ == "backend.nn.flux" and flux.attention.__name__ == "attention"


def test_no_state_left_after_a_freefuse_job(forge, chroma_unet):
    import backend.nn.flux as flux

    sds = {"ca.safetensors": lora_sd(1, approximator=True), "cb.safetensors": lora_sd(2, approximator=True)}
    merged = with_loras(forge, chroma_unet, sds)
    run = dict(steps=3, cfg_scale=3.0, latent_hw=LATENT, uncond_tokens=4, seed=3)
    fresh = chroma_env.sample(forge, merged, **run)
    masks = torch.zeros(1, 2, *GRID)
    masks[:, 0, :, :4], masks[:, 1, :, 4:] = 1, 1
    unet, _ = freefuse_unet(forge, merged, list(sds), masks)
    assert not torch.equal(chroma_env.sample(forge, unet, **run), fresh)
    after = chroma_env.sample(forge, merged, **run)  # the next job, FreeFuse off
    assert torch.equal(after, fresh)
    model = diffusion_model(chroma_unet)
    assert all(type(b).forward is getattr(b.forward, "__func__", None) for b in model.double_blocks)
    for owner, method in ((model, "get_modulations"), (model.distilled_guidance_layer, "forward")):
        assert getattr(type(owner), method) is getattr(getattr(owner, method), "__func__", None)  # per-token: undone
    assert type(model.final_layer).forward is getattr(model.final_layer.forward, "__func__", None)
    assert flux.attention.__module__ == "backend.nn.flux" and flux.attention.__name__ == "attention"


# -- words, through Neo's Chroma text engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip("classic Forge has no Chroma (Forge Neo's backend/diffusion_engine/chroma.py)")
    return chroma_env.t5_engine(forge_root)


def positions(engine, prompt: str, words: list[str]):
    state = RunState()
    subjects = [SimpleNamespace(lora=f"s{i}", words=w) for i, w in enumerate(words)]
    p = SimpleNamespace(sd_model=SimpleNamespace(text_processing_engine_t5=engine))
    found, length = _subject_words(p, [prompt], subjects, state, CHROMA)
    return [found.get(f"s{i}", [None])[0] for i in range(len(words))], length, state


def context_length(engine, prompt: str) -> int:
    """Tokens of the context Neo's Chroma conditions on: conds[0] of the engine's call (prompt_parser takes it), a
    stand-in encoder giving ones."""
    engine.text_encoder = lambda input_ids: torch.ones(*input_ids.shape, 4)
    return int(engine([prompt])[0].shape[0])


def test_words_index_the_unpadded_t5_context(engine):
    """No BOS, no padding: the context is the prompt's T5 pieces and one end token, and the words index it."""
    prompt = "zorbo the knight and quill the wizard"
    (knight, wizard), length, state = positions(engine, prompt, ["zorbo the knight", "quill"])
    chunks, _ = engine.tokenize_line(prompt)
    assert length == len(chunks[0].tokens) == len(engine.tokenize([prompt])[0]) + 1 and not state.warnings
    assert context_length(engine, prompt) == length
    assert chunks[0].tokens[-1] == 1  # T5's end token, the only one past the words
    pieces = engine.tokenizer.convert_ids_to_tokens([chunks[0].tokens[i] for i in knight + wizard])
    assert "".join(pieces).replace("\u2581", "") == "zorbotheknightquill"
    weighted, _, _ = positions(engine, "(zorbo the knight:1.3) and [quill] the wizard", ["zorbo the knight", "quill"])
    assert weighted == [knight, wizard]  # emphasis leaves the positions


def test_words_after_break_are_named_and_the_first_chunk_is_padded_to_the_longest(engine):
    """Neo conditions Chroma on a prompt's first chunk, padded with T5's pad token to its longest chunk."""
    prompt = "zorbo the knight BREAK quill the wizard in a long and winding hall"
    (knight, wizard), length, state = positions(engine, prompt, ["knight", "wizard"])
    chunks, _ = engine.tokenize_line(prompt)
    assert knight is not None and wizard is None
    assert length == len(chunks[1].tokens) > len(chunks[0].tokens)
    assert context_length(engine, prompt) == length
    assert state.warnings == [
        "the words of s1 (wizard) come only after BREAK, and Forge's Chroma uses the text before the first BREAK: "
        "s1 acts as an ordinary LoRA"
    ]


# -- the webui hook's path --------------------------------------------------------------------------------------------


def test_a_chroma_job_is_patched_makes_masks_and_leaves_nothing(forge, forge_root, chroma_unet, engine, monkeypatch):
    """processing.start_run with Neo's patcher, LoRA loader and merge and Chroma's T5 engine; only the LoRA
    extension's name lookup (`networks`) stands in."""
    sds = {"xa.safetensors": lora_sd(1), "xb.safetensors": lora_sd(2)}
    merged, paths, _ = forge.with_loras(chroma_unet, sds, 0.8)
    forge.stand_in_networks(monkeypatch, {"xa": paths[0], "xb": paths[1]})
    prompt = "zorbo the knight and (quill the wizard:1.2) in a hall"
    p = SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=merged), text_processing_engine_t5=engine),
        prompts=[prompt],
        steps=4,
    )
    subjects = [{"lora": "xa", "words": "zorbo the knight"}, {"lora": "xb", "words": "quill the wizard"}]
    args = FreeFuseArgs.from_dict({"enabled": True, "subjects": subjects, "superpixel_vote": False})
    tokens = len(engine.tokenize_line(prompt)[0][0].tokens)
    run = dict(steps=4, cfg_scale=3.0, latent_hw=LATENT, tokens=tokens, uncond_tokens=4, seed=2)
    before = chroma_env.sample(forge, merged, **run)
    job = start_run(p, args, torch.zeros(1, 16, *LATENT))
    assert job is not None and p.freefuse_state.warnings == []
    assert job.family is CHROMA and job.plan.text_length == tokens
    patched = p.sd_model.forge_objects.unet
    assert patched.freefuse_base is merged
    out = chroma_env.sample(forge, patched, **run)
    assert torch.isfinite(out).all() and job.failure is None and job.capture_count == 1
    assert tuple(job.masks.shape) == (1, 2, *GRID)
    assert not torch.allclose(out, before, atol=1e-4)  # the masks changed the image
    assert torch.equal(chroma_env.sample(forge, merged, **run), before)


def test_the_attention_bias_reaches_chromas_blocks_once_the_masks_exist(forge, chroma_unet):
    """Chroma's blocks call FLUX's attention: the phase-2 bias changes the image there, and the host's attention
    function is as before after the job."""
    sds = {"ca.safetensors": lora_sd(1), "cb.safetensors": lora_sd(2)}
    merged = with_loras(forge, chroma_unet, sds)
    forge.assert_attention_bias_acts(
        lambda unet: chroma_env.sample(forge, unet, steps=3, latent_hw=LATENT),
        lambda masks, **fields: freefuse_unet(forge, merged, list(sds), masks, **fields),
        GRID,
    )
