"""Tier selection: the forge and webui tiers run only where Forge is found, and skip with one reason otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forge_locator import find_forge, missing_backend_modules

TIER_DIRS = {"forge": "forge", "webui": "webui"}


def forge_tier_skip_reason() -> str:
    root, why = find_forge()
    if root is None:
        return why
    missing = missing_backend_modules()
    if missing:
        return (
            f"Forge at {root}, but this Python lacks its backend's modules: {', '.join(missing)} (use Forge's Python)"
        )
    return ""


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    reasons = {"forge": forge_tier_skip_reason(), "webui": find_forge()[1]}
    for item in items:
        path = Path(str(item.fspath)).resolve()
        for tier, folder in TIER_DIRS.items():
            if (here / folder) in path.parents:
                item.add_marker(getattr(pytest.mark, tier))
                if reasons[tier]:
                    item.add_marker(pytest.mark.skip(reason=reasons[tier]))
