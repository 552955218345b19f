"""One sampling run of FreeFuse: its step, the captured attention, the masks, and the masks each layer sees.

Created per sampling call (a hires-fix pass 2 gets its own, seeded with pass 1's masks); never stored on the
script or in a module global. Knows nothing of Forge: the host adapter feeds it and asks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core import (
    MaskConfig,
    call_token_masks,
    cross_subject_maps,
    extract_cross_masks,
    extract_masks,
    joint_score_maps,
    text_token_masks,
)
from ..core.attention_bias import joint_attention_bias
from ..core.config import BACKGROUND_FROM_TOKENS
from ..core.steps import StepCounter
from ..families import FLUX1, Family
from ..log import logger

PRE_MASK_MODES = ("joint", "off")
MODULATION_MODES = ("per_token", "global", "off")


@dataclass(frozen=True)
class JobPlan:
    """What the script resolved before sampling. Its defaults are the paper's method (every extra off); the user's
    defaults live in args.FreeFuseArgs, and processing passes every setting explicitly."""

    word_positions: tuple[tuple[tuple[int, ...], ...], ...]  # [image][subject] -> token positions in its prompt
    text_length: int  # length of the tokenised prompt those positions index (the period of a repeated context)
    capture_step: int  # 0-based step of the run at which masks are made
    mask_config: MaskConfig = field(default_factory=MaskConfig)
    pre_mask: str = "joint"  # subject LoRAs before masks exist: "joint" (unmasked, the paper) or "off"
    modulation: str = "per_token"  # subject LoRAs' modulation deltas: "per_token", "global" or "off"
    text_loras: str = "all"  # subject LoRAs on text tokens once masks exist: "all", "own_words" or "none"
    initial_masks: torch.Tensor | None = None  # (B_img, L, h, w) from an earlier pass: used from the first step
    restart: bool = False  # once the masks exist, sample again from the first step with them (authors' later code)
    background_positions: tuple[tuple[int, ...], ...] = ()  # [image] -> text positions of the background class
    # (its end-of-text token), read when mask_config.background is "tokens" or "words"
    attention_bias: float = 0.0  # once the masks exist, push words and regions together (core.attention_bias); 0 off
    average_steps: bool = False  # the masks from the mean of the score maps of every step up to the capture step
    average_blocks: bool = False  # and of every block up to the capture block, in the same call (store_block_maps)

    @property
    def n_images(self) -> int:
        return len(self.word_positions)

    @property
    def n_subjects(self) -> int:
        return len(self.word_positions[0])


def coverage_percent(masks: torch.Tensor) -> list[list[float]]:
    """(B_img, L, h, w) masks -> [image][subject]: the percent of the image each subject's mask covers."""
    return (masks.float().mean(dim=(2, 3)) * 100).tolist()


class RestartWithMasks(Exception):
    """Raised out of the model call that made the masks when the plan restarts sampling with them."""


@dataclass
class _Call:
    """One model evaluation: its step and batch layout, and the masks built for it."""

    step: int
    cond_or_uncond: list[int]
    grid_hw: tuple[int, int]
    text_tokens: int
    reference_tokens: int = 0  # reference-image tokens after the generated image's (FLUX.1 Kontext)
    grids: dict = field(default_factory=dict)  # image tokens -> (h, w): every grid of the family's layers
    cache: dict = field(default_factory=dict)

    def grid_of(self, tokens: int) -> tuple[int, int]:
        """The (h, w) grid of a layer with `tokens` image tokens; the mask grid when no layer grid has as many."""
        return self.grids.get(tokens, self.grid_hw)


@dataclass(frozen=True)
class _CrossCapture:
    """A cross-attention block's capture (SDXL): (B_img, H, N, D) image queries, (B_img, H, T, D) text keys, and
    the same block's self-attention q, k (B_img, H', N, D'), on the grid_hw of its N tokens."""

    image_q: torch.Tensor
    text_k: torch.Tensor
    self_q: torch.Tensor
    self_k: torch.Tensor
    grid_hw: tuple[int, int]

    def of_image(self, b: int) -> tuple[torch.Tensor, ...]:
        """Image b's (image_q, text_k, self_q, self_k), each without the batch axis."""
        return self.image_q[b], self.text_k[b], self.self_q[b], self.self_k[b]


class FreeFuseJob:
    """Per-run state, fed by the host's model wrapper (`begin_call`/`end_call`) and the block patch
    (`capturing`/`store_attention`), asked by the layer patches (`masks_for`, `modulation_masks`)."""

    def __init__(
        self, plan: JobPlan, decode: Callable[[torch.Tensor], torch.Tensor], schedule=None, family: Family = FLUX1
    ):
        """decode: denoised latents (B, C, H, W) -> RGB images (B, H_px, W_px, 3) in [0, 1], for SLIC. family: the
        model's (its grids; FLUX.1 by default)."""
        self.plan = plan
        self.family = family
        self.decode = decode
        self.steps = StepCounter(schedule)
        self.masks: torch.Tensor | None = plan.initial_masks  # (B_img, L, h, w)
        self.failure: str | None = None
        self.capture_count = 0
        self._call: _Call | None = None
        self._captured: tuple[torch.Tensor, torch.Tensor] | _CrossCapture | None = None
        self._earlier_maps: list[list[torch.Tensor]] = []  # [step][image] (L, h, w): average_steps' earlier steps
        self._block_maps: list[list[torch.Tensor]] = []  # [block][image] (L, h, w): this call's earlier blocks' maps

    # -- the model wrapper's side -------------------------------------------------------------------------------
    def begin_call(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond_or_uncond: Sequence[int],
        text_tokens: int,
        reference_tokens: int = 0,
    ):
        """Record a model call: x (B, C, H, W) latents, sigma (B,), the [uncond, cond] chunk order, L_txt, and the
        number of reference-image tokens that follow the image's (Kontext: the masks cover the generated image only;
        reference tokens get every subject LoRA, as in a merged run, and stay out of the captured attention)."""
        step = self.steps.step_of(float(sigma.reshape(-1)[0]))
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        grid = self.family.mask_grid(latent)  # FLUX: its 2x2 patches, padded; SDXL: the latent itself
        grids = {h * w: (h, w) for h, w in reversed(self.family.token_grids(latent))}  # the finest wins a tie
        chunks = list(cond_or_uncond) or [0]
        if x.shape[0] != len(chunks) * self.plan.n_images:
            self.fail(f"a model call has batch {x.shape[0]}, expected {len(chunks)} x {self.plan.n_images} images")
        self._call = _Call(step, chunks, grid, text_tokens, reference_tokens, grids)
        self._block_maps = []

    def end_call(self, denoised: torch.Tensor) -> None:
        """After the call: if attention was captured in it, make the masks from it and the predicted x0."""
        captured, self._captured = self._captured, None
        call, self._call = self._call, None
        blocks, self._block_maps = self._block_maps, []
        if captured is None or call is None or self.failure:
            return
        try:
            self._earlier_maps.extend(blocks)  # average_blocks: the earlier blocks' maps of this call
            if call.step < self.plan.capture_step:  # average_steps: an earlier step's maps, kept for the mean
                self._earlier_maps.append(self._score_maps(captured, call.grid_hw))
                return
            self.masks = self._make_masks(captured, self._cond_rows(denoised, call), call.grid_hw)
        except Exception as error:  # any failure here must still end in an image, made without masks
            self.fail(f"mask extraction failed: {type(error).__name__}: {error}")
            return
        if self.plan.restart:
            self.steps = StepCounter(self.steps.schedule)
            raise RestartWithMasks

    def run(self, sample: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one sampling call; with `restart`, run it again from the start once the first run made the masks."""
        try:
            return sample()
        except RestartWithMasks:
            logger.info("FreeFuse: masks made, sampling again from the first step with them")
            return sample()

    def abort_call(self) -> None:
        """The call raised (an interrupt, an error elsewhere): forget it."""
        self._call = None
        self._captured = None
        self._block_maps = []

    # -- the capture block's side -------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """True during the call in which the capture block must hand over its q and k."""
        call = self._call
        return (
            call is not None
            and self.masks is None
            and self.failure is None
            and (call.step >= self.plan.capture_step or self.plan.average_steps)
            and 0 in call.cond_or_uncond
        )

    def store_attention(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """q, k: (B, H, L_txt + N_img [+ N_ref], D) after QK-norm and RoPE; the conditional rows of the text and
        generated-image tokens are kept."""
        self._captured = self._kept_rows(q, k)
        self.capture_count += 1

    def store_block_maps(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """average_blocks: q, k of a block before the capture block, as store_attention's; its score maps (Eq. 5-10)
        are kept for the mean with the capture block's (the tensors themselves are not)."""
        self._block_maps.append(self._score_maps(self._kept_rows(q, k), self._call.grid_hw))

    def capture_stores(self, capture_block: int) -> list[tuple[int, Callable[[torch.Tensor, torch.Tensor], None]]]:
        """(site index, what its q, k go to) for each site a family patches: the capture block's to store_attention;
        with average_blocks, every earlier site's to store_block_maps."""
        earlier = range(capture_block) if self.plan.average_blocks else ()
        return [(index, self.store_block_maps) for index in earlier] + [(capture_block, self.store_attention)]

    def _kept_rows(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional rows of q, k (B, H, T, D) over the text and generated-image tokens (no reference ones)."""
        call = self._call
        keep = call.text_tokens + call.grid_hw[0] * call.grid_hw[1]  # without reference tokens (Kontext)
        return tuple(self._cond_rows(t, call)[:, :, :keep].detach() for t in (q, k))

    def store_cross_attention(
        self, image_q: torch.Tensor, text_k: torch.Tensor, self_q: torch.Tensor, self_k: torch.Tensor
    ) -> None:
        """A cross-attention block's capture (SDXL): image_q (B, H, N, D) and text_k (B, H, T, D) of its
        cross-attention, self_q and self_k (B, H', N, D') of its self-attention; the conditional rows are kept."""
        call = self._call
        kept = [self._cond_rows(t, call).detach() for t in (image_q, text_k, self_q, self_k)]
        grid = call.grid_of(int(image_q.shape[2]))
        if grid[0] * grid[1] != image_q.shape[2]:
            raise ValueError(f"the capture block's {image_q.shape[2]} image tokens form no grid of this latent")
        self._captured = _CrossCapture(*kept, grid_hw=grid)
        self.capture_count += 1

    # -- the layer patches' side --------------------------------------------------------------------------------
    def masks_for(self, stream: str, x: torch.Tensor) -> torch.Tensor | None:
        """(B|1, T, L) masks for a layer of `stream` ("image", "text", "joint") whose input is x (B, T, d), or
        None when the subject LoRAs must not act now."""
        call = self._call
        if call is None:
            return None
        if self.masks is None or self.failure:
            return self._unmasked(x) if self.plan.pre_mask == "joint" or self.failure else None
        key = (stream, int(x.shape[1]))
        masks = call.cache.get(key)
        if masks is None:
            masks = call.cache[key] = self._call_masks(stream, call, int(x.shape[1]))
        if masks.shape[1] != x.shape[1]:
            self.fail(f"a {stream} layer saw {x.shape[1]} tokens, the masks have {masks.shape[1]}")
            return self._unmasked(x)
        return masks

    def modulation_masks(self, stream: str) -> tuple[str, torch.Tensor | None]:
        """How a modulation layer applies the subject LoRAs now: ("none", None), ("global", None) or
        ("per_token", (B, T, L) masks of `stream`)."""
        call = self._call
        if call is None:
            return "none", None
        if self.masks is None or self.failure:
            return ("global", None) if self.plan.pre_mask == "joint" or self.failure else ("none", None)
        mode = self.plan.modulation
        if mode == "off":
            return "none", None
        if mode == "global":
            return "global", None
        key = (stream, None)
        masks = call.cache.get(key)
        if masks is None:
            masks = call.cache[key] = self._call_masks(stream, call)
        return "per_token", masks

    def call_cached(self, key, make: Callable[[], object]):
        """make(), computed once per model call for `key` (a layer patch's work that every layer would repeat)."""
        call = self._call
        if call is None:
            return make()
        if key not in call.cache:
            call.cache[key] = make()
        return call.cache[key]

    def attention_bias(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """(B, 1, length, length) additive logits for this call's joint attention over [text, image, reference]
        tokens (core.attention_bias), or None: bias off, no masks yet, or a failure. A sequence whose length is not
        this call's text + image (+ reference) tokens raises ValueError."""
        call = self._call
        if call is None or self.plan.attention_bias <= 0 or self.masks is None or self.failure:
            return None
        key = ("bias", length, dtype, device)
        bias = call.cache.get(key)
        if bias is None:
            bias = call.cache[key] = self._call_bias(call, length).to(device=device, dtype=dtype)
        return bias

    def spatial_masks(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B|1, L, h, w) masks for a convolution's output feature map x (B, C, h, w) (SDXL), or None when the
        subject LoRAs must not act now. Image masks apply to every chunk of the call (cond and uncond alike)."""
        call = self._call
        if call is None:
            return None
        if self.masks is None or self.failure:
            if self.plan.pre_mask == "joint" or self.failure:
                return x.new_ones(1, self.plan.n_subjects, 1, 1)
            return None
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        key = ("spatial", hw)
        masks = call.cache.get(key)
        if masks is None:
            masks = call.cache[key] = torch.cat([self._masks_at(hw)] * len(call.cond_or_uncond))
        return masks

    def vector_masks(self, x: torch.Tensor) -> torch.Tensor | None:
        """Masks for a layer with one value per image (time, guidance, pooled-text embedders): such a layer cannot
        act per token, so its subject deltas apply to the whole image when modulation deltas are global (and before
        masks exist in "joint" mode), and not at all otherwise."""
        mode, _ = self.modulation_masks("image")
        if mode != "global":
            return None
        return torch.ones(1, 1, self.plan.n_subjects, device=x.device, dtype=x.dtype)

    # -- results --------------------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Stop masking for the rest of the run (subject LoRAs act unmasked, as merged); report once."""
        if self.failure is None:
            self.failure = reason
            logger.warning("FreeFuse: %s; the rest of this image is made without masks", reason)

    def capture_failed(self, error: Exception) -> None:
        """Handing over the capture block's q and k raised: no masks for this run; the block computes as usual."""
        self._captured = None
        self.fail(f"capturing the attention failed: {type(error).__name__}: {error}")

    def layer_failed(self, error: Exception) -> None:
        """A masked layer raised: the run goes on, that layer without the subject deltas this time."""
        self.fail(f"applying the masks failed: {type(error).__name__}: {error}")

    # -- internals ------------------------------------------------------------------------------------------------
    def _unmasked(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, x.shape[1], self.plan.n_subjects, device=x.device, dtype=x.dtype)

    def _cond_rows(self, batch: torch.Tensor, call: _Call) -> torch.Tensor:
        """The rows of the conditional chunk of a [uncond, cond]-ordered batch: (B_img, ...)."""
        n = self.plan.n_images
        chunk = call.cond_or_uncond.index(0)
        return batch[chunk * n : (chunk + 1) * n]

    def _call_masks(self, stream: str, call: _Call, tokens: int | None = None) -> torch.Tensor:
        grid = call.grid_hw if tokens is None else call.grid_of(tokens - call.reference_tokens)
        image = self._masks_at(grid).flatten(2).transpose(1, 2)  # (B_img, N, L)
        if call.reference_tokens:  # every subject on the reference image's tokens, as merged LoRAs would act
            image = torch.cat([image, image.new_ones(image.shape[0], call.reference_tokens, image.shape[2])], 1)
        text = torch.stack(
            [
                text_token_masks(words, call.text_tokens, self.plan.text_length, self.plan.text_loras)
                for words in self.plan.word_positions
            ]
        ).to(image)
        return call_token_masks(stream, image, text, call.cond_or_uncond)

    def _call_bias(self, call: _Call, length: int) -> torch.Tensor:
        """The attention bias of one call: each conditional chunk's subject words against the masks; the
        unconditional chunks' prompts hold no subject words, so they get none."""
        image = self._masks_at(call.grid_hw).flatten(2).transpose(1, 2)  # (B_img, N, L)
        if call.text_tokens + image.shape[1] + call.reference_tokens != length:
            raise ValueError(
                f"a joint attention over {length} tokens, expected {call.text_tokens} text + {image.shape[1]} image"
                + (f" + {call.reference_tokens} reference" if call.reference_tokens else "")
            )
        words = torch.stack(
            [
                text_token_masks(w, call.text_tokens, self.plan.text_length, "own_words")
                for w in self.plan.word_positions
            ]
        ).to(image)  # (B_img, T, L)
        chunks = [words if kind == 0 else torch.zeros_like(words) for kind in call.cond_or_uncond]
        images = torch.cat([image] * len(chunks))
        return joint_attention_bias(images, torch.cat(chunks), self.plan.attention_bias, None, call.reference_tokens)

    def _masks_at(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The masks on a token grid of this call's size (hires pass 2 reuses pass 1's)."""
        masks = self.masks
        if tuple(masks.shape[-2:]) != tuple(grid_hw):
            mode = "bilinear" if self.plan.mask_config.soft else "nearest-exact"
            masks = F.interpolate(masks.float(), size=grid_hw, mode=mode)
        return masks

    def _score_maps(self, captured, grid_hw: tuple[int, int]) -> list[torch.Tensor]:
        """Per image, the (L, h, w) score maps (Eq. 5-10) of a capture, for average_steps' mean."""
        config = self.plan.mask_config
        words = [list(w) for w in self.plan.word_positions]
        if isinstance(captured, _CrossCapture):
            c = captured
            return [cross_subject_maps(*c.of_image(b), words[b], c.grid_hw, config) for b in range(c.image_q.shape[0])]
        q, k = captured
        return [joint_score_maps(q[b], k[b], words[b], grid_hw, config) for b in range(q.shape[0])]

    def _make_masks(self, captured, denoised: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Masks (B_img, L, *grid_hw): from a joint (q, k) capture (FLUX) or a cross-attention capture (SDXL), with
        the earlier steps' maps of average_steps averaged in."""
        config = self.plan.mask_config
        n_images = denoised.shape[0]
        images = self.decode(denoised) if config.superpixel_vote else [None] * n_images
        words = [list(w) for w in self.plan.word_positions]
        earlier = [[step[b] for step in self._earlier_maps] for b in range(n_images)]
        positions = self.plan.background_positions if config.background in BACKGROUND_FROM_TOKENS else ()
        background = positions or [()] * n_images  # "words" without words: none
        if isinstance(captured, _CrossCapture):
            c = captured
            masks = [
                extract_cross_masks(
                    *c.of_image(b), words[b], c.grid_hw, images[b], config, grid_hw, earlier[b], background[b]
                )
                for b in range(c.image_q.shape[0])
            ]
        else:
            q, k = captured
            masks = [
                extract_masks(q[b], k[b], words[b], grid_hw, images[b], config, background[b], earlier[b])
                for b in range(q.shape[0])
            ]
        self._earlier_maps = []
        result = torch.stack(masks)  # (B_img, L, h, w)
        logger.info("FreeFuse: masks made at step %d, coverage %s", self.plan.capture_step + 1, self._summary(result))
        return result

    @staticmethod
    def _summary(masks: torch.Tensor) -> str:
        return "; ".join(", ".join(f"{p:.0f}%" for p in image) for image in coverage_percent(masks))
