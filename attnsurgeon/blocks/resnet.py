"""ResNet family: torchvision ``BasicBlock`` and ``Bottleneck``.

Covers resnet18/34/50/101/152, resnext50_32x4d/101_32x8d/101_64x4d, wide_resnet50_2/101_2
and the detection and segmentation models built on them (``fasterrcnn_resnet50_fpn``,
``maskrcnn_*``, ``retinanet_*``, ``fcos_*``, ``keypointrcnn_*``, ``deeplabv3_resnet*``,
``fcn_resnet*``; their ``FrozenBatchNorm2d`` and dilated stages included)::

    x ─┬─ attn_identity ─ downsample? ──────────────────────────────────┐
       │                                                               (+) ─ relu ─ attn_post ─>
       └─ attn_pre ─ conv1 ─ bn1 ─ relu ─ [attn_mid] ─ ... ─ bn ─ attn_standard ┘

At ``standard`` a gate's last multiply (SE, ECA, CBAM) and the residual add run as one
``addcmul`` (see ``Slotted._standard_add``). ``mid`` follows the main spatial conv with its
norm and ReLU: ``conv2`` in a Bottleneck
(mmdetection's ``after_conv2``), ``conv1`` in a BasicBlock (the first of its two 3x3s).
The block's ``relu`` is one module used several times, so SK keeps it and applies ReLU in
its own paths (ReLU of a mix of ReLU outputs changes nothing).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import BlockInfo, ConvSite, Family, HeadInfo, Slotted

__all__ = ["FAMILY", "SlottedBasicBlock", "SlottedBottleneck"]


class SlottedBasicBlock(Slotted, BasicBlock):
    """torchvision's BasicBlock with the attention slots (:mod:`attnsurgeon.blocks`)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = self.attn_identity(x)
        out = self._gate_mid(self.conv1(self.attn_pre(x)), self.bn1, self.relu)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.attn_post(self._standard_add(out, identity, self.relu))


class SlottedBottleneck(Slotted, Bottleneck):
    """torchvision's Bottleneck with the attention slots (:mod:`attnsurgeon.blocks`)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = self.attn_identity(x)
        out = self.relu(self.bn1(self.conv1(self.attn_pre(x))))
        out = self._gate_mid(self.conv2(out), self.bn2, self.relu)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.attn_post(self._standard_add(out, identity, self.relu))


def _stride(conv: nn.Module) -> int:
    stride = getattr(conv, "stride", 1)
    return int(stride[0] if isinstance(stride, tuple) else stride)


def describe(block: nn.Module) -> BlockInfo:
    def site(conv: str, norm: str, *, spatial: bool = False, main: bool = False) -> ConvSite:
        return ConvSite(conv, norm, spatial, main=main, act_layer=nn.ReLU)

    if isinstance(block, Bottleneck):
        convs = [site("conv1", "bn1"), site("conv2", "bn2", spatial=True, main=True), site("conv3", "bn3")]
        first, main, last = block.conv1, block.conv2, block.conv3
    else:
        convs = [site("conv1", "bn1", spatial=True, main=True), site("conv2", "bn2", spatial=True)]
        first, main, last = block.conv1, block.conv1, block.conv2
    down = block.downsample
    if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d):
        convs.append(ConvSite("downsample.0", "downsample.1", down[0].kernel_size != (1, 1)))
    dilation = getattr(main, "dilation", (1, 1))
    return BlockInfo(
        name="", stage="",
        type=(Bottleneck if isinstance(block, Bottleneck) else BasicBlock).__name__,
        in_channels=int(first.in_channels),  # replacements (SK, dynconv) keep Conv2d's
        mid_channels=int(main.out_channels),  # in_channels/out_channels/stride attributes
        out_channels=int(last.out_channels),
        stride=max(_stride(m) for m in (block.conv1, block.conv2)),
        shortcut=True,
        downsample=down is not None,
        convs=tuple(convs),
        dilation=int(dilation[0]),
    )


def find_head(model: nn.Module) -> HeadInfo | None:
    if isinstance(model, ResNet) and isinstance(model.fc, nn.Linear):
        return HeadInfo(pool="avgpool", channels=model.fc.in_features)
    return None


FAMILY = Family(
    name="ResNet",
    slotted={BasicBlock: SlottedBasicBlock, Bottleneck: SlottedBottleneck},
    describe=describe,
    head=find_head,
)
