"""Run by Forge at launch: install what FreeFuse needs and the host lacks. Idempotent."""

from __future__ import annotations

from importlib import metadata

# torch, numpy and safetensors come with every Forge; scikit-image gives SLIC (paper Eq. 11).
REQUIREMENTS = {"scikit-image": "0.21"}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def missing_requirements(requirements: dict[str, str] = REQUIREMENTS) -> list[str]:
    """pip specifiers of the requirements that are absent or older than their minimum."""
    missing = []
    for package, minimum in requirements.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or _version_tuple(installed) < _version_tuple(minimum):
            missing.append(f"{package}>={minimum}")
    return missing


def main() -> None:
    import launch  # Forge's own module: only importable inside the webui

    for requirement in missing_requirements():
        launch.run_pip(f'install "{requirement}"', f"FreeFuse requirement: {requirement}")


if __name__ == "__main__":
    main()
