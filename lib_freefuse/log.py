"""FreeFuse's one named logger; its level comes from the `--freefuse-log-level` flag (preload.py)."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("FreeFuse")


def configure(level: str = "INFO") -> None:
    """Print FreeFuse's messages on the console at `level` (once, however often the scripts are reloaded)."""
    logger.setLevel(level.upper())
    if not any(getattr(h, "freefuse", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.freefuse = True
        logger.addHandler(handler)
        logger.propagate = False
