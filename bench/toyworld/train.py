"""Step 2 of making the toy world: train its VAE, base transformer, two character LoRAs and scorer.

The networks are Forge's own classes (backend/nn/vae.py IntegratedAutoencoderKL, backend/nn/flux.py
IntegratedFluxTransformer2DModel), built outside Forge's loader so their layers are plain nn.Linear/nn.Conv2d.
Reads WORK/conditioning.safetensors, WORK/vae_config.json and WORK/word_positions.json (make_text.py); writes
WORK/trained/ with vae, transformer (EMA), lora_zorb, lora_quil, scorer (.safetensors) and train_log.json.

    python bench/toyworld/train.py --forge FORGE_DIR [--device cuda] [--quick] [--attention-loss 0.05]

--attention-loss trains the base so that each figure's word (its colour, or with --base-names a made-up name) and
the figure's image tokens attend to each other in the double blocks (what a real FLUX does with subject words, and
what FreeFuse's masks are read from); the LoRAs are always trained on the flow loss alone.

Needs torch, numpy, safetensors, einops, psutil (Forge's backend imports); not diffusers (a stand-in for its
two config helpers is put in place). Same seed, same device type: same numbers.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import world
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scorer import HEADS, Scorer, half_labels, halves
from torch import nn

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"

TRANSFORMER = dict(
    in_channels=16,
    vec_in_dim=64,  # the tiny CLIP-L's hidden size
    context_in_dim=64,  # the tiny T5's d_model
    hidden_size=96,
    mlp_ratio=4.0,
    num_heads=3,  # head dim 32
    depth=3,
    depth_single_blocks=2,
    axes_dim=[4, 14, 14],  # = the webui hook's axes_dim_for(32)
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,  # FLUX.1-dev-like: Forge feeds the distilled guidance
)
LORA_RANK = 8
GRID = world.CELLS // 2  # image tokens per side: the latent is CELLS x CELLS, FLUX patches it 2 x 2
TOKENS = GRID * GRID

FULL = dict(
    vae_steps=1500, vae_batch=16,
    base_pool=32768, base_steps=3000, base_batch=128, base_lr=6e-4, ema=0.999,
    lora_pool=4096, lora_steps=600, lora_batch=32, lora_lr=2e-3,
    scorer_steps=2000, scorer_batch=256, scorer_lr=2e-3, held_out=2048,
)  # fmt: skip
QUICK = dict(
    vae_steps=3, vae_batch=2,
    base_pool=64, base_steps=3, base_batch=4, base_lr=6e-4, ema=0.9,
    lora_pool=16, lora_steps=3, lora_batch=4, lora_lr=2e-3,
    scorer_steps=3, scorer_batch=8, scorer_lr=2e-3, held_out=16,
)  # fmt: skip


def import_forge(forge_root: Path, device: str):
    """Forge's two network classes, with backend.args parsed for `device` (Forge parses argv on import)."""
    for path in (forge_root, forge_root / "packages_3rdparty"):
        sys.path.insert(0, str(path))
    if "diffusers" not in sys.modules:  # vae.py needs only diffusers' config decorator: a stand-in does
        diffusers, config_utils = types.ModuleType("diffusers"), types.ModuleType("diffusers.configuration_utils")
        config_utils.ConfigMixin = type("ConfigMixin", (), {})
        config_utils.register_to_config = lambda init: init
        diffusers.configuration_utils = config_utils
        sys.modules.update({"diffusers": diffusers, "diffusers.configuration_utils": config_utils})
    saved, sys.argv = sys.argv, ["train", "--attention-pytorch"] + (["--always-cpu"] if device == "cpu" else [])
    try:
        import backend.args  # noqa: F401
    finally:
        sys.argv = saved
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.vae import IntegratedAutoencoderKL

    return IntegratedFluxTransformer2DModel, IntegratedAutoencoderKL


class Log:
    """train_log.json: per phase its settings, loss every `every` steps, seconds."""

    def __init__(self, path: Path, **header):
        self.path, self.data = path, {**header, "phases": {}}

    def phase(self, name: str, **settings):
        self.data["phases"][name] = {**settings, "loss": [], "seconds": None}
        self._start, self._name = time.perf_counter(), name
        print(f"[{name}] {settings}", flush=True)

    def loss(self, step: int, value: torch.Tensor | float, every: int = 100):
        """Reads a tensor only every `every` steps (reading it waits for the device)."""
        if step % every == 0:
            value = float(value)
            self.data["phases"][self._name]["loss"].append([step, round(value, 5)])
            print(f"[{self._name}] step {step} loss {value:.4f}", flush=True)

    def done(self, **results):
        phase = self.data["phases"][self._name]
        phase.update(results, seconds=round(time.perf_counter() - self._start, 1))
        print(f"[{self._name}] done in {phase['seconds']} s {results}", flush=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def render_pool(
    kind: str, n: int, seed: int, paired: float = 0.0, names: float = 0.0
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """n pictures (n, CELLS, CELLS, 3), captions and, for "base", token masks (n, 2, TOKENS) of one training set
    ("base", "zorb" or "quil"): where figure 1 and 2 of the caption cover at least half of an image token."""
    rng = np.random.default_rng(seed)
    if kind != "base":
        pictures, captions = zip(*(world.character_example(kind, rng, paired) for _ in range(n)), strict=True)
        return np.stack(pictures), list(captions), None
    pictures, captions, token_masks = [], [], np.zeros((n, 2, TOKENS), bool)
    for i in range(n):
        picture, text, masks = world.base_example_with_masks(rng, names)
        pictures.append(picture)
        captions.append(text)
        cover = masks.reshape(len(masks), GRID, 2, GRID, 2).mean(axis=(2, 4))  # cells -> 2 x 2 cells per token
        token_masks[i, : len(masks)] = cover.reshape(len(masks), TOKENS) >= 0.5
    return np.stack(pictures), captions, token_masks


def to_pixels(cells: torch.Tensor) -> torch.Tensor:
    """(B, CELLS, CELLS, 3) cells in [0, 1] -> (B, 3, 256, 256) pixels in [-1, 1], as Forge feeds its VAE."""
    x = cells.permute(0, 3, 1, 2) * 2 - 1
    return x.repeat_interleave(world.CELL_PX, 2).repeat_interleave(world.CELL_PX, 3)


def vae_moments(vae, x):
    z = vae.encoder(x)
    if vae.quant_conv is not None:
        z = vae.quant_conv(z)
    return z.chunk(2, dim=1)


def train_vae(vae, pictures: torch.Tensor, cfg: dict, log: Log, gen: torch.Generator):
    """Reconstruction through latents that Forge's process_in maps to ~unit scale, decoder robust to noise."""
    log.phase("vae", steps=cfg["vae_steps"], batch=cfg["vae_batch"], lr=1e-3)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=cfg["vae_steps"], pct_start=0.05)
    for step in range(cfg["vae_steps"]):
        idx = torch.randint(len(pictures), (cfg["vae_batch"],), generator=gen, device=gen.device)
        x = to_pixels(pictures[idx])
        mean, logvar = vae_moments(vae, x)
        scaled = vae.process_in(mean)
        noisy = scaled + 0.1 * torch.randn(scaled.shape, generator=gen, device=gen.device)
        recon = vae.decode(vae.process_out(noisy))
        loss = F.mse_loss(recon, x)
        loss = loss + 0.01 * (scaled.mean() ** 2 + (scaled.var() - 1) ** 2) + 1e-4 * ((logvar + 10) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.loss(step, loss.detach())
    with torch.no_grad():
        x = to_pixels(pictures[:16])
        recon = vae.decode(vae_moments(vae, x)[0])
        error = (recon - x).abs().mean().item() / 2  # in [0, 1] pixel units
    log.done(final_loss=loss.item(), reconstruction_mean_abs_error=round(error, 4))


@torch.no_grad()
def encode(vae, pictures: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Forge's latents of the pictures: process_in(posterior mean), (n, 16, 32, 32)."""
    return torch.cat(
        [
            vae.process_in(vae_moments(vae, to_pixels(pictures[i : i + batch]))[0])
            for i in range(0, len(pictures), batch)
        ]
    )


def zero_init(model):
    """adaLN-zero: modulation and final layer start at 0, so every block starts as the identity."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lin." in name or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                parameter.zero_()


def flow_step(model, latents, context, vector, gen) -> torch.Tensor:
    """Rectified flow as Forge samples it: x_t = (1 - s) x0 + s n, model output = n - x0, timestep = s."""
    b = latents.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=gen, device=gen.device))  # logit-normal
    noise = torch.randn(latents.shape, generator=gen, device=gen.device)
    s = sigma[:, None, None, None]
    x_t = (1 - s) * latents + s * noise
    guidance = 1 + 4 * torch.rand(b, generator=gen, device=gen.device)  # any distilled CFG a user sets
    out = model(x_t, sigma, context, vector, guidance)
    return F.mse_loss(out, noise - latents)


def caption_index(captions: list[str], table: list[str], device) -> torch.Tensor:
    position = {c: i for i, c in enumerate(table)}
    return torch.tensor([position[c] for c in captions], device=device)


def t5_outputs(work: Path, ids: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Forge's T5 class (backend.nn.t5, as Forge's engine runs it: float32, no attention mask) on token ids
    (N, 256) -> (N, 256, 64), with the frozen weights of work/text_encoders.safetensors. Needs import_forge first."""
    try:
        import transformers.activations  # noqa: F401  (t5.py imports it; only its tanh-GELU is used here)
    except ImportError:
        stub = types.ModuleType("transformers.activations")
        stub.NewGELUActivation = lambda: lambda a: F.gelu(a, approximate="tanh")
        sys.modules.setdefault("transformers", types.ModuleType("transformers"))
        sys.modules["transformers.activations"] = stub
    from backend.nn.t5 import IntegratedT5

    config = json.loads((work / "configs/FLUX.1-dev-tiny/text_encoder_2/config.json").read_text())
    prefix = "text_encoders.t5xxl."
    weights = {k[len(prefix) :]: v.float() for k, v in load_file(str(work / "text_encoders.safetensors")).items()
               if k.startswith(prefix)}  # fmt: skip
    t5 = IntegratedT5(config)
    t5.load_state_dict(weights, strict=False)  # logit_scale is not stored
    t5 = t5.transformer.to(device).eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # Forge's engine runs the T5 in full float32
    try:
        with torch.no_grad():
            return torch.cat([t5(input_ids=ids[i : i + batch].to(device)).float() for i in range(0, len(ids), batch)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def caption_table(work: Path) -> list[str]:
    """The captions of make_text.py's conditioning file, in its row order."""
    with safe_open(str(work / "conditioning.safetensors"), "pt") as f:
        return json.loads(f.metadata()["captions"])


def load_conditioning(work: Path, device, captions: list[str] | None = None) -> tuple[list[str], dict, float]:
    """(caption table, {"crossattn": (N, 256, 64), "vector": (N, 64)}, T5 check) from make_text.py's file, for
    `captions` or all. A --names file ships T5 token ids instead of outputs: the outputs are computed here by
    t5_outputs and checked against the rows Forge's engine computed (the largest difference; 0.0 otherwise)."""
    table = caption_table(work)
    with safe_open(str(work / "conditioning.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    rows = torch.arange(len(table)) if captions is None else torch.tensor([table.index(c) for c in captions])
    cond = {"vector": stored["vector"][rows].to(device)}
    if "crossattn" in stored:
        cond["crossattn"], check = stored["crossattn"][rows].to(device), 0.0
    else:
        cond["crossattn"] = t5_outputs(work, stored["t5_ids"][rows].long(), device)
        reference = t5_outputs(work, stored["t5_ids"][stored["reference_rows"]].long(), device).cpu()
        check = (reference - stored["reference_crossattn"]).abs().max().item()
        if check > 1e-4:
            raise SystemExit(
                f"T5 outputs differ from Forge's engine by {check:.2e}: {work / 'conditioning.safetensors'}"
            )
    return [table[r] for r in rows.tolist()], cond, check


class AttentionRecorder:
    """Records (q, k) after RoPE, (B, H, L, D), of every joint attention in backend.nn.flux while `on`."""

    def __init__(self, flux_module):
        original, self.records, self.on = flux_module.attention, [], False

        def recording(q, k, v, pe):
            if self.on:
                self.records.append(flux_module.apply_rope(q, k, pe))
            return original(q, k, v, pe=pe)

        flux_module.attention = recording


def attention_loss(records, depth: int, words: torch.Tensor, token_masks: torch.Tensor, n_txt: int) -> torch.Tensor:
    """Mean over the `depth` double blocks of two cross-entropies on head-averaged attention:
    each figure word's queries over image keys should land on its figure (-log of the mass inside its mask, the
    word's tokens averaged), and each figure token's query over the two figure words' tokens should pick its own
    word (when the caption has two figures).
    words: (B, 2, K) T5 positions of each figure word's tokens, -1 where none; token_masks: (B, 2, TOKENS) float."""
    if words.dim() == 2:
        words = words[..., None]
    b, _, k_max = words.shape
    present = words >= 0  # (B, 2, K)
    valid = present[..., 0] & (token_masks.sum(-1) > 0)  # (B, 2): caption dropped or figure off the token grid
    both = valid.all(1)
    index = words.clamp(min=0).reshape(b, 2 * k_max)
    counts = present.sum(-1).clamp_min(1)  # (B, 2)
    total = 0.0
    for q, k in records[:depth]:
        heads, d = q.shape[1], q.shape[-1]
        gather = index[:, None, :, None].expand(b, heads, 2 * k_max, d)
        q_words, k_words = q[:, :, :n_txt].gather(2, gather), k[:, :, :n_txt].gather(2, gather)  # (B, H, 2K, D)
        q_img, k_img = q[:, :, n_txt:], k[:, :, n_txt:]  # (B, H, TOKENS, D)
        per_token = torch.softmax(q_words @ k_img.transpose(-1, -2) * d**-0.5, -1).mean(1)  # (B, 2K, TOKENS)
        per_token = per_token.reshape(b, 2, k_max, -1) * present[..., None]
        word_to_image = per_token.sum(2) / counts[..., None]  # (B, 2, TOKENS)
        inside = (word_to_image * token_masks).sum(-1).clamp_min(1e-6).log()  # (B, 2)
        loss_words = -(inside * valid).sum() / valid.sum().clamp_min(1)
        logits = q_img @ k_words.transpose(-1, -2) * d**-0.5  # (B, H, TOKENS, 2K); padding can't be picked:
        logits = logits.masked_fill(~present.reshape(b, 1, 1, -1), torch.finfo(logits.dtype).min)
        image_to_tokens = torch.softmax(logits, -1).mean(1)  # (B, TOKENS, 2K)
        image_to_words = image_to_tokens.reshape(b, -1, 2, k_max).sum(-1)  # (B, TOKENS, 2)
        picked = (image_to_words.clamp_min(1e-6).log() * token_masks.transpose(1, 2)).sum((1, 2))  # (B,)
        counted = token_masks.sum((1, 2)) * both
        loss_image = -(picked * both).sum() / counted.sum().clamp_min(1)
        total = total + loss_words + loss_image
    return total / depth


def train_base(model, latents, cap_idx, cond, cfg, log, gen, attention=None):
    """Rectified flow on the generic sprites; with `attention` = (weight, recorder, figure-word token positions per
    caption (C, 2, K), token masks (n, 2, TOKENS)) also attention_loss on the double blocks."""
    log.phase("base", steps=cfg["base_steps"], batch=cfg["base_batch"], lr=cfg["base_lr"], ema=cfg["ema"],
              pool=len(latents), caption_dropout=0.1,
              attention_loss=attention[0] if attention else 0.0)  # fmt: skip
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["base_lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["base_lr"], total_steps=cfg["base_steps"], pct_start=0.05)
    first = None
    for step in range(cfg["base_steps"]):
        idx = torch.randint(len(latents), (cfg["base_batch"],), generator=gen, device=gen.device)
        caps = cap_idx[idx]
        caps = torch.where(torch.rand(len(caps), generator=gen, device=gen.device) < 0.1, 0, caps)  # "" = dropped
        if attention:
            weight, recorder, words, token_masks = attention
            recorder.records.clear()
            recorder.on = True
        loss = flow_step(model, latents[idx], cond["crossattn"][caps], cond["vector"][caps], gen)
        if attention:
            recorder.on = False
            extra = attention_loss(recorder.records, len(model.double_blocks), words[caps], token_masks[idx].float(),
                                   cond["crossattn"].shape[1])  # fmt: skip
            recorder.records.clear()
            if step % 100 == 0:
                values = log.data["phases"]["base"].setdefault("attention_loss_values", [])
                values.append([step, round(extra.item(), 4)])
            loss = loss + weight * extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - cfg["ema"])
        first = loss.item() if first is None else first
        log.loss(step, loss.detach())
    log.done(first_loss=round(first, 4), final_loss=round(loss.item(), 4))
    return ema


class LoRALinear(nn.Module):
    """A frozen Linear plus up @ down (rank r, alpha = r: scale 1), as Forge merges a kohya LoRA at strength 1."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(
            torch.randn(rank, base.in_features, generator=gen, device=gen.device) / base.in_features**0.5
        )
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=gen.device))

    def forward(self, x):
        return self.base(x) + (x @ self.down.t()) @ self.up.t()


def add_loras(model, rank: int, gen, text_stream: bool = True) -> dict[str, LoRALinear]:
    """LoRA on every Linear of the double and single blocks, modulation layers included (as kohya FLUX LoRAs);
    without `text_stream`, none on the double blocks' text layers (txt_attn, txt_mlp, txt_mod: kohya's
    txt_attn_dim / txt_mlp_dim / txt_mod_dim = 0); the single blocks, which hold both streams, keep theirs."""
    added = {}
    for name, module in list(model.named_modules()):
        if not text_stream and ".txt_" in name:
            continue
        if isinstance(module, nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            parent_name, _, leaf = name.rpartition(".")
            lora = LoRALinear(module, rank, gen)
            setattr(model.get_submodule(parent_name), leaf, lora)
            added[name] = lora
    return added


def kohya_state_dict(loras: dict[str, LoRALinear], rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, lora in loras.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = lora.down.detach().to("cpu", torch.float32, copy=True)  # a copy, also on
        out[f"{key}.lora_up.weight"] = lora.up.detach().to("cpu", torch.float32, copy=True)  # the CPU: a snapshot
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def train_lora(
    base, name, latents, cap_idx, cond, cfg, log, gen, prior=None, checkpoint=None, text_stream=True
) -> dict[str, torch.Tensor]:
    """Flow loss on the character's pictures; with `prior` = (share, base latents, base caption rows) that share
    of every batch is the base's own training pictures and captions (kohya's regularisation images, DreamBooth's
    prior preservation), so that the LoRA adds its character without unlearning the rest of the world.
    `checkpoint` = (every, save(step, state)) also hands over the LoRA every `every` steps; `text_stream`: see
    add_loras."""
    share = prior[0] if prior else 0.0
    log.phase(f"lora_{name}", steps=cfg["lora_steps"], batch=cfg["lora_batch"], lr=cfg["lora_lr"], rank=LORA_RANK,
              pool=len(latents), prior_share=share, text_stream=text_stream)  # fmt: skip
    n_prior = round(share * cfg["lora_batch"])
    model = copy.deepcopy(base).requires_grad_(False)
    loras = add_loras(model, LORA_RANK, gen, text_stream)
    params = [p for lora in loras.values() for p in (lora.down, lora.up)]
    opt = torch.optim.AdamW(params, lr=cfg["lora_lr"], weight_decay=0.0)
    first = None
    for step in range(cfg["lora_steps"]):
        idx = torch.randint(len(latents), (cfg["lora_batch"] - n_prior,), generator=gen, device=gen.device)
        x, caps = latents[idx], cap_idx[idx]
        if n_prior:
            _, prior_latents, prior_caps = prior
            other = torch.randint(len(prior_latents), (n_prior,), generator=gen, device=gen.device)
            x, caps = torch.cat([x, prior_latents[other]]), torch.cat([caps, prior_caps[other]])
        loss = flow_step(model, x, cond["crossattn"][caps], cond["vector"][caps], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        log.loss(step, loss.detach())
        if checkpoint and (step + 1) % checkpoint[0] == 0 and step + 1 < cfg["lora_steps"]:
            checkpoint[1](step + 1, kohya_state_dict(loras, LORA_RANK))
    log.done(first_loss=round(first, 4), final_loss=round(loss.item(), 4), layers=len(loras))
    return kohya_state_dict(loras, LORA_RANK)


def save_lora(state: dict[str, torch.Tensor], stem: Path) -> None:
    """A kohya LoRA file (stem + .safetensors) with its rank in the metadata, as kohya's trainer writes it."""
    save_file(state, str(stem) + ".safetensors", metadata={"ss_network_dim": str(LORA_RANK)})


def scorer_batch(n: int, rng: np.random.Generator, vae, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n half-pictures (through the VAE, as generated images are) and their labels; characters oversampled."""
    pictures, labels = [], []
    for _ in range(n // 2):
        figures = []
        for place in ("left", "right"):
            roll = rng.random()
            if roll < 0.15:
                continue
            pool = world.ALL_SPRITES if roll > 0.45 else tuple(world.CHARACTERS.values())
            figures.append((pool[int(rng.integers(len(pool)))], place))
        pictures.append(world.render(figures, rng))
        labels.extend(half_labels(figures))
    cells = torch.from_numpy(np.stack(pictures)).to(device)
    with torch.no_grad():
        if vae is not None:
            cells = torch.cat([roundtrip(vae, cells[i : i + 64]) for i in range(0, len(cells), 64)])
    x = halves(cells.clamp(0, 1))
    y = {head: torch.tensor([lab[head] for lab in labels], device=device) for head in HEADS}
    return x, y


def roundtrip(vae, cells: torch.Tensor) -> torch.Tensor:
    """Cells through the VAE and back, as the cells of a generated image are."""
    recon = vae.decode(vae_moments(vae, to_pixels(cells))[0])
    return (F.avg_pool2d(recon, world.CELL_PX).permute(0, 2, 3, 1) + 1) / 2


def scorer_loss(out: dict, y: dict) -> torch.Tensor:
    present = y["present"] == 1
    loss = F.cross_entropy(out["present"], y["present"])
    for head in HEADS:
        if head != "present" and present.any():
            loss = loss + F.cross_entropy(out[head][present], y[head][present])
    return loss


@torch.no_grad()
def scorer_accuracy(scorer, x, y) -> dict[str, float]:
    out = scorer(x)
    present = y["present"] == 1
    acc = {"present": (out["present"].argmax(1) == y["present"]).float().mean().item()}
    for head in HEADS[1:]:
        acc[head] = (out[head].argmax(1) == y[head])[present].float().mean().item()
    return {k: round(v, 4) for k, v in acc.items()}


def train_scorer(vae, cfg, log, device, seed: int) -> Scorer:
    log.phase("scorer", steps=cfg["scorer_steps"], batch=cfg["scorer_batch"], lr=cfg["scorer_lr"])
    rng = np.random.default_rng(seed)
    scorer = Scorer().to(device)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg["scorer_lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["scorer_lr"], total_steps=cfg["scorer_steps"], pct_start=0.1)
    for step in range(cfg["scorer_steps"]):
        x, y = scorer_batch(cfg["scorer_batch"], rng, vae if step % 2 else None, device)
        x = x + 0.03 * torch.randn_like(x)
        loss = scorer_loss(scorer(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.loss(step, loss.detach())
    scorer.eval()
    held_out = np.random.default_rng(seed + 1)
    clean = scorer_accuracy(scorer, *scorer_batch(cfg["held_out"], held_out, None, device))
    through_vae = scorer_accuracy(scorer, *scorer_batch(cfg["held_out"], held_out, vae, device))
    log.done(final_loss=round(loss.item(), 4), held_out_accuracy=clean, held_out_accuracy_through_vae=through_vae)
    return scorer


def vae_kwargs(config: dict, cls) -> dict:
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, required=True, help="a Forge checkout (its backend/ is imported)")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything: checks the script runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, help="a trained folder: keep its VAE and scorer, train its base on")
    parser.add_argument("--vae-from", type=Path, help="a trained folder: keep its VAE and scorer, a new base")
    parser.add_argument("--base-steps", type=int, help="override the base model's steps")
    parser.add_argument("--base-lr", type=float, help="override the base model's learning rate")
    parser.add_argument("--lora-steps", type=int, help="override each LoRA's steps")
    parser.add_argument("--base-pool", type=int, help="override the base model's number of training pictures")
    parser.add_argument("--base-batch", type=int, help="override the base model's batch")
    parser.add_argument("--lora-lr", type=float, help="override each LoRA's learning rate")
    parser.add_argument("--lora-save-every", type=int, help="also save each LoRA every N steps (lora_NAME_N)")
    parser.add_argument("--lora-no-text", action="store_true", help="no LoRA on the double blocks' text layers")
    parser.add_argument("--characters", default=",".join(world.CHARACTERS), help="which LoRAs to train")
    parser.add_argument("--lora-pool", type=int, help="override each LoRA's number of training pictures")
    parser.add_argument("--lora-batch", type=int, help="override each LoRA's batch")
    parser.add_argument("--lora-paired", type=float, default=0.0, help="share of LoRA pictures with a 2nd sprite")
    parser.add_argument("--lora-prior", type=float, default=0.0, help="share of each LoRA batch from the base's data")
    parser.add_argument("--out", type=Path, help="where the trained files go (default: WORK/trained)")
    parser.add_argument("--attention-loss", type=float, default=0.0, help="weight of the base's attention loss")
    parser.add_argument("--base-names", type=float, default=0.0, help="share of base figures named by NAMES")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("base_steps", "base_lr", "lora_steps", "lora_lr", "base_pool", "base_batch", "lora_pool", "lora_batch"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    unknown = set(args.characters.split(",")) - set(world.CHARACTERS)
    if unknown:
        parser.error(f"--characters: unknown {sorted(unknown)}; the characters are {list(world.CHARACTERS)}")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    flux_cls, vae_cls = import_forge(args.forge.resolve(), device.type)
    out = args.out or args.work / "trained"
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train_log.json", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              torch=torch.__version__, seed=args.seed, quick=args.quick, transformer=TRANSFORMER)  # fmt: skip
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    table, cond, t5_check = load_conditioning(args.work, device)
    log.data["t5_check_max_difference"] = t5_check
    sizes = {"base": cfg["base_pool"], **{name: cfg["lora_pool"] for name in world.CHARACTERS}}
    pools = {
        kind: render_pool(kind, n, args.seed + i, args.lora_paired, args.base_names)
        for i, (kind, n) in enumerate(sizes.items())
    }
    pictures = {k: torch.from_numpy(v[0]).to(device) for k, v in pools.items()}

    vae_config = json.loads((args.work / "vae_config.json").read_text())
    vae = vae_cls(**vae_kwargs(vae_config, vae_cls)).to(device)
    kept = args.resume or args.vae_from
    if kept:
        vae.load_state_dict(load_file(str(kept / "vae.safetensors")))
        log.data["resumed_from" if args.resume else "vae_from"] = json.loads((kept / "train_log.json").read_text())
    else:
        train_vae(vae, torch.cat(list(pictures.values())), cfg, log, gen)
    vae.eval().requires_grad_(False)
    save_file({k: v.float().cpu().contiguous() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"))
    latents = {k: encode(vae, v) for k, v in pictures.items()}
    log.data["latent_std"] = round(latents["base"].std().item(), 4)
    cap_idx = {k: caption_index(v[1], table, device) for k, v in pools.items()}

    model = flux_cls(**TRANSFORMER).to(device)
    zero_init(model)
    if args.resume:
        model.load_state_dict(load_file(str(args.resume / "transformer.safetensors")))
    log.data["transformer_parameters"] = sum(p.numel() for p in model.parameters())
    attention = None
    if args.attention_loss:
        import backend.nn.flux

        positions = json.loads((args.work / "word_positions.json").read_text())
        longest = max(len(tokens) for found in positions.values() for _, tokens in found)
        words = torch.full((len(table), 2, longest), -1, dtype=torch.long)
        for c, text in enumerate(table):
            for f, (_, tokens) in enumerate(positions[text][:2]):
                words[c, f, : len(tokens)] = torch.tensor(tokens)
        masks = torch.from_numpy(pools["base"][2]).to(device)
        attention = (args.attention_loss, AttentionRecorder(backend.nn.flux), words.to(device), masks)
    if cfg["base_steps"] > 0:
        base = train_base(model, latents["base"], cap_idx["base"], cond, cfg, log, gen, attention)
    else:  # --resume --base-steps 0: the resumed base as it is (new LoRAs only)
        base = model.requires_grad_(False)
    save_file(
        {k: v.float().cpu().contiguous() for k, v in base.state_dict().items()}, str(out / "transformer.safetensors")
    )
    for name in args.characters.split(","):
        prior = (args.lora_prior, latents["base"], cap_idx["base"]) if args.lora_prior else None
        checkpoint = None
        if args.lora_save_every:
            every = args.lora_save_every
            checkpoint = (every, lambda step, state, name=name: save_lora(state, out / f"lora_{name}_{step}"))
        lora = train_lora(
            base, name, latents[name], cap_idx[name], cond, cfg, log, gen, prior, checkpoint, not args.lora_no_text
        )
        save_lora(lora, out / f"lora_{name}")
    if kept:
        shutil.copyfile(kept / "scorer.safetensors", out / "scorer.safetensors")
    else:
        scorer = train_scorer(vae, cfg, log, device, args.seed + 10)
        scorer_state = {k: v.float().cpu().contiguous() for k, v in scorer.state_dict().items()}
        save_file(scorer_state, str(out / "scorer.safetensors"))
    log.data["total_seconds"] = round(time.perf_counter() - started, 1)
    log.path.write_text(json.dumps(log.data, indent=1))
    print(f"total {log.data['total_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
