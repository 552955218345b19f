"""A tiny random SDXL UNet built from the host's own classes (backend/nn/unet.py), its UnetPatcher, conditions.

SDXL's layout at a small size: no transformers at the first level, transformers at the others and in the middle
block (several deep), linear proj_in/proj_out, ADM embedding of the pooled text and sizes (label_emb)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import torch

SDXL_CONFIG = dict(
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=[1, 1, 1],  # a list, as checkpoints give it (the LoRA key map reads it per level)
    channel_mult=(1, 2, 2),
    num_head_channels=16,
    use_spatial_transformer=True,
    transformer_depth=[0, 1, 2],
    transformer_depth_output=[0, 0, 1, 1, 2, 2],
    transformer_depth_middle=2,
    context_dim=48,
    use_linear_in_transformer=True,
    num_classes="sequential",
    adm_in_channels=24,
)
TEXT_TOKENS = 77


def make_tiny_sdxl(forge, seed: int = 0):
    """Forge's IntegratedUNet2DConditionModel in SDXL's layout, random weights (non-zero biases, output layers
    included), loaded as backend/loader.py loads a checkpoint (ForgeOperations, then a state dict)."""
    from backend.nn.unet import IntegratedUNet2DConditionModel

    torch.manual_seed(seed)
    reference = IntegratedUNet2DConditionModel(**SDXL_CONFIG)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))
            elif parameter.ndim >= 2 and float(parameter.abs().max()) == 0:  # zero-initialised output layers
                parameter.copy_(torch.randn_like(parameter) / parameter[0].numel() ** 0.5)
    return load_unet(SDXL_CONFIG, reference.state_dict())


def load_unet(config: dict, state_dict: dict):
    """An IntegratedUNet2DConditionModel of `config` built with ForgeOperations and loaded from `state_dict`, as
    backend/loader.py loads a checkpoint (float32, on the CPU, the host's load/offload devices)."""
    from backend import memory_management
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32):
        model = IntegratedUNet2DConditionModel(**config)
    load_state_dict(model, state_dict)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = memory_management.get_torch_device()
    model.initial_device = memory_management.cpu
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_sdxl_patcher(forge, model):
    """UnetPatcher of the model with SDXL's epsilon prediction (scaled-linear betas), as the host builds SDXL's."""
    from backend.modules.k_prediction import Prediction
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    if forge.HOST == "neo":  # Neo's Prediction takes the schedule's numbers explicitly
        schedule = dict(sigma_data=1.0, beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
        predictor = Prediction(prediction_type="epsilon", timesteps=1000, **schedule)
    else:
        predictor = Prediction(prediction_type="epsilon")
    config = model_list.SDXL(dict(SDXL_CONFIG))
    return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=predictor, config=config)


def conditions(batch: int = 1, seed: int = 1, chunks: int = 1, zero: bool = False):
    """compile_conditions() of random CLIP states (77 tokens per chunk) and the ADM vector, as the webui's SDXL
    engine passes them."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, TEXT_TOKENS * chunks, SDXL_CONFIG["context_dim"], generator=g)
    vector = torch.randn(batch, SDXL_CONFIG["adm_in_channels"], generator=g)
    if zero:
        context = torch.zeros_like(context)
    return compile_conditions({"crossattn": context, "vector": vector})


def sample(forge, unet, *, batch: int = 1, cfg_scale: float = 1.0, uncond_chunks: int = 1, **kwargs):
    """Forge's sampling path (forge_env.sample) for the tiny SDXL: 4 latent channels, a negative prompt of its own
    (a different context; `uncond_chunks` 77-token chunks) when cfg_scale > 1."""
    uncond = conditions(batch, seed=9, chunks=uncond_chunks)
    return forge.sample(
        unet, batch=batch, cfg_scale=cfg_scale, cond=conditions(batch), uncond=uncond, channels=4, **kwargs
    )


def clip_engine(forge_root):
    """The host's ClassicTextProcessingEngine with SDXL's CLIP-L tokenizer (as backend/diffusion_engine/sdxl.py
    builds it), without its text encoder: only tokenize_line and its helpers run. `modules.shared` (the webui's
    settings, read only when an engine is constructed) is stubbed while the module is imported."""
    from transformers import CLIPTokenizer

    stubbed = "modules.shared" not in sys.modules
    if stubbed:
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=SimpleNamespace(emphasis="Original"))
    try:
        from backend.text_processing import classic_engine, emphasis
        from backend.text_processing.textual_inversion import EmbeddingDatabase
    finally:
        if stubbed:
            sys.modules.pop("modules.shared", None)
    folder = forge_root / "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0/tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    engine = object.__new__(classic_engine.ClassicTextProcessingEngine)
    engine.tokenizer = tokenizer
    engine.embeddings = EmbeddingDatabase(tokenizer, 768)
    engine.emphasis = emphasis.EmphasisOriginal()
    engine.chunk_length = 75
    engine.id_start, engine.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    engine.comma_token = tokenizer.get_vocab().get(",</w>")
    return engine
