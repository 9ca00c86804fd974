"""EfficientNet and EfficientNetV2: torchvision's ``MBConv`` and ``FusedMBConv``.

Covers efficientnet_b0..b7 and efficientnet_v2_s/m/l::

    x ─┬─ attn_identity ────────────────────────────────────────────────────────────────┐
       │                                                                   stochastic depth (+) ─ attn_post ─>
       └─ attn_pre ─ expand? ─ depthwise ─ [attn_mid] ─ SE ─ project ─ attn_standard ─┘

FusedMBConv fuses expansion and the spatial conv into one 3x3 (``mid`` follows it) and has
no SE. Blocks without a shortcut have no ``identity`` slot. Stochastic depth stays where
it is: it drops the whole branch, the modules at ``pre``, ``mid`` and ``standard``
included, as it drops the built-in SE. ``builtin`` replaces MBConv's ``SqueezeExcitation``.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.models.efficientnet import FusedMBConv, MBConv

from . import BlockInfo, Family, SlottedInverted, describe_branch

__all__ = ["FAMILY", "SlottedFusedMBConv", "SlottedMBConv"]


class _Residual(SlottedInverted):
    _body = "block"
    _drops_path = True

    def _drop_path(self, out: Tensor) -> Tensor:
        return self.stochastic_depth(out)


class SlottedMBConv(_Residual, MBConv):
    """torchvision's MBConv with attention slots."""


class SlottedFusedMBConv(_Residual, FusedMBConv):
    """torchvision's FusedMBConv with attention slots."""


def describe(block: MBConv | FusedMBConv) -> BlockInfo:
    return describe_branch(block, "block", shortcut=bool(block.use_res_connect))


FAMILY = Family(
    name="EfficientNet",
    slotted={MBConv: SlottedMBConv, FusedMBConv: SlottedFusedMBConv},
    describe=describe,
)
