"""Settings of the mask extraction (stage 1 of ALGORITHM.md), one frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

# Which attention scores a subject's words against the image (stage 1, step 1):
# "text_queries" - Eq. 5: the words' queries over the image keys (softmax over the image tokens), the paper;
# "image_queries" - the image tokens' queries over the words' keys, normalised over the image tokens (the
#   authors' later code); the toy world's masks were closer to the true regions with it (TOYWORLD.md).
CROSS_ATTENTION_CHOICES = ("text_queries", "image_queries")
# Which tokens seed Eq. 9's self-attention (T_l): "off" - the top tokens of the subject's map M_l (the paper);
# "strongest" - the top tokens of M_l - max_{m != l} M_m; "authors" - of L * M_l - sum_{m != l} M_m (the authors'
# later code); "leading" - the top tokens of M_l among those where M_l is the largest map (where l would win the
# vote), which keeps the seeds off a place another subject's words claim more strongly. The contrastive rules leave
# out every token that the sink filter dropped from any subject's row.
# Without Eq. 9-10 (self_attention off) there are no seeds and the setting changes nothing.
CONTRASTIVE_CHOICES = ("off", "strongest", "authors", "leading")
# What becomes of the image that no subject claims: "off" - every superpixel goes to some subject (the paper);
# "tokens" - the attention of given background tokens (an end-of-text token, a background phrase) above its even
# share 1/N is one more class in the vote (masks.background_score_map); "threshold" - a superpixel where every
# subject's score is below background_threshold times the even share 1/N (each map is a distribution over the N
# image tokens). What the background wins gets no subject LoRA. "nearest" - where "threshold" would leave a place free,
# it goes to the subject that owns the nearest place instead (superpixel.give_free_to_nearest). "words" - as "tokens"
# where background tokens are given (the user's background words), as "off" where none are.
BACKGROUND_CHOICES = ("off", "tokens", "threshold", "nearest", "words")
BACKGROUND_FROM_TOKENS = ("tokens", "words")  # the choices that read background token positions
# What becomes of the places where no subject clearly leads, after the vote: "vote" - they keep the vote's owner
# (the paper); "nearest_lead" - each goes to the subject that clearly leads at the nearest place (its map there at
# least 3 times every other's; surroundings.nearest_lead), so that weak attention in a figure's surroundings no longer
# decides which LoRA acts there, distance to where a subject is clear does. Places nobody owns stay free.
SURROUNDINGS_CHOICES = ("vote", "nearest_lead")


@dataclass(frozen=True)
class MaskConfig:
    """How subject masks are derived from one block's attention (paper Eq. 5-13)."""

    sink_filter: bool = True  # Eq. 6-7: drop top-k attention that lies on the grid's edge
    sink_top_fraction: float = 0.01  # p of Eq. 6: k = floor(N_img * p)
    edge_width: int = 1  # tokens from the grid border that count as "edge"
    self_attention: bool = True  # Eq. 9-10: refine each map with self-attention of its top tokens
    self_attention_top_fraction: float = 0.01  # Eq. 9: |T| = floor(N_img * fraction), at least 1
    superpixel_vote: bool = True  # Eq. 11-13: one owner per SLIC superpixel of x0
    n_segments: int | None = None  # None: sqrt(pixel count of the image), as the paper
    compactness: float = 10.0  # SLIC compactness, as the paper
    slic_max_side: int = 256  # SLIC runs on a copy downscaled to this long side (README "Superpixel image size")
    soft: bool = False  # token masks as area fractions instead of 0/1
    cross_attention: str = "text_queries"  # CROSS_ATTENTION_CHOICES: Eq. 5 as the paper, or the transposed scores
    contrastive: str = "off"  # CONTRASTIVE_CHOICES: Eq. 9's top tokens by M_l (the paper) or by a contrast
    background: str = "off"  # BACKGROUND_CHOICES: "off" gives every superpixel to some subject, as the paper
    background_threshold: float = 0.5  # "threshold", "nearest": multiple of the even score 1/N below which nobody owns
    fill_holes: float = 0.0  # pieces of an owner (or of background) below this share of the image join their surround
    surroundings: str = "vote"  # SURROUNDINGS_CHOICES: where no subject clearly leads, the vote (paper) or distance

    def __post_init__(self) -> None:
        for flag in ("sink_filter", "self_attention", "superpixel_vote", "soft"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected True or False, got {getattr(self, flag)!r}")
        for name in ("sink_top_fraction", "self_attention_top_fraction"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: expected a fraction in (0, 1], got {value!r}")
        if not _is_real(self.compactness) or not 0.0 < self.compactness < math.inf:
            raise ValueError(f"compactness: expected a positive finite number, got {self.compactness!r}")
        for name, choices in (
            ("cross_attention", CROSS_ATTENTION_CHOICES),
            ("contrastive", CONTRASTIVE_CHOICES),
            ("background", BACKGROUND_CHOICES),
            ("surroundings", SURROUNDINGS_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")
        if not _is_real(self.background_threshold) or not 0.0 < self.background_threshold <= 100.0:
            raise ValueError(f"background_threshold: expected a number in (0, 100], got {self.background_threshold!r}")
        if not _is_real(self.fill_holes) or not 0.0 <= self.fill_holes < 0.5:
            raise ValueError(f"fill_holes: expected a fraction in [0, 0.5), got {self.fill_holes!r}")
        _require_int("edge_width", self.edge_width, minimum=0)
        _require_int("slic_max_side", self.slic_max_side, minimum=16)
        if self.n_segments is not None:
            _require_int("n_segments", self.n_segments, minimum=1)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every setting, in declaration order."""
        return tuple(f.name for f in fields(cls))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
