"""ResNet-family blocks (torchvision ``BasicBlock`` and ``Bottleneck``).

Covers resnet18/34/50/101/152, resnext50_32x4d/101_32x8d/101_64x4d and
wide_resnet50_2/101_2. A block becomes *slotted* by switching its class, in place, to a
subclass whose forward runs four optional attention slots (``nn.Identity`` until filled)::

    x ─┬─ attn_identity ─ downsample? ────────────────┐
       │                                             (+) ─ relu ─ attn_post ─> out
       └─ attn_pre ─ conv ... conv ─ norm ─ attn_standard ┘

The block keeps its children and their names, so every state_dict key of the original
model stays valid: pretrained weights load into the modified model as they are.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import SLOT_ATTR, BlockInfo, ConvSite, HeadInfo

__all__ = ["SlottedBasicBlock", "SlottedBottleneck"]


class SlottedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with the four attention slots of DESIGN.md."""

    attn_pre: nn.Module
    attn_standard: nn.Module
    attn_post: nn.Module
    attn_identity: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        identity = self.attn_identity(x)
        out = self.relu(self.bn1(self.conv1(self.attn_pre(x))))
        out = self.attn_standard(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.attn_post(self.relu(out + identity))


class SlottedBottleneck(Bottleneck):
    """torchvision's Bottleneck with the four attention slots of DESIGN.md."""

    attn_pre: nn.Module
    attn_standard: nn.Module
    attn_post: nn.Module
    attn_identity: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        identity = self.attn_identity(x)
        out = self.relu(self.bn1(self.conv1(self.attn_pre(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn_standard(self.bn3(self.conv3(out)))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.attn_post(self.relu(out + identity))


_SLOTTED = {BasicBlock: SlottedBasicBlock, Bottleneck: SlottedBottleneck}


def recognises(module: nn.Module) -> bool:
    """Exact types only: a subclass (e.g. the quantizable blocks) has its own forward."""
    return type(module) in (BasicBlock, Bottleneck, SlottedBasicBlock, SlottedBottleneck)


def make_slotted(block: nn.Module) -> nn.Module:
    """Give ``block`` its slots (idempotent); returns the same object."""
    if isinstance(block, (SlottedBasicBlock, SlottedBottleneck)):
        return block
    base = type(block)
    if base not in _SLOTTED:
        raise TypeError(f"cannot slot a subclass of {base.__name__} with its own forward")
    block.__class__ = _SLOTTED[base]
    for attr in SLOT_ATTR.values():
        setattr(block, attr, nn.Identity())
    return block


def _stride(conv: nn.Module) -> int:
    stride = getattr(conv, "stride", 1)
    return int(stride[0] if isinstance(stride, tuple) else stride)


def describe(name: str, module: nn.Module) -> BlockInfo | None:
    if not recognises(module):
        return None
    down = module.downsample
    convs: list[ConvSite]
    if isinstance(module, Bottleneck):
        convs = [ConvSite("conv1", "bn1", False), ConvSite("conv2", "bn2", True, main=True),
                 ConvSite("conv3", "bn3", False)]
        first, last = module.conv1, module.conv3
    else:
        convs = [ConvSite("conv1", "bn1", True, main=True), ConvSite("conv2", "bn2", True)]
        first, last = module.conv1, module.conv2
    if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d):
        convs.append(ConvSite("downsample.0", "downsample.1", down[0].kernel_size != (1, 1)))
    stride = max(_stride(m) for m in (module.conv1, module.conv2))
    base = BasicBlock if isinstance(module, BasicBlock) else Bottleneck
    return BlockInfo(
        name=name,
        stage=name.rpartition(".")[0] or name,
        type=base.__name__,
        in_channels=int(first.in_channels),  # replacements (SK, dynconv) keep Conv2d's
        out_channels=int(last.out_channels),  # in_channels/out_channels/stride attributes
        stride=stride,
        downsample=down is not None,
        convs=tuple(convs),
    )


def find_head(model: nn.Module) -> HeadInfo | None:
    if isinstance(model, ResNet) and isinstance(model.fc, nn.Linear):
        return HeadInfo(pool="avgpool", channels=model.fc.in_features)
    return None
