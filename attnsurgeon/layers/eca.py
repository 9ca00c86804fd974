"""Efficient Channel Attention.

Paper: ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks
(Wang, Wu, Zhu, Li, Zuo, Hu; CVPR 2020), https://arxiv.org/abs/1910.03151

``x -> global average pool -> 1-D conv of size k across channels (no bias) -> sigmoid ->
x * s``: SE's gate without the dimensionality reduction, with local cross-channel
interaction. The kernel size follows the paper's adaptive rule::

    k = psi(C) = | log2(C) / gamma + b / gamma |_odd,   gamma = 2, b = 1

where ``|t|_odd`` is the nearest odd number to t. A module has k parameters.

Which rounding. For ResNet-50's bottleneck outputs C = 256, 512, 1024, 2048 the rule gives
t = 4.5, 5, 5.5, 6:

* nearest odd, ties to the smaller kernel (the default here): k = 5, 5, 5, 5, i.e.
  16 x 5 = **80** parameters, the number the paper's abstract gives for ResNet-50;
* the reference code's rounding (github.com/BangguWu/ECANet; timm's ``EcaModule`` too, with k >= 3),
  ``t = int(abs((log2(C) + b) / gamma)); k = t if t odd else t + 1``: k = 5, 5, 5, 7,
  i.e. 3x5 + 4x5 + 6x5 + 3x7 = **86** parameters;
* the model the authors released for ECA-Net50 (README: ``eca_resnet50_k3557``) fixes k per
  stage to 3, 5, 5, 7: 9 + 20 + 30 + 21 = **80** parameters; ``recipes/eca_resnet50.toml``
  builds that model with one rule per stage.

The default follows the paper's written rule ("nearest odd"), whose one ambiguous case, an
even t, is resolved towards the smaller kernel: that is the reading that gives the paper's
80 on ResNet-50 (ties upwards, like the reference code, give 86). The released
k = 3, 5, 5, 7 also gives 80, so the count alone cannot say which one the paper counted.

Departures from the paper:

* the gate is ``sigmoid(conv1d(y) + offset)`` with ``offset`` a fixed buffer (not a
  parameter, not trained): 0 under ``--init paper``, which is the paper's ECA exactly, and
  ``PRESERVE_LOGIT`` under ``--init preserve``. ECA's conv has no bias, so without it no
  weights could make the gate a constant ~1 for every input; a buffer keeps the parameter
  count at k (the paper's 80 on ResNet-50) and the same state_dict keys for both inits;
* ``kernel_size = 0`` means adaptive (the paper's rule above); a positive odd value fixes k
  (``gamma`` and ``b`` are then unused); k is at least 1 for any gamma and b;
* the pooled vector is convolved as ``(N, 1, C)`` and reshaped to ``(N, C, 1, 1)`` with
  ``unsqueeze``/``transpose`` only, so ONNX export keeps a dynamic batch;
* ``--init paper`` is PyTorch's default initialisation of ``nn.Conv1d``, as in the
  reference code (its ResNet initialises only ``nn.Conv2d`` weights);
* ``--init preserve`` (not in the paper): conv weight 0 and offset ``PRESERVE_LOGIT``, so
  the gate is ``sigmoid(PRESERVE_LOGIT)`` for every input, in train and eval mode;
* ``gate="hard_sigmoid"`` (not in the paper): MobileNetV3's hard sigmoid instead of the
  sigmoid; ``--init preserve`` then makes the gate exactly 1 (see :mod:`attnsurgeon.layers`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import gate_layer, initialised, preserve_logit

__all__ = ["ECA", "adaptive_kernel_size", "build", "reference_kernel_size"]


def adaptive_kernel_size(channels: int, *, gamma: float = 2.0, b: float = 1.0) -> int:
    """The paper's k = |log2(C)/gamma + b/gamma|_odd: nearest odd, ties to the smaller, >= 1."""
    t = (math.log2(channels) + b) / gamma
    k = 2 * math.ceil((t - 1) / 2 - 0.5) + 1  # nearest odd; an even t goes down to t - 1
    return max(1, k)


def reference_kernel_size(channels: int, *, gamma: float = 2.0, b: float = 1.0) -> int:
    """The reference code's (and timm's) rounding: ``int`` then up to odd; for comparison."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient channel attention on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        kernel_size: k, odd; 0 picks it from C by the paper's adaptive rule.
        gamma: gamma of the adaptive rule.
        b: b of the adaptive rule.
        gate: ``"sigmoid"`` (the paper's) or ``"hard_sigmoid"``.
    """

    offset: Tensor

    def __init__(self, channels: int, *, kernel_size: int = 0, gamma: float = 2.0, b: float = 1.0,
                 gate: str = "sigmoid") -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if kernel_size < 0 or (kernel_size and kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be 0 (adaptive) or odd, got {kernel_size}")
        k = kernel_size or adaptive_kernel_size(channels, gamma=gamma, b=b)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)  # the paper's C1D_k
        self.register_buffer("offset", torch.zeros(()))
        self.gate = gate_layer(gate)

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    def _scale(self, x: Tensor) -> Tensor:
        """The channel weights, shape ``(N, C, 1, 1)``."""
        y = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C)
        s = self.gate(self.conv(y) + self.offset)
        return s.transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self._scale(x)

    def gate_add(self, x: Tensor, identity: Tensor) -> Tensor:
        """``forward(x) + identity`` in one pass (see :mod:`attnsurgeon.layers`)."""
        return torch.addcmul(identity, x, self._scale(x))

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.zeros_(self.offset)

    def preserve_(self) -> None:
        """Start as (almost) the identity: gate(preserve_logit) for every input."""
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.offset, preserve_logit(self.gate))


def build(channels: int, *, init: str = "paper", kernel_size: int = 0, gamma: float = 2.0,
          b: float = 1.0, gate: str = "sigmoid") -> ECA:
    return initialised(ECA(channels, kernel_size=kernel_size, gamma=gamma, b=b, gate=gate), init)
