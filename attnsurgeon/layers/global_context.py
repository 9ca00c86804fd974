"""Global Context block.

Paper: GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond (Cao, Xu,
Lin, Wei, Hu; ICCV Workshops 2019; extended as "Global Context Networks", TPAMI),
https://arxiv.org/abs/1904.11492

Three steps, context modelling, transform and fusion::

    context   = sum_j softmax_j(W_k x_j) x_j                    context modelling
    transform = W_v2 ReLU(LN(W_v1 context))                     C -> C/r -> C
    out       = x + transform          (fusion = add, the paper's GC block)
    out       = x * sigmoid(transform) (fusion = scale: the reference code's channel_mul)

``W_k`` is a 1x1 conv C -> 1, the softmax runs over the H*W positions, LN is a LayerNorm
over ``[C/r, 1, 1]``; r = 16 (ratio 1/16); all three convs have biases, as in the
reference implementation (mmcv's ``ContextBlock``, the authors' ``ContextBlock2d``).

Departures from the paper:

* the hidden width is ``max(1, C // r)``; mmcv computes ``int(C * ratio)``, the same for
  the paper's channel counts;
* attention pooling is one batched matmul ``x.flatten(2) @ softmax(...)``, as in mmcv; no
  size-bound reshapes, so the ONNX export keeps a dynamic batch and dynamic H, W; where
  the fused GPU kernels run, one pass over x with a streaming softmax instead
  (:func:`attnsurgeon.kernels.context_pool`), the same function to float rounding;
* ``--init paper`` is mmcv's: ``W_k`` Kaiming-normal (fan-in, ReLU gain) with bias 0, the
  transform's last conv weight and bias 0 (so an ``add`` block is exactly the identity
  at initialisation, by design; a ``scale`` block starts at a constant gate of 0.5), the
  first conv and the LayerNorm PyTorch's defaults;
* ``--init preserve``: for ``fusion = add`` the same as ``paper`` (already the identity);
  for ``fusion = scale`` (not in the paper) the last conv gets weight 0 and bias
  ``PRESERVE_LOGIT``, so the gate is ``sigmoid(PRESERVE_LOGIT)`` for every input.
  With the last conv at 0, the first optimiser step moves only that conv (the gradient
  cannot pass through a zero weight); from the second step on every parameter moves,
  except ``conv_mask.bias``: it shifts all softmax logits alike, so its gradient is zero
  by construction. It is kept (as in mmcv and timm) so that parameter counts and weights
  match the reference code; it is one parameter per block.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .. import kernels
from . import PRESERVE_LOGIT, initialised

__all__ = ["FUSIONS", "GlobalContext", "build"]

FUSIONS = ("add", "scale")


class GlobalContext(nn.Module):
    """Global context block on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map.
        reduction: r, the bottleneck ratio of the transform (hidden width C / r).
        fusion: ``"add"`` (the GC block: broadcast addition) or ``"scale"`` (sigmoid gate).
    """

    def __init__(self, channels: int, *, reduction: int = 16, fusion: Literal["add", "scale"] = "add") -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        hidden = max(1, channels // reduction)
        self.fusion = fusion
        self.conv_mask = nn.Conv2d(channels, 1, 1)  # W_k
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),  # W_v1
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),  # W_v2
        )
        self.gate = nn.Sigmoid() if fusion == "scale" else None
        self.reset_parameters()

    def _context(self, x: Tensor) -> Tensor:
        """Attention pooling over positions, shape ``(N, C, 1, 1)``."""
        if kernels.active(x) and not kernels.has_hooks(self.conv_mask):
            return kernels.context_pool(x, self.conv_mask.weight, self.conv_mask.bias)  # one read of x
        weights = self.conv_mask(x).flatten(2).softmax(-1)  # (N, 1, HW)
        return (x.flatten(2) @ weights.transpose(1, 2)).unsqueeze(-1)  # (N, C, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        t = self.transform(self._context(x))
        if self.gate is not None:
            return kernels.scale(x, self.gate(t))  # x * sigmoid(t)
        return kernels.shift(x, t)  # x + t

    FUSES_RELU = True  # gate_add takes relu= (blocks.Slotted._standard_add)

    def gate_add(self, x: Tensor, identity: Tensor, *, relu: bool = False) -> Tensor:
        """``forward(x) + identity``, then ReLU if ``relu``: one pass on a GPU (:mod:`attnsurgeon.kernels`)."""
        if not kernels.active(x, identity):
            out = self(x) + identity
            return torch.relu(out) if relu else out
        t = self.transform(self._context(x))
        if self.gate is not None:
            return kernels.scale(x, self.gate(t), identity, relu=relu)
        return kernels.shift(x, t, identity, relu=relu)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        self.transform[0].reset_parameters()
        self.transform[1].reset_parameters()
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def preserve_(self) -> None:
        """Start as the identity (add) or as a gate of sigmoid(PRESERVE_LOGIT) (scale)."""
        last = self.transform[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, PRESERVE_LOGIT if self.fusion == "scale" else 0.0)


def build(channels: int, *, init: str = "paper", reduction: int = 16, fusion: str = "add") -> GlobalContext:
    return initialised(GlobalContext(channels, reduction=reduction, fusion=fusion), init)
