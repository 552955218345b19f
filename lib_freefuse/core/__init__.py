"""FreeFuse's method itself: masks from attention (stage 1) and masked LoRA outputs (stage 2).

Depends on torch, numpy and scikit-image (with SciPy, which scikit-image is built on) only; never on Forge or
gradio.
"""

from .config import (
    BACKGROUND_CHOICES,
    CONTRASTIVE_CHOICES,
    CROSS_ATTENTION_CHOICES,
    SURROUNDINGS_CHOICES,
    MaskConfig,
)
from .lora import StackedLoRA, masked_lora_delta
from .masks import cross_subject_maps, extract_cross_masks, extract_masks, joint_score_maps
from .prompt import SubjectTokens, byte_level_pieces, find_subject_tokens, split_phrases
from .schedule import default_capture_step
from .superpixel import pixel_masks_to_tokens
from .token_masks import TEXT_LORA_CHOICES, call_token_masks, text_token_masks

__all__ = [
    "BACKGROUND_CHOICES",
    "CONTRASTIVE_CHOICES",
    "CROSS_ATTENTION_CHOICES",
    "SURROUNDINGS_CHOICES",
    "TEXT_LORA_CHOICES",
    "MaskConfig",
    "StackedLoRA",
    "SubjectTokens",
    "byte_level_pieces",
    "call_token_masks",
    "cross_subject_maps",
    "default_capture_step",
    "extract_cross_masks",
    "extract_masks",
    "find_subject_tokens",
    "joint_score_maps",
    "masked_lora_delta",
    "pixel_masks_to_tokens",
    "split_phrases",
    "text_token_masks",
]
