"""FLUX.2 Klein's family description without a host: told from FLUX.1 and Chroma by structure, its layers' roles,
its grid and default site."""

from __future__ import annotations

from types import SimpleNamespace

from lib_freefuse.families import CHROMA, FLUX1, FLUX2_KLEIN, KNOWN, detect, unsupported


def flux_like(double=19, single=38, **extra):
    return SimpleNamespace(double_blocks=[0] * double, single_blocks=[0] * single, **extra)


def test_klein_is_told_from_flux_and_chroma_by_its_shared_modulation():
    assert detect(flux_like(5, 20, double_stream_modulation_img=object())) is FLUX2_KLEIN
    assert detect(flux_like()) is FLUX1
    assert detect(flux_like(distilled_guidance_layer=object())) is CHROMA
    assert FLUX2_KLEIN in KNOWN
    assert "Chroma, FLUX.2 Klein, " in unsupported(None)


def test_klein_layers_see_flux_tokens_and_its_shared_modulations_are_made_per_token():
    roles = {
        "double_blocks.3.img_attn.qkv": ("image", False, None),
        "double_blocks.3.img_mlp.0": ("image", False, None),
        "double_blocks.3.txt_mlp.2": ("text", False, None),
        "single_blocks.7.linear2": ("joint", False, None),
        "img_in": ("image", False, None),
        "txt_in": ("text", False, None),
        "double_stream_modulation_img.lin": ("image", True, "double_stream_modulation_img"),
        "double_stream_modulation_txt.lin": ("text", True, "double_stream_modulation_txt"),
        "single_stream_modulation.lin": ("joint", True, "single_stream_modulation"),
        "time_in.out_layer": ("vector", False, None),
        "final_layer.adaLN_modulation.1": ("vector", False, None),
    }
    for module, expected in roles.items():
        role = FLUX2_KLEIN.layer_role(module)
        assert (role.stream, role.modulation, role.parent) == expected, module


def test_klein_default_site_is_the_second_to_last_double_block_and_its_grid_the_latent():
    for double, site in ((5, "double_blocks.3"), (8, "double_blocks.6"), (1, "double_blocks.0")):
        model = flux_like(double, 20, double_stream_modulation_img=object())
        assert FLUX2_KLEIN.capture_sites(model)[FLUX2_KLEIN.default_capture_site(model)] == site
    assert FLUX2_KLEIN.mask_grid((64, 48)) == (64, 48)  # 1x1 patches
    assert FLUX2_KLEIN.text_engine == "text_processing_engine_gemma"
