"""Where is Forge? Shared by the forge and webui tiers; each skips with a one-line reason when there is none."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# What Forge's backend needs in the Python that runs the forge tier (Forge's own venv has them).
BACKEND_MODULES = ("einops", "diffusers", "transformers", "safetensors", "psutil", "yaml", "PIL")


def is_forge_tree(path: Path) -> bool:
    return (path / "backend" / "nn" / "flux.py").is_file() and (path / "modules").is_dir()


def is_neo(path: Path) -> bool:
    """Forge Neo bundles ComfyUI's LoRA code, huggingface_guess, k_diffusion and gguf under modules_forge/packages;
    classic Forge has none of that folder."""
    return (Path(path) / "modules_forge" / "packages" / "comfy").is_dir()


def find_forge() -> tuple[Path | None, str]:
    """(Forge's root, "") or (None, why not): FORGE_DIR first, else the folder this extension sits in."""
    configured = os.environ.get("FORGE_DIR")
    if configured:
        path = Path(configured).expanduser().resolve()
        if is_forge_tree(path):
            return path, ""
        return None, f"FORGE_DIR={configured} is not a Forge checkout (no backend/nn/flux.py)"
    for parent in REPO_ROOT.parents:
        if parent.name == "extensions" and is_forge_tree(parent.parent):
            return parent.parent, ""
    return None, "no Forge found: set FORGE_DIR, or put this extension in <forge>/extensions/"


def missing_backend_modules() -> list[str]:
    return [name for name in BACKEND_MODULES if importlib.util.find_spec(name) is None]
