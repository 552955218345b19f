"""Per-token adaLN modulation for Z-Image in Forge Neo (backend/nn/lumina.py): a modulated block (`layers.N`,
`noise_refiner.N`) or the final layer whose adaLN Linear a subject LoRA touches gives each token the modulation
computed with its own subjects' deltas (ALGORITHM.md stage 2, modulation layers; FLUX.1's PerTokenModulation).

The host's block makes one (B, 4D) modulation per image and broadcasts it with `unsqueeze(1)`; here the rows are
(B, T, 4D) (or (B, 1, 4D) where every token gets the same), so the block's own equations are written out with them
(`joint_block`, `final_layer`), calling the block's own norms, attention and feed-forward."""

from __future__ import annotations

import torch

from .flux1 import _per_token, subject_outputs, token_owner
from .job import FreeFuseJob
from .lora_layers import SubjectWeightDelta
from .patching import unpatched


def install(clone, job: FreeFuseJob, module: str, parent: str, deltas, masks) -> None:
    """The per-token patch of `parent`'s forward (a block or the final layer) for its adaLN Linear `module`; masks:
    zimage.PaddedMasks of the tokens `parent` sees. Put on `clone` before the capture layer's patch, which wraps it."""
    name = f"diffusion_model.{parent}.forward"
    kind = PerTokenFinalLayer if parent == "final_layer" else PerTokenLayer
    owner = clone.get_model_object(f"diffusion_model.{parent}")
    lin = unpatched(clone, f"diffusion_model.{module}.forward")
    clone.add_object_patch(name, kind(owner, unpatched(clone, name), lin, deltas, job, masks))


class PerTokenAdaLN:
    """What a block and the final layer share: their modulation rows mod_t = W h + b + sum_l m_tl dW_l h, h = the
    adaLN input after the Sequential's activation (none in the blocks, SiLU in the final layer), m_tl = token t's
    mask of subject l (all ones where modulation is "global"), dW_l = subject l's LoRA delta."""

    def __init__(
        self,
        owner: torch.nn.Module,
        original_forward,
        lin_forward,
        deltas: list[tuple[int, SubjectWeightDelta]],
        job: FreeFuseJob,
        masks,
    ):
        self.owner = owner  # the block or final layer: its adaLN_modulation, norms, attention, feed-forward, linear
        self.original_forward = original_forward
        self.lin_forward = lin_forward  # the adaLN Linear with every non-subject LoRA merged, as the host has it
        self.deltas = list(deltas)
        self.job = job
        self.masks = masks
        self._cast: dict = {}

    def rows(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
        """x (B, T, D) the tokens, c (B, d) the adaLN input -> (B, T|1, M*D) modulation rows, or None where the
        subject LoRAs must not act now (the host's own forward is then the answer). A failure goes to the job (one
        warning) and gives None: the block gets the base modulation."""
        try:
            mode, _ = self.job.modulation_masks(self.masks.stream)
            if mode == "none":
                return None
            hidden = self.owner.adaLN_modulation[:-1](c)  # the activation before the Linear, if any
            base = self.lin_forward(hidden)  # (B, M*D)
            per_subject = subject_outputs(self.deltas, hidden, self.job.plan.n_subjects, base.shape[-1], self._cast)
            if mode == "global":
                return (base + per_subject.sum(dim=1))[:, None, :]
            masks = self.masks(x)  # (B|1, T, L), pad tokens included
            if masks is None:
                return None
            key = ("z-image token owner", self.masks.stream, int(x.shape[1]))
            owner = self.job.call_cached(key, lambda: token_owner(masks))
            return _per_token(base, per_subject, masks.to(per_subject).expand(x.shape[0], -1, -1), owner)
        except Exception as error:
            self.job.layer_failed(error)
            return None


class PerTokenLayer(PerTokenAdaLN):
    """Forward of a modulated JointTransformerBlock (layers.N on the joint sequence, noise_refiner.N on the image)."""

    def __call__(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):  # noqa: B006 (the host's)
        rows = self.rows(x, adaln_input)
        if rows is None:
            return self.original_forward(x, x_mask, freqs_cis, adaln_input, transformer_options=transformer_options)
        return joint_block(self.owner, x, x_mask, freqs_cis, rows, transformer_options)


class PerTokenFinalLayer(PerTokenAdaLN):
    """Forward of the FinalLayer (on the joint sequence)."""

    def __call__(self, x, c):
        rows = self.rows(x, c)
        if rows is None:
            return self.original_forward(x, c)
        return final_layer(self.owner, x, rows)


def joint_block(block, x, x_mask, freqs_cis, rows: torch.Tensor, transformer_options) -> torch.Tensor:
    """JointTransformerBlock.forward's modulated branch with (B, T|1, 4D) rows [s_msa, g_msa, s_mlp, g_mlp]:
    x += tanh(g_msa) * norm2(attention(norm1(x) * (1 + s_msa))); x += tanh(g_mlp) * norm2'(ffn(norm1'(x) * (1 + s_mlp)))
    (the host broadcasts (B, 1, D) chunks the same way)."""
    from backend.nn.lumina import clamp_fp16

    scale_msa, gate_msa, scale_mlp, gate_mlp = rows.chunk(4, dim=-1)
    attended = block.attention(
        block.attention_norm1(x) * (1 + scale_msa), x_mask, freqs_cis, transformer_options=transformer_options
    )
    x = x + gate_msa.tanh() * block.attention_norm2(clamp_fp16(attended))
    fed = block.feed_forward(block.ffn_norm1(x) * (1 + scale_mlp))
    return x + gate_mlp.tanh() * block.ffn_norm2(clamp_fp16(fed))


def final_layer(layer, x, rows: torch.Tensor) -> torch.Tensor:
    """FinalLayer.forward with (B, T|1, D) scale rows: linear(norm_final(x) * (1 + scale))."""
    return layer.linear(layer.norm_final(x) * (1 + rows))
