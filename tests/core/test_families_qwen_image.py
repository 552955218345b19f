"""Qwen-Image's family description without a host (told from FLUX.1 and Chroma by structure, its layers' roles, its
default capture site) and the reading of byte-level BPE pieces its tokenizer gives."""

from __future__ import annotations

from types import SimpleNamespace

from lib_freefuse.core import find_subject_tokens
from lib_freefuse.core.prompt import byte_level_pieces
from lib_freefuse.families import QWEN_IMAGE, detect


def qwen_like(blocks: int = 60):
    block = SimpleNamespace(attn=object(), img_mod=object(), txt_mod=object())
    return SimpleNamespace(transformer_blocks=[block] * blocks, txt_norm=object())


def test_qwen_image_is_told_by_its_double_stream_blocks_and_text_norm():
    assert detect(qwen_like()) is QWEN_IMAGE  # Neo's class, and its Nunchaku subclass (refused by the host adapter)
    assert detect(SimpleNamespace(transformer_blocks=qwen_like().transformer_blocks)) is None  # no txt_norm
    single_stream = SimpleNamespace(transformer_blocks=[SimpleNamespace(attn=0, img_mod=0)], txt_norm=0)
    assert detect(single_stream) is None


def test_qwen_image_layers_see_their_stream_and_modulations_act_per_token():
    roles = {
        "transformer_blocks.7.attn.to_q": "image",
        "transformer_blocks.7.attn.to_out.0": "image",
        "transformer_blocks.7.img_mlp.net.0.proj": "image",
        "transformer_blocks.7.img_mlp.net.2": "image",
        "img_in": "image",
        "proj_out": "image",
        "transformer_blocks.7.attn.add_k_proj": "text",
        "transformer_blocks.7.attn.to_add_out": "text",
        "transformer_blocks.7.txt_mlp.net.2": "text",
        "txt_in": "text",
        "norm_out.linear": "vector",
        "time_text_embed.timestep_embedder.linear_1": "vector",
    }
    for module, stream in roles.items():
        role = QWEN_IMAGE.layer_role(module)
        assert (role.stream, role.modulation) == (stream, False), module
    for module, stream in (("img_mod", "image"), ("txt_mod", "text")):
        role = QWEN_IMAGE.layer_role(f"transformer_blocks.7.{module}.1")
        assert (role.stream, role.modulation, role.parent) == (stream, True, f"transformer_blocks.7.{module}")


def test_qwen_image_default_capture_site_and_grid():
    model = qwen_like()
    assert QWEN_IMAGE.capture_sites(model)[QWEN_IMAGE.default_capture_site(model)] == "transformer_blocks.36"
    assert QWEN_IMAGE.default_capture_site(qwen_like(blocks=1)) == 0
    assert QWEN_IMAGE.mask_grid((128, 97)) == (64, 49)


def test_byte_level_pieces_read_as_text():
    pieces = [
        "<|im_start|>",
        "user",
        "\u010a",
        "z",
        "or",
        "bo",
        "\u0120caf",
        "\u00c3\u00a9",
        "\u0120\u00e7\u012e",
        "\u00ab",
    ]
    text = byte_level_pieces(pieces)
    assert text == ["<|im_start|>", "user", "\n", "z", "or", "bo", " caf", "\u00e9", " \u732b", ""]
    (cafe, cat, zorbo) = find_subject_tokens(text, ["café", "\u732b", "zorbo"])
    assert cafe.positions == (6, 7) and cat.positions == (8, 9) and zorbo.positions == (3, 4, 5)


def test_byte_level_pieces_keep_a_broken_character_as_a_replacement():
    assert byte_level_pieces(["\u00e7\u012e"]) == ["\ufffd"]  # the first two of a three-byte character
    assert byte_level_pieces(["\u00ab"]) == ["\ufffd"]  # a continuation byte alone
