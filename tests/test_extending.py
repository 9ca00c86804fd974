"""A kind registered outside the package works like a built-in one: the surgery takes the
convolutions its spec names, and training counts its modules as new."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon.kinds import KINDS, KindSpec, Param, register
from attnsurgeon.layers import is_new
from attnsurgeon.layers._conv import replace_conv
from attnsurgeon.training import new_modules


class Gate(nn.Module):
    """A per-channel gate, defined here: outside attnsurgeon.layers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def build_gate(channels: int, *, init: str) -> Gate:
    return Gate(channels)


class ScaledConv(nn.Conv2d):
    def preserve_(self, conv: nn.Conv2d) -> None:
        with torch.no_grad():
            self.weight.copy_(conv.weight)


def build_scaled(conv: nn.Conv2d, norm: nn.Module | None, *, act: nn.Module | None, init: str,
                 which: str = "all") -> tuple[nn.Module, None]:
    return replace_conv(conv, ScaledConv, kind="scaled", init=init, preserve=lambda new: new.preserve_(conv)), None


@pytest.fixture
def outside_kinds() -> Iterator[None]:
    specs = [
        KindSpec(name="test-gate", title="gate", paper="none", mode="insert", builder=f"{__name__}:build_gate",
                 default_position="standard"),
        KindSpec(name="test-scaled", title="scaled conv", paper="none", mode="replace",
                 builder=f"{__name__}:build_scaled", convs_param="which",
                 params=(Param("which", str, "all", "which convs", choices=("main", "spatial", "all")),)),
    ]
    for spec in specs:
        register(spec)
    try:
        yield
    finally:
        for spec in specs:
            KINDS.pop(spec.name)


@pytest.mark.parametrize("which, convs", [("main", 8), ("spatial", 16), ("all", 19)])
def test_replace_kind_takes_the_convs_its_spec_names(outside_kinds, which, convs):
    model = torchvision.models.resnet18()
    changes = attnsurgeon.apply(model, "test-scaled", params={"which": which})
    # resnet18: 8 blocks of two 3x3 convs (conv1 is the main one), 3 downsample 1x1 convs
    assert len(changes) == convs
    assert {c.where for c in changes} == {"main": {"conv1"}, "spatial": {"conv1", "conv2"},
                                          "all": {"conv1", "conv2", "downsample.0"}}[which]
    assert {n for n, _ in new_modules(model)} == {c.path for c in changes}


def test_modules_of_a_builder_outside_the_package_are_new(outside_kinds):
    model = torchvision.models.resnet18()
    changes = attnsurgeon.apply(model, "test-gate", layers="layer4")
    assert [type(m).__name__ for _, m in new_modules(model)] == ["Gate", "Gate"]
    assert {n for n, _ in new_modules(model)} == {c.path for c in changes}
    groups = attnsurgeon.param_groups(model, lr=0.1, new_lr=1.0)
    assert [g["name"] for g in groups] == ["original", "new"] and len(groups[1]["params"]) == 2
    # a module of attnsurgeon.layers built by hand was not added by a surgery
    from attnsurgeon.layers.squeeze_excite import SqueezeExcite

    assert not is_new(SqueezeExcite(64))


def test_register_refuses_a_replace_kind_without_convs():
    spec = KindSpec(name="test-bad", title="", paper="", mode="replace", builder="x:y")
    with pytest.raises(ValueError, match="needs convs"):
        register(spec)
    bad_param = KindSpec(name="test-bad", title="", paper="", mode="replace", builder="x:y", convs_param="k",
                         params=(Param("k", int, 3, "", choices=(3, 5)),))
    with pytest.raises(ValueError, match="convs_param 'k'"):
        register(bad_param)
    assert "test-bad" not in KINDS
