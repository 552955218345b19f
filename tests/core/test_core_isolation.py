"""The core never imports Forge, the webui or gradio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = ("modules", "backend", "gradio", "ldm_patched", "packages_3rdparty", "launch", "lib_freefuse.forge")

PROBE = f"""
import importlib.abc, sys
FORBIDDEN = {FORBIDDEN!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError("the core imported " + name)
sys.meta_path.insert(0, Refuse())
import lib_freefuse.core, pkgutil, importlib
for info in pkgutil.walk_packages(lib_freefuse.core.__path__, "lib_freefuse.core."):
    importlib.import_module(info.name)
leaked = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
assert not leaked, leaked
print("ok")
"""


def test_core_imports_no_host_module():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
