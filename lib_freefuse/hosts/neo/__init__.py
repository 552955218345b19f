"""Forge Neo (Haoming02's sd-webui-forge-classic, branch neo): LoRAs kept as ComfyUI weight adapters in
`ModelPatcher.patches`, without their file names, and re-merged whenever `patches_uuid` changes (FORGE_NEO.md)."""

from __future__ import annotations

import os
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..base import Host, PatchEntry, SubjectPatches, read_entry


class ForgeNeo(Host):
    name = "Forge Neo"

    @staticmethod
    def matches() -> str | None:
        """None when the running Forge is Neo, else what it lacks."""
        from backend.patcher import base, lora

        if not hasattr(lora, "weight_adapter"):
            return "backend.patcher.lora.weight_adapter"
        if "online_mode" not in base.ModelPatcher.add_patches.__code__.co_varnames:
            return "ModelPatcher.add_patches(online_mode=...)"
        return None

    def owns(self, unet) -> bool:
        return isinstance(getattr(unet, "patches", None), dict) and hasattr(unet, "patches_uuid")

    def missing(self, unet) -> str | None:
        model = getattr(getattr(unet, "model", None), "diffusion_model", None)
        if type(unet).__name__ == "NunchakuPatcher" or isinstance(getattr(model, "loras", None), list):
            return "a Nunchaku model keeps its LoRAs inside the quantised layers, where no mask can reach them"
        return None

    def merged_lora(self, unet, filename: str) -> SubjectPatches | None:
        """The file's patches found in unet.patches: same key, offset and factor values (Neo keeps no file name).
        None unless every patch of the file is there (the LoRA extension applies a file whole or not at all).
        A file found before, unchanged on disk, whose adapters are still on the patcher is not read again."""
        if not unet.patches:
            return None
        stamp = _file_stamp(filename)
        found = _FOUND_BEFORE.find(stamp, unet.patches)
        if found is None:
            found = _match_file(unet, filename)
            if found is None:
                return None
            _FOUND_BEFORE.remember(stamp, found)
        entries = {key: [read_entry(raw) for raw in raws] for key, raws in found.items()}
        strength = next(iter(found.values()))[0][0]
        return SubjectPatches(entries, strength=float(strength), source=found)

    def load_lora(self, unet, filename: str, strength: float) -> SubjectPatches:
        """The file read as sd_forge_lora's load_lora_for_models reads it, its patches laid out as
        ModelPatcher.add_patches lays them out (a scratch patcher would reset the shared model's device)."""
        patches, unmatched = _read_lora_file(unet, filename)
        parameters = unet.model.state_dict()
        entries: dict[str, list[PatchEntry]] = {}
        skipped = []
        for patch_key, adapter in patches.items():
            key, offset = _key_and_offset(patch_key)
            if key not in parameters:
                skipped.append(str(patch_key))
                continue
            function = patch_key[2] if isinstance(patch_key, tuple) and len(patch_key) > 2 else None
            raw = (strength, adapter, 1.0, offset, function, False)
            entries.setdefault(key, []).append(read_entry(raw))
        return SubjectPatches(entries, unmatched=sorted(unmatched), skipped=sorted(skipped), strength=strength)

    def take_out(self, clone, taken: Sequence[SubjectPatches]) -> None:
        removed = {id(raw) for patches in taken for raws in (patches.source or {}).values() for raw in raws}
        if not removed:
            return
        for key in list(clone.patches):
            kept = [raw for raw in clone.patches[key] if id(raw) not in removed]
            if kept:
                clone.patches[key] = kept
            else:
                del clone.patches[key]
        clone.patches_uuid = uuid.uuid4()  # Neo re-merges the weights when this differs from the model's

    def base_weight(self, unet):
        from backend import utils

        def base_weight(key: str) -> torch.Tensor:
            saved = unet.backup.get(key)
            return dequantized(saved.weight if saved is not None else utils.get_attr(unet.model, key))

        return base_weight

    def reference_tokens(self, conditioning: dict, patch_size: int = 2) -> int:
        """FLUX.1 Kontext, FLUX.2 Klein editing: Neo's FLUX appends each reference latent's patches (2x2; Klein's
        1x1) after the image's tokens, taken from the call's `ref_latents` or else
        backend.args.dynamic_args.ref_latents (backend/nn/flux.py forward; process_img's (side + p // 2) // p)."""
        from backend.args import dynamic_args

        references = conditioning.get("ref_latents") or getattr(dynamic_args, "ref_latents", None) or []
        p = patch_size
        return sum(((r.shape[-2] + p // 2) // p) * ((r.shape[-1] + p // 2) // p) for r in references)

    def modulation_output(self, modulation, chunks):
        from backend.nn.flux import ModulationOut

        second = ModulationOut(*chunks[3:]) if getattr(modulation, "is_double", len(chunks) == 6) else None
        return ModulationOut(*chunks[:3]), second


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A parameter as plain numbers: GGUF and comfy-kitchen quantised tensors dequantised as Neo's merge reads them."""
    if getattr(weight, "gguf_cls", None) is not None:
        from backend.operations_gguf import dequantize_tensor

        return dequantize_tensor(weight)
    if hasattr(weight, "dequantize") and type(weight).__name__ == "QuantizedTensor":
        return weight.dequantize()
    return weight


def _file_stamp(filename: str) -> tuple | None:
    """(path, inode, size, modification and change times in ns) of a LoRA file, or None when it cannot be read."""
    try:
        info = os.stat(filename)
    except OSError:
        return None
    return os.path.abspath(os.fspath(filename)), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class _FoundFiles:
    """LoRA files matched on a patcher before: per file stamp, the adapters of its patches, held weakly (Forge
    drops them when the LoRA is unloaded, and nothing here keeps them). A later job finds the same adapter objects
    on its patcher by identity, without reading and comparing the file again (a FLUX LoRA is hundreds of MB)."""

    KEEP = 32  # files remembered, the least recently used dropped first

    def __init__(self):
        self._files: OrderedDict[tuple, dict[str, list[tuple[weakref.ref, object]]]] = OrderedDict()

    def remember(self, stamp, found: dict[str, list]) -> None:
        if stamp is None:
            return
        try:
            self._files[stamp] = {key: [(weakref.ref(raw[1]), raw[3]) for raw in raws] for key, raws in found.items()}
        except TypeError:  # an adapter that takes no weak reference: match by value every time
            return
        self._files.move_to_end(stamp)
        while len(self._files) > self.KEEP:
            self._files.popitem(last=False)

    def find(self, stamp, patches: dict) -> dict[str, list] | None:
        """{key: [raw patch tuples]} on `patches` holding the very adapters found before, or None."""
        known = self._files.get(stamp) if stamp is not None else None
        if known is None:
            return None
        found: dict[str, list] = {}
        for key, refs in known.items():
            raws = patches.get(key, ())
            for ref, offset in refs:
                adapter = ref()
                match = next((raw for raw in raws if raw[1] is adapter and _same(raw[3], offset)), None)
                if adapter is None or match is None:
                    return None
                found.setdefault(key, []).append(match)
        self._files.move_to_end(stamp)
        return found


_FOUND_BEFORE = _FoundFiles()


def _match_file(unet, filename: str) -> dict[str, list] | None:
    """{parameter key: [Neo's raw patch tuples]} of the file's patches on unet (matched by key, offset and factor
    values), or None unless every patch of the file is there."""
    patches, _ = _read_lora_file(unet, filename)
    parameters = unet.model.state_dict()
    found: dict[str, list] = {}
    used: set[int] = set()
    for patch_key, adapter in patches.items():
        key, offset = _key_and_offset(patch_key)
        if key not in parameters:
            continue  # add_patches skips it too
        match = next(
            (
                raw
                for raw in unet.patches.get(key, ())
                if id(raw) not in used and _same(raw[3], offset) and _same(raw[1], adapter)
            ),
            None,
        )
        if match is None:
            return None
        used.add(id(match))
        found.setdefault(key, []).append(match)
    if not found:
        return None
    return found


def _read_lora_file(unet, filename: str) -> tuple[dict, list]:
    """({patch key: adapter}, unmatched file keys): what networks.load_networks and load_lora_for_models read."""
    from backend.patcher.lora import load_lora, model_lora_keys_unet
    from backend.state_dict import state_dict_prefix_replace
    from backend.utils import load_torch_file

    state_dict = load_torch_file(os.fspath(filename), safe_load=True)
    if any(key.startswith("lora_unet__") for key in state_dict):
        state_dict = state_dict_prefix_replace(state_dict, {"lora_unet__": "lora_unet_"})
    key_map = model_lora_keys_unet(unet.model, {})  # a fresh dict: the default key_map={} is shared
    patches, unmatched = load_lora(state_dict, key_map)
    return patches, list(unmatched)


def _key_and_offset(patch_key) -> tuple[str, tuple | None]:
    if isinstance(patch_key, str):
        return patch_key, None
    return patch_key[0], None if patch_key[1] is None else tuple(patch_key[1])


def _same(a, b) -> bool:
    """Equal patch data: tensors by value (a merged copy may sit on another device), adapters by type and factors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        return a.dtype == b.dtype and torch.equal(a, b.to(a.device))
    if hasattr(a, "calculate_weight"):
        return type(a) is type(b) and _same(tuple(a.weights), tuple(b.weights))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
