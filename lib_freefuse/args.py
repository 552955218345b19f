"""FreeFuse's arguments: one typed, validated model shared by the UI, the API, infotext and XYZ plot.

`FreeFuseArgs.from_dict` is the only door for outside values (API dicts, pasted infotext, XYZ strings) and
raises nothing but ValueError, whose message starts with the field at fault ("capture_step: ...",
"subjects[1].weight: ..."). Its coercion rules:
- booleans: True/False, or the strings "true"/"false" (any case); never numbers, not even 0 and 1;
- integers: ints, floats with no fractional part (6.0, as sliders send), or plain decimal strings ("6");
- numbers: ints, finite floats, or decimal strings ("0.9", "1e-2"); never NaN, infinities or "nan";
- automatic values (capture_step, n_segments): None or the string "auto";
- choices: one of the listed words, any case, surrounding spaces ignored;
- capture_block: an index (17), "17" or "double_blocks.17";
- subjects: a list of {"lora", "words", "weight"?} dicts; rows with both lora and words empty are dropped. A LoRA
  bound by two rows is not an argument error: the run warns and keeps the first row (forge/processing.py).
Constructing the dataclasses directly validates too; it only strips text, makes weights floats, subjects a tuple.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from lib_freefuse.core import (
    CONTRASTIVE_CHOICES,
    CROSS_ATTENTION_CHOICES,
    SURROUNDINGS_CHOICES,
    TEXT_LORA_CHOICES,
    MaskConfig,
    default_capture_step,
    split_phrases,
)

PRE_MASK_CHOICES = ("joint", "off")
MODULATION_CHOICES = ("per_token", "global", "off")
SLIC_IMAGE_CHOICES = ("vae", "preview")
HIRES_MASKS_CHOICES = ("reuse", "extract")
# MaskConfig's background "words": the positions of the user's background words (FreeFuseArgs.background_words), if
# any; "tokens": the same, or
# without them the prompt's end-of-text token (families with one: FLUX.1, Chroma), found by the host's text engine.
BACKGROUND_CHOICES = ("words", "off", "threshold", "tokens", "nearest")  # the default first, as the dropdown shows them
# The mask settings where the extension's defaults leave the paper's (MaskConfig keeps the paper's own): the seeds of
# Eq. 9 where each subject leads (0.6.0, with average_blocks: won in both toy worlds and on the planted leak; README);
# stray pieces under 1% of the image filled, each subject keeping its largest, and the background words' places kept
# free where the user gives any (0.7.0: the planted wide canvas and background, no scene worse, neither toy world
# changed; README); the places no subject clearly leads to the nearest one that does (0.8.0: won in the first toy
# world, a tie leaning up in the second, no planted scene worse; README).
EXTENSION_MASK = MaskConfig(contrastive="leading", background="words", fill_holes=0.01, surroundings="nearest_lead")
# The paper's values of every setting whose extension default goes beyond it: FreeFuseArgs.from_dict(PAPER_SETTINGS)
# (with subjects) runs the paper's method, as the benchmarks' and tests' "paper" rows do.
PAPER_SETTINGS = {
    "text_loras": "all",
    "attention_bias": 0.0,
    "average_blocks": False,
    "contrastive": "off",
    "background": "off",
    "fill_holes": 0.0,
    "surroundings": "vote",
}
CONTRASTIVE_UI_ORDER = ("leading", "off", "strongest", "authors")  # the default first, as the dropdown shows them
SURROUNDINGS_UI_ORDER = ("nearest_lead", "vote")
WEIGHT_LIMIT = 10.0
MAX_CAPTURE_STEP = 10_000  # bounds that no real run reaches, so that pasted junk stays out of logs and infotext
MAX_CAPTURE_BLOCK = 999
MAX_ATTENTION_BIAS = 50.0  # logits: at 50 a biased pair weighs e^-50 of an unbiased one, nothing is left to push
BLOCK_PREFIX = "double_blocks."
AUTO = "auto"

_FORBIDDEN_IN_LORA = re.compile(r"[:<>\x00-\x1f\x7f]")  # characters a <lora:NAME:...> tag cannot carry
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)
_SUBJECT_KEYS = ("lora", "words", "weight")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


@dataclass(frozen=True)
class SubjectBinding:
    """One subject: a LoRA, by its `<lora:NAME:...>` name, bound to the activation words of its subject."""

    lora: str
    words: str  # several phrases separated by commas
    weight: float = 1.0  # strength used when the prompt has no <lora:...> tag for this LoRA

    def __post_init__(self) -> None:
        for name in ("lora", "words"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected non-empty text, got {_show(value)}")
            object.__setattr__(self, name, value.strip())
        if _FORBIDDEN_IN_LORA.search(self.lora):
            raise ValueError(
                f"lora: <lora:NAME:...> names cannot hold ':', '<', '>' or control characters, got {_show(self.lora)}"
            )
        if not split_phrases(self.words):
            raise ValueError(f"words: expected at least one activation phrase, got {_show(self.words)}")
        if not _is_real(self.weight) or not -WEIGHT_LIMIT <= self.weight <= WEIGHT_LIMIT:
            raise ValueError(
                f"weight: expected a number in [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}], got {_show(self.weight)}"
            )
        object.__setattr__(self, "weight", float(self.weight))

    @property
    def phrases(self) -> tuple[str, ...]:
        """The activation phrases, split at commas and whitespace-normalised."""
        return split_phrases(self.words)

    def to_dict(self, only_changed: bool = False) -> dict[str, Any]:
        """{"lora", "words", "weight"}; with only_changed, weight is left out when it is the default 1.0."""
        row: dict[str, Any] = {"lora": self.lora, "words": self.words, "weight": self.weight}
        if only_changed and self.weight == 1.0:
            del row["weight"]
        return row


@dataclass(frozen=True)
class FreeFuseArgs:
    """Every FreeFuse argument: the subject bindings and the settings of ALGORITHM.md."""

    enabled: bool = False
    subjects: tuple[SubjectBinding, ...] = ()
    capture_step: int | None = None  # 1-based; None: default_capture_step(steps)
    capture_block: int = 17  # FLUX.1: index into double_blocks; other families: this default = theirs (families/)
    pre_mask: str = "joint"  # subject LoRAs before masks exist: "joint" (unmasked, as the paper) or "off"
    restart: bool = False  # restart sampling once the masks exist, as the authors' later code
    modulation: str = "per_token"  # subject LoRAs' modulation deltas: "per_token", "global" or "off"
    slic_image: str = "vae"  # image for SLIC: "vae" decode of x0 or Forge's fast latent "preview"
    show_masks: bool = False  # add a mask overlay per image to the output
    hires_masks: str = "reuse"  # hires fix pass 2: "reuse" pass-1 masks resized, or "extract" again
    text_loras: str = "own_words"  # subject LoRAs on text tokens once masks exist: "own_words", "all" (paper), "none"
    attention_bias: float = 5.0  # once masks exist, words and regions pushed together (core.attention_bias); 0: off
    average_steps: bool = False  # masks from the mean of every step's maps up to the capture step (beyond the paper)
    average_blocks: bool = True  # masks from the mean of every block's maps up to the capture block (beyond the paper)
    background_words: str = ""  # the prompt's background words, for background "words" and "tokens"
    mask: MaskConfig = EXTENSION_MASK  # flat in the dict form

    def __post_init__(self) -> None:
        for flag in ("enabled", "restart", "average_steps", "average_blocks", "show_masks"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected True or False, got {_show(getattr(self, flag))}")
        if not isinstance(self.subjects, (tuple, list)) or not all(
            isinstance(s, SubjectBinding) for s in self.subjects
        ):
            raise ValueError(f"subjects: expected a tuple of SubjectBinding, got {_show(self.subjects)}")
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not isinstance(self.background_words, str):
            raise ValueError(f"background_words: expected text, got {_show(self.background_words)}")
        words = " ".join(self.background_words.split())
        object.__setattr__(self, "background_words", words if split_phrases(words) else "")  # ", ," names none
        if self.enabled and not self.subjects:
            raise ValueError("subjects: FreeFuse is enabled but no subject binds a LoRA to its activation words")
        if self.capture_step is not None:
            _require_int("capture_step", self.capture_step, minimum=1, maximum=MAX_CAPTURE_STEP)
        _require_int("capture_block", self.capture_block, minimum=0, maximum=MAX_CAPTURE_BLOCK)
        if not _is_real(self.attention_bias) or not 0 <= self.attention_bias <= MAX_ATTENTION_BIAS:
            bound = f"{MAX_ATTENTION_BIAS:g}"
            raise ValueError(
                f"attention_bias: expected a number from 0 (off) to {bound}, got {_show(self.attention_bias)}"
            )
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {_listing(choices)}, got {_show(getattr(self, name))}")
        if not isinstance(self.mask, MaskConfig):
            raise ValueError(f"mask: expected a MaskConfig, got {_show(self.mask)}")
        if self.mask.background not in BACKGROUND_CHOICES:
            raise ValueError(
                f"background: expected one of {_listing(BACKGROUND_CHOICES)}, got {_show(self.mask.background)}"
            )

    @classmethod
    def defaults(cls) -> FreeFuseArgs:
        """Every setting at its default: FreeFuse off, no subjects, the extension's defaults (README "Settings")."""
        return cls()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The keys of the dict form, in UI order: own settings, then MaskConfig's, flat."""
        own = tuple(f.name for f in fields(cls) if f.name != "mask")
        return own + MaskConfig.field_names()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FreeFuseArgs:
        """Validated arguments from a dict (API, infotext, XYZ); keys not given keep their defaults."""
        if not isinstance(values, Mapping):
            raise ValueError(f"FreeFuse args: expected a dict of settings, got {type(values).__name__}")
        _reject_unknown_keys(values, cls.field_names(), what="FreeFuse setting", prefix="")
        own: dict[str, Any] = {}
        mask: dict[str, Any] = {}
        for name in cls.field_names():
            if name in values:
                target = mask if name in _MASK_PARSERS else own
                target[name] = _PARSERS[name](name, values[name])
        return cls(**own, mask=replace(EXTENSION_MASK, **mask))

    def to_dict(self, only_changed: bool = False) -> dict[str, Any]:
        """The flat dict form, JSON-ready; with only_changed, defaults are left out (as infotext wants)."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "subjects":
                flat["subjects"] = [s.to_dict(only_changed) for s in self.subjects]
            elif f.name != "mask":
                flat[f.name] = getattr(self, f.name)
        flat.update((name, getattr(self.mask, name)) for name in MaskConfig.field_names())
        if not only_changed:
            return flat
        return {key: value for key, value in flat.items() if value != _DEFAULT_DICT[key]}

    def updated(self, changes: Mapping[str, Any]) -> FreeFuseArgs:
        """A copy with some keys changed, validated as from_dict does (XYZ plot axes use this)."""
        if not isinstance(changes, Mapping):
            raise ValueError(f"FreeFuse args: expected a dict of changes, got {type(changes).__name__}")
        return FreeFuseArgs.from_dict({**self.to_dict(), **changes})

    @property
    def capture_block_name(self) -> str:
        """The capture block as the UI and logs name it, e.g. "double_blocks.17"."""
        return f"{BLOCK_PREFIX}{self.capture_block}"

    def resolved_capture_step(self, steps: int) -> int:
        """1-based step whose attention makes the masks in a run of `steps` steps (why: capture_step_note)."""
        return self._resolve_capture_step(steps)[0]

    def capture_step_note(self, steps: int) -> str:
        """Why resolved_capture_step is not what was asked for, as one log line; empty when nothing to say."""
        return self._resolve_capture_step(steps)[1]

    def _resolve_capture_step(self, steps: int) -> tuple[int, str]:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {_show(steps)}")
        if self.capture_step is None:
            step, note = default_capture_step(steps), ""
        elif self.capture_step > steps:
            step = max(1, steps - 1)
            note = f"capture step {self.capture_step} is beyond the {_steps(steps)} run: using {step}"
        elif self.capture_step == steps > 1:
            step = steps - 1
            note = (
                f"capture step {steps} is the last of the {_steps(steps)} run, leaving none for the masks: using {step}"
            )
        else:
            step, note = self.capture_step, ""
        if steps == 1:
            note = "; ".join(filter(None, [note, "a 1-step run leaves no step to use the masks"]))
        return step, note


@dataclass(frozen=True)
class FieldHelp:
    """How the UI shows one key of the dict form: its label, its help, and its choices with the labels shown for
    them (the UI stores and sends the choices themselves, so the API and infotext keep the same values)."""

    key: str
    label: str
    help: str
    choices: tuple[str, ...] = ()
    choice_labels: tuple[str, ...] = ()  # one per choice, in the same order

    def shown_choices(self) -> list[tuple[str, str]]:
        """(label shown, value stored) per choice, as Gradio's choices take them."""
        return list(zip(self.choice_labels, self.choices, strict=True))


FIELD_HELP: tuple[FieldHelp, ...] = (
    FieldHelp("enabled", "Enable FreeFuse", "Keep each bound LoRA to its own subject, with masks found at test time."),
    FieldHelp(
        "subjects", "Subjects", "Each row binds a LoRA (its <lora:NAME:...> name) to its subject's activation words."
    ),
    FieldHelp(
        "capture_step",
        "Capture step (0 = auto)",
        "The step whose attention makes the masks; auto: 6 of 28, the same share of any count.",
    ),
    FieldHelp(
        "capture_block",
        "Capture block",
        "Which block is read. FLUX.1 and Chroma: a double block, 0-18 (17 suits FLUX.1-dev). SDXL, Qwen-Image, "
        "Z-Image: 17 means the family's default block (SDXL: the middle block's last transformer; Qwen-Image: block "
        "36 of 60; Z-Image: layers.18 of 30); other values count its transformer blocks in order. FLUX.2 Klein: 17 "
        "means its second-to-last double block; other values index its double blocks.",
    ),
    FieldHelp(
        "pre_mask",
        "Before the masks exist, subject LoRAs act",
        "Until the masks exist, the LoRAs act on the whole image, or wait.",
        PRE_MASK_CHOICES,
        ("Whole image (default)", "Not at all"),
    ),
    FieldHelp(
        "restart",
        "Start over once the masks exist",
        "Sample again from the first step with the masks in place; costs the steps before the capture again.",
    ),
    FieldHelp(
        "modulation",
        "Subject LoRAs' modulation layers",
        "FLUX's modulation layers set a look for the whole image; masked, each subject keeps its own.",
        MODULATION_CHOICES,
        ("Inside each mask (default)", "Whole image", "Left out"),
    ),
    FieldHelp(
        "slic_image",
        "Regions cut from",
        "Decoded exactly, or Forge's fast preview (coarser).",
        SLIC_IMAGE_CHOICES,
        ("Decoded image (default)", "Fast preview"),
    ),
    FieldHelp("show_masks", "Show masks", "Add a coloured picture of each image's subject masks to the output."),
    FieldHelp(
        "hires_masks",
        "Masks in the hires fix pass",
        "Pass 2 reuses pass 1's masks, resized, or finds them again.",
        HIRES_MASKS_CHOICES,
        ("Reuse pass 1's (default)", "Find them again"),
    ),
    FieldHelp(
        "text_loras",
        "Subject LoRAs on the prompt's words",
        "Once the masks exist: which subject LoRAs act on the prompt's own tokens. Own words keeps the LoRAs' "
        "conflict out of the words all subjects share.",
        TEXT_LORA_CHOICES,
        ("Own words only (default)", "All but on others' words", "None"),
    ),
    FieldHelp(
        "attention_bias",
        "Words keep to their regions (0 = off)",
        "Once the masks exist, each subject's words and its region look more at each other and less at the other "
        "subjects' (5, the default: a strong push). FLUX.1, FLUX.2 Klein and Chroma; other models go without it.",
    ),
    FieldHelp(
        "average_steps",
        "Average the steps up to the capture",
        "Masks from the attention of every step up to the capture step, averaged: steadier than one step's.",
    ),
    FieldHelp(
        "average_blocks",
        "Average the blocks up to the capture",
        "Masks from the attention of every block up to the capture block, averaged (on by default): one block's "
        "stray attention counts less. Not on SDXL.",
    ),
    FieldHelp(
        "background_words",
        "Background words",
        "Words of the prompt that describe the background (commas separate phrases): where they look gets no "
        "subject LoRA.",
    ),
    FieldHelp(
        "sink_filter",
        "Ignore attention parked on the border",
        "Drop the strongest attention values on the image's border, where the model parks attention that means "
        "nothing; without it one LoRA can win almost everything.",
    ),
    FieldHelp(
        "sink_top_fraction",
        "Border check share",
        "Top share checked (0.01: 1%).",
    ),
    FieldHelp("edge_width", "Border width", "Tokens from the edge that count as border."),
    FieldHelp(
        "self_attention",
        "Grow each mask over its whole subject",
        "Spread each subject's map along the image's own attention from its strongest points, so it covers the "
        "whole body; without it the masks reach into each other.",
    ),
    FieldHelp(
        "self_attention_top_fraction",
        "Strongest points share",
        "Share of the image taken as strongest points (0.01: 1%).",
    ),
    FieldHelp(
        "superpixel_vote",
        "Snap the masks to image regions",
        "Give each small region of the predicted image wholly to one subject, so the masks follow its edges and "
        "have no holes.",
    ),
    FieldHelp(
        "n_segments",
        "Regions (0 = auto)",
        "How many regions; auto: the square root of the pixel count.",
    ),
    FieldHelp("compactness", "Region compactness", "Higher: rounder; lower: closer to colours."),
    FieldHelp("slic_max_side", "Region image size", "Cut from a copy at most this long (pixels)."),
    FieldHelp("soft", "Soft mask edges", "Each token gets the share of its pixels that is inside the mask."),
    FieldHelp(
        "cross_attention",
        "How words find their subject",
        "Which way the attention between words and image is read.",
        CROSS_ATTENTION_CHOICES,
        ("Words to image (default)", "Image to words"),
    ),
    FieldHelp(
        "contrastive",
        "Strongest points of a subject",
        "Where each mask grows from: by default a subject's strongest places among those where it scores above "
        "every other subject, so words that also point at another subject do not grow the mask there.",
        CONTRASTIVE_UI_ORDER,
        (
            "Its strongest where it leads (default)",
            "Its own strongest",
            "Beats each other subject",
            "Beats the others together",
        ),
    ),
    FieldHelp(
        "background",
        "Places no subject claims",
        "By default the subject LoRAs leave alone where the background words look (none given: every place goes "
        "to some subject). Or free what no subject scores high, or give that to the nearest subject.",
        BACKGROUND_CHOICES,
        (
            "Free at background words (default)",
            "Go to some subject",
            "Stay free where no subject scores high",
            "Free at background words or prompt end",
            "Nearest subject where none scores high",
        ),
    ),
    FieldHelp(
        "background_threshold",
        "Free below",
        "Where no subject scores high: below this multiple of an even share.",
    ),
    FieldHelp(
        "fill_holes",
        "Fill holes smaller than",
        "Mask pieces below this share of the image join their surround (0: off).",
    ),
    FieldHelp(
        "surroundings",
        "Where no subject clearly leads",
        "A place where no subject's words look at least 3 times more than any other's goes to the nearest subject "
        "that does, so each LoRA acts around its own subject (default); or it keeps what the image regions gave it.",
        SURROUNDINGS_UI_ORDER,
        ("Nearest clear subject (default)", "As the vote gives it"),
    ),
)


@dataclass(frozen=True)
class Section:
    """A titled group of settings in the accordion: rows of keys of the dict form, and groups nested in it."""

    key: str  # the element id's last part
    title: str
    rows: tuple[tuple[str, ...], ...] = ()
    parts: tuple[Section, ...] = ()

    def setting_keys(self) -> tuple[str, ...]:
        """Every key of the section and of its parts, in screen order."""
        own = tuple(key for row in self.rows for key in row)
        return own + tuple(key for part in self.parts for key in part.setting_keys())


# The accordion's layout, below the subject rows and "Show masks" (TOP_KEYS): every setting once; the sections closed.
TOP_KEYS = ("show_masks",)
SECTIONS: tuple[Section, ...] = (
    Section(
        "timing",
        "When the masks are made",
        (("capture_step", "capture_block"), ("average_steps", "average_blocks"), ("hires_masks",), ("restart",)),
    ),
    Section("loras", "How the subject LoRAs act", (("pre_mask", "modulation"), ("text_loras", "attention_bias"))),
    Section(
        "recipe",
        "How the masks are found",
        parts=(
            Section(
                "attention",
                "Reading the attention",
                (("sink_filter",), ("sink_top_fraction", "edge_width"), ("cross_attention",)),
            ),
            Section(
                "growth", "Growing the masks", (("self_attention",), ("self_attention_top_fraction", "contrastive"))
            ),
            Section(
                "regions",
                "Image regions",
                (("superpixel_vote", "soft"), ("n_segments", "compactness", "slic_max_side"), ("slic_image",)),
            ),
            Section(
                "background",
                "Background and holes",
                (("background", "background_words"), ("background_threshold", "fill_holes"), ("surroundings",)),
            ),
        ),
    ),
)

SUBJECT_FIELD_HELP: tuple[FieldHelp, ...] = (
    FieldHelp("lora", "LoRA", "its name, as in <lora:NAME:...>."),
    FieldHelp("words", "Activation words", "the subject's words in the prompt; commas separate phrases."),
    FieldHelp(
        "weight",
        "Weight",
        "LoRA strength used only when the prompt has no <lora:NAME:...> tag for this LoRA; with a tag, the tag's "
        "weight counts.",
    ),
)


BUTTON_HELP: tuple[FieldHelp, ...] = (  # the subject rows' buttons, in the UI only
    FieldHelp(
        "add",
        "Add subject",
        "show one more row (up to 4).",
    ),
    FieldHelp(
        "fill",
        "Fill from prompt",
        "one row per <lora:NAME:weight> tag of the prompt; words already typed for a LoRA are kept.",
    ),
    FieldHelp(
        "fill_styles",
        "Also LoRAs without activation words (styles)",
        "Fill from prompt leaves out LoRAs with no words in their metadata or the prompt, unless ticked.",
    ),
    FieldHelp(
        "refresh",
        "Refresh LoRA list",
        "reads the LoRA folder again for the rows' lists (the Lora tab's refresh does too).",
    ),
)


def subject_help_lines() -> list[str]:
    """The help shown under the subject rows: what a row does, then each column and button, "Label: help"."""
    entries = (*SUBJECT_FIELD_HELP, *BUTTON_HELP)
    return [help_for("subjects").help, *(f"{entry.label}: {entry.help}" for entry in entries)]


def img2img_steps(steps: int, denoising: float, fix_steps: bool = False) -> int:
    """Denoising steps an img2img job of `steps` runs at this strength: t_enc + 1 of Forge's setup_img2img_steps
    (forge/processing.py _steps_in_run counts so); all of them with Forge's "img2img_fix_steps" option."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {_show(steps)}")
    if not _is_real(denoising) or not 0 <= denoising <= 1:
        raise ValueError(f"denoising: expected a number in [0, 1], got {_show(denoising)}")
    return steps if fix_steps else int(min(denoising, 0.999) * steps) + 1


def help_for(key: str) -> FieldHelp:
    """The label and help of one key of the dict form, or of a button of the subject rows."""
    for entry in (*FIELD_HELP, *BUTTON_HELP):
        if entry.key == key:
            return entry
    raise KeyError(key)


def _show(value: object) -> str:
    """A short repr for messages, safe for any value (huge ints, long text, broken __repr__)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _REPR.repr(value)
    except Exception:
        return f"a {type(value).__name__}"


def _listing(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _steps(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _require_int(name: str, value: object, *, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name}: expected an integer from {minimum} to {maximum}, got {_show(value)}")


def _reject_unknown_keys(values: Mapping[Any, Any], known: tuple[str, ...], *, what: str, prefix: str) -> None:
    for key in values:
        if isinstance(key, str) and key in known:
            continue
        name = key if isinstance(key, str) and key.isidentifier() and len(key) <= 60 else _show(key)
        if key == "mask" and not prefix:
            raise ValueError(f"mask: give the mask settings as flat keys ({_listing(MaskConfig.field_names())})")
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6) if isinstance(key, str) else []
        hint = f"did you mean {_listing(close)}?" if close else f"known keys: {_listing(known)}"
        raise ValueError(f"{prefix}{name}: unknown {what}; {hint}")


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name}: expected true or false, got {_show(value)}")


def _as_int(name: str, value: object) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and _finite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError(f"{name}: expected an integer, got {_show(value)}")


def _as_optional_int(name: str, value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        return _as_int(name, value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer or {AUTO!r} (automatic), got {_show(value)}") from None


def _as_float(name: str, value: object) -> float:
    number: float | None = None
    try:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value.strip())
    except (OverflowError, TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {_show(value)}")
    return number


def _as_choice(name: str, value: object) -> str:
    choices = _CHOICES.get(name) or _MASK_CHOICES[name]
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(f"{name}: expected one of {_listing(choices)}, got {_show(value)}")


def _as_block(name: str, value: object) -> int:
    if isinstance(value, str) and value.strip().startswith(BLOCK_PREFIX):
        value = value.strip()[len(BLOCK_PREFIX) :]
    try:
        return _as_int(name, value)
    except ValueError:
        raise ValueError(
            f"{name}: expected a block index such as 17 or '{BLOCK_PREFIX}17', got {_show(value)}"
        ) from None


def _as_text(name: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    raise ValueError(f"{name}: expected text, got {_show(value)}")


def _as_subjects(name: str, value: object) -> tuple[SubjectBinding, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of {{lora, words, weight}} rows, got {_show(value)}")
    rows = []
    for index, row in enumerate(value):
        parsed = _as_subject(f"{name}[{index}]", row)
        if parsed is not None:
            rows.append(parsed)
    return tuple(rows)


def _as_subject(name: str, row: object) -> SubjectBinding | None:
    """One row of the subjects list; None for an unused row (lora and words both empty)."""
    if isinstance(row, SubjectBinding):
        return row
    if not isinstance(row, Mapping):
        raise ValueError(f"{name}: expected a dict with lora, words and optionally weight, got {_show(row)}")
    _reject_unknown_keys(row, _SUBJECT_KEYS, what="subject key", prefix=f"{name}.")
    lora = _as_text(f"{name}.lora", row.get("lora"))
    words = _as_text(f"{name}.words", row.get("words"))
    if not lora and not words:
        return None
    weight = _as_float(f"{name}.weight", row["weight"]) if "weight" in row else 1.0
    try:
        return SubjectBinding(lora=lora, words=words, weight=weight)
    except ValueError as error:
        raise ValueError(f"{name}.{error}") from None


def _mask_parser(annotation: object) -> Callable[[str, object], Any]:
    parsers = {
        "bool": _as_bool,
        "int": _as_int,
        "float": _as_float,
        "int | None": _as_optional_int,
        "str": _as_choice,
    }
    if annotation not in parsers:
        raise TypeError(f"MaskConfig field type {annotation!r} has no parser in lib_freefuse.args")
    return parsers[annotation]


_CHOICES: dict[str, tuple[str, ...]] = {
    "pre_mask": PRE_MASK_CHOICES,
    "modulation": MODULATION_CHOICES,
    "slic_image": SLIC_IMAGE_CHOICES,
    "hires_masks": HIRES_MASKS_CHOICES,
    "text_loras": TEXT_LORA_CHOICES,
}
_MASK_CHOICES: dict[str, tuple[str, ...]] = {
    "cross_attention": CROSS_ATTENTION_CHOICES,
    "contrastive": CONTRASTIVE_CHOICES,
    "background": BACKGROUND_CHOICES,
    "surroundings": SURROUNDINGS_CHOICES,
}
_MASK_PARSERS = {f.name: _mask_parser(f.type) for f in fields(MaskConfig)}
_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "enabled": _as_bool,
    "subjects": _as_subjects,
    "capture_step": _as_optional_int,
    "capture_block": _as_block,
    **dict.fromkeys(_CHOICES, _as_choice),
    "restart": _as_bool,
    "average_steps": _as_bool,
    "average_blocks": _as_bool,
    "background_words": _as_text,
    "show_masks": _as_bool,
    "attention_bias": _as_float,
    **_MASK_PARSERS,
}
_DEFAULT_DICT = FreeFuseArgs().to_dict()

__all__ = [
    "BACKGROUND_CHOICES",
    "BUTTON_HELP",
    "FIELD_HELP",
    "HIRES_MASKS_CHOICES",
    "MAX_CAPTURE_BLOCK",
    "MAX_CAPTURE_STEP",
    "MODULATION_CHOICES",
    "PAPER_SETTINGS",
    "PRE_MASK_CHOICES",
    "SECTIONS",
    "SLIC_IMAGE_CHOICES",
    "SUBJECT_FIELD_HELP",
    "TEXT_LORA_CHOICES",
    "TOP_KEYS",
    "WEIGHT_LIMIT",
    "FieldHelp",
    "FreeFuseArgs",
    "Section",
    "SubjectBinding",
    "help_for",
    "img2img_steps",
    "subject_help_lines",
]
