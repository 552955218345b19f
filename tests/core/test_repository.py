"""The project's foundations: CI runs the README's test command, install.py installs what is missing."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]


def readme_test_command() -> str:
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Running the tests", 1)[1]
    return re.search(r"```(?:bash|sh)?\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_test_command()
    ci_lines = [line.strip() for line in ROOT.joinpath(".ci/run").read_text().splitlines()]
    assert command in ci_lines


def test_pytest_markers_cover_the_three_tiers():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())
    markers = {m.split(":")[0] for m in config["tool"]["pytest"]["ini_options"]["markers"]}
    assert {"core", "forge", "webui"} <= markers
    assert config["project"]["requires-python"] == ">=3.10"


def load_installer(monkeypatch, installed: dict[str, str]):
    """install.py with a stand-in for Forge's `launch` module that records pip calls."""
    from importlib import metadata

    calls = []
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=lambda args, desc: calls.append(args)))

    def version(package):
        if package not in installed:
            raise metadata.PackageNotFoundError(package)
        return installed[package]

    monkeypatch.setattr(metadata, "version", version)
    spec = importlib.util.spec_from_file_location("freefuse_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, calls


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ({"scikit-image": "0.21.0"}, []),
        ({"scikit-image": "0.26.0rc1"}, []),
        ({"scikit-image": "0.19.3"}, ['install "scikit-image>=0.21"']),
        ({}, ['install "scikit-image>=0.21"']),
    ],
)
def test_install_py_installs_only_what_is_missing(monkeypatch, installed, expected):
    module, calls = load_installer(monkeypatch, installed)
    module.main()
    assert calls == expected
