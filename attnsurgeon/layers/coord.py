"""Coordinate Attention.

Paper: Coordinate Attention for Efficient Mobile Network Design (Hou, Zhou, Feng;
CVPR 2021), https://arxiv.org/abs/2103.02907

Channel attention factorised into two 1-D encodings along the two spatial directions::

    z_h = mean over W of x               (N, C, H, 1)
    z_w = mean over H of x               (N, C, W, 1)   (transposed)
    f   = h_swish(BN(conv1x1([z_h; z_w])))     C -> mid = max(8, C // r)
    g_h = sigmoid(conv_h(f_h))           (N, C, H, 1)
    g_w = sigmoid(conv_w(f_w))           (N, C, 1, W)
    out = x * g_h * g_w

with r = 32 and biases on the three convs, as in the official code
(github.com/Andrew-Qibin/CoordAttention, ``CoordAtt``: ``mip = max(8, inp // reduction)``).

MobileNetV2 + CA. The official ``mbv2_ca.py`` puts CA on the hidden (expanded) channels
after the depthwise conv of every inverted residual block with expansion (not the first,
t = 1, block): 16 modules on torchvision's ``mobilenet_v2``, +445,776 parameters,
3,950,648 in all: the 3.95M that the paper and the official README print for
"MobileNetV2 + CA" (next to 3.5M for MobileNetV2; torchvision: 3,504,872). CA in all 17
blocks would give 3,951,504, which also rounds to 3.95M.

Departures from the paper:

* the pools are means over one axis (``x.mean(3)``, ``x.mean(2)``) instead of the official
  ``nn.AdaptiveAvgPool2d((None, 1))`` and ``((1, None))``: the same numbers, and the ONNX
  export keeps a dynamic batch and dynamic H, W (the pooling layers export with sizes
  bound to the traced shape);
* the two directions are split by slicing ``[:H]`` / ``[H:]`` (the official
  ``torch.split``), and the width gate is kept as ``(N, C, 1, W)`` by one transpose
  instead of the official permute + expand; the function is the same;
* h-swish is ``nn.Hardswish``, equal to the official ``x * ReLU6(x + 3) / 6``;
* ``--init paper`` is the official MobileNetV2 + CA initialisation (``mbv2_ca.py``): conv
  weights normal with std ``sqrt(2 / (k*k*out_channels))`` (Kaiming, fan-out), conv biases
  0, BN weight 1 and bias 0;
* ``--init preserve`` (not in the paper): ``conv_h`` and ``conv_w`` get weight 0 and bias
  ``PRESERVE_LOGIT``, so both gates are ``sigmoid(PRESERVE_LOGIT)`` for every input, in
  train and eval mode (``out = sigmoid(PRESERVE_LOGIT)**2 * x``); the rest keeps its paper
  initialisation;
* ``gate="hard_sigmoid"`` (not in the paper): MobileNetV3's hard sigmoid for both gates;
  ``--init preserve`` then makes both exactly 1 (see :mod:`attnsurgeon.layers`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from . import gate_layer, initialised, preserve_logit

__all__ = ["CoordAttention", "build"]


class CoordAttention(nn.Module):
    """Coordinate attention on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        reduction: r, the reduction ratio of the shared 1x1 conv (mid = max(min_dim, C // r)).
        min_dim: the lower bound of the mid width (8 in the official code).
        gate: ``"sigmoid"`` (the paper's) or ``"hard_sigmoid"``.
    """

    def __init__(self, channels: int, *, reduction: int = 32, min_dim: int = 8, gate: str = "sigmoid") -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or min_dim < 1:
            raise ValueError(
                f"channels, reduction and min_dim must be >= 1, got {channels}, {reduction}, {min_dim}")
        mid = max(min_dim, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mid, 1)  # F_1, shared by both directions
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = nn.Hardswish()  # delta
        self.conv_h = nn.Conv2d(mid, channels, 1)  # F_h
        self.conv_w = nn.Conv2d(mid, channels, 1)  # F_w
        self.gate = gate_layer(gate)
        self.reset_parameters()

    def _scales(self, x: Tensor, pre: kernels.NormAct | None = None) -> tuple[Tensor, Tensor]:
        """The gates (g_h, g_w) of ``x`` (or of ``pre(x)``), shapes ``(N, C, H, 1)`` and ``(N, C, 1, W)``."""
        h = x.shape[2]
        z_h, z_w = kernels.coord_pool(x, pre=pre)  # pool along W: x.mean(3); along H: x.mean(2); one read on a GPU
        z_w = z_w.transpose(2, 3)  # as (N, C, W, 1)
        f = self.act(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))
        g_h = self.gate(self.conv_h(f[:, :, :h]))
        g_w = self.gate(self.conv_w(f[:, :, h:])).transpose(2, 3)
        return g_h, g_w

    def forward(self, x: Tensor) -> Tensor:
        g_h, g_w = self._scales(x)
        return kernels.scale_hw(x, g_h, g_w)  # x * g_h * g_w

    FUSES_RELU = True  # gate_add takes relu= (blocks.Slotted._standard_add)

    def gate_add(self, x: Tensor, identity: Tensor, *, relu: bool = False) -> Tensor:
        """``forward(x) + identity``, then ReLU if ``relu``: one pass on a GPU (:mod:`attnsurgeon.kernels`)."""
        if not kernels.active(x, identity):
            out = self(x) + identity
            return torch.relu(out) if relu else out
        g_h, g_w = self._scales(x)
        return kernels.scale_hw(x, g_h, g_w, identity, relu=relu)

    def gate_norm_act(self, y: Tensor, pre: kernels.NormAct) -> Tensor:
        """``forward(pre(y))``, ``pre`` the block's eval-mode norm and activation before the
        gate: on a GPU two reads of y and one write, ``pre(y)`` never written."""
        g_h, g_w = self._scales(y, pre)
        return kernels.scale_hw(y, g_h, g_w, pre=pre)

    def reset_parameters(self) -> None:
        for conv in (self.conv1, self.conv_h, self.conv_w):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.bn1.reset_running_stats()
        nn.init.ones_(self.bn1.weight)
        nn.init.zeros_(self.bn1.bias)

    def preserve_(self) -> None:
        """Both gates gate(preserve_logit) for every input, in train and eval mode."""
        for conv in (self.conv_h, self.conv_w):
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, preserve_logit(self.gate))


def build(channels: int, *, init: str = "paper", reduction: int = 32, min_dim: int = 8,
          gate: str = "sigmoid") -> CoordAttention:
    return initialised(CoordAttention(channels, reduction=reduction, min_dim=min_dim, gate=gate), init)
