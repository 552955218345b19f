"""Benchmark-only seam in the toy world's webui (never part of the extension): mask dumps and oracle masks.

The benchmark puts this folder first on the webui's PYTHONPATH, so Python imports this file at start-up. It
loads the webui tier's hook (tests/webui/webui_hook/sitecustomize.py: Forge's loader takes the tiny FLUX) and adds
one post-import patch, to `lib_freefuse.forge.job.extract_masks`:

- $FREEFUSE_TOY_DUMP_DIR: each mask extraction's (L, h, w) result is saved there as NNNNNN.pt with the subjects'
  token positions, so the benchmark can score masks against the true regions.
- $FREEFUSE_TOY_ORACLE_FILE: while that file exists, the masks are the true regions instead: the subject whose
  words come first in the prompt owns the left half of the token grid, the other the right half (every benchmark
  prompt reads "A on the left and B on the right"). A file that reads "figures" gives each subject only the figure
  tokens of its half (read from the capture's x0), the grey background nobody's; one that reads a mode of
  world.MIXED_ORACLES keeps the extracted masks and puts the figure tokens (or the others) right.
- $FREEFUSE_TOY_KEEP_INPUTS (with the dump): each record also keeps the extraction's inputs (q, k, grid, x0 image,
  mask config), for experiments on the mask pipeline itself (bench/toyworld/mask_signals.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from pathlib import Path

HOOK = Path(__file__).resolve().parents[3] / "tests" / "webui" / "webui_hook" / "sitecustomize.py"
DUMP_ENV = "FREEFUSE_TOY_DUMP_DIR"
KEEP_ENV = "FREEFUSE_TOY_KEEP_INPUTS"
ORACLE_ENV = "FREEFUSE_TOY_ORACLE_FILE"

sys.path.insert(0, str(HOOK.parent))  # the hook's own modules beside it (tiny_chroma_hook.py, ...)
_spec = importlib.util.spec_from_file_location("freefuse_webui_hook", HOOK)
hook = importlib.util.module_from_spec(_spec)
sys.modules["freefuse_webui_hook"] = hook
_spec.loader.exec_module(hook)


def oracle_masks(subject_tokens, grid_hw, device):
    """(L, h, w): the first-mentioned subject gets the left half, the next the right half, any others nothing."""
    import torch

    h, w = grid_hw
    order = sorted(range(len(subject_tokens)), key=lambda i: min(subject_tokens[i], default=10**9))
    masks = torch.zeros(len(subject_tokens), h, w, device=device)
    masks[order[0], :, : w // 2] = 1
    if len(order) > 1:
        masks[order[1], :, w // 2 :] = 1
    return masks


def world_module():
    """bench/toyworld/world.py."""
    folder = str(Path(__file__).resolve().parents[1])
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import world

    return world


def figure_tokens(image, grid_hw, device):
    """(h, w) float: 1 on the tokens of the x0 image (H_px, W_px, 3) in [0, 1] that are mostly not the grey
    background (world.figure_tokens, the toy world's own rule)."""
    import numpy as np
    import torch

    tokens = world_module().figure_tokens(np.asarray(image, np.float32), tuple(grid_hw))
    return torch.from_numpy(tokens).to(device=device, dtype=torch.float32)


def patch_job(module):
    import torch

    original = module.extract_masks
    counter = itertools.count()

    def extract_masks(q, k, subject_tokens, grid_hw, image=None, config=None, *args, **kwargs):  # the job's call
        oracle = os.environ.get(ORACLE_ENV)
        if oracle and os.path.exists(oracle):
            mode = Path(oracle).read_text().strip()
            masks = oracle_masks(subject_tokens, grid_hw, q.device)
            if mode == "figures":
                masks = masks * figure_tokens(image, grid_hw, q.device)
            elif mode != "on":  # world.MIXED_ORACLES: the extraction with one part put right
                extracted = original(q, k, subject_tokens, grid_hw, image, config, *args, **kwargs)
                masks = world_module().mixed_masks(extracted, masks, figure_tokens(image, grid_hw, q.device), mode)
        else:
            masks = original(q, k, subject_tokens, grid_hw, image, config, *args, **kwargs)
        dump = os.environ.get(DUMP_ENV)
        if dump and os.path.isdir(dump):
            record = {"masks": masks.detach().cpu(), "subject_tokens": [list(map(int, t)) for t in subject_tokens]}
            if os.environ.get(KEEP_ENV):
                record.update(q=q.detach().cpu().clone(), k=k.detach().cpu().clone(), grid=tuple(grid_hw),
                              image=image, config=config)  # fmt: skip
            torch.save(record, os.path.join(dump, f"{next(counter):06d}.pt"))
        return masks

    extract_masks.__wrapped__ = original
    module.extract_masks = extract_masks


hook.PATCHES["lib_freefuse.forge.job"] = patch_job
