"""Efficient Channel Attention: SE's gate without the reduction, a 1-D conv across channels.

Paper: ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks
(Wang, Wu, Zhu, Li, Zuo, Hu; CVPR 2020), https://arxiv.org/abs/1910.03151

``x -> global average pool -> conv1d of size k across channels (no bias) -> sigmoid -> x * s``,
with k parameters per module and ``k = |(log2(C) + b) / gamma|_odd`` (gamma = 2, b = 1), the
nearest odd number. On an even t this module rounds down: that gives the 80 parameters the
paper states for ResNet-50 (k = 5 everywhere); the reference code
(github.com/BangguWu/ECANet, and timm) rounds up, 86 (:func:`reference_kernel_size`). The
authors' released ECA-Net50 fixes k = 3, 5, 5, 7 per stage, also 80
(``recipes/eca_resnet50.toml``).

Departures from the paper:

* the gate is ``sigmoid(conv1d(y) + offset)`` with ``offset`` a fixed buffer: 0 under
  ``--init paper`` (the paper's ECA exactly), ``PRESERVE_LOGIT`` under ``--init preserve``
  with the conv's weight 0 (a bias-free conv cannot make the gate constant otherwise);
  a buffer keeps the count at k and the same state_dict keys for both inits;
* ``kernel_size = 0`` means the adaptive rule; a positive odd value fixes k;
* the pooled vector is reshaped with ``unsqueeze``/``transpose`` only, so ONNX export keeps
  a dynamic batch;
* ``--init paper`` is PyTorch's default for ``nn.Conv1d``, as in the reference code;
* ``gate="hard_sigmoid"`` (not in the paper): MobileNetV3's hard sigmoid instead of the
  sigmoid; ``--init preserve`` then makes the gate exactly 1 (see :mod:`attnsurgeon.layers`).

``padding="circular"`` is timm's circular ECA (``CecaModule``): the channel axis wraps
around instead of being zero-padded; same parameters, same state_dict keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import kernels
from . import gate_layer, initialised, preserve_logit

__all__ = ["ECA", "PADDINGS", "adaptive_kernel_size", "build", "reference_kernel_size"]

PADDINGS = ("zeros", "circular")


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
        padding: ``"zeros"`` (the paper) or ``"circular"`` (timm's CECA) along the channels.
        gate: ``"sigmoid"`` (the paper's) or ``"hard_sigmoid"``.
    """

    offset: Tensor

    def __init__(self, channels: int, *, kernel_size: int = 0, gamma: float = 2.0, b: float = 1.0,
                 padding: str = "zeros", gate: str = "sigmoid") -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if kernel_size < 0 or (kernel_size and kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be 0 (adaptive) or odd, got {kernel_size}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        k = kernel_size or adaptive_kernel_size(channels, gamma=gamma, b=b)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False, padding_mode=padding)  # the paper's C1D_k
        self.register_buffer("offset", torch.zeros(()))
        self.gate = gate_layer(gate)

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    def _scale(self, x: Tensor) -> Tensor:
        """The channel weights, shape ``(N, C, 1, 1)``."""
        return self._excite(x.mean((2, 3)))

    def _excite(self, z: Tensor) -> Tensor:
        """The channel weights from the pooled ``z`` (N, C)."""
        s = self.gate(self.conv(z.unsqueeze(1)) + self.offset)  # conv over (N, 1, C)
        return s.transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.scale(x, self._scale(x))  # x * s

    FUSES_RELU = True  # gate_add takes relu= (blocks.Slotted._standard_add)

    def gate_add(self, x: Tensor, identity: Tensor, *, relu: bool = False) -> Tensor:
        """``forward(x) + identity`` in one pass, then ReLU if ``relu`` (see :mod:`attnsurgeon.layers`)."""
        return kernels.scale(x, self._scale(x), identity, relu=relu)

    def gate_norm_act(self, y: Tensor, pre: kernels.NormAct) -> Tensor:
        """``forward(pre(y))``, ``pre`` the block's eval-mode norm and activation before the
        gate: on a GPU two reads of y and one write, ``pre(y)`` never written."""
        return kernels.scale(y, self._excite(kernels.norm_act_mean_max(y, pre)[0].flatten(1)), pre=pre)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.zeros_(self.offset)

    def preserve_(self) -> None:
        """Start as (almost) the identity: gate(preserve_logit) for every input."""
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.offset, preserve_logit(self.gate))


def build(channels: int, *, init: str = "paper", kernel_size: int = 0, gamma: float = 2.0,
          b: float = 1.0, padding: str = "zeros", gate: str = "sigmoid") -> ECA:
    return initialised(ECA(channels, kernel_size=kernel_size, gamma=gamma, b=b, padding=padding, gate=gate), init)
