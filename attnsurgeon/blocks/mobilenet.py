"""MobileNetV2 and MobileNetV3: torchvision's two ``InvertedResidual`` classes.

Covers mobilenet_v2, mobilenet_v3_small/large and the detection and segmentation models
built on MobileNetV3 (``fasterrcnn_mobilenet_v3_large(_320)_fpn``,
``ssdlite320_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``,
``deeplabv3_mobilenet_v3_large``, whose last stage is dilated)::

    x ─┬─ attn_identity ───────────────────────────────────────────────────────┐ (shortcut only)
       │                                                                      (+) ─ attn_post ─>
       └─ attn_pre ─ expand? ─ depthwise ─ [attn_mid] ─ SE? ─ project ─ attn_standard ┘

Blocks with a stride or a channel change have no shortcut, hence no ``identity`` slot;
``post`` then follows ``standard`` directly. ``mid`` is on the expanded channels after the
depthwise conv, its norm and activation: where MobileNetV3 keeps its own SE (a new module
at ``mid`` runs before it) and where coordinate attention and ECA put theirs in
MobileNetV2. ``builtin`` replaces MobileNetV3's ``SqueezeExcitation``. SSDLite splits one
block across two Sequentials; that block is not found.
"""

from __future__ import annotations

from torchvision.models import mobilenetv2, mobilenetv3

from . import BlockInfo, Family, SlottedInverted, describe_branch

__all__ = ["FAMILY", "SlottedInvertedResidualV2", "SlottedInvertedResidualV3"]


class SlottedInvertedResidualV2(SlottedInverted, mobilenetv2.InvertedResidual):
    """MobileNetV2's InvertedResidual with attention slots."""

    _body = "conv"


class SlottedInvertedResidualV3(SlottedInverted, mobilenetv3.InvertedResidual):
    """MobileNetV3's InvertedResidual with attention slots."""

    _body = "block"


def describe(block: mobilenetv2.InvertedResidual | mobilenetv3.InvertedResidual) -> BlockInfo:
    body = "conv" if isinstance(block, mobilenetv2.InvertedResidual) else "block"
    return describe_branch(block, body, shortcut=bool(block.use_res_connect))


FAMILY = Family(
    name="MobileNetV2/V3",
    slotted={mobilenetv2.InvertedResidual: SlottedInvertedResidualV2,
             mobilenetv3.InvertedResidual: SlottedInvertedResidualV3},
    describe=describe,
    native_stages=False,
)
