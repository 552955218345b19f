"""Forge's own FLUX engine in this process (text encoders, VAE, UnetPatcher), loaded from an all-in-one checkpoint.

Run with the Python of a Forge webui install (gradio included: Forge's text engines read the webui's options).
The tiny checkpoints here are not 12B-shaped, so the webui tier's test-only hook (tests/webui/webui_hook) reads the
transformer config off the tensors and points the loader at the tiny CLIP/T5/VAE configs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "tests" / "webui" / "webui_hook"
TINY_MODELS = ROOT / "tests" / "webui"


def tiny_models():
    """tests/webui/tiny_models.py: the tiny CLIP/T5/VAE configs shared with the webui tier."""
    if str(TINY_MODELS) not in sys.path:
        sys.path.insert(0, str(TINY_MODELS))
    import tiny_models

    return tiny_models


def load_engine(forge_root: Path, configs: Path, checkpoint: Path):
    """Forge's diffusion engine for `checkpoint`, as the webui would load it on the CPU."""
    os.environ["FREEFUSE_TEST_TINY_FLUX_CONFIGS"] = str(configs)
    if str(HOOK) not in sys.path:
        sys.path.insert(0, str(HOOK))
    import sitecustomize  # noqa: F401 - the test hook patches huggingface_guess when it is imported

    forge_root = Path(forge_root).resolve()
    for path in (forge_root, forge_root / "packages_3rdparty", forge_root / "repositories" / "huggingface_guess"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = ["webui.py", "--always-cpu", "--skip-prepare-environment", "--skip-install", "--attention-pytorch"]
    os.chdir(forge_root)
    try:
        import modules.shared
        from modules import shared_init

        if modules.shared.opts is None:
            shared_init.initialize()
        from backend.loader import forge_loader

        return forge_loader(str(checkpoint))
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
