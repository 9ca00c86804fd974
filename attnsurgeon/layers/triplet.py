"""Triplet attention.

Paper: Rotate to Attend: Convolutional Triplet Attention Module (Misra, Nalamada,
Arasanipalai, Hou; WACV 2021), https://arxiv.org/abs/2010.03045

Three branches, each a CBAM-style spatial gate on a rotated view of the feature map: Z-pool
(``[max; mean]`` over the first axis of the view) -> k x k conv (2 -> 1, no bias) -> BN
-> sigmoid -> multiply. The views are (C, W) for the gate pooled over H, (H, C) for the gate
pooled over W, and (H, W) for the plain spatial gate pooled over C; the output is the mean
of the three gated maps. k = 7; a module has 3 x (2 k^2 + 2) = 300 parameters, so
ResNet-50 with one in every bottleneck (before the residual add, the authors' placement
in ``MODELS/resnet.py``, i.e. ``standard``) has 25,561,832: the paper's 25.56M.

Departures from the authors' code (github.com/landskape-ai/triplet-attention):

* the rotations are ``transpose`` and the pools ``amax``/``mean`` over one axis (ONNX
  keeps a dynamic batch, H and W), and each gate is computed from pools of x in place and
  broadcast back onto x: the same function (up to float rounding), without writing three
  rotated maps;
* ``--init paper`` is the authors' ResNet initialisation: convs Kaiming-normal (fan-out),
  BN gamma 1 in the two rotated branches and 0 in the spatial one (their init zeroes BN
  weights under a ``SpatialGate`` name), betas 0; BN momentum 0.01 as in their code;
* ``--init preserve`` (not in the paper): every conv weight 0, every BN gamma 1 and beta
  ``PRESERVE_LOGIT`` with fresh running statistics, so each gate is
  ``sigmoid(PRESERVE_LOGIT)`` for every input, in train and eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import initialised
from .cbam import SpatialAttention

__all__ = ["TripletAttention", "ZPoolGate", "build"]


class ZPoolGate(SpatialAttention):
    """One branch: CBAM's spatial gate over ``[max; mean]`` (the authors' channel order, so
    their weights load), i.e. ``x * sigmoid(BN(conv(ZPool(x))))``."""

    def _scale(self, x: Tensor) -> Tensor:
        return self.zpool_scale(x.amax(1, keepdim=True), x.mean(1, keepdim=True))

    def zpool_scale(self, peak: Tensor, mean: Tensor) -> Tensor:
        """The gate from the max and the mean over the view's first axis, each ``(N, 1, A, B)``."""
        pooled = torch.cat([peak, mean], dim=1).contiguous()  # (views' strides would pick a slow conv)
        return self.gate(self.bn(self.conv(pooled)))


class TripletAttention(nn.Module):
    """Triplet attention (any number of channels).

    Args:
        kernel_size: k, the kernel of each branch's conv (7 in the paper; 3 also reported).
    """

    def __init__(self, *, kernel_size: int = 7) -> None:
        super().__init__()
        self.gate_h = ZPoolGate(kernel_size=kernel_size)  # pooled over H: attends (C, W)
        self.gate_w = ZPoolGate(kernel_size=kernel_size)  # pooled over W: attends (H, C)
        self.gate_c = ZPoolGate(kernel_size=kernel_size)  # pooled over C: attends (H, W)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        # each gate pools x in place (no rotated copy of x is written) and multiplies x on its
        # own: adding the (N, C, 1, W) and (N, C, H, 1) gates first would fix a 1x1 map's
        # shape into an exported graph
        s_h = self.gate_h.zpool_scale(x.amax(2).unsqueeze(1), x.mean(2).unsqueeze(1))  # (N, 1, C, W)
        s_w = self.gate_w.zpool_scale(x.amax(3).unsqueeze(1).transpose(2, 3),  # the (H, C) view: (N, 1, H, C)
                                      x.mean(3).unsqueeze(1).transpose(2, 3))
        s_c = self.gate_c._scale(x)  # (N, 1, H, W)
        out = x * (s_h.transpose(1, 2) / 3)  # (N, C, 1, W)
        out = out.addcmul_(x, s_w.permute(0, 3, 2, 1) / 3)  # (N, C, H, 1)
        return out.addcmul_(x, s_c / 3)

    def reset_parameters(self) -> None:
        self.gate_h.reset_parameters(gamma=1.0)
        self.gate_w.reset_parameters(gamma=1.0)
        self.gate_c.reset_parameters(gamma=0.0)

    def preserve_(self) -> None:
        """Start as (almost) the identity: every gate sigmoid(PRESERVE_LOGIT)."""
        for gate in (self.gate_h, self.gate_w, self.gate_c):
            gate.preserve_()


def build(channels: int, *, init: str = "paper", kernel_size: int = 7) -> TripletAttention:
    """``channels`` is unused (triplet attention works on any number of channels)."""
    return initialised(TripletAttention(kernel_size=kernel_size), init)
