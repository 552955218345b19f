"""The host adapters' pure parts, without Forge: reading each host's LoRA patch entries into PatchEntry, comparing
patch data, and naming an unknown host. Everything that needs a host's own classes is in the forge tier."""

from __future__ import annotations

import pytest
import torch

from lib_freefuse import hosts
from lib_freefuse.hosts.base import read_entry
from lib_freefuse.hosts.classic import read_entries
from lib_freefuse.hosts.neo import _same

read_neo_entry = read_entry  # one reader: Neo's entries add online_mode and hold weight adapters

pytestmark = pytest.mark.core


def lora_factors(rank=2, d_out=6, d_in=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)


class FakeAdapter:
    """The shape of a ComfyUI weight adapter as Neo stores it: a name, its factors, calculate_weight."""

    def __init__(self, name, weights):
        self.name, self.weights = name, weights

    def calculate_weight(self, *args, **kwargs):
        raise NotImplementedError


def test_classic_plain_lora_is_low_rank_and_additive():
    up, down = lora_factors()
    entry = read_entry([0.8, ("lora", (up, down, 2.0, None, None)), 1.0, (0, 6, 6), None])
    assert entry.kind == "lora" and entry.low_rank[0] is up and entry.low_rank[2] == 2.0
    assert entry.offset == (0, 6, 6) and entry.additive and not entry.dora and not entry.mid


@pytest.mark.parametrize(
    "value, kind, dora, mid",
    [
        (("lora", "dora"), "lora", True, False),
        (("lora", "mid"), "lora", False, True),
        (("loha", (1, 2, 3, 4, 5, 6, 7, None)), "loha", False, False),
        (("lokr", (1, 2, 3, 4, 5, 6, 7, 8, torch.ones(1))), "lokr", True, False),
        ((torch.ones(2, 2),), "diff", False, False),
        ([(torch.ones(2, 2), None)], "nested", False, False),
    ],
)
def test_classic_other_kinds_need_the_merge(value, kind, dora, mid):
    up, down = lora_factors()
    if value == ("lora", "dora"):
        value = ("lora", (up, down, 1.0, None, torch.ones(6, 1)))
    elif value == ("lora", "mid"):
        value = ("lora", (up, down, 1.0, torch.ones(2, 2, 1, 1), None))
    entry = read_entry([1.0, value, 1.0, None, None])
    assert (entry.kind, entry.dora, entry.mid, entry.low_rank) == (kind, dora, mid, None)
    assert entry.additive == (kind in ("lora", "loha", "lokr", "diff", "nested") and not dora)


def test_classic_strength_model_is_not_additive_and_bad_entries_are_named():
    up, down = lora_factors()
    assert not read_entry([1.0, ("lora", (up, down, 1.0, None, None)), 0.5, None, None]).additive
    with pytest.raises(ValueError, match="lora_patches value"):
        read_entries("diffusion_model.x.weight", ("lora", ()))


def test_neo_adapters_are_read_like_classic_entries():
    up, down = lora_factors()
    plain = read_neo_entry((0.7, FakeAdapter("lora", (up, down, 2.0, None, None, None)), 1.0, None, None, False))
    assert plain.kind == "lora" and plain.low_rank == (up, down, 2.0) and plain.strength == 0.7 and plain.additive
    reshaped = read_neo_entry((1.0, FakeAdapter("lora", (up, down, 2.0, None, None, [6, 4])), 1.0, None, None, False))
    assert reshaped.low_rank is None  # a reshape needs the host's merge
    dora = read_neo_entry((1.0, FakeAdapter("lora", (up, down, 2.0, None, torch.ones(6, 1), None)), 1.0, None, None, 0))
    assert dora.dora and not dora.additive
    loha = read_neo_entry((1.0, FakeAdapter("loha", (1, 2, 3, 4, 5, 6, 7, None)), 1.0, None, None, False))
    assert loha.kind == "loha" and not loha.dora and loha.additive
    oft = read_neo_entry((1.0, FakeAdapter("oft", (1, 2, 3, None)), 1.0, None, None, False))
    assert oft.kind == "oft" and not oft.additive  # multiplicative: merged with its base, never summed
    diff = read_neo_entry((1.0, ("diff", (torch.ones(6, 4),)), 1.0, None, None, False))
    assert diff.kind == "diff" and diff.raw[1][0] == "diff"


def test_neo_patch_data_compare_by_value():
    up, down = lora_factors()
    a = FakeAdapter("lora", (up, down, 2.0, None, None, None))
    assert _same(a, FakeAdapter("lora", (up.clone(), down.clone(), 2.0, None, None, None)))
    assert not _same(a, FakeAdapter("lora", (up + 1e-3, down, 2.0, None, None, None)))
    assert not _same(a, FakeAdapter("lora", (up, down, 1.0, None, None, None)))
    assert not _same(a, ("diff", (up,)))
    assert _same((0, 4, 2), (0, 4, 2)) and not _same((0, 4, 2), None)


def test_an_unknown_host_is_named_with_what_each_adapter_misses():
    """Without any Forge on the path no adapter matches: the message names both hosts and what they lack."""
    with pytest.raises(hosts.HostUnsupported, match="not one FreeFuse knows") as raised:
        hosts.detect()
    assert "classic Forge" in str(raised.value) and "Forge Neo" in str(raised.value)

    class Patcher:
        model = None

    with pytest.raises(hosts.HostUnsupported, match=r"patcher \(Patcher\) keeps its LoRAs in a way"):
        hosts.for_unet(Patcher())
