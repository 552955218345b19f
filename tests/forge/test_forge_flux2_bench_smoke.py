"""bench_forge_flux2.py runs at its --smoke size through Forge Neo's backend on the CPU: FreeFuse captured once,
made masks, and the ratio line is printed with its spread. Classic Forge has no FLUX.2: skipped there."""

from __future__ import annotations

import pytest
from test_forge_chroma_bench_smoke import check_neo_bench_smoke


def test_forge_flux2_bench_smoke(forge, forge_root):
    if forge.HOST != "neo":
        pytest.skip("classic Forge has no FLUX.2 (Forge Neo's backend/nn/flux.py global_modulation)")
    check_neo_bench_smoke(forge_root, "bench_forge_flux2.py", "model: FLUX.2 Klein, hidden 256")
