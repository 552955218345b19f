"""Mask overlays in Forge's output: after the images ("Show masks"), saved beside them (the setting SAVE_OPTION on
Forge's Settings page), and in an X/Y/Z plot grid (a cell whose "FreeFuse show masks" axis value is True shows its
overlay in place of its image: the plot takes one image per cell)."""

from __future__ import annotations

from typing import Any

from ..log import logger
from ..overlay import mask_overlay
from .xyz import OVERRIDES_ATTR

SAVE_OPTION = "freefuse_save_overlays"
SAVE_LABEL = "Save a mask overlay beside each image FreeFuse makes"
SAVE_INFO = "also when Show masks is off; the host's file name with -freefuse-masks at its end"
SUFFIX = "-freefuse-masks"  # as Forge's own "-before-highres-fix" images
SECTION = ("freefuse", "FreeFuse")


def register_settings() -> None:
    """The setting on Forge's Settings page (script_callbacks.on_ui_settings)."""
    from modules import shared

    option = shared.OptionInfo(False, SAVE_LABEL, section=SECTION).info(SAVE_INFO)
    shared.opts.add_option(SAVE_OPTION, option)


def add_overlays(p: Any, processed: Any, show: bool, state: Any) -> int:
    """One overlay per image FreeFuse made masks for: saved when the setting asks, then in the output as `show` and
    the X/Y/Z cell ask; how many were made. processed.images[first + i] is the job's i-th image."""
    from modules import images, shared

    save = bool(getattr(shared.opts, SAVE_OPTION, False)) and p.save_samples()
    in_grid = (getattr(p, OVERRIDES_ATTR, None) or {}).get("show_masks") is True
    if not (show or save):
        return 0
    first = getattr(processed, "index_of_first_image", 0)  # a grid may come first
    made = []
    for offset, masks in enumerate(state.image_masks()):
        index = first + offset
        if masks is None or index >= len(processed.images):
            continue
        overlay = mask_overlay(processed.images[index], masks, state.subject_names)
        made.append((index, overlay))
        if save:
            info = processed.infotexts[index] if index < len(processed.infotexts) else None
            seed, prompt = _seed_and_prompt(p, offset)
            path, _ = images.save_image(
                overlay, p.outpath_samples, "", seed, prompt, shared.opts.samples_format, info=info, p=p, suffix=SUFFIX
            )
            logger.debug("FreeFuse: mask overlay saved to %s", path)
    if not show:
        return len(made)
    if in_grid:
        for index, overlay in made:  # the image itself is saved already; the grid shows the masks
            processed.images[index] = overlay
        return len(made)
    for index, overlay in made:
        processed.images.append(overlay)
        processed.infotexts.append(processed.infotexts[index])
    return len(made)


def _seed_and_prompt(p: Any, offset: int) -> tuple[Any, Any]:
    seeds, prompts = getattr(p, "all_seeds", None) or [], getattr(p, "all_prompts", None) or []
    seed = seeds[offset] if offset < len(seeds) else getattr(p, "seed", None)
    prompt = prompts[offset] if offset < len(prompts) else getattr(p, "prompt", None)
    return seed, prompt
