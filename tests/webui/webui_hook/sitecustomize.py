"""Test-only hook for the webui tier: lets Forge's unmodified loader take the tiny random FLUX of tiny_models.py.

The webui fixture puts this folder on the webui subprocess's PYTHONPATH, so Python imports this file at start-up
(as `sitecustomize`). It imports nothing of Forge; it waits for two of Forge's modules to be imported and then
patches them in memory, never on disk:

- `huggingface_guess.guess`: huggingface_guess detects FLUX by a key and then hard-codes the 12B shapes (hidden
  3072, 19 + 38 blocks, context 4096, ...). For a checkpoint whose transformer is *not* 12B-sized, the wrapper
  reads the shapes off the state dict instead, and points the guess at the tiny pipeline configs (CLIP-L, T5, VAE
  and the tokenizers) in $FREEFUSE_TEST_TINY_FLUX_CONFIGS instead of Forge's backend/huggingface/. A real FLUX
  checkpoint is left exactly as Forge guesses it.
  The same wrapper gives a tiny SDXL checkpoint (tiny_sdxl.py) the SDXL guess with its own UNet config and the
  tiny SDXL pipeline configs in $FREEFUSE_TEST_TINY_SDXL_CONFIGS (huggingface_guess matches SDXL at its real sizes
  only); a real SDXL checkpoint is left exactly as Forge guesses it. On Neo, a tiny FLUX.2 checkpoint
  (tiny_klein.py) gets the Klein 4B guess with huggingface_guess's own config read off its tensors and the tiny
  Klein pipeline configs in $FREEFUSE_TEST_TINY_KLEIN_CONFIGS (Neo matches Klein at hidden 3072/4096 only).
  Likewise a tiny Z-Image (tiny_zimage.py) gets the Z-Image guess with its config read off its tensors and the tiny
  Z-Image pipeline configs in $FREEFUSE_TEST_TINY_ZIMAGE_CONFIGS (Neo matches Z-Image at dim 3840 only). A tiny
  Chroma (tiny_chroma.py) gets the Chroma guess with its modulation MLP's own sizes and the tiny Chroma pipeline
  configs in $FREEFUSE_TEST_TINY_CHROMA_CONFIGS (tiny_chroma_hook.py beside this file).
- `backend.nn.llm.llama` (Neo, with $FREEFUSE_TEST_TINY_KLEIN_CONFIGS set): Neo builds a Qwen3 text encoder of an
  unknown width with its Qwen3-0.6B class, which asserts the checkpoint's config against its own fixed one; that
  fixed config becomes the tiny Klein text encoder's, without the class's Anima adapter (`fit_qwen3`). The tiny
  Z-Image (tiny_zimage.py, $FREEFUSE_TEST_TINY_ZIMAGE_CONFIGS) has a text encoder of the same tiny config.
- On Neo with $FREEFUSE_TEST_TINY_QWEN_IMAGE_CONFIGS set, the guess of a tiny Qwen-Image and Neo's Qwen2.5-VL
  class are fitted by tiny_qwen_image_hook.py beside this file (see its docstring).
- `modules.launch_utils.repo_dir`: with --skip-prepare-environment Forge never clones
  repositories/stable-diffusion-webui-assets, and the UI's static mount of it raises at start-up. When that folder
  is missing, the empty folder $FREEFUSE_TEST_WEBUI_ASSETS stands in.

- Fault injection, for the reliability tests only: with $FREEFUSE_TEST_FAULT_FILE set, FreeFuse's attention
  capture (`FreeFuseJob.store_attention`), its SLIC call (`lib_freefuse.core.masks.slic_segments`) and its masked
  LoRA product once the masks exist (`StackedLoRA.add_to` with masks that are not all ones) are wrapped; each
  raises RuntimeError("injected fault: <stage>") while that file holds the stage's name ("capture", "slic",
  "masks"), read at every call, and otherwise does exactly what it did. Stage "host" makes every known host
  adapter disown the job's patcher (a Forge FreeFuse does not know); stage "start" makes the prompt's word lookup
  raise the AttributeError a renamed host attribute would. The shipped code has no such switch.
- With $FREEFUSE_TEST_EXIT_WITH_PARENT=1 the process ends itself once the process that started it is gone, so a
  test run that was killed (and so never reached the fixture's teardown) leaves no webui behind.

Only effective when those environment variables are set; it does nothing in any other process.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import threading
import time

CONFIGS_ENV = "FREEFUSE_TEST_TINY_FLUX_CONFIGS"
ASSETS_ENV = "FREEFUSE_TEST_WEBUI_ASSETS"
EXIT_WITH_PARENT_ENV = "FREEFUSE_TEST_EXIT_WITH_PARENT"

FLUX_TEST_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
FULL_SIZE_HIDDEN = 3072  # FLUX.1 12B: left to huggingface_guess as it is


def count_blocks(keys, prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def axes_dim_for(head_dim: int) -> list[int]:
    """RoPE axes for a head dim, in FLUX.1's proportions (128 -> [16, 56, 56]); tiny_models.py builds with this."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    return [first, rest, head_dim - first - rest]


def flux_config_from_shapes(state_dict, prefix: str) -> dict:
    """The FLUX transformer config that huggingface_guess would return, but read from the tensors' shapes."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    shape = lambda name: tuple(state_dict[prefix + name].shape)  # noqa: E731
    hidden, in_features = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    return {
        "in_channels": in_features // 4,  # the model patchifies 2x2 itself
        "vec_in_dim": shape("vector_in.in_layer.weight")[1],
        "context_in_dim": shape("txt_in.weight")[1],
        "hidden_size": hidden,
        "mlp_ratio": shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        "num_heads": hidden // head_dim,
        "depth": count_blocks(keys, prefix + "double_blocks."),
        "depth_single_blocks": count_blocks(keys, prefix + "single_blocks."),
        "axes_dim": axes_dim_for(head_dim),
        "theta": 10000,
        "qkv_bias": prefix + "double_blocks.0.img_attn.qkv.bias" in state_dict,
        "guidance_embed": prefix + "guidance_in.in_layer.weight" in state_dict,
    }


def fit_tiny_flux(result, state_dict):
    """Correct a FLUX guess in place for a non-12B checkpoint; returns whether it did."""
    configs = os.environ.get(CONFIGS_ENV)
    prefix = (getattr(result, "unet_key_prefix", None) or [""])[0]
    if not configs or result is None or prefix + FLUX_TEST_KEY not in state_dict:
        return False
    if state_dict[prefix + "img_in.weight"].shape[0] == FULL_SIZE_HIDDEN:
        return False
    result.unet_config.update(flux_config_from_shapes(state_dict, prefix))
    # backend/loader.py joins this onto backend/huggingface/; an absolute path wins that join. The name keeps
    # "flux" (the LoRA key mapper checks for it) and must not contain "schnell" (that selects FLUX.1-schnell).
    result.huggingface_repo = os.path.abspath(configs)
    print(f"[freefuse-test] tiny FLUX: {result.unet_config} with configs from {result.huggingface_repo}")
    return True


SDXL_CONFIGS_ENV = "FREEFUSE_TEST_TINY_SDXL_CONFIGS"
SDXL_TEST_KEY = "label_emb.0.0.weight"  # SDXL's ADM embedding
SDXL_CONTEXTS = (2048, 1280)  # SDXL base and refiner: left to huggingface_guess as it is


def tiny_sdxl_guess(state_dict):
    """huggingface_guess matches SDXL only at its real sizes (context 2048, ADM 2816, 320 channels). For an SDXL-
    shaped checkpoint of another context width, the guess is SDXL with the UNet config read off the tensors
    (huggingface_guess's own detect_unet_config), pointed at the tiny pipeline configs in
    $FREEFUSE_TEST_TINY_SDXL_CONFIGS. None for any other checkpoint."""
    configs = os.environ.get(SDXL_CONFIGS_ENV)
    prefix = "model.diffusion_model."
    to_k = next((k for k in state_dict if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    if not configs or prefix + SDXL_TEST_KEY not in state_dict or to_k is None:
        return None
    if state_dict[to_k].shape[1] in SDXL_CONTEXTS:
        return None
    from huggingface_guess import detection, model_list

    result = model_list.SDXL(detection.detect_unet_config(state_dict, prefix))
    result.unet_key_prefix = [prefix]
    result.huggingface_repo = os.path.abspath(configs)
    print(f"[freefuse-test] tiny SDXL: {result.unet_config} with configs from {result.huggingface_repo}")
    return result


KLEIN_CONFIGS_ENV = "FREEFUSE_TEST_TINY_KLEIN_CONFIGS"
KLEIN_TEST_KEY = "double_stream_modulation_img.lin.weight"  # FLUX.2's shared modulation
KLEIN_HIDDEN = (3072, 4096)  # Klein 4B and 9B: left to huggingface_guess as it is


def tiny_klein_guess(state_dict):
    """huggingface_guess takes a FLUX.2 transformer as Klein only at hidden 3072 or 4096. For a FLUX.2 checkpoint of
    another width, the guess is Klein 4B with huggingface_guess's own config read off the tensors, pointed at the tiny
    pipeline configs in $FREEFUSE_TEST_TINY_KLEIN_CONFIGS. None for any other checkpoint."""
    configs = os.environ.get(KLEIN_CONFIGS_ENV)
    prefix = "model.diffusion_model."
    if not configs or prefix + KLEIN_TEST_KEY not in state_dict:
        return None
    if state_dict[prefix + "img_in.weight"].shape[0] in KLEIN_HIDDEN:
        return None
    from huggingface_guess import detection, model_list

    result = model_list.Flux2K4B(detection.detect_unet_config(state_dict, prefix))
    result.unet_key_prefix = [prefix]
    result.unet_config.pop("image_model", None)  # as huggingface_guess.guess leaves it
    result.huggingface_repo = os.path.abspath(configs)
    print(f"[freefuse-test] tiny Klein: {result.unet_config} with configs from {result.huggingface_repo}")
    return result


ZIMAGE_CONFIGS_ENV = "FREEFUSE_TEST_TINY_ZIMAGE_CONFIGS"
ZIMAGE_TEST_KEYS = ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")  # huggingface_guess's Lumina 2
ZIMAGE_DIMS = (2304, 3840)  # Lumina 2 and Z-Image: left to huggingface_guess as it is


def zimage_config_from_shapes(state_dict, prefix: str) -> dict:
    """What huggingface_guess's detection gives Z-Image at dim 3840 (detection.py, the Lumina 2 branch), at the
    checkpoint's own width: heads from the QK-norm's size, RoPE axes in Z-Image's 32/48/48 proportions."""
    from huggingface_guess import detection

    config = detection.detect_unet_config(state_dict, prefix)
    head_dim = state_dict[prefix + "layers.0.attention.k_norm.weight"].shape[0]
    heads = config["dim"] // head_dim
    config.update(
        n_heads=heads,
        n_kv_heads=(state_dict[prefix + "layers.0.attention.qkv.weight"].shape[0] // head_dim - heads) // 2,
        axes_dims=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8],
        axes_lens=[1536, 512, 512],
        rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0,
        z_image_modulation=True,
        time_scale=1000.0,
    )
    if prefix + "cap_pad_token" in state_dict:
        config["pad_tokens_multiple"] = 32
    return config


def tiny_zimage_guess(state_dict):
    """huggingface_guess takes a Lumina 2 / Z-Image transformer as Z-Image only at dim 3840. For one of another width
    (not Lumina 2's 2304), the guess is Z-Image with the config read off the tensors, pointed at the tiny pipeline
    configs in $FREEFUSE_TEST_TINY_ZIMAGE_CONFIGS (a folder named "z-image": Neo's LoRA key map). None for any other
    checkpoint."""
    configs = os.environ.get(ZIMAGE_CONFIGS_ENV)
    prefix = "model.diffusion_model."
    if not configs or any(prefix + key not in state_dict for key in ZIMAGE_TEST_KEYS):
        return None
    if state_dict[prefix + ZIMAGE_TEST_KEYS[0]].shape[0] in ZIMAGE_DIMS:
        return None
    from huggingface_guess import model_list

    result = model_list.ZImage(zimage_config_from_shapes(state_dict, prefix))
    result.unet_key_prefix = [prefix]
    result.unet_config.pop("image_model", None)  # as huggingface_guess.guess leaves it
    result.huggingface_repo = os.path.abspath(configs)
    print(f"[freefuse-test] tiny Z-Image: {result.unet_config} with configs from {result.huggingface_repo}")
    return result


def fit_qwen3(module, config: dict) -> None:
    """Neo builds a Qwen3 text encoder of a width it does not know with its Qwen3-0.6B class, whose fixed config it
    asserts the checkpoint's config against: that class's config becomes the tiny one (backend/nn/llm/llama.py)."""
    import dataclasses

    base = module.Qwen3_06BConfig
    fields = {f.name: config.get(f.name, f.default) for f in dataclasses.fields(base)}
    tiny = dataclasses.make_dataclass(
        "TinyQwen3Config", [(name, type(value), value) for name, value in fields.items()], bases=(base,)
    )
    tiny.head_dim = config.get("head_dim", base.head_dim)
    module.Qwen3_06BConfig = tiny
    import torch

    class NoAdapter(torch.nn.Module):
        """Anima's LLM adapter on the 0.6B class (fixed 1024-wide, 32128-token): Klein's engine never calls it."""

    module.LLMAdapter = NoAdapter


def tiny_qwen_image_hook():
    """tiny_qwen_image_hook.py beside this file (imported when a patch runs: this folder is then on sys.path)."""
    import tiny_qwen_image_hook

    return tiny_qwen_image_hook


QWEN3_CONFIGS_ENVS = (KLEIN_CONFIGS_ENV, ZIMAGE_CONFIGS_ENV)  # tiny Qwen3 text encoders, all of one config


def patch_llama(module):
    configs = next((os.environ[name] for name in QWEN3_CONFIGS_ENVS if os.environ.get(name)), None)
    if configs and os.path.isfile(os.path.join(configs, "text_encoder", "config.json")):
        import json

        with open(os.path.join(configs, "text_encoder", "config.json"), encoding="utf-8") as file:
            fit_qwen3(module, json.load(file))
    tiny_qwen_image_hook().fit_qwen25(module)  # Qwen-Image's Qwen2.5-VL (its own variable; nothing without it)


def patch_huggingface_guess(module):
    original = module.guess
    from tiny_chroma_hook import tiny_chroma_guess  # beside this file, on the webui's PYTHONPATH with it

    def guess(state_dict):
        tiny = tiny_sdxl_guess(state_dict) or tiny_klein_guess(state_dict) or tiny_zimage_guess(state_dict)
        tiny = tiny or tiny_chroma_guess(state_dict) or tiny_qwen_image_hook().tiny_qwen_image_guess(state_dict)
        if tiny is not None:
            return tiny
        result = original(state_dict)
        fit_tiny_flux(result, state_dict)
        return result

    guess.__wrapped__ = original
    module.guess = guess


def patch_launch_utils(module):
    original = module.repo_dir

    def repo_dir(name):
        path = original(name)
        stand_in = os.environ.get(ASSETS_ENV)
        if name == "stable-diffusion-webui-assets" and stand_in and not os.path.isdir(path):
            os.makedirs(stand_in, exist_ok=True)
            return stand_in
        return path

    repo_dir.__wrapped__ = original
    module.repo_dir = repo_dir


FAULT_ENV = "FREEFUSE_TEST_FAULT_FILE"


def injected_fault(stage: str) -> None:
    """Raise if the fault file (read now, at call time) names `stage`."""
    path = os.environ.get(FAULT_ENV)
    try:
        with open(path, encoding="utf-8") as file:
            wanted = file.read().strip()
    except (OSError, TypeError):
        return
    if wanted == stage:
        raise RuntimeError(f"injected fault: {stage}")


def patch_job(module):
    original = module.FreeFuseJob.store_attention

    def store_attention(self, q, k):
        injected_fault("capture")
        return original(self, q, k)

    module.FreeFuseJob.store_attention = store_attention


def patch_masks(module):
    original = module.slic_segments

    def slic_segments(*args, **kwargs):
        injected_fault("slic")
        return original(*args, **kwargs)

    module.slic_segments = slic_segments


def patch_lora(module):
    original = module.StackedLoRA.add_to

    def add_to(self, out, x, masks):
        if not bool((masks == 1).all()):  # the masks exist (before them, "joint" mode passes all ones)
            injected_fault("masks")
        return original(self, out, x, masks)

    module.StackedLoRA.add_to = add_to


def patch_hosts(module):
    """Stage "host": no known adapter owns the job's patcher, as in a Forge that FreeFuse does not know."""
    for adapter in module.KNOWN:
        original = adapter.owns

        def owns(self, unet, _original=original):
            try:
                injected_fault("host")
            except RuntimeError:
                return False
            return _original(self, unet)

        adapter.owns = owns


def patch_start(module):
    """Stage "start": the host's text engine is gone (a renamed attribute in a Forge release FreeFuse predates)."""
    original = module._subject_words

    def _subject_words(*args, **kwargs):
        try:
            injected_fault("start")
        except RuntimeError as error:
            raise AttributeError("'Flux' object has no attribute 'text_processing_engine_t5'") from error
        return original(*args, **kwargs)

    module._subject_words = _subject_words


TENSOR_LOG_ENV = "FREEFUSE_TEST_TENSOR_LOG"


def live_tensors() -> int:
    """The number of torch tensors (parameters included) that the garbage collector can reach now."""
    import gc

    import torch

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def patch_processing(module):
    """Append the count of live tensors to $FREEFUSE_TEST_TENSOR_LOG as each FreeFuse sampling call starts."""
    original = module.start_run

    def start_run(p, args, x):
        with open(os.environ[TENSOR_LOG_ENV], "a", encoding="utf-8") as log:
            log.write(f"{live_tensors()}\n")
        return original(p, args, x)

    module.start_run = start_run


PATCHES = {
    "huggingface_guess": patch_huggingface_guess,
    "modules.launch_utils": patch_launch_utils,
    "backend.nn.llm.llama": patch_llama,
}


def patch_processing_module(module):
    if os.environ.get(TENSOR_LOG_ENV):
        patch_processing(module)
    if os.environ.get(FAULT_ENV):
        patch_start(module)


if os.environ.get(TENSOR_LOG_ENV) or os.environ.get(FAULT_ENV):
    PATCHES["lib_freefuse.forge.processing"] = patch_processing_module
if os.environ.get(FAULT_ENV):
    PATCHES["lib_freefuse.forge.job"] = patch_job
    PATCHES["lib_freefuse.core.masks"] = patch_masks
    PATCHES["lib_freefuse.core.lora"] = patch_lora
    PATCHES["lib_freefuse.hosts"] = patch_hosts


class PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch; everything else is the real loader's."""

    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class PostImportPatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = PatchingLoader(spec.loader, patch)
        return spec


_ACTIVATING = (CONFIGS_ENV, ASSETS_ENV, FAULT_ENV, TENSOR_LOG_ENV)
if any(os.environ.get(name) for name in _ACTIVATING) and not any(
    isinstance(f, PostImportPatcher) for f in sys.meta_path
):
    sys.meta_path.insert(0, PostImportPatcher())


def exit_with_parent(poll_s: float = 1.0) -> None:
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(3)  # the parent is gone: no one will read this server's answers or stop it

    threading.Thread(target=watch, name="freefuse-test-exit-with-parent", daemon=True).start()


if os.environ.pop(EXIT_WITH_PARENT_ENV, None) == "1":  # popped: the webui's own children don't inherit it
    exit_with_parent()
