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
  implementations (timm, torchvision); the paper names none;
* ``gate="hard_sigmoid"`` (not in the paper) swaps sigma for MobileNetV3's hard sigmoid
  (Searching for MobileNetV3, Howard et al., ICCV 2019, https://arxiv.org/abs/1905.02244);
  ``--init preserve`` is then exact (see :mod:`attnsurgeon.layers`).

``variant="effective"`` is eSE (CenterMask: Real-Time Anchor-Free Instance Segmentation,
Lee, Park; CVPR 2020, https://arxiv.org/abs/1911.06667; timm's ``EffectiveSEModule``,
``--attn ese`` in timm): one FC C -> C with bias, no reduction, and a hard sigmoid
``relu6(t + 3) / 6`` (always: ``gate`` applies to the standard variant), i.e. C^2 + C
parameters. Its ``--init preserve`` is exact: weight 0 and bias
:data:`~attnsurgeon.layers.HARD_PRESERVE_LOGIT`, the largest float32 below 3, where the
gate is 1.0 and its gradient still 1/6 (from 3 on it is 0 and the module could never learn).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from . import gate_layer, initialised, preserve_logit

__all__ = ["VARIANTS", "EffectiveSqueezeExcite", "SqueezeExcite", "build"]

VARIANTS = ("standard", "effective")


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation gate on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        reduction: r, the ratio of the bottleneck MLP (hidden width C / r).
        gate: ``"sigmoid"`` (the paper's sigma) or ``"hard_sigmoid"``.
    """

    def __init__(self, channels: int, *, reduction: int = 16, gate: str = "sigmoid") -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)  # W1 in Eq. 3
        self.act = nn.ReLU(inplace=True)  # delta
        self.fc2 = nn.Conv2d(hidden, channels, 1)  # W2 in Eq. 3
        self.gate = gate_layer(gate)  # sigma

    def _scale(self, x: Tensor) -> Tensor:
        """The excitation s of Eq. 3, shape ``(N, C, 1, 1)``."""
        return self._excite(x.mean((2, 3), keepdim=True))  # squeeze, Eq. 2

    def _excite(self, z: Tensor) -> Tensor:
        return self.gate(self.fc2(self.act(self.fc1(z))))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.scale(x, self._scale(x))  # Eq. 4: x * s

    FUSES_RELU = True  # gate_add takes relu= (blocks.Slotted._standard_add)

    def gate_add(self, x: Tensor, identity: Tensor, *, relu: bool = False) -> Tensor:
        """``forward(x) + identity`` in one pass, then ReLU if ``relu`` (see :mod:`attnsurgeon.layers`)."""
        return kernels.scale(x, self._scale(x), identity, relu=relu)

    def gate_norm_act(self, y: Tensor, pre: kernels.NormAct) -> Tensor:
        """``forward(pre(y))``, ``pre`` the block's eval-mode norm and activation before the
        gate: on a GPU two reads of y and one write, ``pre(y)`` never written."""
        return kernels.scale(y, self._excite(kernels.norm_act_mean_max(y, pre)[0]), pre=pre)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: s = gate(preserve_logit) for every input."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, preserve_logit(self.gate))


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
        """Start as the identity: the gate is exactly 1 for every input (module docstring)."""
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, preserve_logit(self.gate))


def build(channels: int, *, init: str = "paper", reduction: int = 16, variant: str = "standard",
          gate: str = "sigmoid") -> SqueezeExcite | EffectiveSqueezeExcite:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "effective":
        return initialised(EffectiveSqueezeExcite(channels), init)
    return initialised(SqueezeExcite(channels, reduction=reduction, gate=gate), init)
