"""Adaptive feature processing (AFP): four branches fused by learnable softmax weights.

Paper: Few-shot image classification based on adaptive feature fusion and transformation
(Computer Engineering and Applications, 2021; no arXiv version); the code follows a
blog post's, https://blog.csdn.net/weixin_43312117/article/details/121374486

Four branches of the same shape as the input, summed with weights ``a = softmax(w)``::

    out = a_1 * maxpool3x3(x) + a_2 * avgpool3x3(x) + a_3 * SE(DConv(x)) + a_4 * x
    DConv(x) = [conv3x3(conv3x3(conv1x1(x))) ; conv3x3(conv1x1(x))]   (channel concat)

The pools have stride 1 and padding 1. DConv's first sub-branch (C -> C/2 channels) uses
two 3x3 convs in place of a 5x5, its second (C -> C - C/2) one 3x3; the concatenation has
C channels and goes through a Squeeze-and-Excitation gate of hidden width C / r, r = 2.
``w`` starts at ones (equal weights), all convs have biases.

Departures from the paper and the blog's code:

* the average pool is 3x3 with stride 1 and padding 1, as in the blog's code; the paper
  (as the blog quotes it) sets its size to 2, which at stride 1 would shrink the
  map by one pixel and make the branches impossible to add. As in the blog's code, the
  zero padding counts in the border averages (``count_include_pad``);
* the DConv widths are ``C // 2`` and ``C - C // 2``: the blog hard-codes C = 3 (1 and 2
  channels), the paper says each 1x1 conv halves the channels;
* no normalisation or activation between the DConv convolutions, as in the blog's code;
* the SE gate is :class:`~attnsurgeon.layers.squeeze_excite.SqueezeExcite` with
  ``reduction = 2``: the blog's ``r = 0.5`` multiplies the width (hidden ``int(C * 0.5)``
  = ``C // 2``); its FCs are 1x1 convs, the same parameters as the blog's ``nn.Linear``;
* ``w`` indexes the branches in the blog code's order (max, avg, DConv, identity); the
  paper's formula lists them as identity, DConv, max, avg. The function is the same;
* the weights are ``softmax(w)``, the blog's ``exp(w_i) / sum_j exp(w_j)`` computed
  without overflow; nothing is printed in ``forward``;
* the sum is computed as ``x + sum_{i<4} a_i (branch_i - x)``, equal since the weights
  sum to 1 (same function, same gradients): under ``--init preserve`` the blog's form
  multiplies ``x`` by the constant ``a_4 = 1 - 3.4e-7``, and the ONNX exporter's optimiser
  (onnxscript's ``mul_by_1`` rule, relative tolerance 1e-5) rewrites that product to
  ``x``, so the ONNX model drifted from the PyTorch one by that much per module;
* ``--init paper`` is PyTorch's default initialisation, as in the blog's code, and w = 1;
* ``--init preserve`` (not in the source) sets ``w = [0, 0, 0, PRESERVE_LOGIT]``: the
  identity gets weight ``1 - 3.4e-7`` and each other branch ``1.1e-7``; the convs keep
  their paper initialisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import PRESERVE_LOGIT, initialised
from .squeeze_excite import SqueezeExcite

__all__ = ["AFP", "build"]


class AFP(nn.Module):
    """Adaptive feature processing on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map (at least 2, so DConv can halve them).
        reduction: r, the ratio of the SE gate after DConv (hidden width C / r).
    """

    def __init__(self, channels: int, *, reduction: int = 2) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"channels must be >= 2, got {channels}")
        half = channels // 2
        rest = channels - half
        self.max_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.avg_pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.dconv_a = nn.Sequential(
            nn.Conv2d(channels, half, 1),
            nn.Conv2d(half, half, 3, padding=1),
            nn.Conv2d(half, half, 3, padding=1),
        )
        self.dconv_b = nn.Sequential(
            nn.Conv2d(channels, rest, 1),
            nn.Conv2d(rest, rest, 3, padding=1),
        )
        self.se = SqueezeExcite(channels, reduction=reduction)
        self.w = nn.Parameter(torch.ones(4))  # w_i; the fusion weights are softmax(w)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.softmax(self.w, dim=0)
        dconv = self.se(torch.cat([self.dconv_a(x), self.dconv_b(x)], dim=1))
        # a_1 max + a_2 avg + a_3 dconv + a_4 x, written around x (the a_i sum to 1)
        return (x + a[0] * (self.max_pool(x) - x) + a[1] * (self.avg_pool(x) - x)
                + a[2] * (dconv - x))

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        nn.init.ones_(self.w)

    def preserve_(self) -> None:
        """Start as (almost) the identity: softmax(w) puts ``1 - 3.4e-7`` on ``x``."""
        with torch.no_grad():
            self.w.zero_()
            self.w[3] = PRESERVE_LOGIT  # the identity branch


def build(channels: int, *, init: str = "paper", reduction: int = 2) -> AFP:
    return initialised(AFP(channels, reduction=reduction), init)
