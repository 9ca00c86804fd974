"""Non-local block, embedded Gaussian.

Paper: Non-local Neural Networks (Wang, Girshick, Gupta, He; CVPR 2018),
https://arxiv.org/abs/1711.07971

``z = x + BN(W_z y)`` with ``y_i = sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j)``
(Eq. 1-3), where theta, phi and g are 1x1 convs C -> C/r and W_z a 1x1 conv C/r -> C,
r = 2 (the paper's "half of the channels"). As in mmcv's ``NonLocal2d`` (the block
mmdetection and mmsegmentation plug in), ``use_scale`` divides the pairwise logits by
sqrt(C/r), and the BN after W_z starts at gamma = beta = 0 (the paper, Sec. 4.1), so the
block starts as the identity.

Cost: the pairwise matrix is (HW) x (HW) per image, so memory and MACs grow with the
square of the resolution, so it belongs on late, low-resolution stages. ``insert`` and
``summarize`` warn on a stage where the inserted modules cost more MACs than the stage's
own layers.

Departures from mmcv:

* theta, phi and g have biases and W_z has none (its BN follows), as mmcv's ``ConvModule``
  builds them with a norm on the last conv only; ``--init paper`` is mmcv's: theta, phi,
  g normal(0, 0.01) with bias 0, W_z Kaiming (PyTorch's default), BN gamma = beta = 0;
* ``--init preserve`` is the same (already the identity, exactly, in train and eval mode);
* hidden width ``max(1, C // r)``;
* ``use_scale`` multiplies theta by 1 / sqrt(C/r) before the pairwise product, where mmcv
  divides the product (the same function, to float rounding): HW x C/r multiplies instead
  of (HW)^2, and in an INT8 file the product keeps a float operand, which stops onnxruntime
  from fusing the float-kept product into a slower integer one (README, quantized export).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from . import initialised

__all__ = ["NonLocal", "build", "pairwise_macs"]


def pairwise_macs(channels: int, height: int, width: int, *, reduction: int = 2) -> int:
    """MACs of one block at H x W: the four 1x1 convs plus the two (HW)^2 products."""
    hidden = max(1, channels // reduction)
    hw = height * width
    return 4 * channels * hidden * hw + 2 * hidden * hw * hw


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map.
        reduction: r, the bottleneck ratio (hidden width C / r).
        use_scale: divide the pairwise logits by sqrt(C / r), as mmcv does by default.
    """

    def __init__(self, channels: int, *, reduction: int = 2, use_scale: bool = True) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.scale = 1 / math.sqrt(hidden) if use_scale else 1.0
        self.theta = nn.Conv2d(channels, hidden, 1)
        self.phi = nn.Conv2d(channels, hidden, 1)
        self.g = nn.Conv2d(channels, hidden, 1)
        self.conv_out = nn.Conv2d(hidden, channels, 1, bias=False)  # W_z
        self.norm = nn.BatchNorm2d(channels)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        if self.scale != 1.0:
            theta = theta * self.scale  # before the product: HW x C' multiplies, not (HW)^2
        phi = self.phi(x).flatten(2)  # (N, C', HW)
        g = self.g(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        attn = (theta @ phi).softmax(-1)  # (N, HW, HW), Eq. 3
        y = (attn @ g).transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:])
        return x + self.norm(self.conv_out(y))

    def reset_parameters(self) -> None:
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.conv_out.reset_parameters()
        self.norm.reset_running_stats()
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def preserve_(self) -> None:
        """The identity, exactly: the paper's zero-initialised BN (``reset_parameters``)."""
        self.reset_parameters()


def build(channels: int, *, init: str = "paper", reduction: int = 2, use_scale: int = 1) -> NonLocal:
    return initialised(NonLocal(channels, reduction=reduction, use_scale=bool(use_scale)), init)
