"""Z-Image in Forge Neo (backend/nn/lumina.py's NextDiT): the token layout of each model call, the capture layer,
masks for layers whose tokens carry pad tokens, and the context's pieces for the word search. `install` puts the
patches on a clone (per-token adaLN modulation: zimage_adaln.py); lib_freefuse/families/zimage.py says which layer
sees which tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core.prompt import byte_level_pieces
from ..families import Z_IMAGE
from ..hosts import Host
from . import zimage_adaln
from .flux1 import _hides_keys
from .job import FreeFuseJob
from .lora_layers import MaskedLinearPatch
from .patching import SubjectDeltas, unpatched
from .qwen_image import OUTSIDE_PROMPT, _prompt_positions


def install(clone, model, job: FreeFuseJob, subject_deltas: SubjectDeltas, capture_block: int, host: Host) -> None:
    """The layout recorder, the capture layer's patch and every masked layer of the subject LoRAs, on `clone`."""
    sites = Z_IMAGE.capture_sites(model)
    if not 0 <= capture_block < len(sites):
        raise ValueError(f"capture_block: {capture_block} is not one of the model's {len(sites)} layers")
    layout = TokenLayout(model.patch_size, model.pad_tokens_multiple or 1)
    forward = "diffusion_model.forward"
    clone.add_object_patch(forward, LayoutRecorder(unpatched(clone, forward), layout))
    for module, deltas in subject_deltas.items():
        role = Z_IMAGE.layer_role(module)
        if role.modulation:  # the block's own forward, patched before the capture layer's patch wraps it
            zimage_adaln.install(clone, job, module, role.parent, deltas, PaddedMasks(job, layout, role.stream))
            continue
        source = job.vector_masks if role.stream == "vector" else PaddedMasks(job, layout, role.stream)
        name = f"diffusion_model.{module}.forward"
        clone.add_object_patch(name, MaskedLinearPatch(unpatched(clone, name), deltas, source, job.layer_failed))
    for index, store in job.capture_stores(capture_block):
        block = f"diffusion_model.{sites[index]}.forward"
        clone.add_object_patch(block, CaptureLayer(unpatched(clone, block), job, layout, store))


@dataclass
class TokenLayout:
    """The joint sequence of the current model call: caption tokens (T, padded to Pc), then image tokens (N, padded
    to Pi); NextDiT pads each part to a multiple of `multiple` (1: no pad tokens)."""

    patch_size: int
    multiple: int
    text: int = 0  # T: the context's tokens
    image: int = 0  # N: the latent's patches

    def record(self, text_tokens: int, latent_hw: tuple[int, int]) -> None:
        self.text = text_tokens
        self.image = math.ceil(latent_hw[0] / self.patch_size) * math.ceil(latent_hw[1] / self.patch_size)

    @property
    def text_padded(self) -> int:
        return self.text + (-self.text) % self.multiple

    @property
    def image_padded(self) -> int:
        return self.image + (-self.image) % self.multiple

    def without_pads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, Pc + Pi, D) -> (B, H, T + N, D): the caption's and the image's rows, the pad tokens dropped."""
        total = self.text_padded + self.image_padded
        if t.shape[2] != total:
            raise ValueError(f"the capture layer's attention has {t.shape[2]} tokens, the call's layout {total}")
        image = slice(self.text_padded, self.text_padded + self.image)
        return torch.cat([t[:, :, : self.text], t[:, :, image]], dim=2)


class LayoutRecorder:
    """Forward of NextDiT: records each call's caption length and latent size in the layout, then runs the model."""

    def __init__(self, original_forward, layout: TokenLayout):
        self.original_forward = original_forward
        self.layout = layout

    def __call__(self, x, timesteps, *args, **kwargs):
        context = kwargs["context"] if "context" in kwargs else args[0]
        self.layout.record(int(context.shape[1]), (int(x.shape[-2]), int(x.shape[-1])))
        return self.original_forward(x, timesteps, *args, **kwargs)


class CaptureLayer:
    """Forward of the capture layer: during the capture call, hands q and k (after QK-norm and RoPE, pads dropped)
    to the job."""

    def __init__(self, original_forward, job: FreeFuseJob, layout: TokenLayout, store=None):
        self.original_forward = original_forward
        self.job = job
        self.layout = layout
        self.store = store or job.store_attention  # average_blocks: job.store_block_maps before the capture layer

    def __call__(self, *args, **kwargs):
        if not self.job.capturing:
            return self.original_forward(*args, **kwargs)
        with _capturing_attention(self.store, self.job.capture_failed, self.layout):
            return self.original_forward(*args, **kwargs)


@contextmanager
def _capturing_attention(
    store: Callable[[torch.Tensor, torch.Tensor], None], on_error: Callable[[Exception], None], layout: TokenLayout
):
    """Swap backend.nn.lumina.attention_function (looked up at call time by JointAttention) for one that also stores
    q, k: JointAttention hands it (B, H, Pc + Pi, D) after QK-norm and RoPE. A mask that hides keys (NextDiT's joint
    layers pass none) makes the capture refused (on_error); the attention is computed as usual either way."""
    import backend.nn.lumina as lumina

    original = lumina.attention_function

    def attention(q, k, v, heads, mask=None, *args, **kwargs):
        try:
            if _hides_keys(mask):
                raise ValueError(f"the capture layer's attention hides keys (a mask {tuple(mask.shape)})")
            store(layout.without_pads(q), layout.without_pads(k))
        except Exception as error:  # reported once by the job; this image is made without masks
            on_error(error)
        return original(q, k, v, heads, mask, *args, **kwargs)

    lumina.attention_function = attention
    try:
        yield
    finally:
        lumina.attention_function = original


class PaddedMasks:
    """x -> (B|1, tokens, L) masks of a Z-Image layer of `stream` ("text", "image", "joint") or None: the job's masks
    of the caption and image tokens, with rows for the pad tokens when x carries them. Caption pads get the caption's
    last token's row (the chat template's closing newline: nobody's word); image pads get each subject's share of
    the image (the mean of its image masks: every LoRA where masks are all ones, none where they are all zero)."""

    def __init__(self, job: FreeFuseJob, layout: TokenLayout, stream: str):
        self.job = job
        self.layout = layout
        self.stream = stream

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        tokens = int(x.shape[1])
        return self.job.call_cached(("z-image masks", self.stream, tokens), lambda: self._masks(x, tokens))

    def _masks(self, x: torch.Tensor, tokens: int) -> torch.Tensor | None:
        lay = self.layout
        if self.stream == "joint":
            if tokens != lay.text_padded + lay.image_padded:
                raise ValueError(
                    f"a joint layer saw {tokens} tokens, the call's layout has {lay.text_padded} + {lay.image_padded}"
                )
            text = self._part(x, "text", lay.text, lay.text_padded)
            image = self._part(x, "image", lay.image, lay.image_padded)
            if text is None or image is None:
                return None
            batch = max(text.shape[0], image.shape[0])
            return torch.cat([text.expand(batch, -1, -1), image.expand(batch, -1, -1)], dim=1)
        count, padded = (lay.text, lay.text_padded) if self.stream == "text" else (lay.image, lay.image_padded)
        if tokens not in (count, padded):
            raise ValueError(f"a {self.stream} layer saw {tokens} tokens, the call's layout has {count} ({padded})")
        return self._part(x, self.stream, count, tokens)

    def _part(self, x: torch.Tensor, stream: str, count: int, padded: int) -> torch.Tensor | None:
        probe = x.new_empty(1, count, 0)  # masks_for reads only the token count, device and dtype
        masks = self.job.masks_for(stream, probe)
        if masks is None or padded == count:
            return masks
        pad = masks[:, -1:] if stream == "text" else masks.mean(dim=1, keepdim=True)
        return torch.cat([masks, pad.expand(-1, padded - count, -1)], dim=1)


def context_pieces(engine, prompt: str) -> list[str]:
    """The pieces of the context Neo's Z-Image conditions on for `prompt`, one per token: the prompt's own text as
    text, the chat template around it (and around each emphasis part: Neo's Qwen3 engine templates each on its own)
    as boundaries no word can match. The engine makes one chunk, keeps every token and pads nothing."""
    chunks = engine.tokenize_line(prompt)  # Neo's Qwen3 engine returns the chunks alone
    if len(chunks) != 1:
        raise ValueError(f"the Qwen3 engine made {len(chunks)} chunks, Z-Image's engine makes one")
    tokens = chunks[0].tokens
    inside = _prompt_positions(engine.tokenizer, tokens)
    pieces = byte_level_pieces(engine.tokenizer.convert_ids_to_tokens(tokens))
    return [pieces[i] if i in inside else OUTSIDE_PROMPT for i in range(len(tokens))]
