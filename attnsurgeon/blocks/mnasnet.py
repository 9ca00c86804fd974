"""MNASNet: torchvision's ``_InvertedResidual``.

Covers mnasnet0_5, mnasnet0_75, mnasnet1_0 and mnasnet1_3. The branch is one flat
Sequential (expand conv, BN, ReLU, depthwise conv, BN, ReLU, project conv, BN); ``mid``
follows the depthwise conv's ReLU. Blocks without a shortcut have no ``identity`` slot::

    x ─┬─ attn_identity ─────────────────────────────────────────────────┐ (shortcut only)
       │                                                                (+) ─ attn_post ─>
       └─ attn_pre ─ expand ─ depthwise ─ [attn_mid] ─ project ─ attn_standard ┘
"""

from __future__ import annotations

from torchvision.models.mnasnet import _InvertedResidual

from . import BlockInfo, Family, SlottedInverted, describe_branch

__all__ = ["FAMILY", "SlottedMNASInvertedResidual"]


class SlottedMNASInvertedResidual(SlottedInverted, _InvertedResidual):
    """MNASNet's _InvertedResidual with attention slots."""

    _body = "layers"
    _residual = "apply_residual"


def describe(block: _InvertedResidual) -> BlockInfo:
    return describe_branch(block, "layers", shortcut=bool(block.apply_residual))


FAMILY = Family(
    name="MNASNet",
    slotted={_InvertedResidual: SlottedMNASInvertedResidual},
    describe=describe,
)
