"""RegNet: torchvision's ``ResBottleneckBlock`` (regnet_x_* and regnet_y_*).

The branch ``f`` is a ``BottleneckTransform``: ``a`` (1x1), ``b`` (3x3 grouped, the main
conv), ``se`` (RegNetY only) and ``c`` (1x1); ``proj`` projects the shortcut where the
shape changes. Every block has a shortcut::

    x ─┬─ attn_identity ─ proj? ──────────────────────────────────────┐
       │                                                             (+) ─ relu ─ attn_post ─>
       └─ attn_pre ─ a ─ b ─ [attn_mid] ─ se? ─ c ─ attn_standard ────┘

``builtin`` replaces RegNetY's ``SqueezeExcitation``; a new module at ``mid`` runs before it.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.models.regnet import ResBottleneckBlock

from . import BlockInfo, Family, Slotted, describe_branch

__all__ = ["FAMILY", "SlottedResBottleneckBlock"]


class SlottedResBottleneckBlock(Slotted, ResBottleneckBlock):
    """RegNet's ResBottleneckBlock with attention slots."""

    _body = "f"

    def forward(self, x: Tensor) -> Tensor:
        identity = self.attn_identity(x)
        if self.proj is not None:
            identity = self.proj(identity)
        return self.attn_post(self._standard_add(self._body_out(x), identity, self.activation))


def describe(block: ResBottleneckBlock) -> BlockInfo:
    return describe_branch(block, "f", shortcut=True, downsample="proj" if block.proj is not None else None)


FAMILY = Family(
    name="RegNet",
    slotted={ResBottleneckBlock: SlottedResBottleneckBlock},
    describe=describe,
)
