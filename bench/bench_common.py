"""What the bench scripts share: which lib_freefuse they import."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lib_root(argv: list[str]) -> str:
    """--lib-root PATH imports lib_freefuse from PATH (a prototype copy) instead of this checkout."""
    for i, arg in enumerate(argv):
        if arg == "--lib-root" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--lib-root="):
            return arg.split("=", 1)[1]
    return str(REPO)
