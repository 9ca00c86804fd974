"""Attention modules, one file per family, each opening with its paper.

Every insert-kind module takes ``(channels, *, knobs...)`` and has two initialisations:

* ``reset_parameters()``: the paper's / reference code's initialisation (``--init paper``);
* ``preserve_()``: the module starts as (almost) the identity, so a pretrained network
  computes the same function right after surgery (``--init preserve``).

Gates that must start "open" cannot be exactly 1 through a sigmoid or softmax; they start
at :data:`PRESERVE_LOGIT` = 16, which leaves each gate ``1 - 1.2e-7`` away from 1 (a softmax
over M branches with the same logit gap puts ``1.1e-7`` on each other branch). 16 is the
largest logit whose sigmoid float32 still tells from 1 (``sigmoid(17)`` rounds to 1 and its
gradient to 0): the closest start to the identity that can still learn. That is far below
float32 noise of a ResNet forward, and still trainable: the gradient is small but not zero,
and adaptive optimisers (Adam, AdamW) rescale it. Tests check both claims.

SE, ECA and coordinate attention take ``gate="hard_sigmoid"`` (MobileNetV3's gate); its
``--init preserve`` is exact: the gate is 1.0 in float32 at :data:`HARD_PRESERVE_LOGIT`,
where the gradient is still 1/6.

A module whose forward ends in a gate multiply may offer ``gate_add(x, identity, *, relu=False)``,
equal to ``forward(x) + identity`` (then ReLU) but with the last multiply folded into the add
as one ``torch.addcmul`` (SE, ECA, CBAM); a residual block then uses it at ``standard``
(``blocks.Slotted._standard_add``), saving a full pass over the feature map. On a GPU the
gates run fused kernels instead, the block's ReLU included (:mod:`attnsurgeon.kernels`),
where the class sets ``FUSES_RELU`` (its ``gate_add`` takes ``relu``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # this package's root stays torch-free: kinds imports INIT_MODES from it
    from torch import nn

__all__ = ["GATES", "HARD_PRESERVE_LOGIT", "INIT_MODES", "NEW_MARK", "PRESERVE_LOGIT", "check_init", "gate_layer",
           "initialised", "is_new", "mark_new", "preserve_logit"]

PRESERVE_LOGIT = 16.0
INIT_MODES: tuple[str, ...] = ("paper", "preserve")  # the one list; kinds and recipes check against it
NEW_MARK = "attnsurgeon_new"  # instance attribute the surgery sets on every module it builds
# the largest float32 below 3: hard_sigmoid(x) = x / 6 + 1/2 rounds to exactly 1.0 there, and its
# gradient is still 1/6 (at 3 and above it is 0, and the gate could never learn)
HARD_PRESERVE_LOGIT = 2.9999997615814209
GATES = ("sigmoid", "hard_sigmoid")


def gate_layer(gate: str) -> nn.Module:
    """The gate activation: ``sigmoid`` (the papers') or ``hard_sigmoid`` (MobileNetV3's
    ``ReLU6(x + 3) / 6``, piecewise linear, the form its quantized models use)."""
    from torch import nn

    if gate == "sigmoid":
        return nn.Sigmoid()
    if gate == "hard_sigmoid":
        return nn.Hardsigmoid()
    raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")


def preserve_logit(gate: nn.Module) -> float:
    """The logit ``--init preserve`` gives a gate: PRESERVE_LOGIT for a sigmoid (1 - 1.2e-7),
    HARD_PRESERVE_LOGIT for a hard sigmoid (exactly 1 in float32, still trainable)."""
    from torch import nn

    return HARD_PRESERVE_LOGIT if isinstance(gate, nn.Hardsigmoid) else PRESERVE_LOGIT


def check_init(init: str) -> None:
    """Raise ValueError unless ``init`` is one of :data:`INIT_MODES` (for callers of the
    builders; the CLI and recipes check the user's value before, as a usage error)."""
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}")


T = TypeVar("T")


def mark_new(module: T) -> T:
    """Mark ``module`` as added by surgery, so :mod:`attnsurgeon.training` counts it (and
    all inside it) as new, whatever package its class comes from. The mark is an instance
    attribute: it survives ``copy.deepcopy`` and pickling, and :func:`attnsurgeon.load`
    sets it again as it re-applies the recipe."""
    setattr(module, NEW_MARK, True)
    return module


def is_new(module: Any) -> bool:
    """Whether :func:`mark_new` marked ``module``."""
    return getattr(module, NEW_MARK, False) is True


class _Preservable(Protocol):
    def preserve_(self) -> None: ...


M = TypeVar("M", bound=_Preservable)


def initialised(module: M, init: str) -> M:
    """``module`` as constructed (``paper``) or started as the identity (``preserve``)."""
    check_init(init)
    if init == "preserve":
        module.preserve_()
    return module
