"""The FreeFuse accordion's events, in Forge's page: the rows' LoRA lists, activation words when a LoRA is picked,
"Fill from prompt", the capture-step line. scripts/freefuse.py wires them; the rules are in lib_freefuse.activation
and lib_freefuse.args."""

from __future__ import annotations

import html

import gradio as gr
from modules import shared

from ..activation import activation_words, lora_tags, rows_from_prompt, styles_left_out
from ..args import FreeFuseArgs, help_for, img2img_steps
from ..log import logger
from ..script_values import SUBJECT_ROWS

STYLES = help_for("fill_styles").label


def literal(text: str) -> str:
    """Text shown as written where Gradio renders HTML or Markdown (help, pop-ups): <lora:NAME:...> stays visible."""
    return html.escape(text, quote=False)


def lora_names(rescan: bool = False) -> list[str]:
    try:
        import networks

        if rescan:
            networks.list_available_networks()
        return sorted(networks.available_network_aliases)
    except Exception:  # the LoRA extension is disabled or not loaded yet: the box still takes any name
        return []


def lora_choices(rescan: bool):
    """Every row's dropdown with the LoRAs on disk now (rescan: read the LoRA folder again first)."""
    choices = ["", *lora_names(rescan)]
    return [gr.update(choices=choices)] * SUBJECT_ROWS


def _lora_path(name: str) -> str | None:
    """The file of a LoRA named as in <lora:NAME:...> (alias or file name, as Forge resolves it); None if unknown."""
    try:
        import networks
    except ImportError:  # the LoRA extension is disabled
        return None
    on_disk = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
    return getattr(on_disk, "filename", None)


def words_for_lora(lora: str, words: str):
    """A row's words when the user picks its LoRA: the LoRA's activation words, only into an empty box."""
    path = _lora_path(lora.strip()) if lora and not (words or "").strip() else None
    found = activation_words(path) if path else None
    if found is None:
        return gr.update()
    logger.info("FreeFuse: words of %s from its %s: %s", lora, found[1], found[0])
    return found[0]


def fill_from_prompt(prompt: str, include_styles: bool, *current) -> list:
    """Every subject row from the prompt's <lora:...> tags (LoRA, activation words, weight), the words of LoRAs the
    rows bind already kept, styles left out unless include_styles; the other rows cleared."""
    prompt = prompt or ""
    bound: dict[str, str] = {}
    for lora, words in zip(current[0::3], current[1::3], strict=False):
        if isinstance(lora, str) and lora.strip():
            bound.setdefault(lora.strip(), words if isinstance(words, str) else "")
    found = rows_from_prompt(prompt, _lora_path, bound, bool(include_styles))
    if not lora_tags(prompt):
        gr.Info(literal("FreeFuse: the prompt has no <lora:NAME:weight> tags"))
        return [gr.update()] * (3 * SUBJECT_ROWS)
    if left := styles_left_out(prompt, found):
        gr.Info(
            literal(
                f"FreeFuse: left out {', '.join(left)}: no activation words in the LoRA's metadata or the prompt "
                f"(a style?); tick '{STYLES}' to bind it anyway"
            )
        )
    if not found:
        return [gr.update()] * (3 * SUBJECT_ROWS)
    if len(found) > SUBJECT_ROWS:
        gr.Warning(f"FreeFuse: {len(found)} LoRA tags but {SUBJECT_ROWS} rows: the first {SUBJECT_ROWS} are used")
    rows = (found + [{"lora": "", "words": "", "weight": 1.0}] * SUBJECT_ROWS)[:SUBJECT_ROWS]
    return [v for row in rows for v in (row["lora"], row["words"], min(2.0, max(-2.0, row["weight"])))]


def capture_text(steps, capture_step, denoising=None) -> str:
    """The capture step FreeFuse will use for this step count (img2img: the steps this denoising strength runs, as
    the job counts them), as the accordion shows it."""
    try:
        args = FreeFuseArgs(capture_step=int(capture_step) or None)
        run = int(steps)
        if denoising is not None:
            run = img2img_steps(run, float(denoising), bool(getattr(shared.opts, "img2img_fix_steps", False)))
        step, note = args.resolved_capture_step(run), args.capture_step_note(run)
    except (TypeError, ValueError) as error:
        return f"Capture step: {error}"
    of = f"{run}" if denoising is None else f"the {run} that denoising {float(denoising):g} runs of {int(steps)}"
    return f"Masks are made at step **{step}** of {of}" + (f" ({note})" if note else "")
