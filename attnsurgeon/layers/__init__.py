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

A module whose forward ends in a gate multiply may offer ``gate_add(x, identity, *, relu=False)``,
equal to ``forward(x) + identity`` (then ReLU) but with the last multiply folded into the add
as one ``torch.addcmul`` (SE, ECA, CBAM); a residual block then uses it at ``standard``
(``blocks.Slotted._standard_add``), saving a full pass over the feature map. On a GPU the
gates run fused kernels instead, the block's ReLU included (:mod:`attnsurgeon.kernels`).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

__all__ = ["PRESERVE_LOGIT", "check_init", "initialised"]

PRESERVE_LOGIT = 16.0


def check_init(init: str) -> None:
    if init not in ("paper", "preserve"):
        raise ValueError(f"init must be 'paper' or 'preserve', got {init!r}")


class _Preservable(Protocol):
    def preserve_(self) -> None: ...


M = TypeVar("M", bound=_Preservable)


def initialised(module: M, init: str) -> M:
    """``module`` as constructed (``paper``) or started as the identity (``preserve``)."""
    check_init(init)
    if init == "preserve":
        module.preserve_()
    return module
