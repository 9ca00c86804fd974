"""Surgery: recipe rules x residual blocks -> a modified model and the list of changes.

This is the one place that edits a model. Insert kinds fill a slot of a block (the block
becomes slotted first) or take the place of its built-in Squeeze-and-Excitation
(``builtin``); replace kinds swap a convolution, and possibly the norm and activation
after it. Every swap goes through :func:`replace_module`, which checks that the old
module is what it should be. Every original parameter and buffer keeps its name and
value, except those of what was replaced. A rule skips selected blocks that lack its
position (a block without a shortcut has no ``identity``) and reports them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, overload

from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from .blocks import NORMS, SLOT_ATTR, BlockInfo, ConvSite, find_blocks, find_head, make_slotted, unsupported_message
from .errors import UsageError, suggest
from .kinds import HEAD_BUILDERS, HEADS, POSITIONS, KindSpec, builder, get_kind
from .layers import mark_new
from .recipe import Recipe, Rule, check_head, check_init, check_seed, load_recipe, make_rule
from .select import select_blocks
from .torch_state import seeded

__all__ = ["Change", "Changes", "Skip", "apply", "apply_recipe", "preserve_lost", "replace_module"]


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
    note: str = ""  # e.g. "beside the block's built-in SqueezeExcitation"

    @property
    def params_added(self) -> int:
        return self.params - self.replaced_params

    def to_data(self) -> dict[str, Any]:
        data = {
            "rule": self.rule, "attn": self.attn, "block": self.block, "stage": self.stage,
            "where": self.where, "path": self.path, "module": self.module,
            "params": self.params, "params_added": self.params_added,
        }
        if self.note:
            data["note"] = self.note
        return data


@dataclass(frozen=True)
class Skip:
    """A selected block that a rule left alone: it has no such position."""

    rule: int
    block: str
    position: str

    def to_data(self) -> dict[str, Any]:
        return {"rule": self.rule, "block": self.block, "position": self.position}


@dataclass(frozen=True)
class Changes(Sequence[Change]):
    """What :func:`apply_recipe` changed: a sequence of :class:`Change` (one per new module),
    and ``skipped``, the selected blocks a rule left alone because they lack its position."""

    changes: tuple[Change, ...] = ()
    skipped: tuple[Skip, ...] = ()

    @overload
    def __getitem__(self, index: int) -> Change: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Change, ...]: ...
    def __getitem__(self, index: int | slice) -> Change | tuple[Change, ...]:
        return self.changes[index]

    def __len__(self) -> int:
        return len(self.changes)


class _Step(NamedTuple):
    """One thing :func:`_plan` found to do: rule ``n`` at ``where`` of one block (a
    position for an insert kind, the dotted name of a conv for a replace kind)."""

    n: int
    rule: Rule
    info: BlockInfo
    block: nn.Module
    where: str


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


def _targets(kind: KindSpec, params: Mapping[str, Any], info: BlockInfo) -> list[ConvSite]:
    """The convolutions of ``info``'s block that replace kind ``kind`` takes (``kind.convs``)."""
    which = kind.conv_targets(params)
    return [c for c in info.convs if which == "all" or (c.main if which == "main" else c.spatial)]


def apply_recipe(model: nn.Module, recipe: Recipe) -> Changes:
    """Apply ``recipe``'s head and rules to ``model`` in place; return what changed.

    Raises:
        UsageError: the model has no supported blocks, a rule selects nothing or a
            position none of its blocks has, or two rules claim the same slot or
            convolution (checked before the model is changed).
    """
    blocks = find_blocks(model)
    if recipe.rules and not blocks:
        raise UsageError(unsupported_message(model, recipe.model or type(model).__name__))
    names = [(info.name, info.stage, info.alias) for info, _ in blocks]
    plan, skipped = _plan(recipe, blocks, select=lambda n, rule: select_blocks(
        rule.layers, names, where=_layers_where(recipe, n)))
    head = _head_site(model, recipe.head) if recipe.head is not None else None  # checked before any change
    changes: list[Change] = []
    with seeded(recipe.seed):
        for n, rule, info, block, where in plan:
            kind = get_kind(rule.attn)
            build = builder(kind)
            params = rule.param_dict
            if kind.mode == "insert":
                changes.append(_insert(n, rule, info, block, where, build(
                    info.slot_channels(where), init=recipe.init, **params)))
                continue
            site = next(c for c in info.convs if c.conv == where)
            conv = block.get_submodule(site.conv)
            norm = block.get_submodule(site.norm) if site.norm else None
            act = block.get_submodule(site.act) if site.act else (site.act_layer() if site.act_layer else None)
            new_conv, new_norm = build(conv, norm, act=act, init=recipe.init, **params)
            mark_new(new_conv)
            replaced = _count(replace_module(block, site.conv, _like(new_conv, conv), expect=nn.Conv2d))
            if new_norm is not None and site.norm is not None:
                replaced += _count(replace_module(block, site.norm, _like(new_norm, conv), expect=NORMS))
                if site.act is not None:  # the replacement applies it per path
                    replace_module(block, site.act, nn.Identity(), expect=nn.Module)
            changes.append(Change(n, rule.attn, info.name, info.stage, site.conv, f"{info.name}.{site.conv}",
                                  type(new_conv).__name__, _count(new_conv) + _count(new_norm), replaced))
        if recipe.head is not None:
            changes.append(_apply_head(model, recipe.head, head, init=recipe.init))
    # notes say what a block holds in the end: a built-in SE a rule replaced is gone
    beside = {info.name for info, _ in blocks if info.builtin} - {c.block for c in changes if c.where == "builtin"}
    changes = [replace(c, note="beside the block's built-in SqueezeExcitation")
               if c.block in beside and c.where in SLOT_ATTR else c for c in changes]
    return Changes(tuple(changes), tuple(skipped))


def _insert(n: int, rule: Rule, info: BlockInfo, block: nn.Module, where: str, new: nn.Module) -> Change:
    """Put ``new`` at position ``where`` of ``block``: a slot, or the built-in SE's place."""
    mark_new(new)
    if where == "builtin" and info.builtin is not None:  # (a block with a builtin position has one)
        new = _like(new, block)
        old = replace_module(block, info.builtin, new, expect=SqueezeExcitation)
        return Change(n, rule.attn, info.name, info.stage, where, f"{info.name}.{info.builtin}",
                      type(new).__name__, _count(new), _count(old), note="replaces the built-in SqueezeExcitation")
    block = make_slotted(block)
    new = _like(new, block)
    setattr(block, SLOT_ATTR[where], new)
    return Change(n, rule.attn, info.name, info.stage, where, f"{info.name}.{SLOT_ATTR[where]}",
                  type(new).__name__, _count(new), 0)


def _layers_where(recipe: Recipe, n: int) -> str:
    """How errors name rule ``n``'s layer spec: the option, or the recipe's file and rule."""
    return "--layers" if recipe.source == "command line" else f"{recipe.source}: rule {n}: layers"


def _plan(
    recipe: Recipe,
    blocks: list[tuple[BlockInfo, nn.Module]],
    *,
    select: Callable[[int, Rule], list[int]],
) -> tuple[list[_Step], list[Skip]]:
    """Every (rule number, rule, block, position or conv) the recipe asks for, and the
    selected blocks a rule skips because they lack its position, checked before anything
    is changed: a selection that names nothing, a position no selected block has, two
    rules claiming one slot or conv, or a slot/conv an earlier surgery already changed
    is an error, and the model is left untouched."""
    plan: list[_Step] = []
    skipped: list[Skip] = []
    claimed: dict[str, int] = {}
    for n, rule in enumerate(recipe.rules, start=1):
        kind = get_kind(rule.attn)
        chosen = select(n, rule)
        label = f"{_layers_where(recipe, n)} {rule.layers!r}"
        if kind.mode == "insert":
            position = rule.position or kind.default_position  # resolved by make_rule
            if position is None:
                raise ValueError(f"insert kind {kind.name!r} has no default position")
            having = [i for i in chosen if position in blocks[i][0].slots]
            if not having:
                have = [p for p in POSITIONS if any(p in blocks[i][0].slots for i in chosen)]
                article = "an" if position[:1] in "aeiou" else "a"
                raise UsageError(f"{label}: no selected block has {article} {position!r} position "
                                 f"(they have: {', '.join(have)})")
            skipped.extend(Skip(n, blocks[i][0].name, position) for i in chosen if i not in having)
            for i in having:
                info, block = blocks[i]
                slot = info.builtin if position == "builtin" and info.builtin else SLOT_ATTR[position]
                _claim(claimed, f"{info.name}.{slot}", n, label, f"the {position} position of {info.name}")
                held: nn.Module | None
                if position == "builtin":
                    held = block.get_submodule(slot)
                    fresh = isinstance(held, SqueezeExcitation)
                else:
                    held = getattr(block, slot, None)
                    fresh = held is None or isinstance(held, nn.Identity)
                if not fresh:
                    raise UsageError(f"{label}: the {position} position of {info.name} already "
                                     f"holds a {type(held).__name__} (from an earlier surgery)")
                plan.append(_Step(n, rule, info, block, position))
            continue
        for i in chosen:
            info, block = blocks[i]
            for site in _targets(kind, rule.param_dict, info):
                path = f"{info.name}.{site.conv}"
                _claim(claimed, path, n, label, path)
                conv = block.get_submodule(site.conv)
                if type(conv) is not nn.Conv2d:
                    raise UsageError(f"{label}: {path} is already a {type(conv).__name__} "
                                     "(from an earlier surgery)")
                plan.append(_Step(n, rule, info, block, site.conv))
    return plan, skipped


def _claim(claimed: dict[str, int], path: str, rule: int, label: str, what: str) -> None:
    if path in claimed:
        raise UsageError(f"{label}: {what} is already taken by rule {claimed[path]}")
    claimed[path] = rule


def _head_site(model: nn.Module, head: str) -> Any:
    """Where ``head`` goes in ``model`` (its pool), or a UsageError before anything changes."""
    if head not in HEAD_BUILDERS:
        raise UsageError(f"--head: unknown head {head!r}" + suggest(head, HEADS))
    info = find_head(model)
    if info is None:
        raise UsageError(f"--head {head}: {type(model).__name__} has no supported classifier head")
    return info


def _apply_head(model: nn.Module, head: str, info: Any, *, init: str) -> Change:
    new = mark_new(builder(HEAD_BUILDERS[head])(info.channels, init=init))
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
) -> Changes:
    """Apply attention surgery to a model you already hold (in place).

    Either one rule (``attn``, ``position``, ``layers``, ``params``) or a ``recipe`` (a
    :class:`Recipe` or the path of a TOML file; its ``model`` key is ignored here)::

        model = torchvision.models.resnet50(weights="DEFAULT")
        attnsurgeon.apply(model, "se", layers="layer3:", init="preserve")

    ``init`` (``"paper"`` or ``"preserve"``), ``head`` and ``seed`` override the recipe's.

    Returns:
        :class:`Changes`: the :class:`Change` records, one per new module, and ``skipped``,
        the selected blocks a rule left alone because they lack its position.
    """
    _check_apply_types(model, attn, position=position, layers=layers, params=params, recipe=recipe,
                       head=head, init=init, seed=seed)
    if recipe is not None:
        if attn is not None:
            raise UsageError("give attn or recipe, not both")
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        rec = rec.with_overrides(head=head, seed=seed, init=init)
    else:
        rules = () if attn is None else (make_rule(attn, layers=layers, position=position,
                                                    params=params, where="apply"),)
        rec = Recipe(rules=rules, head=head, init=init or "paper", seed=seed)
    rec = replace(rec, head=check_head(rec.head, "head"))  # "avg" -> None
    check_init(rec.init, "init")
    check_seed(rec.seed, "seed")
    changes = apply_recipe(model, rec)
    lost = preserve_lost(changes, rec.init)
    if lost:
        warnings.warn(lost, stacklevel=2)
    return changes


def _check_apply_types(model: object, attn: object, **args: object) -> None:
    """A wrong type for an argument of :func:`apply` is a TypeError naming it, before the
    model is touched (not an AttributeError from deep inside)."""
    if not isinstance(model, nn.Module):
        hint = (f"; build it first, e.g. torchvision.models.get_model({model!r})"
                if isinstance(model, str) else "")
        raise TypeError(f"apply: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    want: dict[str, tuple[type, ...]] = {"attn": (str, type(None)), "position": (str, type(None)),
                                          "layers": (str,), "params": (Mapping, type(None)),
                                          "recipe": (Recipe, str, Path, type(None)),
                                          "head": (str, type(None)), "init": (str, type(None)),
                                          "seed": (int, type(None))}
    for name, value in {"attn": attn, **args}.items():
        if not isinstance(value, want[name]) or (name == "seed" and isinstance(value, bool)):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in want[name])
            raise TypeError(f"apply: {name} must be {names}, got {type(value).__name__} {value!r}")


def preserve_lost(changes: Sequence[Change], init: str) -> str | None:
    """Why ``init="preserve"`` did not keep the function, or None: a rule replaced built-in
    SqueezeExcitation modules (modules of the model removed, which no initialisation of the
    new ones restores)."""
    replaced = sum(c.where == "builtin" for c in changes)
    if not replaced or init != "preserve":
        return None
    return (f"{replaced} built-in SqueezeExcitation module{'s were' if replaced > 1 else ' was'} replaced: "
            "init 'preserve' cannot keep the function where a module of the model is removed")

