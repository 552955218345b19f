"""FreeFuse for Forge: the AlwaysOn script. A thin adapter: the UI, and the hooks that call lib_freefuse."""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_freefuse.args import (
    SUBJECT_FIELD_HELP,
    TOP_KEYS,
    help_for,
    subject_help_lines,
)
from lib_freefuse.forge import adetailer
from lib_freefuse.forge.accordion import sections, setting
from lib_freefuse.forge.job import coverage_percent
from lib_freefuse.forge.overlays import add_overlays, register_settings
from lib_freefuse.forge.processing import begin_job, run_state, start_run
from lib_freefuse.forge.ui_events import (
    capture_text,
    fill_from_prompt,
    literal,
    lora_choices,
    lora_names,
    words_for_lora,
)
from lib_freefuse.forge.xyz import clear_previous_cell, register_axes, xyz_args
from lib_freefuse.hosts import HostUnsupported, detect
from lib_freefuse.infotext import COVERAGE_KEY, WARNINGS_KEY, args_from_params, coverage_text, infotext_params
from lib_freefuse.log import configure, logger
from lib_freefuse.script_values import (
    SETTING_KEYS,
    SUBJECT_ROWS,
    args_from_values,
    incomplete_rows,
    values_from_args,
)

configure(getattr(shared.cmd_opts, "freefuse_log_level", "INFO"))
try:
    logger.info("FreeFuse: running in %s", detect().name)
except HostUnsupported as unknown:  # each job says so again, in its infotext too, and is made without FreeFuse
    logger.warning("FreeFuse: %s", unknown)
ADD, FILL, STYLES, REFRESH = (help_for(key).label for key in ("add", "fill", "fill_styles", "refresh"))
register_axes()  # now: an API-only server builds the scripts' UI before any before_ui callback
script_callbacks.on_before_ui(register_axes)  # and before the UI, if X/Y/Z plot loads later (idempotent)
script_callbacks.on_ui_settings(register_settings)  # "Save a mask overlay beside each image" in Settings


def _value(component):
    """A component's value at start-up (None without one)."""
    return None if component is None else component.value


def _paste(index: int):
    """Paste parameters: the value of the script's `index`-th component recorded in an infotext, or None (leave
    the component as it is) when the infotext has no FreeFuse or a damaged one."""

    def value(params: dict):
        try:
            args = args_from_params(params)
        except ValueError as error:
            logger.warning("FreeFuse: the pasted parameters are not usable: %s", error)
            return None
        return None if args is None else values_from_args(args)[index]

    return value


def _reject_job(p, message: str) -> None:
    """Stop the job before sampling with `message` (the API answers with it). Forge catches every exception of a
    script hook, so the job's own sample() raises instead: p lives for this job only."""
    logger.error(message)

    def rejected(*args, **kwargs):
        raise ValueError(message)

    p.sample = rejected


class FreeFuseScript(scripts.Script):
    def title(self):
        return "FreeFuse"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def after_component(self, component, **kwargs):
        if kwargs.get("elem_id") == f"{'img2img' if self.is_img2img else 'txt2img'}_steps":
            self.steps_slider = component  # UI wiring only: shows the capture step resolved for the step count
        if kwargs.get("elem_id") == f"{'img2img' if self.is_img2img else 'txt2img'}_prompt":
            self.prompt_box = component  # UI wiring only: "Fill from prompt" reads it
        if self.is_img2img and kwargs.get("elem_id") == "img2img_denoising_strength":
            self.denoising_slider = component  # UI wiring only: the capture step counts the steps img2img runs

    def ui(self, is_img2img):
        prefix = f"freefuse-{'img2img' if is_img2img else 'txt2img'}"
        lora, words, weight = SUBJECT_FIELD_HELP
        with InputAccordion(False, label="FreeFuse", elem_id=prefix) as enabled:
            rows = []
            for index in range(SUBJECT_ROWS):  # rows 3-4 show when filled or added (javascript/freefuse.js)
                with gr.Row(elem_id=f"{prefix}-subject-{index}", elem_classes=["freefuse-subject"]):
                    rows.append(
                        gr.Dropdown(
                            # "" first: with an empty value, Gradio 4's dropdown shows and sends its first choice
                            # (javascript/freefuse.js hides that empty choice in the open list)
                            ["", *lora_names()],
                            value="",
                            allow_custom_value=True,
                            label=f"{index + 1}. {lora.label}",  # numbered as the warnings name rows
                            elem_id=f"{prefix}-lora-{index}",
                            scale=2,
                        )
                    )
                    rows.append(
                        gr.Textbox(
                            value="",
                            label=words.label,
                            placeholder="e.g. harry potter, the boy wizard",
                            lines=1,
                            elem_id=f"{prefix}-words-{index}",
                            scale=3,
                        )
                    )
                    rows.append(
                        gr.Slider(
                            -2.0, 2.0, value=1.0, step=0.05, label=weight.label, elem_id=f"{prefix}-weight-{index}"
                        )
                    )
            with gr.Row(elem_classes=["freefuse-buttons"]):
                gr.Button(ADD, size="sm", scale=0, elem_id=f"{prefix}-add-subject")  # freefuse.js shows a row
                fill = gr.Button(FILL, size="sm", scale=0, elem_id=f"{prefix}-fill-from-prompt")
                rescan = gr.Button(REFRESH, size="sm", scale=0, elem_id=f"{prefix}-refresh-loras")
                reread = gr.Button(visible=False, elem_id=f"{prefix}-reread-loras")  # after the Lora tab's refresh
                styles = gr.Checkbox(False, label=STYLES, elem_id=f"{prefix}-fill-styles", min_width=260)
            first, *more = subject_help_lines()  # one small paragraph, each label bold; <lora:NAME:...> as written
            bold = [f"**{label}**:{text}" for label, text in (line.split(":", 1) for line in more)]
            gr.Markdown(literal(" ".join([first, *bold])), elem_id=f"{prefix}-help", elem_classes=["freefuse-help"])
            top = {key: setting(key, prefix) for key in TOP_KEYS}
            denoising = getattr(self, "denoising_slider", None) if is_img2img else None
            line = capture_text(getattr(getattr(self, "steps_slider", None), "value", 20), 0, _value(denoising))
            resolved = []
            widgets = sections(
                prefix,
                after={
                    "capture_step": lambda: resolved.append(gr.Markdown(line, elem_id=f"{prefix}-capture-resolved"))
                },
            )
        settings = [{**top, **widgets}[key] for key in SETTING_KEYS]  # the API's positional order, not the layout's
        steps = getattr(self, "steps_slider", None)
        capture = settings[SETTING_KEYS.index("capture_step")]
        if steps is not None:
            sources = [steps, capture] + ([denoising] if denoising is not None else [])
            for source in sources:
                source.change(capture_text, inputs=sources, outputs=resolved, show_progress=False)
        for index in range(SUBJECT_ROWS):
            lora_box, words_box = rows[3 * index], rows[3 * index + 1]
            lora_box.input(words_for_lora, inputs=[lora_box, words_box], outputs=[words_box], show_progress=False)
        loras = rows[0::3]
        rescan.click(lambda: lora_choices(True), outputs=loras, show_progress=False)
        reread.click(lambda: lora_choices(False), outputs=loras, show_progress=False)
        prompt_box = getattr(self, "prompt_box", None)
        if prompt_box is not None:
            fill.click(fill_from_prompt, inputs=[prompt_box, styles, *rows], outputs=rows, show_progress=False)
        components = [enabled, *rows, *settings]
        self.infotext_fields = [(c, _paste(i)) for i, c in enumerate(components)]
        return components

    def process(self, p, *values):
        if adetailer.is_adetailer_pass(p):  # a region of an image FreeFuse made: only its owner's LoRA redraws it
            adetailer.redraw_pass(p)
            return
        if not begin_job(p):  # a copy of a job under way (ADetailer's, after its passes)
            return
        adetailer.unlink()
        clear_previous_cell(p)  # X/Y/Z plot cells share one extra_generation_params dict
        try:
            args = xyz_args(args_from_values(values), p)  # with an X/Y/Z plot cell's values
        except ValueError as error:
            _reject_job(p, f"FreeFuse: {error}")
            return
        p.freefuse_args = args
        for note in incomplete_rows(values):  # a half-filled row is left out, named, and the image is made
            run_state(p).warn(note)
        if args.enabled:
            p.extra_generation_params.update(infotext_params(args))
        elif getattr(p, "freefuse_state", None) is not None:  # FreeFuse off for want of a complete row
            p.extra_generation_params[WARNINGS_KEY] = "; ".join(p.freefuse_state.warnings)

    def process_before_every_sampling(self, p, *values, **kwargs):
        args = getattr(p, "freefuse_args", None)
        if args is None or not args.enabled:
            return
        try:
            start_run(p, args, kwargs.get("x"))
        except Exception as error:  # a host that changed under FreeFuse: name it, and make the image without FreeFuse
            logger.exception("FreeFuse: could not start")
            run_state(p).warn(
                f"FreeFuse could not start in this Forge ({type(error).__name__}: {error}): it did nothing"
            )

    def postprocess_batch(self, p, *values, **kwargs):
        args = getattr(p, "freefuse_args", None)
        if args is None or not args.enabled:
            return
        state = run_state(p)
        if not state.jobs:  # FreeFuse changed nothing: the infotext must not say it ran
            for key in infotext_params(args):
                p.extra_generation_params.pop(key, None)
        count = len(kwargs.get("images", ())) or p.batch_size
        masks = state.end_batch(count)
        if masks is not None:
            coverage = coverage_percent(masks)
            p.extra_generation_params[COVERAGE_KEY] = coverage_text(
                {name: [image[i] for image in coverage] for i, name in enumerate(state.subject_names)}
            )
            adetailer.link_job(p, count)
        else:
            p.extra_generation_params.pop(COVERAGE_KEY, None)
        if note := adetailer.adetailer_leaves_out(p, self.filename):
            state.warn(note)
        failures = [job.failure for job in state.jobs if job.failure]
        if failures or state.warnings:
            p.extra_generation_params[WARNINGS_KEY] = "; ".join(dict.fromkeys([*failures, *state.warnings]))

    def postprocess_image(self, p, pp, *values):
        if getattr(p, "freefuse_args", None) is not None:
            adetailer.forget_other_image(p)

    def postprocess(self, p, processed, *values):
        args = getattr(p, "freefuse_args", None)
        state = getattr(p, "freefuse_state", None)
        if args is not None and state is not None:
            add_overlays(p, processed, args.show_masks, state)
