"""Fine-tuning helpers: parameter groups and freezing split new from original parameters."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon.checkpoint import save
from attnsurgeon.training import new_modules

from _every_kind import every_kind_model, every_kind_recipe, kind_cases

CASES = kind_cases()
IDS = [f"{k}-{p}" if p else k for k, p in CASES]


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def _expected_new(model: nn.Module, paths: set[str]) -> set[str]:
    """Parameter names under the modules the surgery reported."""
    return {n for n, _ in model.named_parameters() if any(n.startswith(path + ".") for path in paths)}


def _check_partition(model: nn.Module, paths: set[str]) -> None:
    groups = attnsurgeon.param_groups(model, lr=0.01, new_lr=0.1, weight_decay=1e-4, new_weight_decay=0.0)
    assert [g["name"] for g in groups] == ["original", "new"]
    original, new = groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each parameter exactly once
    assert _names(model, new["params"]) == _expected_new(model, paths)
    assert (original["lr"], original["weight_decay"], new["lr"], new["weight_decay"]) == (0.01, 1e-4, 0.1, 0.0)
    assert {n for n, _ in new_modules(model)} == paths


@pytest.mark.parametrize("kind, position", CASES, ids=IDS)
def test_param_groups_partition_the_parameters(kind, position):
    model = torchvision.models.resnet18(num_classes=10)
    plain = {n for n, _ in model.named_parameters()}
    changes = attnsurgeon.apply(model, kind, position=position)
    reported = {c.path for c in changes}
    if not _expected_new(model, reported):  # parameter-free at --init paper (simam): one group
        assert [g["name"] for g in attnsurgeon.param_groups(model, lr=0.1)] == ["original"]
        assert {n for n, _ in new_modules(model)} == reported
        model = torchvision.models.resnet18(num_classes=10)  # its preserve form has parameters
        reported = {c.path for c in attnsurgeon.apply(model, kind, position=position, init="preserve")}
    _check_partition(model, reported)
    # the original group is the unmodified model's parameters, minus what was replaced
    original = _names(model, attnsurgeon.param_groups(model, lr=0.1)[0]["params"])
    assert original <= plain
    for name in plain - original:
        assert any(name.startswith(path.rpartition(".")[0] + ".") for path in reported), name


def test_param_groups_and_freezing_on_applied_and_loaded_models(tmp_path):
    model, changes = every_kind_model()
    paths = {c.path for c in changes}
    _check_partition(model, paths)
    path = tmp_path / "every.pt"
    save(path, model, model_name="resnet18", model_kwargs={"num_classes": 10}, recipe=every_kind_recipe())
    loaded = attnsurgeon.load(path)
    _check_partition(loaded, paths)
    for m in (model, loaded):
        new = _expected_new(m, paths)
        frozen = attnsurgeon.freeze_original(m)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == new and frozen == len(list(m.parameters())) - len(new)
        x = torch.randn(2, 3, 32, 32)
        m.train()
        m(x).sum().backward()
        assert all(p.grad is None for n, p in m.named_parameters() if n not in new)
        assert attnsurgeon.unfreeze(m) == len(list(m.parameters()))
        assert all(p.requires_grad for p in m.parameters())


def test_sk_and_dynconv_count_as_new_whole():
    model, changes = every_kind_model()
    names = dict(new_modules(model))
    sk = next(c.path for c in changes if c.attn == "sk")
    dyn = next(c.path for c in changes if c.attn == "dynconv")
    assert sk in names and f"{sk}.paths.0.conv" not in names  # path 1 (the old conv's copy) is inside
    new = _names(model, attnsurgeon.param_groups(model, lr=0.1, new_lr=1.0)[1]["params"])
    assert f"{sk}.paths.0.conv.weight" in new and f"{dyn}.weight" in new


def test_optimizer_accepts_the_groups_and_a_model_without_surgery_gives_one():
    model, _ = every_kind_model()
    optimizer = torch.optim.SGD(attnsurgeon.param_groups(model, lr=0.01, new_lr=0.1), lr=0.5, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.1]
    plain = torchvision.models.resnet18()
    assert [g["name"] for g in attnsurgeon.param_groups(plain, lr=0.1)] == ["original"]
    assert new_modules(plain) == []
    with pytest.raises(ValueError, match="got -1"):
        attnsurgeon.param_groups(plain, lr=0.1, new_lr=-1)
