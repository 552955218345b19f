"""FreeFuse in ADetailer's passes: each redraw of a detected region keeps only the LoRA of the subject owning it.

ADetailer (Bing-su/adetailer; Haoming02/ADetailer-Neo for Forge Neo) redraws each region it detects in a finished
image with an img2img inpainting pass of its own (`p._ad_inner` set), from the image's `postprocess_image` hook, with
the image's whole prompt: both character LoRAs would act on every face. Its passes run FreeFuse's hooks only when
ADetailer's script filter lets FreeFuse in ("Script names to apply to ADetailer" lists `freefuse`).

Forge runs one job at a time, and ADetailer's passes inside the job that made the image; so a FreeFuse job links
itself here when a batch is done (`link_job`), every other top-level job drops the link (`unlink`), and each pass
finds the image's masks through it (a weak reference: it never keeps a job alive). In the pass, the region's owner
is decided by lib_freefuse.regions (more than half of the region) and the other subjects' `<lora:...>` tags are
taken out of the pass's prompt, so that Forge loads only the owner's LoRA (text encoder part included); what was
decided is written to the image's infotext (`ADETAILER_KEY`).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch

from ..activation import lora_tags
from ..log import logger
from ..regions import AMBIGUOUS, BACKGROUND, EMPTY, SUBJECT, RegionOwner, keep_subject_loras, region_owner

ADETAILER_KEY = "FreeFuse ADetailer"  # the image's infotext: what each of its ADetailer passes kept
ADETAILER_TITLE = "ADetailer"  # its script's title, in both forks
SCRIPT_NAMES_OPTION = "ad_script_names"  # ADetailer's "Script names to apply to ADetailer"
ONLY_SELECTED_OPTION = "ad_only_selected_scripts"  # ADetailer's "Apply only selected scripts to ADetailer" (True)


class _Link:
    """The FreeFuse job whose batch ADetailer is redrawing, and what its passes decided for the current image."""

    def __init__(self) -> None:
        self.job: weakref.ref | None = None
        self.start = 0  # index in the job's RunState.image_masks() of the batch's first image
        self.image = -1  # batch_index of the image the passes below belong to
        self.passes: list[str] = []


_LINK = _Link()


def is_adetailer_pass(p) -> bool:
    """Whether p is one of ADetailer's inner inpainting passes."""
    return bool(getattr(p, "_ad_inner", False))


def link_job(p, images: int) -> None:
    """After a FreeFuse batch of `images` images made masks: ADetailer's passes over them find them through this link
    (the batch's images are the last of the job's RunState: Forge's img2img batch reuses one job for every file)."""
    _LINK.job, _LINK.image, _LINK.passes = weakref.ref(p), -1, []
    _LINK.start = len(p.freefuse_state.image_masks()) - images


def unlink() -> None:
    """A new top-level job: passes from now on belong to it, not to a FreeFuse job before."""
    _LINK.job, _LINK.start, _LINK.image, _LINK.passes = None, 0, -1, []


def forget_other_image(p) -> None:
    """In the job's postprocess_image: an ADETAILER_KEY written for another image of the batch is not this one's."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict) and _LINK.image != getattr(p, "batch_index", 0):
        params.pop(ADETAILER_KEY, None)


def redraw_pass(p) -> None:
    """In an ADetailer pass over an image FreeFuse made: keep only the LoRA of the subject owning the region."""
    job = _LINK.job() if _LINK.job is not None else None
    state, args = getattr(job, "freefuse_state", None), getattr(job, "freefuse_args", None)
    if state is None or args is None:
        return  # FreeFuse was off for that image: ADetailer's pass stays as it is
    at, images = _LINK.start + job.batch_index, state.image_masks()
    masks = images[at] if 0 <= at < len(images) else None
    index = int(job.iteration) * int(job.batch_size) + int(job.batch_index)  # the image's place in the job (get_i)
    region = _region(getattr(p, "image_mask", None))
    if masks is None or region is None:
        why = "FreeFuse made no masks for it" if masks is None else "the pass has no inpainting mask"
        _record(job, index, f"all ({why})")
        return
    if getattr(job, "inpaint_full_res", False) and getattr(job, "image_mask", None) is not None:
        _record(job, index, "all (the image's masks cover only the crop its inpainting redrew)")
        return
    (h, w), (height, width) = masks.shape[-2:], region.shape
    if abs(h * width / height - w) > 1:  # hires fix's reused masks are coarser than the image: the shape counts
        _record(job, index, f"all (FreeFuse's masks, {w}x{h} tokens, do not fit this {width}x{height} image)")
        return
    names = state.subject_names
    owner = region_owner(masks.float().cpu(), region)
    summary = ", ".join(f"{name} {share:.0%}" for name, share in zip(names, owner.shares, strict=True))
    if owner.verdict in (AMBIGUOUS, EMPTY):
        _record(job, index, f"all ({summary})" if owner.verdict == AMBIGUOUS else "all (empty region)")
        return
    keep = names[owner.owner] if owner.verdict == SUBJECT else None
    weight = _weight(job, index, keep, args) if keep is not None else 1.0
    p.all_prompts = [keep_subject_loras(text, names, keep, weight, _same_lora) for text in p.all_prompts]
    p.prompt = keep_subject_loras(p.prompt, names, keep, weight, _same_lora)
    _record(job, index, _kept(owner, keep, summary))


def adetailer_leaves_out(p, script_filename: str) -> str | None:
    """A warning when ADetailer will redraw p's images without FreeFuse (its script filter leaves FreeFuse out)."""
    scripts = getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []
    present = any(_title(script) == ADETAILER_TITLE for script in scripts)
    if not present or getattr(p, "_ad_disabled", False) or is_adetailer_pass(p):
        return None
    from modules import shared

    data = shared.opts.data
    if not data.get(ONLY_SELECTED_OPTION, True):
        return None  # ADetailer runs every script in its passes
    names = {name.strip() for name in str(data.get(SCRIPT_NAMES_OPTION, "")).split(",")}
    stem = Path(script_filename).stem
    if stem in names:
        return None
    return (
        f"ADetailer redraws faces with every subject LoRA: add {stem} to the script names it applies (Settings > "
        f"ADetailer) so that each face keeps only its own subject's LoRA"
    )


def _region(mask) -> torch.Tensor | None:
    """ADetailer's inpainting mask (a PIL image over the whole image) -> (H, W) bool, or None without one."""
    if mask is None or not hasattr(mask, "convert"):
        return None
    return torch.from_numpy(np.asarray(mask.convert("L")) > 127)


def _weight(job, index: int, keep: str, args) -> float:
    """The owner's weight in the image: its tag's in the image's prompt, else its row's."""
    prompts = list(getattr(job, "all_prompts", None) or [])
    prompt = prompts[index % len(prompts)] if prompts else ""
    for name, weight in lora_tags(prompt):
        if _same_lora(name, keep):
            return weight
    return next((s.weight for s in args.subjects if s.lora == keep), 1.0)


def _same_lora(tag_name: str, subject: str) -> bool:
    """Whether a tag's name names the subject's LoRA: the same name, or the same file by Forge's aliases."""
    if tag_name == subject:
        return True
    import networks  # Forge's built-in LoRA extension (extensions-builtin/sd_forge_lora)

    def file(name: str):
        found = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
        return getattr(found, "filename", None)

    first = file(tag_name)
    return first is not None and first == file(subject)


def _kept(owner: RegionOwner, keep: str | None, summary: str) -> str:
    if owner.verdict == BACKGROUND:
        return f"none (background {owner.background:.0%}: {summary})"
    return f"{keep} ({summary})"


def _record(job, index: int, decision: str) -> None:
    """Log one pass's decision and write the image's passes so far to its infotext."""
    if _LINK.image != job.batch_index:
        _LINK.image, _LINK.passes = job.batch_index, []
    _LINK.passes.append(decision)
    number = len(_LINK.passes)
    logger.info("FreeFuse: ADetailer pass %d over image %d keeps the LoRAs of %s", number, index + 1, decision)
    params = getattr(job, "extra_generation_params", None)
    if isinstance(params, dict):
        params[ADETAILER_KEY] = "; ".join(f"{n}: {d}" for n, d in enumerate(_LINK.passes, start=1))


def _title(script) -> str:
    try:
        return script.title()
    except Exception:  # another extension's script: its title is not FreeFuse's business
        return ""
