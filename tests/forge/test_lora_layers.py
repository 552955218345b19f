"""Subject LoRAs as masked deltas: they reproduce Forge's own LoRA merge exactly, weight by weight and through the
tiny FLUX's forward (all-ones masks = merged, zero masks = no LoRA), and mask per token."""

from __future__ import annotations

import os

import forge_env
import pytest
import torch

from lib_freefuse.forge.lora_layers import MaskedLinearPatch, SubjectWeightDelta, subject_deltas

H = 128  # forge_env.TINY_CONFIG hidden_size
MLP = 4 * H
PREFIX = "diffusion_model."


# ----------------------------------------------------------------------------------------------- LoRA state dicts
def _rand(g, *shape, scale=0.1):
    return (scale * torch.randn(*shape, generator=g)).contiguous()


def add_lora(sd, g, name, out_f, in_f, rank=4, alpha=None, style="kohya"):
    """One plain LoRA: kohya lora_up/lora_down (+ .alpha) or diffusers lora_A/lora_B."""
    up, down = _rand(g, out_f, rank), _rand(g, rank, in_f)
    if style == "kohya":
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
    else:
        sd[f"{name}.lora_B.weight"], sd[f"{name}.lora_A.weight"] = up, down
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))


def kohya_lora(seed=0):
    """BFL module names in kohya keys: attention, MLP, single-block linear1/linear2, modulations."""
    g, sd = torch.Generator().manual_seed(seed), {}
    add_lora(sd, g, "lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, rank=4, alpha=2.0)
    add_lora(sd, g, "lora_unet_double_blocks_0_img_attn_proj", H, H, rank=8, alpha=8.0)
    add_lora(sd, g, "lora_unet_double_blocks_0_img_mlp_0", MLP, H, rank=4, alpha=1.0)
    add_lora(sd, g, "lora_unet_double_blocks_0_img_mlp_2", H, MLP, rank=4, alpha=4.0)
    add_lora(sd, g, "lora_unet_double_blocks_1_txt_attn_qkv", 3 * H, H, rank=2)  # no alpha: scale = strength
    add_lora(sd, g, "lora_unet_double_blocks_1_txt_attn_proj", H, H, rank=2, alpha=1.0)
    add_lora(sd, g, "lora_unet_double_blocks_0_img_mod_lin", 6 * H, H, rank=4, alpha=4.0)
    add_lora(sd, g, "lora_unet_single_blocks_0_linear1", 3 * H + MLP, H, rank=4, alpha=2.0)
    add_lora(sd, g, "lora_unet_single_blocks_1_linear2", H, H + MLP, rank=4, alpha=2.0)
    add_lora(sd, g, "lora_unet_single_blocks_1_modulation_lin", 3 * H, H, rank=4, alpha=2.0)
    return sd


def diffusers_lora(seed=1):
    """ai-toolkit keys: to_q/to_k/to_v and proj_mlp into slices of fused weights, a bias diff, norm_out (swapped)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    block, single = "transformer.transformer_blocks.1", "transformer.single_transformer_blocks.0"
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        add_lora(sd, g, f"{block}.attn.{proj}", H, H, rank=4, alpha=2.0 if i == 0 else None, style="diffusers")
    add_lora(sd, g, f"{block}.attn.add_k_proj", H, H, rank=4, style="diffusers")
    add_lora(sd, g, f"{block}.attn.to_out.0", H, H, rank=4, style="diffusers")
    sd[f"{block}.attn.to_out.0.diff_b"] = _rand(g, H)
    add_lora(sd, g, f"{block}.ff.net.0.proj", MLP, H, rank=4, style="diffusers")
    add_lora(sd, g, f"{block}.norm1.linear", 6 * H, H, rank=4, style="diffusers")
    add_lora(sd, g, f"{single}.attn.to_q", H, H, rank=4, style="diffusers")
    add_lora(sd, g, f"{single}.proj_mlp", MLP, H, rank=4, style="diffusers")
    add_lora(sd, g, "transformer.single_transformer_blocks.1.proj_out", H, H + MLP, rank=4, style="diffusers")
    add_lora(sd, g, "transformer.norm_out.linear", 2 * H, H, rank=4, style="diffusers")
    return sd


def other_kinds_lora(seed=2):
    """LoHa, LoKr (full and factored), GLoRA, DoRA (kohya and into a fused slice), full diff with a bias diff."""
    g, sd = torch.Generator().manual_seed(seed), {}
    name = "lora_unet_double_blocks_0_img_attn_qkv"  # LoHa
    sd[f"{name}.hada_w1_a"], sd[f"{name}.hada_w1_b"] = _rand(g, 3 * H, 4), _rand(g, 4, H)
    sd[f"{name}.hada_w2_a"], sd[f"{name}.hada_w2_b"] = _rand(g, 3 * H, 4), _rand(g, 4, H)
    sd[f"{name}.alpha"] = torch.tensor(2.0)
    name = "lora_unet_double_blocks_0_img_mlp_0"  # LoKr, kron((4, 2), (128, 64)) = (512, 128)
    sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"] = _rand(g, 4, 2, scale=1.0), _rand(g, 128, 64)
    name = "lora_unet_double_blocks_0_img_mlp_2"  # LoKr with factored w2 and alpha: kron((2, 8), (64, 64))
    sd[f"{name}.lokr_w1"] = _rand(g, 2, 8, scale=1.0)
    sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = _rand(g, 64, 4), _rand(g, 4, 64)
    sd[f"{name}.alpha"] = torch.tensor(2.0)
    name = "lora_unet_double_blocks_1_img_attn_qkv"  # GLoRA: W a1 a2 + b1 b2
    sd[f"{name}.a1.weight"], sd[f"{name}.a2.weight"] = _rand(g, H, 4), _rand(g, 4, H)
    sd[f"{name}.b1.weight"], sd[f"{name}.b2.weight"] = _rand(g, 3 * H, 4), _rand(g, 4, H)
    sd[f"{name}.alpha"] = torch.tensor(4.0)
    name = "lora_unet_single_blocks_1_linear2"  # DoRA
    add_lora(sd, g, name, H, H + MLP, rank=4, alpha=2.0)
    sd[f"{name}.dora_scale"] = 1.0 + _rand(g, H, 1)
    name = "transformer.transformer_blocks.2.attn.to_k"  # DoRA on a slice of the fused qkv
    add_lora(sd, g, name, H, H, rank=4, alpha=2.0, style="diffusers")
    sd[f"{name}.dora_scale"] = 1.0 + _rand(g, H, 1)
    name = "lora_unet_double_blocks_1_img_attn_proj"  # full diff + bias diff
    sd[f"{name}.diff"], sd[f"{name}.diff_b"] = _rand(g, H, H, scale=0.01), _rand(g, H)
    return sd


# ------------------------------------------------------------------------------------------------ Forge's side
def lora_clone(unet, sd, strength=0.8, strength_model=1.0, filename="subject.safetensors"):
    """What sd_forge_lora does for the unet (the host's key map, load_lora, add_patches on a clone): (the clone, the
    adapter's reading of the LoRA's merged patches, unmatched keys)."""
    clone, (path,), unmatched = forge_env.with_loras(unet, {filename: sd}, strength, strength_model)
    return clone, forge_env.merged_patches(clone, path), unmatched


def deltas_of(entry, base: dict):
    """subject_deltas with the base parameters `base` and the host's merge."""
    return subject_deltas(entry, base.__getitem__, forge_env.host_adapter().merge)


def parameters(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.model.named_parameters()}


def load(unet) -> None:
    """Load a patcher the way sampling does: object patches applied, LoRA merged (or restored)."""
    from backend import memory_management

    memory_management.load_models_gpu([unet])


def merged_parameters(clone) -> dict[str, torch.Tensor]:
    load(clone)
    return parameters(clone)


def rebuilt(base: dict[str, torch.Tensor], deltas: list[SubjectWeightDelta]) -> dict[str, torch.Tensor]:
    """base + each delta's weight() (and bias) placed in its rows, for every touched parameter."""
    out: dict[str, torch.Tensor] = {}
    for d in deltas:
        rows = slice(None) if d.rows is None else slice(d.rows[0], d.rows[0] + d.rows[1])
        weight, bias = f"{PREFIX}{d.module}.weight", f"{PREFIX}{d.module}.bias"
        if not d.low_rank or d.down.shape[0] > 0:
            out.setdefault(weight, base[weight].clone())[rows] += d.weight()
        if d.bias is not None:
            out.setdefault(bias, base[bias].clone())[rows] += d.bias
    return out


def assert_reproduces_merge(base, merged, entry, deltas):
    """Every key Forge merged equals base + our deltas; nothing else changed."""
    ours = rebuilt(base, deltas)
    assert set(ours) == set(entry)
    for key in entry:
        torch.testing.assert_close(ours[key], merged[key], atol=2e-6, rtol=1e-5, msg=key)
        assert not torch.equal(merged[key], base[key]), key
    for key in base.keys() - set(entry):
        assert torch.equal(merged[key], base[key]), key


def by_module(deltas):
    out: dict[str, list[tuple[int, SubjectWeightDelta]]] = {}
    for d in deltas:
        out.setdefault(d.module, []).append((0, d))
    return out


def constant_masks(value: float):
    """mask_source: one subject column of `value` for every token (a 2-D input counts as one token)."""
    return lambda x: torch.full((1, x.shape[1] if x.ndim == 3 else 1, 1), value, dtype=x.dtype)


def masked_clone(unet, deltas, value: float):
    """A clone with MaskedLinearPatch on every touched module. Unloads first: get_model_object reads the live model,
    so a clone made while another patched clone is loaded would wrap that clone's patch."""
    forge_env.unload(unet)
    clone = unet.clone()
    for module, pairs in by_module(deltas).items():
        name = f"{PREFIX}{module}.forward"
        clone.add_object_patch(name, MaskedLinearPatch(clone.get_model_object(name), pairs, constant_masks(value)))
    return clone


def model_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)  # 16 image tokens
    context, pooled = torch.randn(1, 8, 64, generator=g), torch.randn(1, 32, generator=g)
    return x, torch.tensor([0.7]), context, pooled, torch.tensor([3.5])


def forward(unet) -> torch.Tensor:
    load(unet)
    with torch.no_grad():
        return unet.model.diffusion_model(*model_inputs())


# ------------------------------------------------------------------------------------------ reproducing the merge
LORAS = {"kohya": kohya_lora, "diffusers": diffusers_lora, "other kinds": other_kinds_lora}


@pytest.mark.parametrize("style", list(LORAS))
def test_deltas_reproduce_forges_merge(tiny_unet, style):
    base = parameters(tiny_unet)
    clone, entry, unmatched = lora_clone(tiny_unet, LORAS[style]())
    assert unmatched == {}
    deltas, notes = deltas_of(entry, base)
    assert_reproduces_merge(base, merged_parameters(clone), entry, deltas)
    if style == "kohya":
        assert notes == [] and all(d.low_rank for d in deltas)
        qkv = next(d for d in deltas if d.module == "double_blocks.0.img_attn.qkv")
        assert qkv.rows is None and qkv.scale == pytest.approx(0.8 * 2.0 / 4)  # strength * alpha / rank
        txt = next(d for d in deltas if d.module == "double_blocks.1.txt_attn.qkv")
        assert txt.scale == pytest.approx(0.8)  # alpha None -> 1.0, as Forge does
    if style == "diffusers":
        rows = {d.module: [] for d in deltas}
        for d in deltas:
            rows[d.module].append(d.rows)
        assert sorted(rows["double_blocks.1.img_attn.qkv"]) == [(0, H), (H, H), (2 * H, H)]
        assert sorted(rows["double_blocks.1.txt_attn.qkv"]) == [(H, H)]
        assert sorted(rows["single_blocks.0.linear1"]) == [(0, H), (3 * H, MLP)]
        final = next(d for d in deltas if d.module == "final_layer.adaLN_modulation.1")
        assert not final.low_rank  # Forge's key function (swap_scale_shift) is honoured through its merge
        assert any(n.startswith("LoRA, key function swap_scale_shift: applied as a dense") for n in notes)
        proj = next(d for d in deltas if d.module == "double_blocks.1.img_attn.proj")
        assert proj.low_rank and proj.bias is not None
    if style == "other kinds":
        kinds = {n.split(":")[0] for n in notes}
        assert {"LoHa", "LoKr", "GLoRA", "DoRA", "full diff"} <= kinds, notes
        assert "LoHa: applied as a dense masked delta, slower: double_blocks.0.img_attn.qkv" in notes
        assert all(not d.low_rank for d in deltas if d.down is None or d.down.shape[0] > 0)
        dora_slice = next(d for d in deltas if d.module == "double_blocks.2.img_attn.qkv")
        assert dora_slice.rows == (H, H) and dora_slice.dense.shape == (H, H)


@pytest.mark.parametrize("style", list(LORAS))
def test_masked_forward_equals_merged_with_ones_and_base_with_zeros(tiny_unet, style):
    base_out = forward(tiny_unet)
    clone, entry, _ = lora_clone(tiny_unet, LORAS[style]())
    merged_out = forward(clone)
    assert (merged_out - base_out).abs().max() > 1e-3  # the LoRA matters
    load(tiny_unet)  # loading the clone merged the LoRA; loading the base patcher restores the weights
    base = parameters(tiny_unet)
    deltas, _ = deltas_of(entry, base)
    ones_out = forward(masked_clone(tiny_unet, deltas, 1.0))
    torch.testing.assert_close(ones_out, merged_out, atol=1e-5, rtol=1e-4)
    zeros_out = forward(masked_clone(tiny_unet, deltas, 0.0))
    torch.testing.assert_close(zeros_out, base_out, atol=1e-6, rtol=1e-6)


def test_strength_model_scales_the_base_weight_as_forge_does(tiny_unet):
    base = parameters(tiny_unet)
    sd = {}
    add_lora(sd, torch.Generator().manual_seed(5), "lora_unet_double_blocks_0_img_attn_proj", H, H, alpha=2.0)
    clone, entry, _ = lora_clone(tiny_unet, sd, strength=0.7, strength_model=0.5)
    deltas, notes = deltas_of(entry, base)
    assert [d.low_rank for d in deltas] == [False]
    assert notes == [
        "LoRA, strength_model 0.5 (scales the base weight): applied as a dense masked delta, slower: "
        "double_blocks.0.img_attn.proj"
    ]
    assert_reproduces_merge(base, merged_parameters(clone), entry, deltas)


def test_entries_that_do_not_add_up_are_merged_together_in_forges_order(tiny_unet):
    """A DoRA over the whole qkv and a plain LoRA into its to_q slice, in one file: one dense delta."""
    g, sd = torch.Generator().manual_seed(6), {}
    add_lora(sd, g, "lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, alpha=2.0)
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = 1.0 + _rand(g, 3 * H, 1)
    add_lora(sd, g, "transformer.transformer_blocks.0.attn.to_q", H, H, style="diffusers")
    base = parameters(tiny_unet)
    clone, entry, _ = lora_clone(tiny_unet, sd)
    assert len(entry[f"{PREFIX}double_blocks.0.img_attn.qkv.weight"]) == 2
    deltas, notes = deltas_of(entry, base)
    assert len(deltas) == 1 and deltas[0].rows is None and not deltas[0].low_rank
    assert notes[0].startswith("DoRA + LoRA: applied as a dense")
    assert_reproduces_merge(base, merged_parameters(clone), entry, deltas)


def test_non_linear_parameters_are_left_out(tiny_unet):
    base = parameters(tiny_unet)
    scale_key = next(k for k in base if k.startswith(f"{PREFIX}double_blocks.0.img_attn.norm.query_norm."))
    sd = {f"{scale_key.removesuffix('.weight')}.set_weight": torch.ones(64)}  # the host's generic key for it
    add_lora(sd, torch.Generator().manual_seed(7), "lora_unet_double_blocks_0_img_attn_proj", H, H)
    _, entry, _ = lora_clone(tiny_unet, sd)
    assert scale_key in entry
    deltas, notes = deltas_of(entry, base)
    assert [d.module for d in deltas] == ["double_blocks.0.img_attn.proj"]
    # classic calls the norm's parameter "scale" (not a weight at all), Neo "weight" (a weight, but not a Linear's)
    assert notes in (
        [f"not a Linear weight or bias of the diffusion model: left out: {scale_key}"],
        [f"set on a non-Linear weight: left out: {scale_key.removeprefix(PREFIX).removesuffix('.weight')}"],
    )


# ------------------------------------------------------------------------------------------- per-token masking
def random_deltas(module="double_blocks.0.img_attn.qkv", seed=8):
    """Low-rank in slices and whole, dense in a slice, a bias on a low-rank delta, a bias-only rank-0 delta."""
    g = torch.Generator().manual_seed(seed)
    return [
        (0, SubjectWeightDelta(module, (0, H), down=_rand(g, 4, H), up=_rand(g, H, 4), scale=0.5)),
        (1, SubjectWeightDelta(module, (H, H), down=_rand(g, 2, H), up=_rand(g, H, 2), scale=2.0)),
        (1, SubjectWeightDelta(module, None, down=_rand(g, 3, H), up=_rand(g, 3 * H, 3), bias=_rand(g, 3 * H))),
        (2, SubjectWeightDelta(module, (2 * H, H), dense=_rand(g, H, H, scale=0.01), bias=_rand(g, H))),
        (0, SubjectWeightDelta(module, (H, H), down=torch.zeros(0, H), up=torch.zeros(H, 0), bias=_rand(g, H))),
    ]


def naive(original, deltas, x, masks):
    """original(x) + sum over deltas of masks[..., subject] * (x W_d^T + b_d), subject by subject, float64."""
    x3 = x if x.ndim == 3 else x[:, None]
    masks = masks if masks.ndim == 3 else masks[:, None]
    y = original(x).double()
    y3 = y if x.ndim == 3 else y[:, None]
    for subject, d in deltas:
        rows = slice(None) if d.rows is None else slice(d.rows[0], d.rows[0] + d.rows[1])
        change = x3.double() @ d.weight().double().T
        if d.bias is not None:
            change = change + d.bias.double()
        y3[..., rows] += masks[..., subject, None].double() * change
    return y


def test_per_token_masks_match_a_naive_computation(tiny_unet):
    qkv = tiny_unet.model.diffusion_model.double_blocks[0].img_attn.qkv
    deltas = random_deltas()
    g = torch.Generator().manual_seed(9)
    x, masks = torch.randn(2, 5, H, generator=g), torch.rand(2, 5, 3, generator=g)
    masks[0, :2] = 0.0  # some tokens get no subject at all
    patch = MaskedLinearPatch(qkv.forward, deltas, lambda _: masks)
    with torch.no_grad():
        out = patch(x)
        torch.testing.assert_close(out.double(), naive(qkv.forward, deltas, x, masks), atol=1e-5, rtol=1e-5)
        for b in range(2):  # each image of the batch gets its own masks
            alone = MaskedLinearPatch(qkv.forward, deltas, lambda _, b=b: masks[b : b + 1])(x[b : b + 1])
            torch.testing.assert_close(alone[0], out[b], atol=1e-6, rtol=1e-6)
        shared = MaskedLinearPatch(qkv.forward, deltas, lambda _: masks[:1])(x)  # (1, T, L) broadcasts
        expected = naive(qkv.forward, deltas, x, masks[:1].expand(2, -1, -1))
        torch.testing.assert_close(shared.double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(MaskedLinearPatch(qkv.forward, deltas, lambda _: None)(x), qkv.forward(x))


def test_two_dimensional_input_of_a_modulation_layer(tiny_unet):
    lin = tiny_unet.model.diffusion_model.double_blocks[0].img_mod.lin
    g = torch.Generator().manual_seed(10)
    deltas = [
        (0, SubjectWeightDelta("double_blocks.0.img_mod.lin", None, down=_rand(g, 4, H), up=_rand(g, 6 * H, 4))),
        (1, SubjectWeightDelta("double_blocks.0.img_mod.lin", (H, H), dense=_rand(g, H, H), bias=_rand(g, H))),
    ]
    x = torch.randn(2, H, generator=g)
    masks = torch.tensor([[[1.0, 0.0]], [[0.25, 1.0]]])  # (B, 1, L): one value per image
    with torch.no_grad():
        for given in (masks, masks[:, 0]):  # (B, 1, L) or (B, L)
            out = MaskedLinearPatch(lin.forward, deltas, lambda _, m=given: m)(x)
            assert out.shape == (2, 6 * H)
            torch.testing.assert_close(out.double(), naive(lin.forward, deltas, x, masks), atol=1e-5, rtol=1e-5)


def test_deltas_are_cast_lazily_to_the_input_dtype():
    linear = torch.nn.Linear(H, 3 * H).to(torch.bfloat16)
    deltas = random_deltas()
    g = torch.Generator().manual_seed(11)
    x, masks = torch.randn(2, 5, H, generator=g), torch.rand(2, 5, 3, generator=g)
    patch = MaskedLinearPatch(linear.forward, deltas, lambda _: masks)
    with torch.no_grad():
        out = patch(x.to(torch.bfloat16))
        expected = naive(linear.float().forward, deltas, x.to(torch.bfloat16).float(), masks)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)


def test_mask_columns_must_cover_the_subjects(tiny_unet):
    qkv = tiny_unet.model.diffusion_model.double_blocks[0].img_attn.qkv
    patch = MaskedLinearPatch(qkv.forward, random_deltas(), lambda x: torch.ones(1, x.shape[1], 2))
    with pytest.raises(ValueError, match="need 3 subjects"):
        patch(torch.randn(1, 5, H))
    with pytest.raises(ValueError, match="down and up"):
        SubjectWeightDelta("m", None, down=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="rows"):
        SubjectWeightDelta("m", (0, 3), dense=torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------ Host.load_lora
def test_load_lora_equals_the_hosts_own_path(tiny_unet, tmp_path):
    """A bound LoRA without a tag is read with the host's loader: the same patches the LoRA extension would merge,
    unmatched and skipped keys named, the patcher and the host's shared default key map untouched."""
    from backend.patcher.lora import model_lora_keys_unet
    from safetensors.torch import save_file

    sd = {**kohya_lora(), **diffusers_lora()}
    stray = {
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": torch.zeros(H, 2),  # Forge maps no such key
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2),  # text encoder part
    }
    sd["transformer.transformer_blocks.1.attn.to_q.diff_b"] = torch.ones(H)  # Forge keys it "().bias": skipped
    path = tmp_path / "subject.safetensors"
    save_file({**sd, **stray}, str(path))
    default_key_map = model_lora_keys_unet.__defaults__[0]
    default_size = len(default_key_map)
    store = tiny_unet.lora_patches if hasattr(tiny_unet, "lora_patches") else tiny_unet.patches  # classic | Neo
    before = dict(store)

    ours = forge_env.host_adapter().load_lora(tiny_unet, path, 0.8)

    assert len(default_key_map) == default_size  # the host's shared default dict was not filled
    assert dict(store) == before == {}
    assert set(ours.unmatched) == set(stray) and ours.skipped == ("().bias",)
    assert ours.source is None and ours.strength == 0.8
    clone, reference, _ = lora_clone(tiny_unet, sd, strength=0.8)
    assert ours.keys() == reference.keys()
    for key, entries in reference.items():
        assert [(e.kind, e.strength, e.strength_model, e.offset) for e in ours[key]] == [
            (e.kind, e.strength, e.strength_model, e.offset) for e in entries
        ]
    base = parameters(tiny_unet)
    deltas, _ = deltas_of(ours, base)
    assert_reproduces_merge(base, merged_parameters(clone), ours, deltas)


def test_merged_lora_is_found_and_taken_out_of_the_merge(tiny_unet):
    """Host.merged_lora finds the prompt's LoRA among others on the patcher (one of its keys shared with another
    LoRA); take_out leaves exactly the others merged, and the original patcher keeps its LoRAs."""
    host = forge_env.host_adapter()
    g = torch.Generator().manual_seed(11)
    first, second = {}, {}
    add_lora(first, g, "lora_unet_double_blocks_0_img_attn_proj", H, H, alpha=2.0)
    add_lora(second, g, "lora_unet_double_blocks_0_img_attn_proj", H, H, alpha=2.0)  # the same key, other values
    add_lora(second, g, "lora_unet_single_blocks_0_linear1", 3 * H + MLP, H, alpha=2.0)
    only_second, _, _ = forge_env.with_loras(tiny_unet, {"second.safetensors": second}, strength=0.7)
    expected = merged_parameters(only_second)
    both, paths, _ = forge_env.with_loras(tiny_unet, {"first.safetensors": first, "second.safetensors": second}, 0.7)
    found = host.merged_lora(both, paths[0])
    assert found is not None and found.strength == pytest.approx(0.7)
    assert list(found) == [f"{PREFIX}double_blocks.0.img_attn.proj.weight"]
    assert host.merged_lora(tiny_unet, paths[0]) is None  # not merged on the bare patcher
    clone = both.clone()
    host.take_out(clone, [found])
    taken = merged_parameters(clone)
    assert taken.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(taken[key], expected[key], atol=0, rtol=0, msg=key)
    assert host.merged_lora(both, paths[0]) is not None  # the original patcher still has it


def test_a_merged_lora_found_before_is_not_read_again(tiny_unet, monkeypatch):
    """Neo keeps no file names, so merged_lora reads the file and compares its factors with the patcher's: once per
    file. A later job whose patcher holds the same adapters finds them by identity without reading; a patcher with
    the file loaded anew (other adapter objects) or a file changed on disk is read again, and a LoRA no longer on
    the patcher is not found."""
    if forge_env.HOST != "neo":
        pytest.skip("classic Forge keeps the file name with each patch: nothing is read")
    import lib_freefuse.hosts.neo as neo

    host = forge_env.host_adapter()
    g = torch.Generator().manual_seed(12)
    sd = {}
    add_lora(sd, g, "lora_unet_double_blocks_0_img_attn_proj", H, H, alpha=2.0)
    add_lora(sd, g, "lora_unet_single_blocks_0_linear1", 3 * H + MLP, H, alpha=2.0)
    merged, (path,), _ = forge_env.with_loras(tiny_unet, {"read_once.safetensors": sd}, strength=0.6)
    reads = []
    original = neo._read_lora_file
    monkeypatch.setattr(neo, "_read_lora_file", lambda *a: reads.append(a[1]) or original(*a))

    first = host.merged_lora(merged, path)
    again = host.merged_lora(merged.clone(), path)  # the next job's clone holds the same adapters
    assert len(reads) == 1 and first is not None and again is not None
    assert {k: [id(r) for r in raws] for k, raws in again.source.items()} == {
        k: [id(r) for r in raws] for k, raws in first.source.items()
    }
    assert [(e.kind, e.strength, e.offset) for k in first for e in first[k]] == [
        (e.kind, e.strength, e.offset) for k in again for e in again[k]
    ]

    from backend.patcher.lora import load_lora, model_lora_keys_unet

    patches, _ = load_lora(sd, model_lora_keys_unet(tiny_unet.model, {}))
    reloaded = tiny_unet.clone()  # the same file loaded anew: other adapter objects, same values
    reloaded.add_patches(filename=path, patches=patches, strength_patch=0.6)
    assert host.merged_lora(reloaded, path) is not None and len(reads) == 2

    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # changed on disk
    assert host.merged_lora(reloaded, path) is not None and len(reads) == 3
    assert host.merged_lora(reloaded, path) is not None and len(reads) == 3

    without = reloaded.clone()
    adapters = {id(raws[0][1]) for raws in reloaded.patches.values()}
    without.patches = {k: [r for r in raws if id(r[1]) not in adapters] for k, raws in without.patches.items()}
    assert host.merged_lora(without, path) is None  # the adapters found before are gone from this patcher
