"""Qwen-Image in Forge Neo (backend/nn/qwen.py): the capture block, masked layers, per-token modulation, and the words
in the context Neo's Qwen engine returns. `install` puts the patches on a clone; lib_freefuse/families/qwen_image.py
says which layer sees which tokens."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from operator import itemgetter

import torch

from ..core.prompt import byte_level_pieces
from ..families import QWEN_IMAGE
from ..hosts import Host
from .flux1 import CaptureBlock, PerTokenModulation, _hides_keys
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch
from .patching import SubjectDeltas, stream_masks, unpatched

QWEN25_7B_WIDTH = 3584  # Qwen2.5-VL-7B's hidden size: the probe's width when the engine's encoder does not say
OUTSIDE_PROMPT = "<template>"  # a piece the word search treats as a boundary (core.prompt: special pieces)


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """The capture block's patch and every masked layer of the subject LoRAs, as object patches on `clone`."""
    if not 0 <= capture_block < len(model.transformer_blocks):
        raise ValueError(
            f"capture_block: {capture_block} is not one of the model's {len(model.transformer_blocks)} blocks"
        )
    for index, store in job.capture_stores(capture_block):
        block = f"diffusion_model.transformer_blocks.{index}.forward"
        clone.add_object_patch(block, CaptureBlock(unpatched(clone, block), job, _capturing_attention, store))
    modulated: set[str] = set()  # blocks whose _modulate takes per-token parameters
    for module, deltas in subject_deltas.items():
        role = QWEN_IMAGE.layer_role(module)
        name = f"diffusion_model.{module}.forward"
        if role.modulation:  # img_mod/txt_mod = Sequential(SiLU, Linear): its forward gives (B, T|1, 6D)
            patch = PerTokenModulation(unpatched(clone, name), 1, deltas, job, role.stream, itemgetter(0))
            clone.add_object_patch(f"diffusion_model.{role.parent}.forward", patch)
            modulate = f"diffusion_model.{role.parent.rsplit('.', 1)[0]}._modulate"
            if modulate not in modulated:  # one block may have both img_mod and txt_mod
                modulated.add(modulate)
                clone.add_object_patch(modulate, TokenModulate(unpatched(clone, modulate)))
            continue
        source = job.vector_masks if role.stream == "vector" else stream_masks(job, role.stream)
        clone.add_object_patch(name, MaskedLinearPatch(unpatched(clone, name), deltas, source, job.layer_failed))


class TokenModulate:
    """A block's `_modulate(x, mod_params)` that also takes the per-token parameters PerTokenModulation gives.
    Neo's takes (B, 3D) and broadcasts one shift/scale/gate over the tokens: x (B, T, D) * (1 + scale[:, None]) +
    shift[:, None]; (B, T|1, 3D) parameters are already per token: x * (1 + scale) + shift, gate (B, T|1, D)."""

    def __init__(self, original):
        self.original = original

    def __call__(self, x: torch.Tensor, mod_params: torch.Tensor):
        if mod_params.ndim == 2:
            return self.original(x, mod_params)
        shift, scale, gate = torch.chunk(mod_params, 3, dim=-1)
        return torch.addcmul(shift, x, 1 + scale), gate


@contextmanager
def _capturing_attention(store: Callable[[torch.Tensor, torch.Tensor], None], on_error: Callable[[Exception], None]):
    """Swap backend.nn.qwen.attention_function (looked up at call time by the block's Attention) for one that also
    stores q, k. Neo hands it (B, L_txt + N_img, H*D) q and k after QK-norm and RoPE, the head count and the
    attention mask (Neo's blocks pass none today); they are stored as (B, H, L, D). A mask that hides keys makes
    the capture refused (on_error), as FLUX.1's; the block's attention is computed as usual either way."""
    import backend.nn.qwen as qwen

    original = qwen.attention_function

    def attention_function(q, k, v, heads, mask=None, *args, **kwargs):
        try:
            if _hides_keys(mask):
                raise ValueError(f"the capture block's attention hides keys (a mask {tuple(mask.shape)})")
            store(*(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k)))
        except Exception as error:  # reported once by the job; this image is made without masks
            on_error(error)
        return original(q, k, v, heads, mask, *args, **kwargs)

    qwen.attention_function = attention_function
    try:
        yield
    finally:
        qwen.attention_function = original


# -- the words ----------------------------------------------------------------------------------------------------


def context_pieces(engine, prompt: str) -> list[str]:
    """The pieces of the context Neo's Qwen engine conditions on for `prompt`, one per token: the prompt's own
    text as text, everything else (the chat template left after the engine drops its leading tokens, and the
    templates emphasis puts around each weighted part) as boundaries no word can match.

    Neo (backend/text_processing/qwen_engine.py) wraps every emphasis part of the prompt in the whole chat template,
    encodes the concatenation as one chunk, then `strip_template` drops the tokens before the second
    `<|im_start|>` and, when they follow, `user` and the newline; the word positions index what is kept."""
    chunks = engine.tokenize_line(prompt)
    if len(chunks) != 1 or not all(isinstance(t, int) for t in chunks[0].tokens):
        raise ValueError("the Qwen engine made more than one chunk or an image token: not a text-only prompt")
    tokens = chunks[0].tokens
    kept = _kept_positions(engine, tokens)
    inside = _prompt_positions(engine.tokenizer, tokens)
    pieces = byte_level_pieces(engine.tokenizer.convert_ids_to_tokens(tokens))
    return [pieces[i] if i in inside else OUTSIDE_PROMPT for i in kept]


def _kept_positions(engine, tokens: list[int]) -> list[int]:
    """Positions of `tokens` the engine keeps, by running its own strip_template on a probe of positions as wide as
    its encoder's output (the method compares the output's second dimension, the width, with the cut)."""
    try:
        width = int(engine.text_encoder.get_input_embeddings().embedding_dim)
    except AttributeError:
        width = QWEN25_7B_WIDTH
    probe = torch.arange(len(tokens))[:, None].expand(len(tokens), width)
    return engine.strip_template(probe, tokens)[:, 0].tolist()


def _prompt_positions(tokenizer, tokens: list[int]) -> set[int]:
    """Positions of the prompt's own text: between each `<|im_start|>user\\n` and the `<|im_end|>` after it."""
    start, user, newline, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "user", "\u010a", "<|im_end|>"])
    inside: set[int] = set()
    in_prompt, i = False, 0
    while i < len(tokens):
        if not in_prompt and tokens[i : i + 3] == [start, user, newline]:
            in_prompt, i = True, i + 3
            continue
        if in_prompt and tokens[i] == end:
            in_prompt = False
        elif in_prompt:
            inside.add(i)
        i += 1
    return inside


def refusal(p) -> str | None:
    """Why FreeFuse cannot run this Qwen-Image job (one phrase), or None. Qwen-Image-Edit's reference images put
    their vision tokens into the text context (their number depends on each image's size), so the words' positions
    in it are not the prompt's: refused rather than guessed."""
    from backend.args import dynamic_args

    if getattr(dynamic_args, "ref_latents", None):
        return "Qwen-Image with reference images (Edit) puts their vision tokens into the text context"
    return None
