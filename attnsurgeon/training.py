"""Fine-tuning after surgery: which parameters are new, optimiser groups, freezing.

A model that went through surgery holds two kinds of parameters: the original network's
(pretrained, usually) and those of the modules the surgery added. Fine-tuning usually wants
a higher learning rate for the new ones, or to train them alone first::

    model = attnsurgeon.load("se_resnet50.pt")           # or attnsurgeon.apply(...)
    optimizer = torch.optim.SGD(
        attnsurgeon.param_groups(model, lr=0.01, new_lr=0.1, weight_decay=1e-4), momentum=0.9)
    attnsurgeon.freeze_original(model)                     # warm up the new modules alone
    ...
    attnsurgeon.unfreeze(model)

A module is *new* when the surgery built it (:func:`attnsurgeon.layers.mark_new`, whatever
package its builder lives in), counted top-most only: everything inside it is new too. So a
Selective Kernel conv counts as new as a whole, its first path included (a copy of the
replaced conv under ``--init preserve``), and so does a dynamic conv (it replaced a conv;
its kernels are new parameters). The slotted residual blocks are the original blocks
with empty slots, not new modules. The mark is on the modules themselves, so this works
the same on a model from :func:`attnsurgeon.apply` and one from :func:`attnsurgeon.load`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from .layers import is_new as _is_new

__all__ = ["freeze_original", "new_modules", "new_parameters", "original_parameters", "param_groups", "unfreeze"]

def new_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-most modules the surgery added, as ``(dotted name, module)`` in module order."""
    found: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _is_new(child):
                found.append((path, child))
            else:
                visit(child, path)

    if _is_new(model):
        return [("", model)]
    visit(model, "")
    return found


def _split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``model``'s parameters (each once, even if shared) as (original, new) lists."""
    new_ids = {id(p) for _, m in new_modules(model) for p in m.parameters()}
    original: list[tuple[str, nn.Parameter]] = []
    new: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():  # named_parameters yields a shared parameter once
        (new if id(p) in new_ids else original).append((name, p))
    return original, new


def new_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of :func:`new_modules`."""
    return (p for _, p in _split(model)[1])


def original_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter of ``model`` that is not in a new module."""
    return (p for _, p in _split(model)[0])


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    new_lr: float | None = None,
    weight_decay: float = 0.0,
    new_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the original parameters and the new ones.

    Every parameter of ``model`` is in exactly one group. An empty group is left out (a
    model without surgery gives one group). Each group carries a ``"name"`` key
    (``"original"`` or ``"new"``), which torch optimisers keep and ignore.

    Args:
        lr: learning rate of the original parameters.
        new_lr: learning rate of the new ones (default ``lr``); fine-tuning usually
            gives them 10x ``lr``.
        weight_decay: of the original parameters.
        new_weight_decay: of the new ones (default ``weight_decay``).

    Returns:
        A list for ``torch.optim.*(groups, ...)``.

    Raises:
        ValueError: a negative learning rate or weight decay.
    """
    new_lr = lr if new_lr is None else new_lr
    new_weight_decay = weight_decay if new_weight_decay is None else new_weight_decay
    for name, value in (("lr", lr), ("new_lr", new_lr), ("weight_decay", weight_decay),
                        ("new_weight_decay", new_weight_decay)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    original, new = _split(model)
    groups = [
        {"name": "original", "params": [p for _, p in original], "lr": lr, "weight_decay": weight_decay},
        {"name": "new", "params": [p for _, p in new], "lr": new_lr, "weight_decay": new_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def freeze_original(model: nn.Module) -> int:
    """Stop gradients to every original parameter (``requires_grad = False``); the new
    modules' parameters are made trainable.

    BatchNorm running statistics of the original network still update in train mode:
    call ``.eval()`` on those norms too if they should stay fixed.

    Returns:
        How many parameters were frozen.
    """
    original, new = _split(model)
    for _, p in original:
        p.requires_grad_(False)
    for _, p in new:
        p.requires_grad_(True)
    return len(original)


def unfreeze(model: nn.Module) -> int:
    """Make every parameter of ``model`` trainable again; returns how many there are."""
    count = 0
    for p in model.parameters():
        p.requires_grad_(True)
        count += 1
    return count
