"""Surgery: recipe rules x residual blocks -> a modified model and the list of changes.

This is the one place that edits a model. Insert kinds fill a slot of a block (the block
becomes slotted first); replace kinds swap a convolution, and possibly the norm after
it, through :func:`replace_module`, which checks that the old module is what it should be.
Every original parameter and buffer keeps its name and value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import SLOT_ATTR, BlockInfo, ConvSite, find_blocks, find_head, make_slotted
from .errors import UsageError
from .kinds import HEAD_BUILDERS, builder, get_kind
from .recipe import Recipe, Rule, load_recipe, make_rule
from .select import select_blocks

__all__ = ["Change", "apply", "apply_recipe", "replace_module"]


@dataclass(frozen=True)
class Change:
    """One module the surgery added or replaced."""

    rule: int  # 1-based rule number; 0 for the head
    attn: str
    block: str  # "layer3.1", or the head's pool
    stage: str
    where: str  # slot ("standard") or replaced conv ("conv2")
    path: str  # full dotted path of the new module
    module: str  # its class name
    params: int  # parameters of the new module
    replaced_params: int  # parameters of what it replaced (0 for slots)

    @property
    def params_added(self) -> int:
        return self.params - self.replaced_params

    def to_data(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "attn": self.attn, "block": self.block, "stage": self.stage,
            "where": self.where, "path": self.path, "module": self.module,
            "params": self.params, "params_added": self.params_added,
        }


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def replace_module(root: nn.Module, path: str, new: nn.Module, *, expect: type | tuple[type, ...]) -> nn.Module:
    """Replace ``root``'s submodule at dotted ``path`` by ``new``; return the old one.

    Raises:
        AttributeError: if the path does not exist (``get_submodule``).
        TypeError: if the old module is not an ``expect``; surgery never guesses.
    """
    old = root.get_submodule(path)
    if not isinstance(old, expect):
        raise TypeError(f"expected {expect} at {path!r}, found {type(old).__name__}")
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
    return old


def _like(new: nn.Module, ref: nn.Module) -> nn.Module:
    """Put ``new`` on the device/dtype and in the train/eval mode of ``ref``."""
    p = next(ref.parameters(), None)
    if p is not None:
        new = new.to(device=p.device, dtype=p.dtype)
    return new.train(ref.training)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _targets(attn: str, params: Mapping[str, Any], info: BlockInfo) -> list[ConvSite]:
    if attn == "sk":
        return [c for c in info.convs if c.main]
    if params.get("target") == "all":
        return list(info.convs)
    return [c for c in info.convs if c.spatial]


def apply_recipe(model: nn.Module, recipe: Recipe) -> list[Change]:
    """Apply ``recipe``'s head and rules to ``model`` in place; return what changed.

    Raises:
        UsageError: the model has no supported blocks, a rule selects nothing, or two rules
            claim the same slot or convolution (checked before the model is changed).
    """
    blocks = find_blocks(model)
    if recipe.rules and not blocks:
        raise UsageError(
            f"{recipe.model or type(model).__name__}: found no supported residual blocks "
            "(supported so far: the ResNet family: resnet*, resnext*, wide_resnet*)"
        )
    names = [(info.name, info.stage) for info, _ in blocks]
    plan = _plan(recipe, blocks, select=lambda n, rule: select_blocks(
        rule.layers, names,
        where="--layers" if recipe.source == "command line" else f"{recipe.source}: rule {n}: layers"))
    changes: list[Change] = []
    with _seeded(recipe.seed):
        for n, rule, info, block, where in plan:
            kind = get_kind(rule.attn)
            build = builder(kind)
            params = rule.param_dict
            if kind.mode == "insert":
                block = make_slotted(block)
                new = _like(build(info.slot_channels(where), init=recipe.init, **params), block)
                setattr(block, SLOT_ATTR[where], new)
                changes.append(Change(n, rule.attn, info.name, info.stage, where,
                                      f"{info.name}.{SLOT_ATTR[where]}", type(new).__name__, _count(new), 0))
                continue
            site = next(c for c in info.convs if c.conv == where)
            conv = block.get_submodule(site.conv)
            norm = block.get_submodule(site.norm) if site.norm else None
            new_conv, new_norm = build(conv, norm, init=recipe.init, **params)
            replaced = _count(replace_module(block, site.conv, _like(new_conv, conv), expect=nn.Conv2d))
            if new_norm is not None and site.norm is not None:
                replaced += _count(replace_module(block, site.norm, _like(new_norm, conv), expect=nn.BatchNorm2d))
            changes.append(Change(n, rule.attn, info.name, info.stage, site.conv, f"{info.name}.{site.conv}",
                                  type(new_conv).__name__, _count(new_conv) + _count(new_norm), replaced))
        if recipe.head is not None:
            changes.append(_apply_head(model, recipe.head, init=recipe.init))
    return changes


def _plan(
    recipe: Recipe,
    blocks: list[tuple[BlockInfo, nn.Module]],
    *,
    select: Callable[[int, Rule], list[int]],
) -> list[tuple[int, Rule, BlockInfo, nn.Module, str]]:
    """Every (rule number, rule, block, slot or conv) the recipe asks for, checked before
    anything is changed: a selection that names nothing, two rules claiming one slot or
    conv, or a slot/conv an earlier surgery already changed is an error, and the model is
    left untouched."""
    plan = []
    claimed: dict[str, int] = {}
    for n, rule in enumerate(recipe.rules, start=1):
        kind = get_kind(rule.attn)
        chosen = select(n, rule)
        label = ("options" if recipe.source == "command line" else f"{recipe.source}: rule {n}") \
            + f": layers {rule.layers!r}"
        for i in chosen:
            info, block = blocks[i]
            if kind.mode == "insert":
                position = rule.position or kind.default_position  # resolved by make_rule
                _claim(claimed, f"{info.name}.{SLOT_ATTR[position]}", n, label,
                       f"the {position} slot of {info.name}")
                held = getattr(block, SLOT_ATTR[position], None)
                if held is not None and not isinstance(held, nn.Identity):
                    raise UsageError(f"{label}: the {position} slot of {info.name} already "
                                     f"holds a {type(held).__name__} (from an earlier surgery)")
                plan.append((n, rule, info, block, position))
                continue
            for site in _targets(rule.attn, rule.param_dict, info):
                path = f"{info.name}.{site.conv}"
                _claim(claimed, path, n, label, path)
                conv = block.get_submodule(site.conv)
                if type(conv) is not nn.Conv2d:
                    raise UsageError(f"{label}: {path} is already a {type(conv).__name__} "
                                     "(from an earlier surgery)")
                plan.append((n, rule, info, block, site.conv))
    return plan


def _claim(claimed: dict[str, int], path: str, rule: int, label: str, what: str) -> None:
    if path in claimed:
        raise UsageError(f"{label}: {what} is already taken by rule {claimed[path]}")
    claimed[path] = rule


def _apply_head(model: nn.Module, head: str, *, init: str) -> Change:
    info = find_head(model)
    if info is None:
        raise UsageError(f"--head {head}: {type(model).__name__} has no supported classifier head")
    new = builder(HEAD_BUILDERS[head])(info.channels, init=init)
    old = model.get_submodule(info.pool)
    replace_module(model, info.pool, _like(new, model), expect=(nn.AdaptiveAvgPool2d,))
    return Change(0, head, info.pool, "head", "pool", info.pool, type(new).__name__,
                  _count(new), _count(old))


def apply(
    model: nn.Module,
    attn: str | None = None,
    *,
    position: str | None = None,
    layers: str = "all",
    params: Mapping[str, object] | None = None,
    recipe: Recipe | str | Path | None = None,
    head: str | None = None,
    init: str | None = None,
    seed: int | None = None,
) -> list[Change]:
    """Apply attention surgery to a model you already hold (in place).

    Either one rule (``attn``, ``position``, ``layers``, ``params``) or a ``recipe`` (a
    :class:`Recipe` or the path of a TOML file; its ``model`` key is ignored here)::

        model = torchvision.models.resnet50(weights="DEFAULT")
        attnsurgeon.apply(model, "se", layers="layer3:", init="preserve")

    ``init`` (``"paper"`` or ``"preserve"``), ``head`` and ``seed`` override the recipe's.

    Returns:
        The list of :class:`Change` records, one per new module.
    """
    if recipe is not None:
        if attn is not None:
            raise UsageError("give attn or recipe, not both")
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        rec = rec.with_overrides(head=head, seed=seed, init=init)
    else:
        rules = () if attn is None else (make_rule(attn, layers=layers, position=position,
                                                    params=params, where="apply"),)
        rec = Recipe(rules=rules, head=head, init=init or "paper", seed=seed)
    return apply_recipe(model, rec)

