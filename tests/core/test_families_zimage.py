"""Z-Image's family description without a host: told apart by structure (not Lumina 2, not FLUX), its layers' roles,
its default capture site."""

from __future__ import annotations

from types import SimpleNamespace

from lib_freefuse.families import KNOWN, Z_IMAGE, detect, unsupported


def next_dit(layers: int = 30, z_image: bool = True):
    """NextDiT's shape: refiners, caption embedder, joint layers whose adaLN is a Linear (Z-Image) or SiLU + Linear."""
    linear, silu = SimpleNamespace(weight=0), SimpleNamespace()
    adaln = [linear] if z_image else [silu, linear]
    return SimpleNamespace(
        noise_refiner=[0, 0],
        context_refiner=[0, 0],
        cap_embedder=[0, 0],
        layers=[SimpleNamespace(adaLN_modulation=adaln) for _ in range(layers)],
    )


def test_z_image_is_told_from_lumina2_and_flux_by_structure():
    assert detect(next_dit()) is Z_IMAGE
    assert detect(next_dit(z_image=False)) is None  # Lumina 2: the same NextDiT, a SiLU before the adaLN linear
    assert detect(SimpleNamespace(double_blocks=[0], single_blocks=[0])) is not Z_IMAGE
    assert [f.name for f in KNOWN][-1] == "Z-Image"
    assert unsupported(None).endswith("Z-Image")


def test_z_image_layers_see_their_part_of_the_sequence():
    roles = {
        "layers.0.attention.qkv": "joint",
        "layers.29.attention.out": "joint",
        "layers.7.feed_forward.w2": "joint",
        "final_layer.linear": "joint",
        "noise_refiner.1.attention.qkv": "image",
        "noise_refiner.0.feed_forward.w3": "image",
        "x_embedder": "image",
        "context_refiner.1.attention.out": "text",
        "context_refiner.0.feed_forward.w1": "text",
        "cap_embedder.1": "text",
        "t_embedder.mlp.0": "vector",
        "t_embedder.mlp.2": "vector",
    }
    for module, stream in roles.items():
        role = Z_IMAGE.layer_role(module)
        assert (role.stream, role.modulation, role.cross_kv) == (stream, False, False), module


def test_z_image_adaln_linears_are_modulation_layers_of_their_block():
    """Each modulated block's (and the final layer's) adaLN Linear modulates the tokens its block sees, per token."""
    roles = {
        "layers.3.adaLN_modulation.0": ("joint", "layers.3"),
        "layers.29.adaLN_modulation.0": ("joint", "layers.29"),
        "noise_refiner.1.adaLN_modulation.0": ("image", "noise_refiner.1"),
        "final_layer.adaLN_modulation.1": ("joint", "final_layer"),
    }
    for module, (stream, parent) in roles.items():
        role = Z_IMAGE.layer_role(module)
        assert (role.stream, role.modulation, role.parent) == (stream, True, parent), module


def test_z_image_default_capture_site_is_the_authors_layer():
    model = next_dit()
    assert Z_IMAGE.capture_sites(model)[Z_IMAGE.default_capture_site(model)] == "layers.18"
    small = next_dit(layers=3)
    assert Z_IMAGE.capture_sites(small)[Z_IMAGE.default_capture_site(small)] == "layers.2"
    assert Z_IMAGE.mask_grid((128, 97)) == (64, 49)  # NextDiT pads the latent to its 2x2 patches
    assert not Z_IMAGE.first_chunk_only and not Z_IMAGE.end_of_text
