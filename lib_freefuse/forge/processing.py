"""From a webui job to a FreeFuse run: find each subject's words and LoRA, build the job, patch the unet.

Called by the script's `process_before_every_sampling`, once per sampling call (classic Forge calls it three
times for a hires-fix job, the first pass-2 call discarded by a reset): every call starts again from the
unpatched unet, so the hook is idempotent.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch

from ..args import FreeFuseArgs, help_for
from ..core import find_subject_tokens
from ..core.config import BACKGROUND_FROM_TOKENS
from ..families import FLUX1, Family, detect, unsupported
from ..hosts import Host, HostUnsupported, SubjectPatches, for_unet
from ..log import logger
from . import flux2, qwen_image, zimage
from .host import diffusion_model, patch_unet
from .job import FreeFuseJob, JobPlan
from .lora_layers import subject_deltas

_REFUSALS = {"Qwen-Image": qwen_image.refusal}  # family -> p -> why FreeFuse cannot run this job, or None
# the background "words" choice as the accordion shows it, for messages
_WORDS_LABEL = next(label for label, value in help_for("background").shown_choices() if value == "words")
# what becomes of the background when its words cannot be used, per background setting
_WITHOUT_WORDS = {
    "tokens": "places where no subject scores high stay free instead",
    "words": "every place goes to some subject",
}
_CONTEXT_PIECES = {
    "FLUX.2 Klein": flux2.context_pieces,
    "Qwen-Image": qwen_image.context_pieces,
    "Z-Image": zimage.context_pieces,
}  # family -> (engine, prompt) -> the context's pieces


@dataclass
class RunState:
    """What FreeFuse did in one webui job (all its sampling calls), for infotext, previews and the next pass."""

    jobs: list[FreeFuseJob] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    subject_names: list[str] = field(default_factory=list)
    batches: list[tuple[torch.Tensor | None, int]] = field(default_factory=list)  # (masks, images) per batch
    _jobs_seen: int = 0

    def warn(self, message: str) -> None:
        """A problem the user must see: logged once per job, kept for the infotext and the UI."""
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning("FreeFuse: %s", message)

    def end_batch(self, images: int) -> torch.Tensor | None:
        """Close a batch (batch count > 1 runs several): the masks its sampling calls made last, or None (also when
        FreeFuse failed in the call that made them: the image was finished without masks)."""
        made = [job.masks for job in self.jobs[self._jobs_seen :] if job.masks is not None and job.failure is None]
        self._jobs_seen = len(self.jobs)
        masks = made[-1] if made else None
        self.batches.append((masks, images))
        return masks

    def image_masks(self) -> list[torch.Tensor | None]:
        """(L, h, w) masks of every image of the job in order, None where FreeFuse made none."""
        return [None if masks is None else masks[i] for masks, count in self.batches for i in range(count)]

    @property
    def masks(self) -> torch.Tensor | None:
        """The latest masks made in this job: (B_img, L, h, w)."""
        for job in reversed(self.jobs):
            if job.masks is not None:
                return job.masks
        return None


def begin_job(p) -> bool:
    """In the script's process(): whether FreeFuse sets up this job. True for a new job, and for the same job object
    run again (Forge's img2img batch runs one per input file), whose state starts afresh so that each file's overlays,
    coverage and warnings are its own; False for a copy of a job under way (ADetailer runs the scripts' process() on
    one after its passes), which must leave that job's state alone."""
    if getattr(p, "freefuse_of", id(p)) != id(p):
        return False
    p.freefuse_of = id(p)
    p.freefuse_state = None
    return True


def run_state(p) -> RunState:
    """The job's RunState, kept on p (per job, never on the script)."""
    state = getattr(p, "freefuse_state", None)
    if state is None:
        state = RunState()
        p.freefuse_state = state
    return state


def start_run(p, args: FreeFuseArgs, x: torch.Tensor) -> FreeFuseJob | None:
    """Patch p's unet for this sampling call, or leave it as it is (with a warning) when FreeFuse cannot run."""
    state = run_state(p)
    unet = p.sd_model.forge_objects.unet
    unet = getattr(unet, "freefuse_base", unet)  # never patch a patched clone twice
    model = diffusion_model(unet)
    family = detect(model)
    if family is None:
        state.warn(f"{unsupported(model)}: FreeFuse does nothing for it")
        return None
    try:
        host = for_unet(unet)
    except HostUnsupported as error:
        state.warn(f"{error}: FreeFuse does nothing for this job")
        return None
    if reason := host.missing(unet):
        state.warn(f"{reason} ({host.name}): FreeFuse does nothing for it")
        return None
    if not hasattr(p.sd_model, family.text_engine):  # an SDXL refiner: CLIP-G alone, which SDXL's engine is not
        state.warn(f"the {family.name} model has no {family.text_engine} to find the words in: FreeFuse does nothing")
        return None
    if (refuse := _REFUSALS.get(family.name)) and (reason := refuse(p)):
        state.warn(f"{reason}: FreeFuse does nothing for this job")
        return None
    is_hr = bool(getattr(p, "is_hr_pass", False))
    prompts = list(p.hr_prompts if is_hr else p.prompts)
    rows = _distinct_rows(args.subjects, state)
    words, text_length = _subject_words(p, prompts, rows, state, family)
    subjects = [s for s in rows if s.lora in words]
    loras = _subject_loras(unet, host, subjects, state)
    subjects = [s for s in subjects if s.lora in loras]
    if len(subjects) < 2:
        state.warn(f"{len(subjects)} usable subject(s): FreeFuse needs at least 2; the LoRAs act as usual")
        return None
    state.subject_names = [s.lora for s in subjects]

    deltas: dict[str, list] = defaultdict(list)
    base_weight = host.base_weight(unet)
    for index, subject in enumerate(subjects):
        for delta in _deltas(loras[subject.lora], base_weight, host, subject.lora, state):
            deltas[delta.module].append((index, delta))
    merged = [loras[s.lora] for s in subjects if loras[s.lora].source is not None]

    steps = _steps_in_run(p, is_hr)
    capture = args.resolved_capture_step(steps)
    if note := args.capture_step_note(steps):
        state.warn(note)
    previous = state.masks if is_hr and args.hires_masks == "reuse" else None
    word_positions = tuple(tuple(words[s.lora][b] for s in subjects) for b in range(len(prompts)))
    background = _background_positions(p, prompts, family, args, state)
    background = _apart_from_subjects(background, word_positions, _WITHOUT_WORDS.get(args.mask.background, ""), state)
    mask_config = args.mask
    if args.mask.background == "tokens" and not background:
        mask_config = replace(args.mask, background="threshold")
    plan = JobPlan(
        word_positions=word_positions,
        text_length=text_length,
        capture_step=capture - 1,
        mask_config=mask_config,
        pre_mask=args.pre_mask,
        modulation=args.modulation,
        text_loras=args.text_loras,
        initial_masks=previous,
        restart=args.restart,
        background_positions=background,
        attention_bias=_attention_bias(args, family, state),
        average_steps=args.average_steps,
        average_blocks=_average_blocks(args, family),
    )
    job = FreeFuseJob(plan, _decoder(p, args.slic_image), family=family)
    _record_schedule(p, job)
    if args.restart:
        _restart_with_masks(p, job)
    sites = family.capture_sites(model)
    block = _capture_site(args, family, model, state)
    patched = patch_unet(unet, job, deltas, block, merged, host, family)
    patched.freefuse_base = unet
    p.sd_model.forge_objects.unet = patched
    state.jobs.append(job)
    logger.info(
        "FreeFuse: %d subjects (%s), capture at step %d of %d in %s",
        len(subjects),
        ", ".join(s.lora for s in subjects),
        capture,
        steps,
        sites[block],
    )
    return job


def _capture_site(args: FreeFuseArgs, family: Family, model, state: RunState) -> int:
    """Index of the capture site: the setting's block on FLUX.1 (the last one where the model has fewer); on
    another family the setting's default means the family's default site, another value indexes its sites."""
    sites = family.capture_sites(model)
    block = args.capture_block
    if family is not FLUX1 and block == FreeFuseArgs.capture_block:
        return family.default_capture_site(model)
    if block >= len(sites):
        if family is FLUX1:
            state.warn(
                f"capture block double_blocks.{block} does not exist (the model has {len(sites)}): using the last"
            )
        else:
            state.warn(
                f"capture block {block} does not exist (the {family.name} model has {len(sites)} transformer blocks): "
                "using the last"
            )
        block = len(sites) - 1
    return block


def _attention_bias(args: FreeFuseArgs, family: Family, state: RunState) -> float:
    """The setting's attention bias, or 0 where the family's attention cannot take it: silently for the default
    (it is on where it can be), with a warning for a value the user chose."""
    if args.attention_bias > 0 and not family.attention_bias:
        if args.attention_bias == FreeFuseArgs.attention_bias:
            return 0.0
        state.warn(f"keeping words to their regions is not available for {family.name} models: made without it")
        return 0.0
    return args.attention_bias


def _average_blocks(args: FreeFuseArgs, family: Family) -> bool:
    """The setting, or False on a family whose capture is a cross-attention block (SDXL: its blocks sit at several
    resolutions, so their maps have no common grid to average on). Silently: it is the default (0.6.0), on where it
    can be, as the attention bias is."""
    return args.average_blocks and family.attention == "joint"


def _background_positions(p, prompts: list[str], family: Family, args: FreeFuseArgs, state: RunState) -> tuple:
    """[image] -> text positions of the background class: for the background "tokens" the background words' where
    given, else (position of the end-of-text token,) in the prompt's context; for "words" the background words' where
    given. () for the other settings, for "words" without words, or (with a warning; "tokens" uses "threshold"
    instead, "words" gives every place to some subject) when the words are not in the prompt or, for "tokens" without
    words, the family has no such token."""
    if args.mask.background not in BACKGROUND_FROM_TOKENS:
        if args.background_words:
            state.warn(
                f"the background words ({args.background_words}) count only when places no subject claims "
                f"{_WORDS_LABEL!r}: made without them"
            )
        return ()
    if args.background_words:
        return _background_words(p, prompts, family, args.background_words, _WITHOUT_WORDS[args.mask.background], state)
    if args.mask.background == "words":
        return ()
    engine = getattr(p.sd_model, family.text_engine)
    end = getattr(engine, "id_end", None)
    if not family.end_of_text or end is None:
        state.warn(
            f"the {family.name} model's context has no end-of-text token to find the background with: "
            "places where no subject scores high stay free instead"
        )
        return ()
    positions = []
    for prompt in prompts:
        chunks, _ = engine.tokenize_line(prompt)
        positions.append((chunks[0].tokens.index(end),))  # every T5 chunk ends its pieces with it
    return tuple(positions)


def _apart_from_subjects(background: tuple, word_positions: tuple, instead: str, state: RunState) -> tuple:
    """[image] -> the background positions that are no subject's words (a shared token counts for its subject, and
    is named); () with a warning saying what the job does `instead` when none is left."""
    if not background:
        return background
    kept = []
    for positions, subjects in zip(background, word_positions, strict=True):
        taken = {t for subject in subjects for t in subject}
        kept.append(tuple(t for t in positions if t not in taken))
    if kept == list(background):
        return background
    if not all(kept):
        state.warn(f"the background words are a subject's own words: {instead}")
        return ()
    state.warn("some background words are also a subject's words: they count for the subject only")
    return tuple(kept)


def _distinct_rows(subjects, state: RunState) -> list:
    """The rows that bind distinct LoRAs: a LoRA bound again by a later row is named, and its first row kept."""
    first: dict[str, object] = {}
    for subject in subjects:
        if subject.lora not in first:
            first[subject.lora] = subject
        else:
            state.warn(
                f"LoRA {subject.lora} is bound twice (words '{first[subject.lora].words}' and '{subject.words}'): "
                f"using the first binding only"
            )
    return list(first.values())


def _subject_words(p, prompts: list[str], subjects, state: RunState, family: Family = FLUX1) -> tuple[dict, int]:
    """({lora: [positions per image]} for subjects whose words occur in every prompt, the tokenised length).

    prompts: one per image of the batch (they may differ). The family's text engine tokenises them as the host
    does (emphasis and BREAK included). FLUX.1 and Chroma: only the text before a prompt's first BREAK counts (Forge
    conditions them on that first T5 chunk alone, padded to the longest chunk). SDXL: every 77-token CLIP chunk,
    positions counted across them. Qwen-Image: the context its engine keeps after the chat template's leading tokens
    (forge/qwen_image.context_pieces); Z-Image: its Qwen3 engine's one chunk, the template included
    (forge/zimage.context_pieces); FLUX.2 Klein: its Qwen3 engine's one chunk, the template included, role words
    kept out (forge/flux2.context_pieces)."""
    per_image, length, after_break = _search_words(p, prompts, [s.words for s in subjects], family)
    return _bound_words(subjects, per_image, after_break, family, state), length


def _words_in_all_chunks(engine, prompts: list[str], subjects, state: RunState) -> tuple[dict, int]:
    """_subject_words for a model that reads every chunk of the prompt (SDXL's CLIP: 77 tokens each, BOS and EOS
    included, concatenated in the context)."""
    per_image, length = _search_context(prompts, [s.words for s in subjects], lambda p: _chunk_pieces(engine, p))
    return _bound_words(subjects, per_image, set(), None, state), length


def _search_words(p, prompts: list[str], words: list[str], family: Family) -> tuple[list[list], int, set[int]]:
    """Where each entry of `words` (comma-separated phrases) is in each prompt, in the context the family's engine
    makes (see _subject_words): ([image][entry] -> find_subject_tokens' result, the tokenised length, the entries
    found only after a BREAK that the family leaves out)."""
    engine = getattr(p.sd_model, family.text_engine)
    if family.name in _CONTEXT_PIECES:
        pieces = _CONTEXT_PIECES[family.name]
        return (*_search_context(prompts, words, lambda prompt: pieces(engine, prompt)), set())
    if not family.first_chunk_only:
        return (*_search_context(prompts, words, lambda prompt: _chunk_pieces(engine, prompt)), set())
    lengths = []
    per_image = []
    after_break = set()
    for prompt in prompts:
        chunks, _ = engine.tokenize_line(prompt)
        lengths.append(max(len(c.tokens) for c in chunks))  # the engine pads the first chunk to the longest
        per_image.append(find_subject_tokens(engine.tokenizer.convert_ids_to_tokens(chunks[0].tokens), words))
        if len(chunks) > 1:
            later = [token for chunk in chunks[1:] for token in chunk.tokens]
            later_found = find_subject_tokens(engine.tokenizer.convert_ids_to_tokens(later), words)
            after_break.update(i for i, r in enumerate(later_found) if r.found and not per_image[-1][i].found)
    return per_image, max(lengths), after_break


def _search_context(prompts: list[str], words: list[str], context) -> tuple[list[list], int]:
    """_search_words where the family's whole context counts: context(prompt) -> the context's pieces."""
    per_image, lengths = [], []
    for prompt in prompts:
        pieces = context(prompt)
        lengths.append(len(pieces))
        per_image.append(find_subject_tokens(pieces, words))
    return per_image, max(lengths)


def _bound_words(subjects, per_image: list[list], after_break: set[int], family: Family | None, state: RunState):
    """{lora: [positions per image]} of the subjects found in every prompt; the others named (ordinary LoRAs)."""
    found: dict = {}
    for index, subject in enumerate(subjects):
        results = [image[index] for image in per_image]
        if not all(r.found for r in results):
            missing = sorted({m for r in results for m in r.missing})
            state.warn(
                f"the words of {subject.lora} ({', '.join(missing)}) {_where(index, after_break, family)}: "
                f"{subject.lora} acts as an ordinary LoRA"
            )
            continue
        for r in results:
            if r.missing:
                state.warn(f"{subject.lora}: '{', '.join(r.missing)}' not in the prompt; using its other words")
        found[subject.lora] = [r.positions for r in results]
    return found


def _where(index: int, after_break: set[int], family: Family | None) -> str:
    """Why an entry's words were not found: only after a BREAK the family leaves out, or nowhere."""
    if index in after_break:
        return f"come only after BREAK, and Forge's {family.name} uses the text before the first BREAK"
    return "are not in the prompt"


def _background_words(p, prompts: list[str], family: Family, words: str, instead: str, state: RunState) -> tuple:
    """[image] -> the text positions of the background words, found as a subject's are; () with a warning saying what
    the job does `instead` when a prompt holds none of them."""
    per_image, _, after_break = _search_words(p, prompts, [words], family)
    results = [image[0] for image in per_image]
    if not all(r.found for r in results):
        missing = sorted({m for r in results for m in r.missing})
        state.warn(f"the background words ({', '.join(missing)}) {_where(0, after_break, family)}: {instead}")
        return ()
    for r in results:
        if r.missing:
            state.warn(f"background words: '{', '.join(r.missing)}' not in the prompt; using the others")
    return tuple(tuple(r.positions) for r in results)


def _chunk_pieces(engine, prompt: str) -> list[str]:
    """The pieces of every chunk of an engine's tokenize_line, in order."""
    chunks, _ = engine.tokenize_line(prompt)
    return engine.tokenizer.convert_ids_to_tokens([token for chunk in chunks for token in chunk.tokens])


def _subject_loras(unet, host: Host, subjects, state: RunState) -> dict[str, SubjectPatches]:
    """{lora name: its patches}: those the host merged from the prompt's tags, else the file loaded here."""
    import networks  # Forge's built-in LoRA extension (extensions-builtin/sd_forge_lora)

    loras = {}
    files: dict[str, str] = {}  # file -> the name that bound it first
    for subject in subjects:
        on_disk = networks.available_network_aliases.get(subject.lora) or networks.available_networks.get(subject.lora)
        if on_disk is None:
            state.warn(f"LoRA {subject.lora} not found: check the name (as in <lora:NAME:weight>)")
            continue
        if on_disk.filename in files:
            state.warn(
                f"LoRA {subject.lora} is the same file as {files[on_disk.filename]} "
                f"({os.path.basename(on_disk.filename)}): using the first binding only"
            )
            continue
        files[on_disk.filename] = subject.lora
        try:
            patches = host.merged_lora(unet, on_disk.filename)
            if patches is None:
                patches = host.load_lora(unet, on_disk.filename, subject.weight)
                if patches:
                    logger.info(
                        "FreeFuse: %s has no tag in the prompt: loaded at weight %s", subject.lora, subject.weight
                    )
        except Exception as error:  # an unreadable or non-LoRA file must not stop the job
            reason = " ".join(str(error).split())  # Neo's loader puts its message on several lines
            state.warn(f"LoRA {subject.lora} could not be read: {type(error).__name__}: {reason}")
            continue
        if not patches:
            keys = patches.unmatched
            example = f" (none of its {len(keys)} keys, e.g. {keys[0]}, matches a layer)" if keys else ""
            state.warn(f"LoRA {subject.lora} changes no layer of this model{example}: not a LoRA for this model")
            continue
        loras[subject.lora] = patches
    return loras


def _deltas(patches: SubjectPatches, base_weight, host: Host, name: str, state: RunState):
    deltas, notes = subject_deltas(patches, base_weight, host.merge)
    for note in notes:
        logger.info("FreeFuse: %s: %s", name, note)
    if not deltas:
        state.warn(f"LoRA {name} changes no layer FreeFuse can mask")
    return deltas


def _steps_in_run(p, is_hr: bool) -> int:
    """Denoising steps this sampling call runs (img2img: only those its denoising strength runs)."""
    if is_hr:
        return int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
    if getattr(p, "init_images", None) is not None and hasattr(p, "denoising_strength"):
        from modules import sd_samplers_common

        _, t_enc = sd_samplers_common.setup_img2img_steps(p)
        return t_enc + 1  # the run uses sigmas[steps - t_enc - 1:]
    return int(p.steps)


def _decoder(p, source: str):
    """x0 latents (B, C, H, W), or Neo's (B, C, 1, H, W) for its Wan-VAE models (Qwen-Image) -> (B, H_px, W_px, 3)
    RGB in [0, 1] for SLIC: the VAE, or Forge's cheap preview (one image per call: it reads the batch's first)."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if source == "preview":
            from modules import sd_samplers_common

            preview = sd_samplers_common.samples_to_images_tensor
            images = torch.cat([preview(latents[i : i + 1], approximation=2) for i in range(latents.shape[0])])
        else:
            images = p.sd_model.decode_first_stage(latents)
        if images.ndim == 5:  # Neo's Wan-VAE decode: (B, T = 1, 3, H, W), squeezed as Neo's processing does
            images = images.squeeze(1)
        return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    return decode


def _record_schedule(p, job: FreeFuseJob) -> None:
    """Give the job the run's sigma schedule when the sampler computes it (step counting for every sampler)."""
    sampler = getattr(p, "sampler", None)
    if sampler is None or not hasattr(sampler, "get_sigmas"):
        return
    original = getattr(sampler, "freefuse_get_sigmas", None) or sampler.get_sigmas
    sampler.freefuse_get_sigmas = original

    def get_sigmas(*args, **kwargs):
        sigmas = original(*args, **kwargs)
        job.steps.use_schedule(sigmas)
        return sigmas

    sampler.get_sigmas = get_sigmas


def _restart_with_masks(p, job: FreeFuseJob) -> None:
    """Make this call's sampler run again from the start once the masks exist (the sampler is per job)."""
    sampler = getattr(p, "sampler", None)
    for name in ("sample", "sample_img2img"):
        original = getattr(sampler, f"freefuse_{name}", None) or getattr(sampler, name, None)
        if original is None:
            continue
        setattr(sampler, f"freefuse_{name}", original)

        def sample(*args, _original=original, **kwargs):
            kept = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            return job.run(
                lambda: _original(*[a.clone() if isinstance(a, torch.Tensor) else a for a in kept], **kwargs)
            )

        setattr(sampler, name, sample)
