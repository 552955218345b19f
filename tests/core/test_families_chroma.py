"""Chroma's family description without a host: told from FLUX.1 by structure, its layers' roles."""

from __future__ import annotations

from types import SimpleNamespace

from lib_freefuse.families import CHROMA, FLUX1, KNOWN, detect, unsupported


def flux_like(**extra):
    return SimpleNamespace(double_blocks=[0] * 19, single_blocks=[0] * 38, **extra)


def test_chroma_is_told_from_flux_by_its_global_modulation_mlp():
    assert detect(flux_like(distilled_guidance_layer=object())) is CHROMA
    assert detect(flux_like()) is FLUX1
    assert [f.name for f in KNOWN][:3] == ["FLUX.1", "SDXL", "Chroma"]
    assert unsupported(None) == (
        "the model (no diffusion model) is none of FLUX.1, SDXL, Chroma, FLUX.2 Klein, Qwen-Image, Z-Image"
    )


def test_chroma_layers_see_flux_tokens_and_its_modulation_mlp_one_vector_per_image():
    roles = {
        "double_blocks.3.img_attn.qkv": ("image", False),
        "double_blocks.3.txt_mlp.2": ("text", False),
        "single_blocks.7.linear2": ("joint", False),
        "img_in": ("image", False),
        "final_layer.linear": ("image", False),
        "distilled_guidance_layer.in_proj": ("vector", False),
        "distilled_guidance_layer.layers.4.out_layer": ("vector", False),
        "distilled_guidance_layer.out_proj": ("vector", False),
    }
    for module, (stream, modulation) in roles.items():
        role = CHROMA.layer_role(module)
        assert (role.stream, role.modulation) == (stream, modulation), module


def test_chroma_default_capture_site_is_the_papers_block():
    model = flux_like(distilled_guidance_layer=object())
    assert CHROMA.capture_sites(model)[CHROMA.default_capture_site(model)] == "double_blocks.17"
    assert CHROMA.mask_grid((128, 96)) == (64, 48)
    assert CHROMA.text_engine == "text_processing_engine_t5" and CHROMA.first_chunk_only
