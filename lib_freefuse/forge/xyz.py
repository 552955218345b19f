"""FreeFuse's axes for Forge's X/Y/Z plot (scripts/xyz_grid.py), and how a grid cell's job reads them.

Each cell of a grid runs on `copy(p)`: an axis's apply puts its value in `p.freefuse_xyz` ({FreeFuseArgs key:
value}, a new dict per apply, so that several axes compose and the template `p` is never changed) or, for the
subject LoRA weights, in `p.freefuse_xyz_weights` ({subject index, or ALL_SUBJECTS: weight}). The script's
`process()` then calls `xyz_args(args, p)`, which validates them as `FreeFuseArgs.updated` does, and
`clear_previous_cell(p)`: the cells share one `extra_generation_params` dict (a shallow copy), so a cell would
otherwise keep the "FreeFuse ..." infotext entries of the cell before (FreeFuse off, no warnings, a default).

An axis over a setting's choices lists the accordion's plain labels (FIELD_HELP's `choice_labels`: Forge's page then
gives the labels picked, and its grid records them); a cell turns a label into its stored value, so the cell's
infotext and the API keep the stored values, and a stored value given as it is (CSV mode, the API) still counts.

Only `register_axes` touches Forge (modules.scripts, found at call time); everything else is plain Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..args import FreeFuseArgs, SubjectBinding, help_for
from ..log import logger
from ..script_values import SUBJECT_ROWS

OVERRIDES_ATTR = "freefuse_xyz"
WEIGHTS_ATTR = "freefuse_xyz_weights"
ALL_SUBJECTS = -1  # key of WEIGHTS_ATTR: every subject
WEIGHT = "weight"  # Axis.key of the subject LoRA weight axes
LABEL_PREFIX = "FreeFuse "
PARAMS_PREFIX = "FreeFuse "  # every infotext key of FreeFuse but the bindings' "FreeFuse" (lib_freefuse.infotext)
XYZ_MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid")  # Forge loads scripts/xyz_grid.py as module "xyz_grid.py"
BOOL_CHOICES = ("False", "True")  # as Forge's boolean_choice(reverse=True)
AUTO_ZERO = ("capture_step",)  # 0 stands for "automatic", as in the script's number box
_PROBE = FreeFuseArgs(subjects=(SubjectBinding("probe", "probe"),))  # enabled=True needs a subject to validate


@dataclass(frozen=True)
class Axis:
    """One X/Y/Z plot axis: its label, the FreeFuseArgs key it sets, the type Forge parses values with, choices."""

    label: str
    key: str  # a FreeFuseArgs key, or WEIGHT
    type: type  # int and float axes take Forge's ranges ("1-4", "0.5-1 (+0.25)", "1-10 [4]")
    choices: tuple[str, ...] = ()  # the values: a dropdown in Forge's page, which then gives the values picked
    subject: int = ALL_SUBJECTS  # WEIGHT axes: the 0-based subject whose weight is set, or ALL_SUBJECTS
    choice_labels: tuple[str, ...] = ()  # the plain words the dropdown shows for `choices` (the accordion's)

    @property
    def shown_choices(self) -> tuple[str, ...]:
        """What the dropdown lists: the plain labels where the setting has them, else the values."""
        return self.choice_labels or self.choices

    def stored(self, value: Any) -> Any:
        """The stored value of a shown label ("Whole image" -> "global"); any other value as it is."""
        if isinstance(value, str) and value in self.choice_labels:
            return self.choices[self.choice_labels.index(value)]
        return value


def _choice_axis(name: str, key: str) -> Axis:
    """An axis over a setting's choices, shown by the accordion's plain labels (lib_freefuse.args.FIELD_HELP)."""
    field = help_for(key)
    return Axis(f"{LABEL_PREFIX}{name}", key, str, field.choices, choice_labels=field.choice_labels)


def _weight_axes() -> tuple[Axis, ...]:
    every = Axis(f"{LABEL_PREFIX}subject LoRA weight", WEIGHT, float)
    rows = tuple(
        Axis(f"{LABEL_PREFIX}subject {i + 1} LoRA weight", WEIGHT, float, subject=i) for i in range(SUBJECT_ROWS)
    )
    return (every, *rows)


AXES: tuple[Axis, ...] = (
    Axis(f"{LABEL_PREFIX}enabled", "enabled", str, BOOL_CHOICES),
    Axis(f"{LABEL_PREFIX}capture step", "capture_step", int),
    Axis(f"{LABEL_PREFIX}capture block", "capture_block", int),
    Axis(f"{LABEL_PREFIX}sink filter", "sink_filter", str, BOOL_CHOICES),
    Axis(f"{LABEL_PREFIX}self-attention", "self_attention", str, BOOL_CHOICES),
    Axis(f"{LABEL_PREFIX}superpixel vote", "superpixel_vote", str, BOOL_CHOICES),
    _choice_axis("pre-mask LoRA mode", "pre_mask"),
    Axis(f"{LABEL_PREFIX}restart", "restart", str, BOOL_CHOICES),
    Axis(f"{LABEL_PREFIX}average steps", "average_steps", str, BOOL_CHOICES),
    Axis(f"{LABEL_PREFIX}average blocks", "average_blocks", str, BOOL_CHOICES),
    _choice_axis("modulation", "modulation"),
    _choice_axis("word-to-image attention", "cross_attention"),
    _choice_axis("LoRAs on text tokens", "text_loras"),
    Axis(f"{LABEL_PREFIX}attention bias", "attention_bias", float),
    _choice_axis("contrastive seeds", "contrastive"),
    _choice_axis("background", "background"),
    Axis(f"{LABEL_PREFIX}background threshold", "background_threshold", float),
    Axis(f"{LABEL_PREFIX}fill holes", "fill_holes", float),
    _choice_axis("surroundings", "surroundings"),
    Axis(f"{LABEL_PREFIX}superpixel image size", "slic_max_side", int),
    Axis(f"{LABEL_PREFIX}show masks", "show_masks", str, BOOL_CHOICES),  # True: the cell shows its mask overlay
    *_weight_axes(),
)


# ------------------------------------------------------------------------------------------------ values


def parse_value(axis: Axis, value: Any) -> Any:
    """The typed value of one axis value, as FreeFuseArgs reads it; ValueError names the field at fault."""
    if axis.key == WEIGHT:
        field = "subjects[*].weight" if axis.subject == ALL_SUBJECTS else f"subjects[{axis.subject}].weight"
        try:
            return SubjectBinding("probe", "probe", weight=value).weight
        except ValueError as error:
            raise ValueError(f"{field}{str(error).removeprefix('weight')}") from None
    if axis.key in AUTO_ZERO and value == 0 and not isinstance(value, bool):
        return None
    return _PROBE.updated({axis.key: axis.stored(value)}).to_dict()[axis.key]


def format_value(axis: Axis, value: Any) -> str:
    """The grid's legend for one value: "FreeFuse capture step: auto", "FreeFuse restart: True"."""
    if axis.key in AUTO_ZERO and value == 0:
        value = "auto"
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{axis.label}: {value}"


def confirm_values(axis: Axis, values: Iterable[Any]) -> None:
    """Check every value of an axis before the grid starts; ValueError names the axis and the field."""
    for value in values:
        try:
            parse_value(axis, value)
        except ValueError as error:
            raise ValueError(f"{axis.label} value {value!r}: {error}") from None


def with_axis_value(
    overrides: Mapping[str, Any], weights: Mapping[int, Any], axis: Axis, value: Any
) -> tuple[dict[str, Any], dict[int, Any]]:
    """(overrides, weights) with one axis value added, as new dicts; never raises (process() rejects bad values)."""
    with contextlib.suppress(ValueError):  # a bad value stays raw: FreeFuseArgs.updated names it in process()
        value = parse_value(axis, value)
    if axis.key == WEIGHT:
        return dict(overrides), {**weights, axis.subject: value}
    return {**overrides, axis.key: value}, dict(weights)


def apply_axis(p: Any, axis: Axis, value: Any) -> None:
    """Put one axis value on a cell's `p` (Forge's AxisOption.apply)."""
    overrides, weights = with_axis_value(_overrides(p), _weights(p), axis, value)
    setattr(p, OVERRIDES_ATTR, overrides)
    setattr(p, WEIGHTS_ATTR, weights)


def cell_args(args: FreeFuseArgs, overrides: Mapping[str, Any], weights: Mapping[int, Any]) -> FreeFuseArgs:
    """`args` with a cell's overrides, then its subject weights (every subject first, then single ones)."""
    if overrides:
        args = args.updated(overrides)
    if not weights:
        return args
    if not isinstance(weights, Mapping):
        raise ValueError(f"subjects: expected a dict of XYZ weights, got {type(weights).__name__}")
    rows = [subject.to_dict() for subject in args.subjects]
    for index in weights:
        if index != ALL_SUBJECTS and not (isinstance(index, int) and 0 <= index < len(rows)):
            raise ValueError(
                f"subjects[{index}].weight: an X/Y/Z axis sets subject {_ordinal(index)}'s weight, "
                f"but {len(rows)} subject(s) are bound"
            )
    for index, row in enumerate(rows):
        row[WEIGHT] = weights.get(index, weights.get(ALL_SUBJECTS, row[WEIGHT]))
    return args.updated({"subjects": rows})


def xyz_args(args: FreeFuseArgs, p: Any) -> FreeFuseArgs:
    """The arguments of this job: `args` as the script's values give them, with the X/Y/Z plot cell's values."""
    return cell_args(args, _overrides(p), _weights(p))


def clear_previous_cell(p: Any) -> None:
    """Drop the "FreeFuse ..." infotext entries of the cell before: X/Y/Z plot cells share copy(p)'s dict."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        ours = [key for key in params if isinstance(key, str) and (key.startswith(PARAMS_PREFIX) or key == "FreeFuse")]
        for key in ours:
            del params[key]


def _overrides(p: Any) -> Mapping[str, Any]:
    return getattr(p, OVERRIDES_ATTR, None) or {}


def _weights(p: Any) -> Mapping[int, Any]:
    return getattr(p, WEIGHTS_ATTR, None) or {}


def _ordinal(index: object) -> str:
    return str(index + 1) if isinstance(index, int) else repr(index)


# ------------------------------------------------------------------------------------------ registration


def find_xyz_grid(scripts_data: Sequence[Any]) -> Any | None:
    """Forge's loaded scripts/xyz_grid.py module among `modules.scripts.scripts_data`, or None."""
    for data in scripts_data:
        if data.script_class.__module__ in XYZ_MODULE_NAMES and getattr(data, "module", None) is not None:
            return data.module
    return None


def axis_option(xyz_grid: Any, axis: Axis) -> Any:
    """Forge's AxisOption for one axis."""
    choices: Callable[[], list[str]] | None = (lambda: list(axis.shown_choices)) if axis.choices else None
    return xyz_grid.AxisOption(
        axis.label,
        axis.type,
        lambda p, x, xs: apply_axis(p, axis, x),
        format_value=lambda p, opt, x: format_value(axis, x),
        confirm=lambda p, xs: confirm_values(axis, xs),
        choices=choices,
    )


def add_axes(xyz_grid: Any) -> int:
    """Append FreeFuse's axes that `xyz_grid.axis_options` lacks (by label); how many were added."""
    present = {getattr(option, "label", None) for option in xyz_grid.axis_options}
    missing = [axis for axis in AXES if axis.label not in present]
    xyz_grid.axis_options.extend(axis_option(xyz_grid, axis) for axis in missing)
    return len(missing)


def register_axes() -> None:
    """Add FreeFuse's axes to Forge's X/Y/Z plot, once (Forge's on_before_ui callback; safe to call again)."""
    from modules import scripts  # Forge, imported only here

    xyz_grid = find_xyz_grid(scripts.scripts_data)
    if xyz_grid is None:
        logger.info("FreeFuse: no X/Y/Z plot script is loaded; its FreeFuse axes are not added")
        return
    added = add_axes(xyz_grid)
    logger.debug("FreeFuse: %d axes added to the X/Y/Z plot", added)


__all__ = [
    "ALL_SUBJECTS",
    "AXES",
    "OVERRIDES_ATTR",
    "WEIGHTS_ATTR",
    "Axis",
    "add_axes",
    "apply_axis",
    "cell_args",
    "clear_previous_cell",
    "confirm_values",
    "find_xyz_grid",
    "format_value",
    "parse_value",
    "register_axes",
    "xyz_args",
]
