"""The toy world's pure parts: the sprite generator keeps the characters out of the base data, and the committed
scorer reads identity correctly on rendered ground truth (what the benchmark relies on)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

TOYWORLD = Path(__file__).resolve().parents[2] / "bench" / "toyworld"
sys.path.insert(0, str(TOYWORLD))

import scorer as toy_scorer  # noqa: E402
import world  # noqa: E402


def test_characters_never_appear_in_base_data():
    rng = np.random.default_rng(0)
    assert world.ZORB not in world.GENERIC_SPRITES and world.QUIL not in world.GENERIC_SPRITES
    for _ in range(300):
        picture, caption = world.base_example(rng)
        assert "zorb" not in caption and "quil" not in caption
        assert picture.shape == (world.CELLS, world.CELLS, 3)
    # the characters' exact looks are absent: no base picture has a red disc with yellow horizontal stripes
    zorb = world.render([(world.ZORB, "left")], np.random.default_rng(1))
    assert not np.allclose(zorb, world.BACKGROUND)


def test_same_seed_same_data():
    a = [world.base_example(np.random.default_rng(3)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and a[0][1] == a[1][1]


@pytest.mark.parametrize("place", ["left", "right"])
def test_sprites_stay_inside_their_half(place):
    rng = np.random.default_rng(4)
    for _ in range(50):
        picture = world.render([(world.QUIL, place)], rng)
        drawn = np.abs(picture - np.array(world.BACKGROUND)).sum(-1) > 1e-6
        other = drawn[:, world.HALF :] if place == "left" else drawn[:, : world.HALF]
        assert drawn.any() and not other.any()


def test_captions_cover_training_and_benchmark():
    captions = world.all_captions()
    assert captions[0] == "" and len(set(captions)) == len(captions)
    for prompt, _ in world.benchmark_prompts().values():
        assert prompt in captions
    rng = np.random.default_rng(5)
    assert all(world.character_example("zorb", rng)[1] in captions for _ in range(20))
    assert all(world.base_example(rng)[1] in captions for _ in range(100))


def test_upscale_and_cells_are_inverse():
    picture = world.render([(world.ZORB, "left"), (world.QUIL, "right")], np.random.default_rng(6))
    image = world.upscale(picture)
    assert image.shape == (world.IMAGE_PX, world.IMAGE_PX, 3)
    np.testing.assert_allclose(world.cells_of(image), picture, atol=1e-6)


def test_committed_scorer_reads_rendered_ground_truth():
    """Held-out renders: every head >= 0.97 where the label is visible, and identity exact for the characters."""
    scorer = toy_scorer.load_scorer(TOYWORLD / "model" / "scorer.safetensors")
    rng = np.random.default_rng(12345)
    pictures, truths = [], []
    for i in range(200):
        pool = world.ALL_SPRITES if i % 2 else tuple(world.CHARACTERS.values())
        figures = [(pool[int(rng.integers(len(pool)))], place) for place in ("left", "right") if rng.random() > 0.1]
        pictures.append(world.upscale(world.render(figures, rng)))
        truths.append(dict((place, sprite) for sprite, place in figures))
    read = toy_scorer.read_halves(scorer, torch.from_numpy(np.stack(pictures)))
    hits = {head: [] for head in toy_scorer.HEADS}
    for halves, truth in zip(read, truths, strict=True):
        for half, place in zip(halves, ("left", "right"), strict=True):
            sprite = truth.get(place)
            hits["present"].append(half["present"] == ("present" if sprite else "absent"))
            if sprite is None:
                continue
            for head in ("colour", "shape", "pattern"):
                hits[head].append(half[head] == getattr(sprite, head))
            if sprite.pattern != "plain":  # a plain sprite has no visible pattern colour
                hits["pattern_colour"].append(half["pattern_colour"] == sprite.pattern_colour)
            for name, character in world.CHARACTERS.items():
                assert toy_scorer.identified(half, name) == (sprite == character) or sprite.colour == character.colour
    accuracy = {head: float(np.mean(v)) for head, v in hits.items()}
    assert min(accuracy.values()) >= 0.97, accuracy


def test_score_image_counts_halves():
    zorb = {"present": "present", "colour": "red", "shape": "disc", "pattern": "hstripes", "pattern_colour": "yellow"}
    quil = {"present": "present", "colour": "blue", "shape": "square", "pattern": "dots", "pattern_colour": "white"}
    empty = dict(zorb, present="absent")
    assert toy_scorer.score_image([zorb, quil], "zorb") == {
        "present": 1.0,
        "identity": 1.0,
        "both_right": 1.0,
        "wrong_colour": 0.0,
    }
    swapped = toy_scorer.score_image([zorb, quil], "quil")
    assert swapped["identity"] == 0.0 and swapped["wrong_colour"] == 1.0
    assert toy_scorer.score_image([zorb, empty], "zorb") == {
        "present": 0.5,
        "identity": 0.5,
        "both_right": 0.0,
        "wrong_colour": 0.0,
    }


def test_figure_masks_are_where_the_figures_are_drawn():
    """render_with_masks: each mask covers exactly its sprite's pixels; base_example draws the same pictures."""
    for seed in range(20):
        picture, caption, masks = world.base_example_with_masks(np.random.default_rng(seed))
        same_picture, same_caption = world.base_example(np.random.default_rng(seed))
        assert np.array_equal(picture, same_picture) and caption == same_caption
        assert len(masks) == caption.count(" and ") + 1
        drawn = np.any(np.abs(picture - np.array(world.BACKGROUND)) > 1e-6, axis=-1)
        assert np.array_equal(drawn, masks.any(0))
        if len(masks) == 2:  # left figure first, in the left half
            assert not masks[0][:, world.HALF :].any() and not masks[1][:, : world.HALF].any()


def test_base_pool_token_masks_cover_each_figure():
    import train

    _, captions, token_masks = train.render_pool("base", 40, seed=2)
    grid = token_masks.reshape(40, 2, train.GRID, train.GRID)
    for caption, masks in zip(captions, grid, strict=True):
        two = " and " in caption
        assert masks[0].sum() >= 16 and (masks[1].sum() >= 16) == two  # a 12-cell sprite covers >= 16 tokens
        if two:
            assert not masks[0][:, train.GRID // 2 :].any() and not masks[1][:, : train.GRID // 2].any()


def naive_attention_loss(records, depth, words, token_masks, n_txt):
    """attention_loss by loops: per block, figure, word token, image token and head; words (B, 2, K)."""
    total = 0.0
    for q, k in records[:depth]:
        b_size, heads, _, d = q.shape
        word_terms, image_terms, word_count, image_count = 0.0, 0.0, 0, 0
        for b in range(b_size):
            own = [[int(t) for t in words[b, f] if t >= 0] for f in range(2)]
            valid = [bool(own[f]) and token_masks[b, f].sum() > 0 for f in range(2)]
            for f in range(2):
                if not valid[f]:
                    continue
                maps = [
                    sum(torch.softmax(q[b, h, w] @ k[b, h, n_txt:].T / d**0.5, -1) for h in range(heads)) / heads
                    for w in own[f]
                ]
                word_terms -= torch.log((sum(maps) / len(maps) * token_masks[b, f]).sum())
                word_count += 1
            if all(valid):
                both = own[0] + own[1]
                for t in range(q.shape[2] - n_txt):
                    for f in range(2):
                        if token_masks[b, f, t]:
                            logits = [q[b, h, n_txt + t] @ k[b, h, both].T / d**0.5 for h in range(heads)]
                            p = sum(torch.softmax(x, -1) for x in logits) / heads
                            mine = p[: len(own[0])].sum() if f == 0 else p[len(own[0]) :].sum()
                            image_terms -= torch.log(mine)
                            image_count += 1
        total += word_terms / max(word_count, 1) + image_terms / max(image_count, 1)
    return total / depth


def test_attention_loss_matches_naive_reference():
    import train

    gen = torch.Generator().manual_seed(0)
    b, heads, n_txt, tokens, d = 4, 2, 6, 12, 8
    records = [tuple(torch.randn(b, heads, n_txt + tokens, d, generator=gen) for _ in range(2)) for _ in range(3)]
    words = torch.tensor([[0, 3], [2, -1], [-1, -1], [1, 4]])
    token_masks = torch.zeros(b, 2, tokens)
    token_masks[0, 0, :4] = token_masks[0, 1, 6:9] = 1
    token_masks[1, 0, 2:5] = 1
    token_masks[3, 0, 7:] = token_masks[3, 1, :3] = 1
    got = train.attention_loss(records, 2, words, token_masks, n_txt)
    assert torch.allclose(got, naive_attention_loss(records, 2, words[..., None], token_masks, n_txt), atol=1e-5)
    # words of several T5 tokens (a name), padded with -1
    words = torch.tensor(
        [[[0, 1, -1], [3, 4, 5]], [[2, -1, -1], [-1, -1, -1]], [[-1] * 3] * 2, [[1, -1, -1], [4, 5, -1]]]
    )
    got = train.attention_loss(records, 3, words, token_masks, n_txt)
    assert torch.allclose(got, naive_attention_loss(records, 3, words, token_masks, n_txt), atol=1e-5)
    # a figure's word attending only inside its figure, and its tokens only to it, costs (almost) nothing
    q, k = (torch.zeros(1, 1, n_txt + tokens, 2) for _ in range(2))
    q[0, 0, 0], k[0, 0, n_txt : n_txt + 4] = torch.tensor([30.0, 0]), torch.tensor([1.0, 0])
    q[0, 0, n_txt : n_txt + 4], k[0, 0, 0] = torch.tensor([0, 30.0]), torch.tensor([0, 1.0])
    one_figure = torch.zeros(1, 2, tokens)
    one_figure[0, 0, :4] = 1
    assert train.attention_loss([(q, k)], 1, torch.tensor([[0, -1]]), one_figure, n_txt) < 1e-3


def test_named_base_pictures():
    """--base-names: the same figures, some named by made-up names (never a character's), every caption known."""
    assert not set(world.NAMES) & set(world.CHARACTERS) and not set(world.NAMES) & set(world.COLOURS)
    captions = set(world.all_captions(names=True))
    named = 0
    for seed in range(60):
        picture, caption, masks = world.base_example_with_masks(np.random.default_rng(seed), names=0.5)
        plain = world.base_example_with_masks(np.random.default_rng(seed))
        assert np.array_equal(picture, plain[0]) and np.array_equal(masks, plain[2])
        assert caption in captions and "zorb" not in caption and "quil" not in caption
        named += any(name in caption.split() for name in world.NAMES)
    assert 20 < named < 60
    assert set(world.all_captions()) < captions


def test_made_up_names():
    """More names than the T5 has dimensions (64), all distinct, the same every time, none a colour, a character,
    a held-out name or a caption word; the held-out pair is captioned (for word_maps.py) but never drawn on."""
    names = world.made_up_names()
    assert names == world.NAMES and len(set(names)) == len(names) == world.NAME_COUNT > 64
    reserved = set(world.COLOURS) | set(world.CHARACTERS) | set(world.HELD_OUT_NAMES)
    assert not set(names) & (reserved | {"on", "the", "left", "right", "in", "center", "and"})
    assert all(name.isalpha() and name.islower() for name in names)
    first, second = world.HELD_OUT_NAMES
    captions = world.all_captions(names=True)
    assert world.caption([(first, "left"), (second, "right")]) in captions
    assert world.caption([(second, "left"), (first, "right")]) in captions
    assert not any(first in world.base_example_with_masks(np.random.default_rng(s), names=1.0)[1] for s in range(40))


def test_word_maps_split_iou_and_lora_merge(tmp_path):
    """word_maps.py: a map pair that splits the grid at the middle scores 1, the swap 0; merge_lora adds up @ down."""
    import word_maps

    grid = word_maps.GRID
    left = np.zeros((grid, grid))
    left[:, : grid // 2] = 1.0
    left, right = left.ravel() + 0.01, (1 - left).ravel() + 0.01
    assert word_maps.split_iou(left, right) == pytest.approx(1.0)
    assert word_maps.split_iou(right, left) == pytest.approx(0.0)

    model = torch.nn.Module()
    model.double_blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.double_blocks[0].img_attn = torch.nn.Module()
    model.double_blocks[0].img_attn.qkv = torch.nn.Linear(4, 6)
    before = model.double_blocks[0].img_attn.qkv.weight.detach().clone()
    up, down = torch.randn(6, 2), torch.randn(2, 4)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    path = tmp_path / "lora.safetensors"
    save_file({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)}, path)
    word_maps.merge_lora(model, path)
    assert torch.allclose(model.double_blocks[0].img_attn.qkv.weight, before + up @ down)


@pytest.mark.parametrize("metric", ["identity", "both_right"])
def test_oracle_share_and_its_bootstrap_interval(metric):
    """benchmark.py: FreeFuse's share of the oracle's gain over merged use (in identity, and in both right), with a
    paired bootstrap interval that holds the point estimate, narrows with more images, and is absent when there is
    no gain to share."""
    import benchmark

    def rows(merged, own, oracle):
        return {
            name: {metric: (float(np.mean(v)), 0.0), f"{metric}_values": list(v)}
            for name, v in (("both merged", merged), ("FreeFuse", own), ("oracle", oracle))
        }

    rng = np.random.default_rng(3)
    for n in (64, 1024):
        oracle = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.4, 0.4, 0.2])
        own = np.where(rng.random(n) < 0.5, oracle, 0.0)  # each oracle success kept with probability 1/2
        table = rows(np.zeros(n), own, oracle)
        share = benchmark.oracle_share(table, "FreeFuse", "oracle", metric)
        low, high = benchmark.oracle_share_interval(table, "FreeFuse", "oracle", metric)
        assert low < share < high and low < 0.5 < high
        assert (high - low) < (0.5 if n == 64 else 0.12)
    empty = rows(np.zeros(8), np.zeros(8), np.zeros(8))
    assert benchmark.oracle_share_interval(empty, "FreeFuse", "oracle", metric) is None


def test_load_conditioning_picks_the_rows_of_the_captions_asked_for(tmp_path):
    """train.load_conditioning on a file of T5 outputs: the asked-for captions' rows, in the asked-for order."""
    import json

    import train

    captions = ["", "red on the left", "zorb on the left and quil on the right"]
    crossattn, vector = torch.randn(3, 256, 64), torch.randn(3, 64)
    save_file({"crossattn": crossattn, "vector": vector}, str(tmp_path / "conditioning.safetensors"),
              metadata={"captions": json.dumps(captions)})  # fmt: skip
    table, cond, check = train.load_conditioning(tmp_path, "cpu")
    assert table == captions and torch.equal(cond["crossattn"], crossattn) and check == 0.0
    table, cond, _ = train.load_conditioning(tmp_path, "cpu", [captions[2], captions[0]])
    assert table == [captions[2], captions[0]] and train.caption_table(tmp_path) == captions
    assert torch.equal(cond["crossattn"], crossattn[[2, 0]]) and torch.equal(cond["vector"], vector[[2, 0]])


class _TinyFlux(torch.nn.Module):
    """A stand-in with one Linear under double_blocks (where add_loras puts LoRAs) and FLUX's call signature."""

    def __init__(self):
        super().__init__()
        self.double_blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.double_blocks[0].lin = torch.nn.Linear(4, 4)

    def forward(self, x, sigma, context, vector, guidance):
        return self.double_blocks[0].lin(x.movedim(1, -1)).movedim(-1, 1) + vector[:, :1, None, None]


def test_lora_checkpoints_are_the_lora_of_a_shorter_run(tmp_path):
    """train_lora --lora-save-every: the step-k checkpoint is exactly what a k-step run returns; none at the end."""
    import train

    torch.manual_seed(0)
    base = _TinyFlux().requires_grad_(False)
    latents, cap_idx = torch.randn(8, 4, 2, 2), torch.arange(8) % 3
    cond = {"crossattn": torch.randn(3, 5, 8), "vector": torch.randn(3, 8)}

    def run(steps, checkpoint=None):
        cfg = {"lora_steps": steps, "lora_batch": 4, "lora_lr": 1e-2}
        log = train.Log(tmp_path / "log.json")
        gen = torch.Generator().manual_seed(5)
        return train.train_lora(base, "zorb", latents, cap_idx, cond, cfg, log, gen, None, checkpoint)

    saved = {}
    final = run(5, (2, lambda step, state: saved.setdefault(step, state)))
    assert sorted(saved) == [2, 4]
    key = "lora_unet_double_blocks_0_lin"
    assert set(final) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"}
    short = run(2)
    assert all(torch.equal(saved[2][k], short[k]) for k in short)
    assert not torch.equal(saved[2][f"{key}.lora_up.weight"], final[f"{key}.lora_up.weight"])


def test_screen_loras_candidates_and_rows(tmp_path):
    """screen_loras.py: DIR@STEP picks the checkpoints, a missing file is named; rows carry their own LoRA names."""
    import screen_loras

    for name in ("lora_zorb", "lora_quil", "lora_zorb_500"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    label, files = screen_loras.candidate_files(str(tmp_path))
    assert label == f"{tmp_path.name}@final" and files["quil"] == tmp_path / "lora_quil.safetensors"
    with pytest.raises(SystemExit, match="lora_quil_500.safetensors"):
        screen_loras.candidate_files(f"{tmp_path}@500")

    rows = screen_loras.rows_for("x@final", 3, ["alone", "oracle"])
    assert [(name, tags, oracle) for name, tags, _, oracle in rows] == [
        ("x@final ZORB alone", " <lora:c3_zorb:1>", False),
        ("x@final QUIL alone", " <lora:c3_quil:1>", False),
        ("x@final oracle", " <lora:c3_zorb:1> <lora:c3_quil:1>", True),
    ]
    subjects = rows[2][2]["FreeFuse"]["args"][0]["subjects"]
    assert [s["lora"] for s in subjects] == ["c3_zorb", "c3_quil"]


def test_add_loras_without_the_text_stream():
    """--lora-no-text: no LoRA on a double block's txt_* layers; image layers and single blocks keep theirs."""
    import train

    def model():
        m = torch.nn.Module()
        m.double_blocks = torch.nn.ModuleList([torch.nn.Module()])
        for stream in ("img_attn", "txt_attn"):
            setattr(m.double_blocks[0], stream, torch.nn.Module())
            getattr(m.double_blocks[0], stream).qkv = torch.nn.Linear(4, 12)
        m.single_blocks = torch.nn.ModuleList([torch.nn.Module()])
        m.single_blocks[0].linear1 = torch.nn.Linear(4, 8)
        return m

    every = train.add_loras(model(), 2, torch.Generator().manual_seed(0))
    image_only = train.add_loras(model(), 2, torch.Generator().manual_seed(0), text_stream=False)
    assert sorted(every) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1"]
    assert sorted(image_only) == ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]


def test_assemble_lora_no_text_keys():
    """assemble.py --lora-no-text: only a double block's txt_* keys are text layers (single blocks hold both)."""
    import assemble

    text = ["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight", "lora_unet_double_blocks_12_txt_mod_lin.alpha",
            "lora_unet_double_blocks_2_txt_mlp_0.lora_up.weight"]  # fmt: skip
    kept = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_single_blocks_0_linear1.alpha",
            "lora_unet_double_blocks_1_img_mod_lin.lora_up.weight"]  # fmt: skip
    assert all(assemble.is_text_layer(k) for k in text)
    assert not any(assemble.is_text_layer(k) for k in kept)


def test_assemble_takes_each_lora_from_its_own_run(tmp_path):
    """assemble.py --lora-runs: each LoRA from the first run holding it; the log keeps the base run and each LoRA's."""
    import json

    import assemble

    base, zorb_run, quil_run = (tmp_path / n for n in ("base", "zorb", "quil"))
    logs = {
        base: {"phases": {"base": {"steps": 4000}, "lora_zorb": {"steps": 1200}, "lora_quil": {"steps": 1200}}},
        zorb_run: {"phases": {"lora_zorb": {"steps": 3000}}, "resumed_from": {"phases": {}}},
        quil_run: {"phases": {"lora_quil": {"steps": 3000, "lr": 4e-3}}},
    }
    for folder, log in logs.items():
        folder.mkdir()
        (folder / "train_log.json").write_text(json.dumps(log))
        for name in log["phases"]:
            if name.startswith("lora_"):
                (folder / f"{name}.safetensors").write_bytes(b"")

    assert assemble.lora_sources(base, []) == {"zorb": base, "quil": base}
    sources = assemble.lora_sources(base, [zorb_run, quil_run])
    assert sources == {"zorb": zorb_run, "quil": quil_run}
    log = assemble.training_log(base, sources)
    assert log["base_run"]["phases"] == {"base": {"steps": 4000}}  # the base run's own LoRAs are not the world's
    assert log["lora_zorb_run"] == {"phases": {"lora_zorb": {"steps": 3000}}}
    assert log["lora_quil_run"]["phases"]["lora_quil"]["lr"] == 4e-3
    (quil_run / "lora_quil.safetensors").unlink()
    (base / "lora_quil.safetensors").unlink()
    with pytest.raises(SystemExit, match="no lora_quil.safetensors"):
        assemble.lora_sources(base, [zorb_run, quil_run])


def test_figure_accuracy_counts_the_figures_tokens_in_their_own_halfs_mask():
    """world.figure_tokens finds a sprite's cells on grey; figure_accuracy: right masks 1, swapped 0, half of the
    figure in the wrong mask 0.5, a picture without figures 1."""
    image = np.full((64, 64, 3), world.BACKGROUND, np.float32)
    image[8:24, 0:16] = (0.9, 0.1, 0.1)  # a figure on the left: token rows 1-2, columns 0-1 of an 8 x 8 grid
    figure = world.figure_tokens(image, (8, 8))
    assert figure.sum() == 4 and figure[1:3, 0:2].all()
    left = np.zeros((8, 8), bool)
    left[:, :4] = True
    right_masks, swapped = np.stack([left, ~left]), np.stack([~left, left])
    assert world.figure_accuracy(right_masks, figure) == 1.0
    assert world.figure_accuracy(swapped, figure) == 0.0
    half = right_masks.copy()
    half[0, 1, :2], half[1, 1, :2] = False, True  # one of the figure's two token rows given to the right subject
    assert world.figure_accuracy(half, figure) == 0.5
    assert world.figure_accuracy(swapped, np.zeros((8, 8), bool)) == 1.0


def test_mixed_oracle_masks_put_one_part_right():
    """world.mixed_masks: the extraction where the mode keeps it, the true halves on the rest; both modes together
    rebuild each side."""
    rng = np.random.default_rng(0)
    extracted = (rng.random((2, 4, 6)) > 0.5).astype(np.float32)
    halves = np.zeros((2, 4, 6), np.float32)
    halves[0, :, :3] = halves[1, :, 3:] = 1
    figure = (rng.random((4, 6)) > 0.6).astype(np.float32)
    on = world.mixed_masks(extracted, halves, figure, "truth on figures")
    off = world.mixed_masks(extracted, halves, figure, "truth off figures")
    inside, outside = figure.astype(bool), ~figure.astype(bool)
    assert np.array_equal(on[:, inside], halves[:, inside]) and np.array_equal(on[:, outside], extracted[:, outside])
    assert np.array_equal(off[:, inside], extracted[:, inside]) and np.array_equal(off[:, outside], halves[:, outside])
    with pytest.raises(ValueError, match="truth on figures"):
        world.mixed_masks(extracted, halves, figure, "figures")
