"""The widgets of the FreeFuse accordion's settings, laid out as lib_freefuse.args.SECTIONS says: one widget per key
of the dict form, its label, help and shown choices from the argument model. The script wires the events."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from ..args import SECTIONS, FieldHelp, FreeFuseArgs, Section, help_for
from ..script_values import AUTO_ZERO

DEFAULTS = FreeFuseArgs().to_dict()
CHECK_CLASS = "freefuse-check"  # style.css: the description under its checkbox, not above it
NUMBER_MIN_WIDTH = 110  # px: a number box as narrow as its values need
CHOICE_MIN_WIDTH = 220


def elem_id(prefix: str, key: str) -> str:
    """The element id of a setting's widget: freefuse-txt2img-capture-step."""
    return f"{prefix}-{key.replace('_', '-')}"


def setting(key: str, prefix: str):
    """The widget of one setting: a dropdown of plain labels that stores the model's values, a checkbox with its
    description under it, a one-line text box, or a compact number box (0 stands for automatic where AUTO_ZERO
    says so)."""
    entry: FieldHelp = help_for(key)
    value = DEFAULTS[key]
    common = {"label": entry.label, "info": entry.help, "elem_id": elem_id(prefix, key)}
    if entry.choices:
        return gr.Dropdown(entry.shown_choices(), value=value, min_width=CHOICE_MIN_WIDTH, **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, elem_classes=[CHECK_CLASS], **common)
    if isinstance(value, str):
        return gr.Textbox(value=value, lines=1, max_lines=1, min_width=CHOICE_MIN_WIDTH, **common)
    if key in AUTO_ZERO:
        return gr.Number(value=0, precision=0, minimum=0, min_width=NUMBER_MIN_WIDTH, **common)
    precision = 0 if isinstance(value, int) else None
    return gr.Number(value=value, precision=precision, minimum=0, min_width=NUMBER_MIN_WIDTH, **common)


def sections(prefix: str, after: dict[str, Callable[[], object]] | None = None) -> dict[str, object]:
    """Every section of SECTIONS as a closed accordion (nested parts as titled groups); {key: widget}.
    after: {key: make()} adds what make() builds under the row that holds that key (the capture-step line)."""
    widgets: dict[str, object] = {}
    for section in SECTIONS:
        with gr.Accordion(section.title, open=False, elem_id=f"{prefix}-{section.key}"):
            _section_body(section, prefix, widgets, after or {})
    return widgets


def _section_body(section: Section, prefix: str, widgets: dict, after: dict[str, Callable[[], object]]) -> None:
    for row in section.rows:
        with gr.Row(equal_height=False, elem_classes=["freefuse-settings-row"]):
            for key in row:
                widgets[key] = setting(key, prefix)
        for key in row:
            if key in after:
                after[key]()
    for part in section.parts:
        with gr.Group(elem_id=f"{prefix}-{part.key}", elem_classes=["freefuse-part"]):
            gr.Markdown(f"**{part.title}**", elem_classes=["freefuse-part-title"])
            _section_body(part, prefix, widgets, after)
