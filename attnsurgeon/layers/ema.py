"""Efficient Multi-Scale Attention (EMA).

Paper: Efficient Multi-Scale Attention Module with Cross-Spatial Learning (Ouyang, He,
Zhang, Luo, Guo, Zhan, Huang; ICASSP 2023), https://arxiv.org/abs/2305.13563

The channels are split into G groups (the authors' ``factor``, 32); within each group of
c = C / G channels, two branches share the work:

* a 1x1 branch: means along W and along H, one 1x1 conv over both, two sigmoid gates
  (coordinate attention without the reduction), then a GroupNorm with one group per
  channel;
* a 3x3 branch: a 3x3 conv;

and each branch's global average, softmaxed over the c channels, weighs the *other*
branch's map ("cross-spatial learning"); the sum of both weighted maps is one spatial
map per group, and ``out = x * sigmoid(map)``. A module has 10 c^2 + 4 c parameters.

Departures from the authors' code (github.com/YOLOonMe/EMA-attention-module, ``EMA``):

* G must divide C; where the factor does not, the largest divisor of C not above it is
  used (the authors' code only asserts ``C // factor > 0`` and then fails to reshape);
* the pools are ``mean`` over one axis instead of adaptive pooling layers (the same
  function, and ONNX keeps a dynamic H and W);
* the 3x3 conv, which the authors run on the ``(N*G, c, H, W)`` view, is one grouped conv
  on ``(N, C, H, W)`` with its kernel repeated per group: the same function and gradients
  (up to float rounding), several times faster on the CPU where c is small;
* ``--init paper`` is PyTorch's default initialisation, as in the authors' code;
* ``--init preserve`` (not in the paper): the 3x3 conv weight and bias 0 and the
  GroupNorm weight 0 with bias ``PRESERVE_LOGIT``; both branches are then constant maps,
  each softmax-weighted sum is that constant, and the gate is
  ``sigmoid(PRESERVE_LOGIT)`` for every input. The 1x1 conv learns once the GroupNorm
  weight has moved (the gradient cannot pass a zero weight), as in GC's zero-init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import PRESERVE_LOGIT, initialised

__all__ = ["EMA", "build", "group_count"]


def group_count(channels: int, factor: int) -> int:
    """The largest divisor of ``channels`` that is at most ``factor``."""
    return next(g for g in range(min(factor, channels), 0, -1) if channels % g == 0)


class EMA(nn.Module):
    """Efficient multi-scale attention on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        factor: G, the number of groups (reduced to a divisor of C, see the module docstring).
    """

    def __init__(self, channels: int, *, factor: int = 32) -> None:
        super().__init__()
        if channels < 1 or factor < 1:
            raise ValueError(f"channels and factor must be >= 1, got {channels}, {factor}")
        self.groups = group_count(channels, factor)
        c = channels // self.groups
        self.gn = nn.GroupNorm(c, c)
        self.conv1x1 = nn.Conv2d(c, c, 1)
        self.conv3x3 = nn.Conv2d(c, c, 3, padding=1)

    def _conv3x3(self, x: Tensor) -> Tensor:
        """The 3x3 branch of every group, ``(N*G, c, H, W)``: one grouped conv on ``x`` with the
        shared kernel repeated per group (the same function as the authors' conv on the
        ``(N*G, c, H, W)`` view, which runs several times slower on the CPU for small c)."""
        conv, groups = self.conv3x3, self.groups
        bias = None if conv.bias is None else conv.bias.repeat(groups)
        y = F.conv2d(x, conv.weight.repeat(groups, 1, 1, 1), bias, padding=1, groups=groups)
        return y.unflatten(1, (groups, -1)).flatten(0, 1)

    def _map(self, g: Tensor, x2: Tensor) -> Tensor:
        """The spatial logits of each group, shape ``(N*G, 1, H, W)``; ``g`` is ``(N*G, c, H, W)``
        and ``x2`` the 3x3 branch of it."""
        h, w = g.shape[-2:]
        x_h = g.mean(3, keepdim=True)  # (NG, c, H, 1)
        x_w = g.mean(2, keepdim=True).transpose(2, 3)  # (NG, c, W, 1)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        a_h, a_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(g * a_h.sigmoid() * a_w.transpose(2, 3).sigmoid())
        w1 = x1.mean((2, 3)).softmax(-1).unsqueeze(1)  # (NG, 1, c)
        w2 = x2.mean((2, 3)).softmax(-1).unsqueeze(1)
        logits = w1 @ x2.flatten(2) + w2 @ x1.flatten(2)  # (NG, 1, HW)
        return logits.unflatten(2, (h, w))

    def forward(self, x: Tensor) -> Tensor:
        g = x.unflatten(1, (self.groups, -1)).flatten(0, 1)  # (N*G, c, H, W)
        out = g * self._map(g, self._conv3x3(x)).sigmoid()
        return out.unflatten(0, (-1, self.groups)).flatten(1, 2)

    def reset_parameters(self) -> None:
        self.gn.reset_parameters()
        self.conv1x1.reset_parameters()
        self.conv3x3.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: gate = sigmoid(PRESERVE_LOGIT) for every input."""
        nn.init.zeros_(self.conv3x3.weight)
        nn.init.zeros_(self.conv3x3.bias)
        nn.init.zeros_(self.gn.weight)
        nn.init.constant_(self.gn.bias, PRESERVE_LOGIT)


def build(channels: int, *, init: str = "paper", factor: int = 32) -> EMA:
    return initialised(EMA(channels, factor=factor), init)
