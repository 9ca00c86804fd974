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

* Path 1 keeps the replaced conv's geometry (kernel, stride, padding, dilation, groups,
  bias): on ResNeXt that is the paper's 3x3 G=32 path, elsewhere the conv pretrained
  weights fit. Path m = 2..M has its kernel and stride and m times its dilation (the
  paper's dilated 3x3 standing for a (2m+1)x(2m+1) kernel; on 5x5 and 7x7 depthwise convs
  each path still sees a wider field than the one before).
* Groups of paths 2..M: G where G divides both channel counts, else the largest divisor
  of gcd(C_in, C_out) not above G, so any ``--param groups`` is valid; on a depthwise conv
  every path is depthwise (a grouped path would cost more than the whole block).
* Each path's norm and activation are the replaced conv's (BN/ReLU on ResNets,
  ReLU6/Hardswish/SiLU on mobile nets, FrozenBatchNorm2d in detectors, none on ConvNeXt).
  An activation that belongs to the conv alone moves into the paths; ResNet's shared
  ``relu`` stays after V, where it changes nothing (V mixes ReLU outputs convexly).
* The FCs are bias-free 1x1 convs on the pooled tensor, as in timm's ``SelectiveKernel``.
* ``--init paper`` is PyTorch's default initialisation, as in timm; the paper names none.
* ``--init preserve`` (see :func:`from_conv`): path 1 is the replaced conv and norm, the
  fuse BN outputs exactly 1 and the select FC puts a logit gap of
  :data:`~attnsurgeon.layers.PRESERVE_LOGIT` between path 1 and the others, so the block
  keeps its function to ~1e-6 relative and still trains (the fuse BN's gamma and the
  select FC get gradients at once, the fuse FC once gamma leaves 0).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import PRESERVE_LOGIT
from ._conv import replace_conv

__all__ = ["SelectiveKernelConv", "fit_groups", "from_conv"]

_Pair = tuple[int, int]


def fit_groups(groups: int, in_channels: int, out_channels: int) -> int:
    """The largest divisor of gcd(in_channels, out_channels) that is <= ``groups``."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    common = math.gcd(in_channels, out_channels)
    return max(g for g in range(1, min(groups, common) + 1) if common % g == 0)


NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]


def _path(conv: nn.Conv2d, norm_layer: NormLayer | None, act_layer: ActLayer | None) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=conv,
        bn=norm_layer(conv.out_channels) if norm_layer else nn.Identity(),
        act=act_layer() if act_layer else nn.Identity()))


class SelectiveKernelConv(nn.Module):
    """An SK convolution on ``in_channels -> out_channels``.

    Args:
        in_channels, out_channels: channels of the replaced conv (the paper's C in and out).
        kernel_size, stride, padding, dilation, groups, bias: geometry of path 1 (the
            replaced conv's); path m = 2..M has the same kernel, stride and bias, m times
            its dilation, 'same' padding, and groups G (all channels if depthwise).
        branches: M, the number of paths.
        path_groups: G, the groups of paths 2..M (fitted by :func:`fit_groups`).
        reduction: r; min_dim: L; the fuse width is d = max(out_channels // r, L).
        norm_layer, act_layer: the norm and activation after each path's conv (the
            replaced conv's: BN and ReLU in a ResNet); ``None`` for none.
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
        bias: bool = False,
        branches: int = 2,
        path_groups: int = 32,
        reduction: int = 16,
        min_dim: int = 32,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = partial(nn.ReLU, inplace=True),
    ) -> None:
        super().__init__()
        for name, value in (("branches", branches), ("reduction", reduction), ("min_dim", min_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if any(2 * p != d * (k - 1) for p, d, k in zip(padding, dilation, kernel_size, strict=True)):
            raise ValueError(
                "SK needs a 'same'-padded conv so that every path has its output size, got "
                f"kernel_size={kernel_size}, padding={padding}, dilation={dilation}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.branches = branches
        first = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        depthwise = groups == in_channels == out_channels and groups > 1
        g = groups if depthwise else fit_groups(path_groups, in_channels, out_channels)
        others = []
        for m in range(2, branches + 1):
            dil = (dilation[0] * m, dilation[1] * m)
            pad = (dil[0] * (kernel_size[0] - 1) // 2, dil[1] * (kernel_size[1] - 1) // 2)
            others.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, dil, g, bias=bias))
        self.paths = nn.ModuleList(_path(conv, norm_layer, act_layer) for conv in [first, *others])
        dim = max(out_channels // reduction, min_dim)
        self.fuse = nn.Sequential(OrderedDict(
            fc=nn.Conv2d(out_channels, dim, 1, bias=False), bn=nn.BatchNorm2d(dim), act=nn.ReLU(inplace=True)))
        self.select = nn.Conv2d(dim, branches * out_channels, 1, bias=False)

    def _attention(self, u: Tensor) -> Tensor:
        """The selection weights a of Eq. 5, shape ``(N, M, C, 1, 1)``, summing to 1 over M."""
        z = self.fuse(u.mean((2, 3), keepdim=True))  # Eq. 2-4
        return self.select(z).unflatten(1, (self.branches, self.out_channels)).softmax(1)

    def forward(self, x: Tensor) -> Tensor:
        # the M maps as a list, not stacked into (N, M, C, H, W): the sums and products write
        # M + 1 maps instead of 2M + 2 (README, SK's rows), and the exported graph has Adds
        # and Muls, which onnxruntime's INT8 kernels take
        feats = [path(x) for path in self.paths]  # split
        a = self._attention(sum(feats[1:], feats[0]))  # fuse
        out = feats[0] * a[:, 0]
        for m in range(1, self.branches):  # (indexed, not unbound: fx's proxies do not unpack)
            out = torch.addcmul(out, feats[m], a[:, m])  # select (Eq. 6)
        return out

    @torch.no_grad()
    def preserve_(self, conv: nn.Conv2d, norm: nn.Module | None) -> None:
        """Start as (almost exactly) ``act(norm(conv(x)))``; see the module docstring."""
        first = self.paths[0]
        first.conv.load_state_dict(conv.state_dict())
        if norm is not None:
            first.bn.load_state_dict(norm.state_dict())
            if isinstance(norm, nn.BatchNorm2d):
                first.bn.momentum = norm.momentum
        nn.init.zeros_(self.fuse.bn.weight)  # z = ReLU(0 * xhat + 1) = 1 in train and eval
        nn.init.ones_(self.fuse.bn.bias)
        logits = torch.full((self.branches, self.out_channels), -PRESERVE_LOGIT / 2)
        logits[0] = PRESERVE_LOGIT / 2
        dim = self.select.in_channels
        self.select.weight.copy_((logits / dim).reshape(-1, 1, 1, 1).expand(-1, dim, 1, 1))


def _norm_layer(norm: nn.Module | None) -> NormLayer | None:
    """A factory of norms like ``norm`` (its type, eps and momentum), or ``None``."""
    if norm is None or isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, nn.BatchNorm2d):
        return partial(type(norm), eps=norm.eps, momentum=norm.momentum)
    if isinstance(norm, FrozenBatchNorm2d):
        return partial(FrozenBatchNorm2d, eps=norm.eps)
    raise ValueError(f"SK copies a BatchNorm2d or FrozenBatchNorm2d after the conv, got {type(norm).__name__}")


def from_conv(
    conv: nn.Conv2d,
    norm: nn.Module | None,
    *,
    act: nn.Module | None = None,
    init: str = "paper",
    branches: int = 2,
    groups: int = 32,
    reduction: int = 16,
    min_dim: int = 32,
) -> tuple[SelectiveKernelConv, nn.Identity | None]:
    """Replace ``conv``, and the ``norm`` and ``act`` after it, by one SK convolution.

    Each path gets a norm like ``norm`` and a copy of ``act`` (none where they are None).

    Returns:
        ``(sk, nn.Identity())`` when there is a norm to take over (the SK conv has its own
        norms, so the old one goes; the caller also removes ``act`` where it belongs to
        this conv alone), else ``(sk, None)``.

    Raises:
        ValueError: a bad param, or a conv that is not zero-padded with numeric 'same'
            padding, or a norm that is not a (frozen) batch norm.
    """
    sk = replace_conv(conv, partial(
        SelectiveKernelConv, branches=branches, path_groups=groups, reduction=reduction, min_dim=min_dim,
        norm_layer=_norm_layer(norm), act_layer=(lambda: copy.deepcopy(act)) if act is not None else None,
    ), kind="SK", init=init, preserve=lambda new: new.preserve_(conv, norm))
    return sk, (nn.Identity() if _norm_layer(norm) is not None else None)
