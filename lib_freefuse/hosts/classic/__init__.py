"""Classic Forge (lllyasviel/stable-diffusion-webui-forge, frozen at dfdcbab6): LoRAs kept per file in
`UnetPatcher.lora_patches`, merged by its `LoraLoader` (FORGE.md "LoRA")."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..base import Host, PatchEntry, SubjectPatches, read_entry


class ClassicForge(Host):
    name = "classic Forge"

    @staticmethod
    def matches() -> str | None:
        """None when the running Forge is classic, else what it lacks."""
        from backend.patcher import lora

        return None if hasattr(lora, "LoraLoader") else "backend.patcher.lora.LoraLoader"

    def owns(self, unet) -> bool:
        return isinstance(getattr(unet, "lora_patches", None), dict)

    def missing(self, unet) -> str | None:
        return None if hasattr(getattr(unet, "model", None), "lora_loader") else "no LoraLoader on the model"

    def merged_lora(self, unet, filename: str) -> SubjectPatches | None:
        keys = [key for key in unet.lora_patches if key[0] == filename]
        if not keys:
            return None
        entries: dict[str, list[PatchEntry]] = {}
        for key in keys:
            for param, raw_entries in unet.lora_patches[key].items():
                entries.setdefault(param, []).extend(read_entries(param, raw_entries))
        return SubjectPatches(entries, strength=float(keys[0][1]), source=keys)

    def load_lora(self, unet, filename: str, strength: float) -> SubjectPatches:
        """What sd_forge_lora's load_lora_for_models does for the unet (load_torch_file, model_lora_keys_unet,
        load_lora, add_patches), on a scratch patcher. Keys that matched nothing (a text-encoder part too) are in
        `.unmatched`."""
        from backend.patcher.base import ModelPatcher
        from backend.patcher.lora import load_lora, model_lora_keys_unet
        from backend.utils import load_torch_file

        filename = os.fspath(filename)
        state_dict = load_torch_file(filename, safe_load=True)
        key_map = model_lora_keys_unet(unet.model, {})  # a fresh dict: Forge's default key_map={} is shared
        lora_unet, unmatched = load_lora(state_dict, key_map)
        scratch = ModelPatcher(unet.model, unet.load_device, unet.offload_device, size=unet.size)
        scratch.lora_patches = {}
        loaded = scratch.add_patches(filename=filename, patches=lora_unet, strength_patch=strength)
        skipped = sorted(str(key) for key in lora_unet if key not in loaded)
        (raw,) = scratch.lora_patches.values()
        entries = {param: read_entries(param, raw_entries) for param, raw_entries in raw.items()}
        return SubjectPatches(entries, unmatched=sorted(unmatched), skipped=skipped, strength=strength)

    def take_out(self, clone, taken: Sequence[SubjectPatches]) -> None:
        keys = {key for patches in taken for key in patches.source or ()}
        clone.lora_patches = {key: value for key, value in clone.lora_patches.items() if key not in keys}

    def base_weight(self, unet):
        from backend import utils

        backup = getattr(getattr(unet.model, "lora_loader", None), "backup", {}) or {}

        def base_weight(key: str) -> torch.Tensor:
            saved = backup.get(key)
            return dequantized(saved if saved is not None else utils.get_attr(unet.model, key))

        return base_weight

    def modulation_output(self, modulation, chunks):
        return tuple(chunks)  # classic FLUX's Modulation returns its chunks

    def merge(self, entries, weight, key):
        from backend.patcher.lora import merge_lora_to_weight

        return merge_lora_to_weight([list(e.raw) for e in entries], weight, key, computation_dtype=torch.float32)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A parameter as plain numbers: GGUF and bitsandbytes 4-bit dequantised as classic Forge's LoRA merge does."""
    if getattr(weight, "gguf_cls", None) is not None:
        from backend.operations_gguf import dequantize_tensor

        return dequantize_tensor(weight)
    if hasattr(weight, "bnb_quantized"):
        from backend.operations_bnb import functional_dequantize_4bit

        return functional_dequantize_4bit(weight)
    return weight


def read_entries(key: str, raw_entries) -> list[PatchEntry]:
    """Classic patch entries [[strength_patch, (type, data), strength_model, offset, fn], ...] as PatchEntry."""
    if not isinstance(raw_entries, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) >= 5 for e in raw_entries
    ):
        raise ValueError(
            f"{key}: expected a list of [strength_patch, (type, data), strength_model, offset, fn] entries "
            f"(one UnetPatcher.lora_patches value), got {raw_entries!r:.120}"
        )
    return [read_entry(list(e[:5])) for e in raw_entries]
