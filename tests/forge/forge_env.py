"""Forge's own backend on CPU without the webui: import setup, a tiny FLUX, its UnetPatcher, Euler sampling.

Nothing here is Forge's code; it builds Forge's classes the way backend/loader.py and the webui's sampler do, in
classic Forge or in Forge Neo (`HOST` says which, after `setup()`; the tree tells: Neo bundles its packages under
modules_forge/packages). Call `setup()` before importing anything from `backend`. The benches use the same helpers
with a FLUX of any size (`make_flux`), on CUDA too (`setup(..., device="cuda")`).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from forge_locator import is_neo

TINY_CONFIG = dict(
    in_channels=16,  # latent channels; the model patchifies 2x2 itself
    vec_in_dim=32,
    context_in_dim=64,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=2,
    depth=3,
    depth_single_blocks=2,
    axes_dim=[16, 24, 24],  # sums to the head dim, 64
    theta=10000,
    qkv_bias=True,
    guidance_embed=True,
)
NEO_CONFIG = dict(out_channels=16, patch_size=2, image_model="flux")  # what Neo's FLUX class also asks for
HOST = None  # "classic" or "neo", set by setup()


def setup(forge_root: Path, device: str = "cpu") -> None:
    """Put Forge on sys.path and import backend.args under a CPU-only argv (it parses argv at import time).

    device "cuda": Forge's own device choice (the GPU) instead of --always-cpu; only the first call's device counts.
    """
    global HOST
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    neo = is_neo(forge_root)
    HOST = "neo" if neo else "classic"
    if neo:
        paths = (forge_root, forge_root / "modules_forge" / "packages")
    else:
        paths = (forge_root, forge_root / "packages_3rdparty", forge_root / "repositories" / "huggingface_guess")
    for path in paths:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make tiny forwards 10-40x slower
    if "backend.args" in sys.modules:
        return
    saved = sys.argv
    if neo:
        flags = ["--cpu"] if device == "cpu" else []
        flags.append("--use-pytorch-cross-attention")
    else:
        flags = ["--always-cpu"] if device == "cpu" else []
        flags.append("--attention-pytorch")
    sys.argv = [saved[0] if saved else "forge", *flags]
    try:
        import backend.args  # noqa: F401
    finally:
        sys.argv = saved


def model_config(**overrides) -> dict:
    """The tiny FLUX's constructor arguments for this host (Neo's class also takes out_channels and patch_size)."""
    config = {**TINY_CONFIG, **overrides}
    return {**NEO_CONFIG, **config} if HOST == "neo" else config


def flux_class():
    """The host's FLUX transformer class."""
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    return IntegratedFluxTransformer2DModel


def constructor_args(config: dict) -> dict:
    """config without the keys that are only for the loader (Neo's "image_model")."""
    return {k: v for k, v in config.items() if k != "image_model"}


def make_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Forge's IntegratedFluxTransformer2DModel built as backend/loader.py builds it (ForgeOperations, then a
    state dict), with random weights and non-trivial QK-norm scales."""
    config = model_config(**overrides)
    torch.manual_seed(seed)
    reference = flux_class()(**constructor_args(config))
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(".scale") or name.endswith("_norm.weight"):  # QK-norm scales (Neo: RMSNorm.weight)
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))  # zero-free biases (modulation included)
    state_dict = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    return flux_from_state_dict(config, state_dict, dtype)


def flux_from_state_dict(config: dict, state_dict: dict, dtype: torch.dtype = torch.float32):
    """The host's FLUX class on the CPU as backend/loader.py builds it: ForgeOperations, then the state dict, then the
    attributes the host's patcher reads. config: model_config()'s."""
    from backend import memory_management
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    device = memory_management.cpu
    with using_forge_operations(device=device, dtype=dtype, manual_cast_enabled=False):
        model = flux_class()(**constructor_args(config)).to(device=device, dtype=dtype)
    load_state_dict(model, state_dict)
    model.config = config
    model.storage_dtype = model.computation_dtype = dtype
    model.load_device = memory_management.get_torch_device()
    model.initial_device = device
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_flux(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Forge's IntegratedFluxTransformer2DModel of any size (FLUX.1-dev's included) with random weights made directly
    on `device` in `dtype`: no float32 reference model, so a 12B model needs only its own memory.

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), QK-norm scales ~ 1 + N(0, 0.1^2). Loaded as backend/loader.py
    loads a checkpoint (ForgeOperations, then a state dict).
    """
    from backend import memory_management
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    device = torch.device(device)
    config = {**NEO_CONFIG, **config} if HOST == "neo" else dict(config)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in flux_class()(**constructor_args(config)).state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    state_dict = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if name.endswith(".scale") or name.endswith("_norm.weight"):
            t = t.mul_(0.1).add_(1.0)
        elif name.endswith(".bias"):
            t = t.mul_(0.02)
        elif len(shape) >= 2:
            t = t.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
        state_dict[name] = t.to(dtype)
        del t
    with using_forge_operations(device=device, dtype=dtype, manual_cast_enabled=False):
        model = flux_class()(**constructor_args(config))
    load_state_dict(model, state_dict)
    del state_dict
    model.to(device=device, dtype=dtype)
    model.config = dict(config)
    model.storage_dtype = model.computation_dtype = dtype
    model.load_device = memory_management.get_torch_device()
    model.initial_device = device
    model.offload_device = memory_management.unet_offload_device()
    return model


def make_unet_patcher(model):
    """UnetPatcher as the host's backend/diffusion_engine/flux.py builds it (FLUX.1-dev prediction)."""
    from backend.modules.k_prediction import PredictionFlux
    from backend.patcher.unet import UnetPatcher
    from huggingface_guess import model_list

    estimated = model_list.Flux(dict(model.config))
    if HOST == "neo":
        return UnetPatcher.from_model(
            model=model, diffusers_scheduler=None, k_predictor=PredictionFlux(estimated), config=estimated
        )
    predictor = PredictionFlux(seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=predictor, config=estimated)


def unload(unet) -> None:
    """Unload every loaded clone of unet's model (object patches undone, LoRA merges restored), as the host does
    before another clone loads."""
    from backend import memory_management

    if hasattr(memory_management, "unload_model_clones"):  # classic
        memory_management.unload_model_clones(unet)
        return
    loaded = memory_management.current_loaded_models
    for index in reversed(range(len(loaded))):
        if loaded[index].model is not None and unet.is_clone(loaded[index].model):
            loaded.pop(index).model_unload()


def host_adapter():
    """FreeFuse's adapter of the host set up here."""
    from lib_freefuse.hosts import detect

    return detect()


def lora_dir() -> Path:
    """A folder for the LoRA files tests write (the Neo adapter finds merged LoRAs by their files)."""
    global _LORA_DIR
    if _LORA_DIR is None:
        _LORA_DIR = Path(tempfile.mkdtemp(prefix="freefuse-forge-loras-"))
    return _LORA_DIR


_LORA_DIR: Path | None = None


def with_loras(unet, sds: dict[str, dict], strength: float = 1.0, strength_model: float = 1.0):
    """What the host's LoRA extension does for the prompt's tags: its key map, load_lora, add_patches on a clone, one
    file each (written to lora_dir() under the dict's names). Returns (clone, [file path per name], unmatched keys)."""
    from backend.patcher.lora import load_lora, model_lora_keys_unet
    from safetensors.torch import save_file

    paths, unmatched = [], {}
    for name, sd in sds.items():
        path = str(lora_dir() / Path(name).name)
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        patches, missed = load_lora(sd, model_lora_keys_unet(unet.model, {}))
        unmatched.update(missed)
        unet = unet.clone()
        unet.add_patches(filename=path, patches=patches, strength_patch=strength, strength_model=strength_model)
        paths.append(path)
    return unet, paths, unmatched


def merged_patches(unet, path: str):
    """The adapter's reading of one merged LoRA file's patches on unet (Host.merged_lora)."""
    patches = host_adapter().merged_lora(unet, path)
    assert patches is not None, f"{path} is not merged on this patcher"
    return patches


def subject_deltas_of(merged_unet, names):
    """The subject LoRA files `names` (in lora_dir(), merged by with_loras) as start_run takes them out of the merge:
    ({module: [(subject index, delta)]}, [each file's merged patches])."""
    from lib_freefuse.forge.lora_layers import subject_deltas

    params = dict(merged_unet.model.named_parameters())
    host = host_adapter()
    deltas: dict[str, list] = {}
    merged = []
    for index, name in enumerate(names):
        patches = merged_patches(merged_unet, str(lora_dir() / name))
        merged.append(patches)
        for delta in subject_deltas(patches, lambda k: params[k], host.merge)[0]:
            deltas.setdefault(delta.module, []).append((index, delta))
    return deltas, merged


def freefuse_unet(merged_unet, names, masks: torch.Tensor | None, family, **plan_fields):
    """A FreeFuse clone of a patcher with the subject LoRA files `names` merged (with_loras): they come out of the
    merge and act masked, with the given (B_img, L, h, w) masks from the first step; no words (text tokens get every
    LoRA), no capture unless plan_fields say otherwise. Returns (clone, job)."""
    from lib_freefuse.forge.host import patch_unet
    from lib_freefuse.forge.job import FreeFuseJob, JobPlan

    deltas, merged = subject_deltas_of(merged_unet, names)
    images = 1 if masks is None else masks.shape[0]
    fields = {
        "word_positions": tuple(((),) * len(names) for _ in range(images)),
        "text_length": 8,
        "capture_step": 10**6,
        "initial_masks": masks,
        **plan_fields,
    }
    job = FreeFuseJob(JobPlan(**fields), decode=None, family=family)
    return patch_unet(merged_unet, job, deltas, capture_block=0, merged=merged), job


def assert_attention_bias_acts(sample, make_unet, grid: tuple[int, int]) -> None:
    """The phase-2 attention bias on a family whose blocks call FLUX's attention: with left/right masks and two
    subjects' words, bias 5 changes the sampled image against bias 0, no job fails, and the host's attention function
    is as before afterwards. make_unet(masks, **plan_fields) -> (unet, job); sample(unet) -> latents."""
    import backend.nn.flux as flux

    original = flux.attention
    masks = torch.zeros(1, 2, *grid)
    masks[0, 0, :, : grid[1] // 2] = 1
    masks[0, 1, :, grid[1] // 2 :] = 1
    runs = {}
    for bias in (0.0, 5.0):
        unet, job = make_unet(masks, word_positions=(((1, 2), (5,)),), attention_bias=bias)
        runs[bias] = sample(unet)
        assert job.failure is None
    assert flux.attention is original
    assert (runs[5.0] - runs[0.0]).abs().max() > 1e-3


def stand_in_networks(monkeypatch, files: dict[str, str]) -> None:
    """The LoRA extension's name lookup (`networks`, only there in a webui) standing in for a test: {alias: file}."""
    from types import SimpleNamespace

    networks = types.ModuleType("networks")
    networks.available_network_aliases = {alias: SimpleNamespace(filename=f) for alias, f in files.items()}
    networks.available_networks = {}
    monkeypatch.setitem(sys.modules, "networks", networks)


def import_k_diffusion():
    """Forge's vendored k_diffusion. Its utils import torchvision, which has no build for the CPU torch wheel: a
    stub stands in during this import only (a lasting stub breaks diffusers' find_spec)."""
    import backend.modules.k_prediction  # noqa: F401 - imports diffusers before the stub exists

    if HOST == "neo":
        from modules_forge.packages.k_diffusion import external, sampling

        return sampling, external

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stub = importlib.util.find_spec("torchvision") is None
    if stub:
        tv, tvt, tvf = (types.ModuleType(n) for n in names)
        tv.transforms, tvt.functional = tvt, tvf
        sys.modules.update(zip(names, (tv, tvt, tvf), strict=True))
    try:
        import k_diffusion.external as external
        import k_diffusion.sampling as sampling
    finally:
        if stub:
            for name in names:
                sys.modules.pop(name, None)
    return sampling, external


def simple_sigmas(unet, steps: int) -> torch.Tensor:
    """The webui's "Simple" scheduler over the model's own sigmas, with the final 0."""
    sigmas = unet.model.predictor.sigmas
    stride = len(sigmas) / steps
    return torch.tensor([float(sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def conditions(
    batch: int = 1,
    text_tokens: int = 8,
    seed: int = 1,
    zero: bool = False,
    context_dim: int | None = None,
    vec_dim: int | None = None,
):
    """compile_conditions() of random T5 states, pooled vector and guidance: what the webui passes for FLUX.
    context_dim, vec_dim: the model's context_in_dim and vec_in_dim (default: the tiny FLUX's)."""
    from backend.sampling.condition import compile_conditions

    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, text_tokens, context_dim or TINY_CONFIG["context_in_dim"], generator=g)
    pooled = torch.randn(batch, vec_dim or TINY_CONFIG["vec_in_dim"], generator=g)
    if zero:
        context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    return compile_conditions({"crossattn": context, "vector": pooled, "guidance": torch.full((batch,), 3.5)})


def sample(
    unet,
    *,
    steps: int = 4,
    cfg_scale: float = 1.0,
    batch: int = 1,
    latent_hw: tuple[int, int] = (16, 16),
    seed: int = 0,
    sampler: str = "sample_euler",
    cond=None,
    uncond=None,
    on_sigmas=None,
    device: str | torch.device | None = None,
    timings: dict | None = None,
    channels: int = 16,
):
    """Forge's sampling path for one job: sampling_prepare, a k-diffusion sampler over a CFG denoiser that calls
    sampling_function_inner (as the webui's CFGDenoiser does for FLUX), sampling_cleanup.

    channels: the latent's (FLUX 16, SDXL 4). device: where the noise and the sigmas live (the model's load device,
    e.g. "cuda"; default CPU). timings: a dict
    to which the seconds of "prepare" (model load, LoRA merge), "sample" (the sampler loop) and "cleanup" are added
    (also when the sampler raises), the GPU synchronised at each boundary."""
    from backend.sampling.sampling_function import sampling_cleanup, sampling_function_inner, sampling_prepare

    k_sampling, k_external = import_k_diffusion()
    cond = cond if cond is not None else conditions(batch)
    uncond = uncond if uncond is not None else conditions(batch, zero=True)

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner_model = k_external.ForgeScheduleLinker(unet.model.predictor)

        def forward(self, x, sigma, **_):
            return sampling_function_inner(unet.model, x, sigma, uncond, cond, cfg_scale, unet.model_options)

    sigmas = simple_sigmas(unet, steps)
    if on_sigmas is not None:
        on_sigmas(sigmas)
    noise = torch.randn(batch, channels, *latent_hw, generator=torch.Generator().manual_seed(seed))
    if device is not None:
        noise, sigmas = noise.to(device), sigmas.to(device)
    x = unet.model.predictor.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
    clock = _Clock(timings, x.device)
    with clock("prepare"):
        sampling_prepare(unet, x)
    try:
        with torch.inference_mode(), clock("sample"):  # as both hosts' process_images samples
            return getattr(k_sampling, sampler)(Denoiser(), x, sigmas, disable=True)
    finally:
        with clock("cleanup"):
            sampling_cleanup(unet)


class _Clock:
    """with clock(name): adds the block's wall seconds to timings[name] (nothing when timings is None)."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings = timings
        self.cuda = device.type == "cuda"

    def __call__(self, name: str):
        return _Timed(self, name)


class _Timed:
    def __init__(self, clock: _Clock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        if self.clock.timings is not None:
            if self.clock.cuda:
                torch.cuda.synchronize()
            self.start, self.start_cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc):
        timings = self.clock.timings
        if timings is not None:
            if self.clock.cuda:
                torch.cuda.synchronize()
            timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - self.start
            cpu = f"{self.name} cpu"  # this thread's CPU seconds: with one torch thread, the work itself
            timings[cpu] = timings.get(cpu, 0.0) + time.thread_time() - self.start_cpu
        return False


def decode(latents: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """A cheap stand-in for the VAE: x0 latents (B, 16, H, W) -> (B, H*upscale, W*upscale, 3) RGB in [0, 1] on the CPU.

    A fixed linear latent -> RGB projection (as Forge's cheap preview does, with factors of its own, not Forge's),
    upsampled by pixel repetition to the size the VAE would give, so that SLIC sees an image of the real size.
    """
    generator = torch.Generator().manual_seed(12345)
    factors = torch.randn(latents.shape[1], 3, generator=generator) / math.sqrt(latents.shape[1])
    rgb = torch.einsum("bchw,cr->brhw", latents.detach().float().cpu(), factors)
    rgb = (rgb * 0.5 + 0.5).clamp_(0.0, 1.0)
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    return rgb.permute(0, 2, 3, 1).contiguous()


def flux_t5_engine(forge_root: Path):
    """The host's T5TextProcessingEngine as its backend/diffusion_engine/flux.py builds it (classic: emphasis
    "Original", padded to 256; Neo: its defaults), with FLUX.1-schnell's T5 tokenizer and no text encoder: only
    tokenize_line runs. `modules.shared` (classic imports its `opts` with the module; Neo reads it when an engine is
    built) is a stand-in while the engine is imported and built."""
    from transformers import T5TokenizerFast

    stubbed = "modules.shared" not in sys.modules
    if stubbed:
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=types.SimpleNamespace(emphasis="Original"))
    try:
        from backend.text_processing.t5_engine import T5TextProcessingEngine

        folder = forge_root / "backend/huggingface/black-forest-labs/FLUX.1-schnell/tokenizer_2"
        tokenizer = T5TokenizerFast.from_pretrained(str(folder))
        encoder = types.SimpleNamespace(transformer=None)
        if is_neo(forge_root):
            return T5TextProcessingEngine(text_encoder=encoder, tokenizer=tokenizer)
        return T5TextProcessingEngine(text_encoder=encoder, tokenizer=tokenizer, emphasis_name="Original")
    finally:
        if stubbed:
            sys.modules.pop("modules.shared", None)
