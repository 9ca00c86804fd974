"""Residual-block adapters: where each block's slots and convolutions are.

An adapter recognises one family of residual blocks by type and describes each block as a
:class:`BlockInfo`: its dotted name, stage, channels, stride and convolution sites. It can
also turn a block into its *slotted* form, whose forward has the four insertion positions
of DESIGN.md (``pre``, ``standard``, ``post``, ``identity``). One file per family; only the
ResNet family (torchvision ``BasicBlock`` / ``Bottleneck``) exists so far.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..kinds import POSITIONS

__all__ = ["BlockInfo", "ConvSite", "HeadInfo", "SLOT_ATTR", "find_blocks", "find_head", "make_slotted"]

SLOT_ATTR = {pos: f"attn_{pos}" for pos in POSITIONS}


@dataclass(frozen=True)
class ConvSite:
    """A convolution of a block, relative to the block: ``conv`` and the norm after it."""

    conv: str
    norm: str | None
    spatial: bool  # kernel larger than 1x1
    main: bool = False  # the block's main spatial conv (what SK replaces)


@dataclass(frozen=True)
class BlockInfo:
    """One residual block as the user sees it in ``attnsurgeon blocks``."""

    name: str
    stage: str
    type: str
    in_channels: int
    out_channels: int
    stride: int
    downsample: bool
    convs: tuple[ConvSite, ...]
    slots: tuple[str, ...] = POSITIONS

    def slot_channels(self, position: str) -> int:
        """``pre`` and ``identity`` see the block input; ``standard`` and ``post`` its output."""
        return self.in_channels if position in ("pre", "identity") else self.out_channels

    def to_data(self) -> dict[str, object]:
        return {
            "name": self.name, "stage": self.stage, "type": self.type,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "stride": self.stride, "downsample": self.downsample,
            "spatial_convs": [c.conv for c in self.convs if c.spatial],
            "convs": [c.conv for c in self.convs],
            "slots": list(self.slots),
        }


@dataclass(frozen=True)
class HeadInfo:
    """Where the classifier's global pool is and how many channels it pools."""

    pool: str
    channels: int


from . import resnet as _resnet  # noqa: E402  (adapters register below)

_ADAPTERS = (_resnet,)


def find_blocks(model: nn.Module) -> list[tuple[BlockInfo, nn.Module]]:
    """Every residual block any adapter recognises, in module order."""
    found = []
    for name, module in model.named_modules():
        for adapter in _ADAPTERS:
            info = adapter.describe(name, module)
            if info is not None:
                found.append((info, module))
                break
    return found


def make_slotted(block: nn.Module) -> nn.Module:
    for adapter in _ADAPTERS:
        if adapter.recognises(block):
            return adapter.make_slotted(block)
    raise TypeError(f"no adapter for {type(block).__name__}")


def find_head(model: nn.Module) -> HeadInfo | None:
    for adapter in _ADAPTERS:
        head = adapter.find_head(model)
        if head is not None:
            return head
    return None
