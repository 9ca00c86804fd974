"""ConvNeXt: torchvision's ``CNBlock`` (convnext_tiny/small/base/large).

The branch is a 7x7 depthwise conv, then, channels-last, LayerNorm, Linear (C -> 4C),
GELU, Linear (4C -> C); the block scales it by ``layer_scale`` and applies stochastic
depth before the add. Every block has a shortcut::

    x ─┬─ attn_identity ─────────────────────────────────────────────────────────────────┐
       │                                                                                (+) ─ attn_post ─>
       └─ attn_pre ─ dwconv ─ LN ─ Linear ─ GELU ─ [attn_mid] ─ Linear ─ attn_standard ─ x layer_scale ─ drop ┘

``mid`` is on the expanded 4C channels after GELU (the inverted bottleneck's hidden
layer); the tensor is channels-last there, so the module sees it permuted to NCHW and
back. ``standard`` comes before ``layer_scale``, which plays the role of the last norm's
scale. The only conv is the depthwise 7x7 (the Linears are not convs): it is what ``sk``
and ``dynconv`` replace; it has a bias and no norm after it.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.convnext import CNBlock

from . import BlockInfo, ConvSite, Family, Slotted

__all__ = ["FAMILY", "SlottedCNBlock"]

_MID = 4  # block[4] is the GELU after the expanding Linear


class SlottedCNBlock(Slotted, CNBlock):
    """ConvNeXt's CNBlock with attention slots."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.attn_pre(x)
        for i, layer in enumerate(self.block):
            out = layer(out)
            if i == _MID and not isinstance(self.attn_mid, nn.Identity):
                out = self.attn_mid(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.stochastic_depth(self.layer_scale * self.attn_standard(out))
        return self.attn_post(out + self.attn_identity(x))


def describe(block: CNBlock) -> BlockInfo:
    dw = block.block[0]
    expand = block.block[3]
    return BlockInfo(
        name="", stage="", type="CNBlock", in_channels=int(dw.in_channels),
        mid_channels=int(expand.out_features), out_channels=int(dw.out_channels),
        stride=1, shortcut=True, downsample=False,
        convs=(ConvSite("block.0", None, spatial=True, main=True),),
    )


FAMILY = Family(name="ConvNeXt", slotted={CNBlock: SlottedCNBlock}, describe=describe)
