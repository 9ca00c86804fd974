"""Convolutional Block Attention Module.

Paper: CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon; ECCV 2018),
https://arxiv.org/abs/1807.06521

Channel attention, then spatial attention, each a multiplicative gate (Eq. 1)::

    M_c = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))            (Eq. 2)
    x'  = M_c * x
    M_s = sigmoid(BN(conv_kxk([mean_c(x'); max_c(x')])))        (Eq. 3, with BN)
    out = M_s * x'

The MLP is shared by both pooled vectors: C -> C/r -> ReLU -> C, with biases, r = 16;
k = 7 (or 3). ResNet-50 / ResNet-101 with CBAM in every block (``standard`` position)
have 28,089,624 / 49,330,172 parameters: the paper's 28.09M / 49.33M (Table 4).

Departures from the paper:

* the spatial conv is followed by ``BatchNorm2d(1)`` (momentum 0.01), as in the authors'
  official code (github.com/Jongchan/attention-module, ``SpatialGate``); the paper's Eq. 3
  has no BN. It adds 2 parameters per module, which Table 4's counts include;
* the MLP layers are 1x1 convolutions on the pooled ``(N, C, 1, 1)`` tensors: the same
  parameters and arithmetic as the official ``nn.Linear``, without reshapes;
* the hidden width is ``max(1, C // r)``: the paper only uses C divisible by r;
* the spatial descriptor is ``[mean; max]`` in the paper's order (Eq. 3); the official
  code concatenates ``[max; mean]``, so loading its weights needs the two input channels
  of the spatial conv swapped;
* global max pooling is ``amax`` over H, W (exports to ONNX as ``ReduceMax``) instead of a
  pooling layer; the function is the same;
* ``--init paper`` is the official code's initialisation (the paper names none): MLP
  weights PyTorch's default, MLP biases 0, spatial conv Kaiming-normal (fan-out), spatial
  BN gamma = 0 and beta = 0, so the spatial gate starts at a constant 0.5;
* ``--init preserve`` (not in the paper) makes both gates ``sigmoid(PRESERVE_LOGIT)``
  for every input, in train and eval mode: the MLP's last layer gets weight 0 and bias
  ``PRESERVE_LOGIT / 2`` (the bias is added twice, once per pooled path); the spatial
  conv gets weight 0 and its BN gamma 1, beta ``PRESERVE_LOGIT`` and fresh running
  statistics, so the BN maps the all-zero conv output to ``PRESERVE_LOGIT`` with batch
  statistics (train) and with running statistics (eval).

``variant="light"`` is timm's light CBAM (``LightCbamModule``, ``--attn lcbam`` in timm; no
paper of its own): each gate pools once, as ``0.5 (mean + max)``, so the channel MLP runs
once and the spatial conv has one input channel (k^2 + 2 parameters instead of 2k^2 + 2).
timm's MLP has no biases; this one keeps CBAM's (and its init): C / r + C parameters more.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from . import PRESERVE_LOGIT, initialised
from .squeeze_excite import SqueezeExcite

__all__ = ["CBAM", "VARIANTS", "ChannelAttention", "SpatialAttention", "build"]

VARIANTS = ("standard", "light")


class ChannelAttention(SqueezeExcite):
    """CBAM's channel gate M_c (Eq. 2) on ``channels`` channels: SE's MLP (W0 = fc1,
    W1 = fc2), shared by the average- and the max-pooled vector.

    Args:
        channels: C, the channels of the feature map it gates.
        reduction: r, the ratio of the shared MLP (hidden width C / r).
        light: pool once, ``0.5 (avg + max)``, and run the MLP once (timm's light form).
    """

    def __init__(self, channels: int, *, reduction: int = 16, light: bool = False) -> None:
        super().__init__(channels, reduction=reduction)
        self.light = light
        self.reset_parameters()

    def _mlp(self, z: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(z)))

    def _scale(self, x: Tensor) -> Tensor:
        """M_c of Eq. 2, shape ``(N, C, 1, 1)``."""
        return self._pooled(*kernels.mean_max_hw(x))  # x.mean((2, 3)), x.amax((2, 3)), one read on a GPU

    def _pooled(self, avg: Tensor, peak: Tensor) -> Tensor:
        """M_c from the mean and the max over the positions, each ``(N, C, 1, 1)``."""
        if self.light:
            return self.gate(self._mlp(0.5 * avg + 0.5 * peak))
        return self.gate(self._mlp(avg) + self._mlp(peak))

    def gate_norm_act(self, y: Tensor, pre: kernels.NormAct) -> Tensor:
        """``forward(pre(y))`` (see :meth:`SqueezeExcite.gate_norm_act`), with both pools."""
        return kernels.scale(y, self._pooled(*kernels.norm_act_mean_max(y, pre)), pre=pre)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def preserve_(self) -> None:
        """M_c = sigmoid(PRESERVE_LOGIT) for every input (the bias counts once per path)."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, PRESERVE_LOGIT if self.light else PRESERVE_LOGIT / 2)


class SpatialAttention(nn.Module):
    """CBAM's spatial gate M_s (Eq. 3, plus the official code's BN).

    Args:
        kernel_size: k, the odd kernel of the conv over ``[mean; max]`` (7 or 3 in the paper).
        light: one input channel, ``0.5 (mean + max)`` (timm's light form).
    """

    def __init__(self, *, kernel_size: int = 7, light: bool = False) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.light = light
        self.conv = nn.Conv2d(1 if light else 2, 1, kernel_size, padding=kernel_size // 2, bias=False)  # f^{kxk}
        self.bn = nn.BatchNorm2d(1, momentum=0.01)
        self.gate = nn.Sigmoid()
        self.reset_parameters()

    def _scale(self, x: Tensor) -> Tensor:
        """M_s of Eq. 3, shape ``(N, 1, H, W)``."""
        return self._pooled_scale(x.mean(1, keepdim=True), x.amax(1, keepdim=True))

    def _pooled_scale(self, mean: Tensor, peak: Tensor) -> Tensor:
        """M_s from the mean and the max over the channels of its input, each ``(N, 1, H, W)``."""
        pooled = 0.5 * mean + 0.5 * peak if self.light else torch.cat([mean, peak], dim=1)
        return self.gate(self.bn(self.conv(pooled)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self._scale(x)

    def reset_parameters(self, *, gamma: float = 0.0) -> None:
        """The official code's init: kaiming-normal conv, BN scale ``gamma`` (0 for CBAM)."""
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out")
        self.bn.reset_running_stats()
        nn.init.constant_(self.bn.weight, gamma)
        nn.init.zeros_(self.bn.bias)

    def preserve_(self) -> None:
        """M_s = sigmoid(PRESERVE_LOGIT) for every input, in train and eval mode."""
        nn.init.zeros_(self.conv.weight)
        self.bn.reset_running_stats()
        nn.init.ones_(self.bn.weight)
        nn.init.constant_(self.bn.bias, PRESERVE_LOGIT)


class CBAM(nn.Module):
    """Channel attention then spatial attention, on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        reduction: r, the ratio of the channel MLP.
        kernel_size: k, the kernel of the spatial conv.
        variant: ``"standard"`` (the paper) or ``"light"`` (timm's light CBAM).
    """

    def __init__(self, channels: int, *, reduction: int = 16, kernel_size: int = 7, variant: str = "standard") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        light = variant == "light"
        self.channel = ChannelAttention(channels, reduction=reduction, light=light)
        self.spatial = SpatialAttention(kernel_size=kernel_size, light=light)

    def forward(self, x: Tensor) -> Tensor:
        if kernels.active(x) and not kernels.has_hooks(self):
            return self._fused(x, None, relu=False)
        return self.spatial(self.channel(x))

    FUSES_RELU = True  # gate_add takes relu= (blocks.Slotted._standard_add)

    def gate_add(self, x: Tensor, identity: Tensor, *, relu: bool = False) -> Tensor:
        """``forward(x) + identity``, the spatial gate's multiply folded into the add; then
        ReLU if ``relu``."""
        if kernels.active(x, identity):
            return self._fused(x, identity, relu=relu)
        x = self.channel(x)
        out = torch.addcmul(identity, x, self.spatial._scale(x))
        return torch.relu(out) if relu else out

    def gate_norm_act(self, y: Tensor, pre: kernels.NormAct) -> Tensor:
        """``forward(pre(y))``, ``pre`` the block's eval-mode norm and activation before the
        gate: on a GPU three reads of y (two pools, the apply) and one write, ``pre(y)`` and
        ``pre(y) * M_c`` never written."""
        s = self.channel._pooled(*kernels.norm_act_mean_max(y, pre))
        g = self.spatial._pooled_scale(*kernels.spatial_pool(y, s, pre=pre))
        return kernels.scale_spatial(y, s, g, pre=pre)

    def _fused(self, x: Tensor, identity: Tensor | None, *, relu: bool) -> Tensor:
        """GPU kernels: ``x * M_c`` is never written; both pools and the last pass read ``x``."""
        s = self.channel._scale(x)
        g = self.spatial._pooled_scale(*kernels.spatial_pool(x, s))
        return kernels.scale_spatial(x, s, g, identity, relu=relu)

    def reset_parameters(self) -> None:
        self.channel.reset_parameters()
        self.spatial.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: out = sigmoid(PRESERVE_LOGIT)**2 * x."""
        self.channel.preserve_()
        self.spatial.preserve_()


def build(channels: int, *, init: str = "paper", reduction: int = 16, kernel_size: int = 7,
          variant: str = "standard") -> CBAM:
    return initialised(CBAM(channels, reduction=reduction, kernel_size=kernel_size, variant=variant), init)
