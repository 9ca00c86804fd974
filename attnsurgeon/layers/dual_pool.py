"""Dual pooling head: global average and global max pooling, concatenated and reduced.

Paper: none; a Kaggle technique (shared by the Kaggle Master "gray"), as reproduced in the
blog post "Attention机制中CBAM以及Dual pooling的pytorch实现" (CSDN).

Replaces a ResNet's global average pool; ResNet's ``forward`` then flattens the result
and applies its own ``fc``::

    (N, C, H, W) -> [avgpool(x) ; maxpool(x)] -> conv1x1(2C -> C, bias) -> dropout(0.5)
                 -> (N, C, 1, 1)

Departures from the blog's code:

* the dropout sits in this module, before the model's own ``fc``, instead of in a new
  ``Sequential(Dropout, Linear)`` classifier: the same computation, and every original
  parameter keeps its name, so pretrained weights load unchanged;
* global max pooling is ``amax`` over H, W (exports to ONNX as ``ReduceMax``) instead of
  ``nn.AdaptiveMaxPool2d(1)``; the function is the same;
* the channel count comes from the model (the blog hard-codes resnet18's 1024 -> 512);
* ``--init paper`` is PyTorch's default initialisation, as in the blog's code;
* ``--init preserve`` (not in the blog) sets the reduce conv's weight to ``[I | 0]`` and
  its bias to 0: it passes the average-pooled half through and ignores the max-pooled
  half, so in eval mode (dropout off) the model computes exactly what the original did.
  In train mode the dropout still drops and rescales features, as it should.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import initialised

__all__ = ["DualPool", "build"]


class DualPool(nn.Module):
    """Concat(global avg pool, global max pool) -> 1x1 reduce -> dropout.

    Args:
        channels: C, the channels of the feature map it pools (and of its output).
        dropout: the dropout probability after the reduce conv.
    """

    def __init__(self, channels: int, *, dropout: float = 0.5) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)], dim=1)
        return self.dropout(self.reduce(pooled))

    def reset_parameters(self) -> None:
        self.reduce.reset_parameters()

    def preserve_(self) -> None:
        """Output the average-pooled features: weight ``[I | 0]``, bias 0."""
        channels = self.reduce.out_channels
        with torch.no_grad():
            self.reduce.weight.zero_()
            self.reduce.weight[:, :channels, 0, 0].fill_diagonal_(1.0)
            self.reduce.bias.zero_()


def build(channels: int, *, init: str = "paper") -> DualPool:
    return initialised(DualPool(channels), init)
