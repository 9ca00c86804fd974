"""Selective Kernel convolution.

Paper: Selective Kernel Networks (Li, Wang, Hu, Yang; CVPR 2019),
https://arxiv.org/abs/1903.06586

An SK convolution (Sec. 3.1, Fig. 1) replaces a block's main spatial conv and the norm
after it, with M paths of different receptive fields and a per-channel soft choice:

* **Split**: path m is conv -> BN -> ReLU, giving ``U_m`` (N, C, H, W);
* **Fuse**: ``U = sum_m U_m``, ``s = GAP(U)`` (Eq. 2), ``z = ReLU(BN(W_fuse s))`` of width
  ``d = max(C / r, L)`` (Eq. 3-4);
* **Select**: ``a = softmax over m of (W_select z)``, per channel, and
  ``V = sum_m a_m * U_m`` (Eq. 5-6).

With the paper's defaults (M=2, G=32, r=16, L=32) on every block of torchvision's
resnext50_32x4d this is SKNet-50: 27,479,784 parameters, the paper's 27.5M (Table 2).

Departures from the paper, and why:

* Path 1 keeps the replaced conv's geometry (kernel, stride, padding, dilation, groups).
  On ResNeXt (groups 32) that is exactly the paper's 3x3 G=32 path; on plain ResNets it is
  the original dense conv, the one pretrained weights fit (the paper only builds SK on
  ResNeXt). Paths m = 2..M are 3x3 convs with dilation m, the paper's approximation of a
  (2m+1)x(2m+1) kernel (Sec. 3.1, "Split"), with the replaced conv's stride.
* Groups of paths 2..M: G when G divides both channel counts, else the largest divisor
  of gcd(C_in, C_out) that is <= G (e.g. G=48 on 64 channels gives 32). The paper only
  uses channel counts divisible by G; this keeps any ``--param groups`` valid.
* The FCs are bias-free 1x1 convs on the pooled ``(N, C, 1, 1)`` tensor, as in timm's
  ``SelectiveKernel`` and the seed's port; the paper writes them as matrices.
* ``--init paper`` is PyTorch's default initialisation (BN weight 1, bias 0), as in the
  reference implementations (timm); the paper names none.
* ``--init preserve`` (see :func:`from_conv`): path 1 is the replaced conv and its BN, the
  fuse BN outputs exactly 1 (gamma 0, beta 1) and the select FC puts a logit gap of
  :data:`~attnsurgeon.layers.PRESERVE_LOGIT` between path 1 and the others, so
  ``V = (1 - e) ReLU(BN(conv(x))) + e * (other paths)`` with
  ``e = (M-1) exp(-PRESERVE_LOGIT)`` (8.3e-7 for M=2): the block computes its old
  function to ~1e-6 relative. It trains: the fuse BN's gamma and the select FC get
  non-zero gradients (the softmax gradient is small, ~e, and adaptive optimisers rescale
  it); the fuse FC follows once gamma leaves 0, and the other paths get gradients scaled
  by their weight ``a_m`` (~e).
* The block's own ReLU still runs after V; V is a convex mix of ReLU outputs, so it is
  already non-negative and that ReLU changes nothing.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from . import PRESERVE_LOGIT, check_init

__all__ = ["SelectiveKernelConv", "fit_groups", "from_conv"]

_Pair = tuple[int, int]


def fit_groups(groups: int, in_channels: int, out_channels: int) -> int:
    """The largest divisor of gcd(in_channels, out_channels) that is <= ``groups``."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    common = math.gcd(in_channels, out_channels)
    return max(g for g in range(1, min(groups, common) + 1) if common % g == 0)


def _path(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=conv, bn=nn.BatchNorm2d(conv.out_channels), act=nn.ReLU(inplace=True)))


class SelectiveKernelConv(nn.Module):
    """An SK convolution on ``in_channels -> out_channels``.

    Args:
        in_channels, out_channels: channels of the replaced conv (the paper's C in and out).
        kernel_size, stride, padding, dilation, groups: geometry of path 1 (the replaced
            conv's); paths 2..M use 3x3, dilation m, padding m and the same stride.
        branches: M, the number of paths.
        path_groups: G, the groups of paths 2..M (fitted by :func:`fit_groups`).
        reduction: r; min_dim: L; the fuse width is d = max(out_channels // r, L).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: _Pair = (3, 3),
        stride: _Pair = (1, 1),
        padding: _Pair = (1, 1),
        dilation: _Pair = (1, 1),
        groups: int = 1,
        branches: int = 2,
        path_groups: int = 32,
        reduction: int = 16,
        min_dim: int = 32,
    ) -> None:
        super().__init__()
        for name, value in (("branches", branches), ("reduction", reduction), ("min_dim", min_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if 2 * padding[0] != dilation[0] * (kernel_size[0] - 1) or 2 * padding[1] != dilation[1] * (kernel_size[1] - 1):
            raise ValueError(
                "SK needs a 'same'-padded conv so that every path has its output size, got "
                f"kernel_size={kernel_size}, padding={padding}, dilation={dilation}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.branches = branches
        first = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        g = fit_groups(path_groups, in_channels, out_channels)
        others = [nn.Conv2d(in_channels, out_channels, 3, stride, m, m, g, bias=False)
                  for m in range(2, branches + 1)]
        self.paths = nn.ModuleList(_path(conv) for conv in [first, *others])
        dim = max(out_channels // reduction, min_dim)
        self.fuse = nn.Sequential(OrderedDict(
            fc=nn.Conv2d(out_channels, dim, 1, bias=False), bn=nn.BatchNorm2d(dim), act=nn.ReLU(inplace=True)))
        self.select = nn.Conv2d(dim, branches * out_channels, 1, bias=False)

    def _attention(self, u: Tensor) -> Tensor:
        """The selection weights a of Eq. 5, shape ``(N, M, C, 1, 1)``, summing to 1 over M."""
        z = self.fuse(u.mean((2, 3), keepdim=True))  # Eq. 2-4
        return self.select(z).unflatten(1, (self.branches, self.out_channels)).softmax(1)

    def forward(self, x: Tensor) -> Tensor:
        feats = torch.stack([path(x) for path in self.paths], 1)  # split: (N, M, C, H, W)
        return (feats * self._attention(feats.sum(1))).sum(1)  # fuse, select (Eq. 6)

    @torch.no_grad()
    def preserve_(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
        """Start as (almost exactly) ``ReLU(norm(conv(x)))``; see the module docstring."""
        first = self.paths[0]
        first.conv.weight.copy_(conv.weight)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            getattr(first.bn, name).copy_(getattr(norm, name))
        first.bn.eps, first.bn.momentum = norm.eps, norm.momentum
        nn.init.zeros_(self.fuse.bn.weight)  # z = ReLU(0 * xhat + 1) = 1 in train and eval
        nn.init.ones_(self.fuse.bn.bias)
        logits = torch.full((self.branches, self.out_channels), -PRESERVE_LOGIT / 2)
        logits[0] = PRESERVE_LOGIT / 2
        dim = self.select.in_channels
        self.select.weight.copy_((logits / dim).reshape(-1, 1, 1, 1).expand(-1, dim, 1, 1))


def from_conv(
    conv: nn.Conv2d,
    norm: nn.BatchNorm2d | None,
    *,
    init: str = "paper",
    branches: int = 2,
    groups: int = 32,
    reduction: int = 16,
    min_dim: int = 32,
) -> tuple[SelectiveKernelConv, nn.Identity]:
    """Replace ``conv`` and the norm after it by one SK convolution.

    Returns:
        ``(sk, nn.Identity())``: the SK conv has its own BNs, so the old norm goes.

    Raises:
        ValueError: a bad param, a conv with a bias or not 'same'-padded, or
            ``init="preserve"`` without the BatchNorm2d to copy into path 1.
    """
    check_init(init)
    if conv.bias is not None or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            "SK replaces a bias-free, zero-padded conv with numeric padding, got "
            f"bias={conv.bias is not None}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )
    sk = SelectiveKernelConv(
        conv.in_channels, conv.out_channels,
        kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups,
        branches=branches, path_groups=groups, reduction=reduction, min_dim=min_dim,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    if init == "preserve":
        if not isinstance(norm, nn.BatchNorm2d):
            raise ValueError(f"init='preserve' needs the BatchNorm2d after the conv, got {type(norm).__name__}")
        sk.preserve_(conv, norm)
    return sk, nn.Identity()
