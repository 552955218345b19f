"""FreeFuse's X/Y/Z plot axes without Forge: value parsing, apply on a cell's copy of p, per-cell arguments."""

from __future__ import annotations

import subprocess
import sys
from copy import copy
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_freefuse.args import FreeFuseArgs, help_for
from lib_freefuse.forge.xyz import (
    ALL_SUBJECTS,
    AXES,
    OVERRIDES_ATTR,
    WEIGHTS_ATTR,
    Axis,
    add_axes,
    apply_axis,
    cell_args,
    clear_previous_cell,
    confirm_values,
    find_xyz_grid,
    format_value,
    parse_value,
    xyz_args,
)

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]
BY_LABEL = {axis.label: axis for axis in AXES}
ARGS = FreeFuseArgs.from_dict(
    {"enabled": True, "subjects": [{"lora": "a", "words": "cat"}, {"lora": "b", "words": "dog", "weight": 0.7}]}
)


def axis(label: str) -> Axis:
    return BY_LABEL[f"FreeFuse {label}"]


class FakeAxisOption:
    """What Forge's xyz_grid.AxisOption keeps of its arguments."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def fake_xyz_grid() -> SimpleNamespace:
    return SimpleNamespace(AxisOption=FakeAxisOption, axis_options=[FakeAxisOption("Nothing", str, None)])


def test_the_required_axes_exist_with_unique_prefixed_labels():
    labels = [a.label for a in AXES]
    assert len(labels) == len(set(labels)) and all(label.startswith("FreeFuse ") for label in labels)
    wanted = {
        "enabled": "enabled",
        "capture step": "capture_step",
        "capture block": "capture_block",
        "sink filter": "sink_filter",
        "self-attention": "self_attention",
        "superpixel vote": "superpixel_vote",
        "pre-mask LoRA mode": "pre_mask",
        "restart": "restart",
        "modulation": "modulation",
        "word-to-image attention": "cross_attention",
        "LoRAs on text tokens": "text_loras",
        "contrastive seeds": "contrastive",
        "background": "background",
        "background threshold": "background_threshold",
        "fill holes": "fill_holes",
        "superpixel image size": "slic_max_side",
        "subject LoRA weight": "weight",
        "subject 1 LoRA weight": "weight",
        "subject 4 LoRA weight": "weight",
    }
    assert {label: axis(label).key for label in wanted} == wanted


def test_every_setting_axis_sets_a_key_of_the_argument_model():
    keys = set(FreeFuseArgs.field_names())
    assert all(a.key in keys for a in AXES if a.key != "weight")


@pytest.mark.parametrize(
    ("label", "value", "parsed"),
    [
        ("capture step", 0, None),  # 0 = automatic, as the script's number box
        ("capture step", 3, 3),
        ("capture block", 17, 17),
        ("enabled", "True", True),
        ("restart", "false", False),
        ("sink filter", " FALSE ", False),
        ("pre-mask LoRA mode", "Joint", "joint"),
        ("modulation", "per_token", "per_token"),
        ("modulation", "Whole image", "global"),  # the label the dropdown shows: its stored value
        ("LoRAs on text tokens", "All but on others' words", "all"),
        ("LoRAs on text tokens", "None", "none"),
        ("background", "Go to some subject", "off"),
        ("background", "Free at background words (default)", "words"),
        ("word-to-image attention", "Image_Queries", "image_queries"),
        ("contrastive seeds", "Strongest", "strongest"),
        ("contrastive seeds", "Its strongest where it leads (default)", "leading"),
        ("contrastive seeds", "Its own strongest", "off"),
        ("background", "threshold", "threshold"),
        ("background", "Tokens", "tokens"),
        ("background threshold", 0.75, 0.75),
        ("fill holes", 0.01, 0.01),
        ("superpixel image size", 512, 512),
        ("subject LoRA weight", 0.5, 0.5),
        ("subject 2 LoRA weight", -1, -1.0),
    ],
)
def test_values_parse_as_the_argument_model_reads_them(label, value, parsed):
    assert parse_value(axis(label), value) == parsed


@pytest.mark.parametrize(
    ("label", "value", "field"),
    [
        ("capture step", -1, "capture_step"),
        ("capture block", 1000, "capture_block"),
        ("restart", "yes", "restart"),
        ("enabled", "1", "enabled"),
        ("modulation", "masked", "modulation"),
        ("word-to-image attention", "both", "cross_attention"),
        ("contrastive seeds", "always", "contrastive"),
        ("background", "sky", "background"),
        ("fill holes", -0.5, "fill_holes"),
        ("superpixel image size", 8, "slic_max_side"),
        ("subject LoRA weight", 11.0, r"subjects\[\*\].weight"),
        ("subject 2 LoRA weight", float("nan"), r"subjects\[1\].weight"),
    ],
)
def test_invalid_values_are_refused_before_the_grid_naming_axis_and_field(label, value, field):
    with pytest.raises(ValueError, match=rf"^FreeFuse {label} value .*: {field}: "):
        confirm_values(axis(label), [value])


def test_choice_axes_offer_their_choices_and_every_choice_is_valid():
    assert axis("enabled").choices == axis("enabled").shown_choices == ("False", "True")
    assert axis("pre-mask LoRA mode").choices == ("joint", "off")
    assert axis("modulation").choices == ("per_token", "global", "off")
    for a in AXES:
        confirm_values(a, a.choices)
        confirm_values(a, a.shown_choices)
        assert (a.type is str) == bool(a.choices)


def test_choice_axes_show_the_accordions_plain_labels_and_set_the_stored_values():
    """The dropdown lists what the accordion shows (lib_freefuse.args.FIELD_HELP); each label sets its value."""
    for a in AXES:
        if a.key in ("enabled", "restart", "average_steps", "average_blocks", "show_masks", "sink_filter",
                     "self_attention", "superpixel_vote"):  # fmt: skip
            assert a.choice_labels == () and a.shown_choices == a.choices == ("False", "True")
            continue
        if not a.choices:
            continue
        field = help_for(a.key)
        assert a.shown_choices == field.choice_labels and a.choices == field.choices, a.label
        assert [parse_value(a, label) for label in a.shown_choices] == list(field.choices), a.label
        assert [parse_value(a, value) for value in a.choices] == list(field.choices), a.label  # API, old grids
    assert axis("modulation").shown_choices == ("Inside each mask (default)", "Whole image", "Left out")


def test_legend_values():
    assert format_value(axis("capture step"), 0) == "FreeFuse capture step: auto"
    assert format_value(axis("capture step"), 4) == "FreeFuse capture step: 4"
    assert format_value(axis("subject LoRA weight"), 0.1 + 0.2) == "FreeFuse subject LoRA weight: 0.3"
    assert format_value(axis("restart"), "True") == "FreeFuse restart: True"


def test_axes_compose_on_the_cell_copy_and_leave_the_template_alone():
    """As Forge's xyz_grid: each cell is copy(p), then the X, Y and Z axes apply in turn."""
    template = SimpleNamespace(steps=6)
    cells = []
    for step in (1, 2):
        for restart in ("False", "True"):
            cell = copy(template)
            apply_axis(cell, axis("capture step"), step)
            apply_axis(cell, axis("restart"), restart)
            apply_axis(cell, axis("subject 2 LoRA weight"), 0.25)
            cells.append(cell)
    assert not hasattr(template, OVERRIDES_ATTR) and not hasattr(template, WEIGHTS_ATTR)
    assert [getattr(c, OVERRIDES_ATTR) for c in cells] == [
        {"capture_step": s, "restart": r} for s in (1, 2) for r in (False, True)
    ]
    assert all(getattr(c, WEIGHTS_ATTR) == {1: 0.25} for c in cells)
    first = xyz_args(ARGS, cells[1])
    assert (first.capture_step, first.restart, [s.weight for s in first.subjects]) == (1, True, [1.0, 0.25])


def test_a_copy_of_a_cell_does_not_share_its_dicts():
    cell = SimpleNamespace()
    apply_axis(cell, axis("capture step"), 2)
    other = copy(cell)
    apply_axis(other, axis("capture block"), 3)
    assert getattr(cell, OVERRIDES_ATTR) == {"capture_step": 2}


def test_no_xyz_values_leave_the_arguments_unchanged():
    assert xyz_args(ARGS, SimpleNamespace()) is ARGS
    assert cell_args(ARGS, {}, {}) is ARGS


def test_one_weight_for_every_subject_and_single_ones_on_top():
    assert [s.weight for s in cell_args(ARGS, {}, {ALL_SUBJECTS: 0.5}).subjects] == [0.5, 0.5]
    assert [s.weight for s in cell_args(ARGS, {}, {1: 1.5, ALL_SUBJECTS: 0.5}).subjects] == [0.5, 1.5]
    assert [s.weight for s in cell_args(ARGS, {}, {0: 2.0}).subjects] == [2.0, 0.7]


def test_a_weight_for_a_subject_that_is_not_bound_is_refused():
    with pytest.raises(ValueError, match=r"^subjects\[2\]\.weight: .* subject 3's weight, but 2 subject"):
        cell_args(ARGS, {}, {2: 0.5})


def test_a_bad_value_is_kept_raw_by_apply_and_refused_by_the_cell_naming_the_field():
    """apply runs outside xyz_grid's try: it must not raise; process() rejects the cell's job instead."""
    cell = SimpleNamespace()
    apply_axis(cell, axis("capture block"), 1000)
    apply_axis(cell, axis("subject 1 LoRA weight"), 99.0)
    assert getattr(cell, OVERRIDES_ATTR) == {"capture_block": 1000}
    with pytest.raises(ValueError, match="^capture_block: "):
        xyz_args(ARGS, cell)
    with pytest.raises(ValueError, match=r"^subjects\[0\]\.weight: "):
        cell_args(ARGS, {}, getattr(cell, WEIGHTS_ATTR))


def test_enabling_through_an_axis_needs_a_bound_subject():
    with pytest.raises(ValueError, match="^subjects: FreeFuse is enabled"):
        cell_args(FreeFuseArgs(), {"enabled": True}, {})


def test_a_cell_drops_the_freefuse_infotext_of_the_cell_before_and_keeps_the_rest():
    shared = {"Steps": 6, "FreeFuse subjects": "[]", "FreeFuse warnings": "w", "Lora hashes": "x"}
    cell = copy(SimpleNamespace(extra_generation_params=shared))
    clear_previous_cell(cell)
    assert cell.extra_generation_params == {"Steps": 6, "Lora hashes": "x"}
    clear_previous_cell(SimpleNamespace())  # no dict: nothing to do


def test_adding_the_axes_twice_adds_them_once():
    grid = fake_xyz_grid()
    assert add_axes(grid) == len(AXES)
    assert add_axes(grid) == 0
    labels = [o.label for o in grid.axis_options]
    assert labels == ["Nothing", *(a.label for a in AXES)]


def test_registered_options_apply_format_confirm_and_offer_choices():
    grid = fake_xyz_grid()
    add_axes(grid)
    options = {o.label: o for o in grid.axis_options}
    step, restart = options["FreeFuse capture step"], options["FreeFuse restart"]
    assert step.type is int and step.choices is None
    assert restart.type is str and restart.choices() == ["False", "True"]
    texts = options["FreeFuse LoRAs on text tokens"]
    assert texts.choices() == ["Own words only (default)", "All but on others' words", "None"]
    labelled = SimpleNamespace()
    texts.apply(labelled, "All but on others' words", texts.choices())
    assert getattr(labelled, OVERRIDES_ATTR) == {"text_loras": "all"}
    label = "All but on others' words"
    assert texts.format_value(labelled, texts, label) == f"FreeFuse LoRAs on text tokens: {label}"
    cell = SimpleNamespace()
    step.apply(cell, 2, [1, 2])
    restart.apply(cell, "True", ["False", "True"])
    assert getattr(cell, OVERRIDES_ATTR) == {"capture_step": 2, "restart": True}
    assert step.format_value(cell, step, 0) == "FreeFuse capture step: auto"
    step.confirm(cell, [0, 1, 28])
    with pytest.raises(ValueError, match="capture_step"):
        step.confirm(cell, [1, -2])


def test_the_xyz_module_is_found_by_its_script_module_name():
    module = fake_xyz_grid()
    entry = SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)
    other = SimpleNamespace(script_class=type("Script", (), {"__module__": "freefuse.py"}), module=object())
    assert find_xyz_grid([other, entry]) is module
    assert find_xyz_grid([other]) is None


def test_the_module_imports_without_forge():
    probe = (
        "import sys, lib_freefuse.forge.xyz; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('modules', 'gradio', 'backend')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
