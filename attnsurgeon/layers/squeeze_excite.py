"""Squeeze-and-Excitation.

Paper: Squeeze-and-Excitation Networks (Hu, Shen, Sun; CVPR 2018),
https://arxiv.org/abs/1709.01507

``x -> global average pool -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid -> x * s``
(Eq. 2-4 of the paper), with biases, r = 16 by default. SE-ResNet-50 built this way has
28,088,024 parameters: the paper's 28.1M (Tables 10, 13) and CBAM's 28.09M (Table 4).

Departures from the paper:

* the FCs are 1x1 convolutions on the pooled ``(N, C, 1, 1)`` tensor: the same parameters
  and arithmetic as ``nn.Linear``, without the reshapes that complicate ONNX graphs;
* the hidden width is ``max(1, C // r)``: the paper only uses C divisible by r;
* ``--init paper`` is PyTorch's default initialisation, as in the reference
  implementations (timm, torchvision); the paper names none.

``variant="effective"`` is eSE (CenterMask: Real-Time Anchor-Free Instance Segmentation,
Lee, Park; CVPR 2020, https://arxiv.org/abs/1911.06667; timm's ``EffectiveSEModule``,
``--attn ese`` in timm): one FC C -> C with bias, no reduction, and a hard sigmoid
``relu6(t + 3) / 6``, i.e. C^2 + C parameters. Its ``--init preserve``: weight 0 and bias
``3 - 6 (1 - sigmoid(PRESERVE_LOGIT))``, so the gate is ``sigmoid(PRESERVE_LOGIT)`` for
every input, like SE's. A bias of 3 would give exactly 1, but the hard sigmoid's
gradient is 0 from 3 on, and the module could never learn.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from . import PRESERVE_LOGIT, initialised

__all__ = ["VARIANTS", "EffectiveSqueezeExcite", "SqueezeExcite", "build"]

VARIANTS = ("standard", "effective")


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation gate on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        reduction: r, the ratio of the bottleneck MLP (hidden width C / r).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)  # W1 in Eq. 3
        self.act = nn.ReLU(inplace=True)  # delta
        self.fc2 = nn.Conv2d(hidden, channels, 1)  # W2 in Eq. 3
        self.gate = nn.Sigmoid()  # sigma

    def _scale(self, x: Tensor) -> Tensor:
        """The excitation s of Eq. 3, shape ``(N, C, 1, 1)``."""
        z = x.mean((2, 3), keepdim=True)  # squeeze, Eq. 2
        return self.gate(self.fc2(self.act(self.fc1(z))))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.scale(x, self._scale(x))  # Eq. 4: x * s

    def gate_add(self, x: Tensor, identity: Tensor, *, relu: bool = False) -> Tensor:
        """``forward(x) + identity`` in one pass, then ReLU if ``relu`` (see :mod:`attnsurgeon.layers`)."""
        return kernels.scale(x, self._scale(x), identity, relu=relu)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: s = sigmoid(PRESERVE_LOGIT) for every input."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, PRESERVE_LOGIT)


class EffectiveSqueezeExcite(nn.Module):
    """eSE: one FC C -> C and a hard sigmoid (see the module docstring).

    Args:
        channels: C, the channels of the feature map it gates.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.fc = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def _scale(self, x: Tensor) -> Tensor:
        return self.gate(self.fc(x.mean((2, 3), keepdim=True)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self._scale(x)

    def gate_add(self, x: Tensor, identity: Tensor) -> Tensor:
        """``forward(x) + identity`` in one pass (see :mod:`attnsurgeon.layers`)."""
        return torch.addcmul(identity, x, self._scale(x))

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: gate = sigmoid(PRESERVE_LOGIT) for every input."""
        nn.init.zeros_(self.fc.weight)
        gap = 1 - torch.sigmoid(torch.tensor(PRESERVE_LOGIT)).item()
        nn.init.constant_(self.fc.bias, 3.0 - 6.0 * gap)


def build(channels: int, *, init: str = "paper", reduction: int = 16,
          variant: str = "standard") -> SqueezeExcite | EffectiveSqueezeExcite:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "effective":
        return initialised(EffectiveSqueezeExcite(channels), init)
    return initialised(SqueezeExcite(channels, reduction=reduction), init)
