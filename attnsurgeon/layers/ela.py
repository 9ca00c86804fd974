"""Efficient local attention (ELA), as timm ships it and as its authors wrote it.

Paper: ELA: Efficient Local Attention for Deep Convolutional Neural Networks (Xu, Wan;
2024), https://arxiv.org/abs/2403.01123; the authors' code: github.com/Xuwei86/ELA_Code

Coordinate attention without the channel reduction: means along W and along H give two
strips ``(N, C, H, 1)`` and ``(N, C, 1, W)``; each goes through a depthwise 1-D conv of
size k (no bias), a GroupNorm and SiLU, and a sigmoid; ``out = x * a_h * a_w``. k = 7.
This is timm's ``EfficientLocalAttn`` (``timm/layers/coord_attn.py``, ``--attn ela`` in
timm's ``create_attn``) with its defaults: separate convs and norms for H and W, GroupNorm
with one group; a module has 2 (k + 2) C parameters.

Departures from timm:

* ``groups`` (the GroupNorm's groups) is a parameter, 1 by default as in timm; where it
  does not divide C the largest divisor of C below it is used;
* ``--init paper`` is PyTorch's default initialisation, as in timm;
* ``--init preserve`` (not in the paper): both GroupNorms get weight 0 and bias
  ``PRESERVE_LOGIT``, so each gate is ``sigmoid(SiLU(PRESERVE_LOGIT))`` (``1 - 1.3e-7``)
  for every input; the convs learn once the norms' weights have moved.

``variant="T" | "B" | "S" | "L"`` is the paper's ELA-T/B/S/L in the authors' form
(:class:`PaperLocalAttention`): one 1-D conv and one GroupNorm shared by the H and W
strips, no activation before the sigmoid, k * C * C / g + 2C parameters. The four versions
set k, the conv's groups g and the GroupNorm's groups (:data:`PAPER_VERSIONS`, as the
authors' code defines them: the H/W-shared conv of their ``ELA(in_channels, phi)``; their
MobileNetV2 model ``mbv2_ela72`` is ELA-L). Where C is not a multiple of 8 (S, L) or of the
GroupNorm's groups, the largest divisor below is used; ``--init preserve`` is as above.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import PRESERVE_LOGIT, initialised
from .ema import group_count

__all__ = ["PAPER_VERSIONS", "VARIANTS", "EfficientLocalAttention", "PaperLocalAttention", "build"]

# version: (kernel k, channels per conv group (1: depthwise; 8: g = C / 8), GroupNorm groups)
PAPER_VERSIONS: dict[str, tuple[int, int, int]] = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}
VARIANTS = ("timm", *PAPER_VERSIONS)


class EfficientLocalAttention(nn.Module):
    """Efficient local attention on ``channels`` channels.

    Args:
        channels: C, the channels of the feature map it gates.
        kernel_size: k, the odd kernel of the depthwise 1-D convs.
        groups: the GroupNorm's groups (reduced to a divisor of C).
    """

    def __init__(self, channels: int, *, kernel_size: int = 7, groups: int = 1) -> None:
        super().__init__()
        if channels < 1 or groups < 1:
            raise ValueError(f"channels and groups must be >= 1, got {channels}, {groups}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        pad = kernel_size // 2
        self.conv_h = nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0), groups=channels, bias=False)
        self.conv_w = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad), groups=channels, bias=False)
        g = group_count(channels, groups)
        self.norm_h = nn.GroupNorm(g, channels)
        self.norm_w = nn.GroupNorm(g, channels)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        a_h = self.act(self.norm_h(self.conv_h(x.mean(3, keepdim=True)))).sigmoid()  # (N, C, H, 1)
        a_w = self.act(self.norm_w(self.conv_w(x.mean(2, keepdim=True)))).sigmoid()  # (N, C, 1, W)
        return x * a_h * a_w

    def reset_parameters(self) -> None:
        for m in (self.conv_h, self.conv_w, self.norm_h, self.norm_w):
            m.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: both gates sigmoid(SiLU(PRESERVE_LOGIT))."""
        for norm in (self.norm_h, self.norm_w):
            nn.init.zeros_(norm.weight)
            nn.init.constant_(norm.bias, PRESERVE_LOGIT)


class PaperLocalAttention(nn.Module):
    """The paper's ELA-T/B/S/L on ``channels`` channels, in the authors' form (module docstring).

    Args:
        channels: C, the channels of the feature map it gates.
        version: "T", "B", "S" or "L" (:data:`PAPER_VERSIONS`).
    """

    def __init__(self, channels: int, *, version: str = "B") -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if version not in PAPER_VERSIONS:
            raise ValueError(f"version must be one of {tuple(PAPER_VERSIONS)}, got {version!r}")
        k, per_group, norm_groups = PAPER_VERSIONS[version]
        conv_groups = group_count(channels, max(1, channels // per_group))
        self.conv = nn.Conv1d(channels, channels, k, padding=k // 2, groups=conv_groups, bias=False)
        self.norm = nn.GroupNorm(group_count(channels, norm_groups), channels)

    def _gate(self, strip: Tensor) -> Tensor:
        return self.norm(self.conv(strip)).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        a_h = self._gate(x.mean(3).reshape(n, c, h)).reshape(n, c, h, 1)
        a_w = self._gate(x.mean(2).reshape(n, c, w)).reshape(n, c, 1, w)
        return x * a_h * a_w

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.norm.reset_parameters()

    def preserve_(self) -> None:
        """Start as (almost) the identity: both gates sigmoid(PRESERVE_LOGIT)."""
        nn.init.zeros_(self.norm.weight)
        nn.init.constant_(self.norm.bias, PRESERVE_LOGIT)


def build(channels: int, *, init: str = "paper", kernel_size: int = 7, groups: int = 1,
          variant: str = "timm") -> EfficientLocalAttention | PaperLocalAttention:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "timm":
        return initialised(PaperLocalAttention(channels, version=variant), init)
    return initialised(EfficientLocalAttention(channels, kernel_size=kernel_size, groups=groups), init)
