"""CPU timings of attnsurgeon's attention modules against timm and against the seeds' code.

For each module and input shape, three implementations are timed side by side:

* **ours**: the module in :mod:`attnsurgeon.layers` (insert kinds built directly, replace
  kinds through their ``from_conv`` builder on a plain ``nn.Conv2d``), ``--init paper``;
* **timm**: timm's equivalent where one exists (``SEModule``, ``CbamModule``,
  ``SelectiveKernel``, ``CondConv2d`` with the routing of timm's ``CondConvResidual``,
  ``EcaModule``, ``CoordAttn``, ``GlobalContext``),
  configured to our sizes and defaults as far as timm allows;
* **seed**: a straightforward re-implementation of the seed post's code (below), with only
  its syntax errors, typos and prints fixed and its approach kept.

Two measurements per implementation: ``fwd`` (eval mode, under ``torch.inference_mode``)
and ``fwd+bwd`` (train mode, input requiring grad, ``out.backward(g)`` for a fixed ``g``,
gradients cleared with ``grad = None`` before each call).

Method: ``torch.set_num_threads`` (default 1, ``--threads N``) and one interop thread;
warm-up calls; the number of calls per sample is calibrated so one sample takes about
``--target-ms``; then ``--reps`` rounds, each timing one sample of every implementation in
a rotating round-robin order, so load drifts on a shared machine hit all of them alike.
Reported: the median time per call, and the ratio ``ours / other`` as the median over
rounds of the ratio within each round (its quartiles in brackets). A ratio above 1 means
ours is slower. Parameter counts show whether the configurations match.

Run from the repository root::

    python benchmarks/bench_layers.py            # full run, a few minutes
    python benchmarks/bench_layers.py --quick    # smoke run, seconds

The table goes to stdout (Markdown); progress goes to stderr. Needs timm (``pip install
-e '.[bench]'``). The training step of DY-ResNet against the seed's dynamic conv is
``benchmarks/bench_dynconv.py``; this file times single modules only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnsurgeon.latency import time_interleaved

# ---------------------------------------------------------------------------------------
# Seed-style modules. Each follows its seed post's code; only what kept it from running
# (syntax, indentation, typos, pdb/prints) is fixed, as noted per class.
# ---------------------------------------------------------------------------------------


class SeedSENet1(nn.Module):
    """Seed 002's ``SENet1``: AdaptiveAvgPool2d, view, two ``nn.Linear`` (with bias), unsqueeze.

    Fixed: the post's mangled whitespace (``self.inchannelinchannel``, ``r16``).
    """

    def __init__(self, inchannel: int, r: int = 16) -> None:
        super().__init__()
        self.inchannel = inchannel
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Sequential(nn.Linear(self.inchannel, self.inchannel // r), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(self.inchannel // r, self.inchannel), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.pool1(x)
        x1 = x1.view(x1.shape[0], -1)
        x1 = self.fc1(x1)
        x1 = self.fc2(x1)
        x1 = x1.unsqueeze(2).unsqueeze(3)
        return x * x1


class SeedChannelAttention(nn.Module):
    """Seed 003's CBAM ``ChannelAttention`` (1x1 convs without bias, shared by both pools).

    The post hard-codes ``in_planes // 16`` and ignores ``ratio``; here ``ratio`` is used
    (the same at the default 16).
    """

    def __init__(self, in_planes: int, ratio: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(in_planes, in_planes // ratio, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Conv2d(in_planes // ratio, in_planes, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        avg_out = self.fc2(self.relu1(self.fc1(self.avg_pool(x))))
        max_out = self.fc2(self.relu1(self.fc1(self.max_pool(x))))
        return self.sigmoid(avg_out + max_out)


class SeedSpatialAttention(nn.Module):
    """Seed 003's CBAM ``SpatialAttention`` (7x7 conv over [mean; max], no BN)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        padding = 3 if kernel_size == 7 else 1
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        x = torch.cat([avg_out, max_out], dim=1)
        return self.sigmoid(self.conv1(x))


class SeedCBAM(nn.Module):
    """Seed 003's use in ``BasicBlock``: ``out = ca(out) * out; out = sa(out) * out``."""

    def __init__(self, channels: int, ratio: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.ca = SeedChannelAttention(channels, ratio)
        self.sa = SeedSpatialAttention(kernel_size)

    def forward(self, out: Tensor) -> Tensor:
        out = self.ca(out) * out
        return self.sa(out) * out


class SeedSKConv(nn.Module):
    """Seed 001's ``SKConv`` (M paths of 3x3 dilation 1..M, groups 32, reduce/chunk/map).

    Fixed: the post's code is on a few lines with its newlines lost.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, M: int = 2,
                 r: int = 16, L: int = 32) -> None:
        super().__init__()
        d = max(in_channels // r, L)
        self.M = M
        self.out_channels = out_channels
        self.conv = nn.ModuleList()
        for i in range(M):
            self.conv.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride, padding=1 + i, dilation=1 + i,
                          groups=32, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True)))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Sequential(nn.Conv2d(out_channels, d, 1, bias=False),
                                 nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        self.fc2 = nn.Conv2d(d, out_channels * M, 1, 1, bias=False)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, input: Tensor) -> Tensor:
        batch_size = input.size(0)
        output = []
        for conv in self.conv:
            output.append(conv(input))
        U = reduce(lambda x, y: x + y, output)
        s = self.global_pool(U)
        z = self.fc1(s)
        a_b = self.fc2(z)
        a_b = a_b.reshape(batch_size, self.M, self.out_channels, -1)
        a_b = self.softmax(a_b)
        a_b = list(a_b.chunk(self.M, dim=1))
        a_b = list(map(lambda x: x.reshape(batch_size, self.out_channels, 1, 1), a_b))
        V = list(map(lambda x, y: x * y, output, a_b))
        return reduce(lambda x, y: x + y, V)


class SeedAttention2d(nn.Module):
    """Seed 004's ``attention2d``: GAP, 1x1 convs without bias, softmax(x / temperature).

    Fixed: removed ``pdb.set_trace()``.
    """

    def __init__(self, in_planes: int, ratio: float, K: int, temperature: int) -> None:
        super().__init__()
        assert temperature % 3 == 1
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden_planes = int(in_planes * ratio) if in_planes != 3 else K
        self.fc1 = nn.Conv2d(in_planes, hidden_planes, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden_planes, K, 1, bias=False)
        self.temperature = temperature
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(x)
        x = F.relu(self.fc1(x))
        x = self.fc2(x).view(x.size(0), -1)
        return F.softmax(x / self.temperature, 1)


class SeedDynamicConv2d(nn.Module):
    """Seed 004's ``Dynamic_conv2d``: aggregate per-sample kernels, one grouped conv.

    Fixed: the broken indentation (methods nested in ``__init__``), ``_initalize_weights``,
    ``self.strid``, ``dialtion``, ``outputsize``.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, ratio: float = 0.25,
                 stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1,
                 bias: bool = True, K: int = 4, temperature: int = 34) -> None:
        super().__init__()
        assert in_planes % groups == 0
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.K = K
        self.attention = SeedAttention2d(in_planes, ratio, K, temperature)
        self.weight = nn.Parameter(torch.Tensor(K, out_planes, in_planes // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.Tensor(K, out_planes)) if bias else None
        for i in range(self.K):
            nn.init.kaiming_uniform_(self.weight[i])
        if self.bias is not None:
            nn.init.zeros_(self.bias)  # the post leaves it uninitialised

    def forward(self, x: Tensor) -> Tensor:
        softmax_attention = self.attention(x)
        batch_size, in_planes, height, width = x.size()
        x = x.view(1, -1, height, width)
        weight = self.weight.view(self.K, -1)
        aggregate_weight = torch.mm(softmax_attention, weight).view(
            -1, self.in_planes // self.groups, self.kernel_size, self.kernel_size)
        aggregate_bias = None
        if self.bias is not None:
            aggregate_bias = torch.mm(softmax_attention, self.bias).view(-1)
        output = F.conv2d(x, weight=aggregate_weight, bias=aggregate_bias, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups * batch_size)
        return output.view(batch_size, self.out_planes, output.size(-2), output.size(-1))


class SeedSEblock(nn.Module):
    """Seed 000's ``SEblock`` (``r=0.5`` multiplies the width; ``nn.Linear``, reshape)."""

    def __init__(self, channel: int, r: float = 0.5) -> None:
        super().__init__()
        self.global_avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, int(channel * r)), nn.ReLU(),
            nn.Linear(int(channel * r), channel), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        branch = self.global_avg_pool(x).view(x.size(0), -1)
        weight = self.fc(branch)
        h, w = weight.shape
        return torch.reshape(weight, (h, w, 1, 1)) * x


class SeedAFP(nn.Module):
    """Seed 000's ``AFP``, generalised from 3 channels to C (1 -> C // 2, 2 -> C - C // 2).

    Fixed: removed the shape prints in ``forward``. Kept: the four ``exp / sum(exp)`` weights.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half, rest = channels // 2, channels - channels // 2
        self.branch1 = nn.Sequential(nn.MaxPool2d(3, 1, padding=1))
        self.branch2 = nn.Sequential(nn.AvgPool2d(3, 1, padding=1))
        self.branch3_1 = nn.Sequential(
            nn.Conv2d(channels, half, 1), nn.Conv2d(half, half, 3, padding=1),
            nn.Conv2d(half, half, 3, padding=1))
        self.branch3_2 = nn.Sequential(nn.Conv2d(channels, rest, 1), nn.Conv2d(rest, rest, 3, padding=1))
        self.branch_SE = SeedSEblock(channel=channels)
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1(x)
        b2 = self.branch2(x)
        b3 = self.branch_SE(torch.cat((self.branch3_1(x), self.branch3_2(x)), dim=1))
        b4 = x
        w1 = torch.exp(self.w[0]) / torch.sum(torch.exp(self.w))
        w2 = torch.exp(self.w[1]) / torch.sum(torch.exp(self.w))
        w3 = torch.exp(self.w[2]) / torch.sum(torch.exp(self.w))
        w4 = torch.exp(self.w[3]) / torch.sum(torch.exp(self.w))
        return b1 * w1 + b2 * w2 + b3 * w3 + b4 * w4


class SeedDualPool(nn.Module):
    """Seed 003's dual-pooling head up to the classifier: pools, cat, 1x1 reduce, view, dropout.

    The post's ``nn.Linear(512, num_classes)`` is left out: ours leaves the model's own
    ``fc`` in place, so neither side times a classifier.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.reduce_layer = nn.Conv2d(2 * channels, channels, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        bs = x.shape[0]
        x = torch.cat([self.avg_pool(x), self.max_pool(x)], dim=1)
        return self.dropout(self.reduce_layer(x).view(bs, -1))


# ---------------------------------------------------------------------------------------
# timm adapter: CondConv2d takes its routing weights as an argument.
# ---------------------------------------------------------------------------------------


class TimmCondConv(nn.Module):
    """timm's ``CondConv2d`` with the routing of timm's ``CondConvResidual``.

    ``routing = sigmoid(Linear(C_in, K)(GAP(x)))``: one linear layer and an independent
    sigmoid per expert, not the paper's two-layer MLP and softmax with temperature.
    """

    def __init__(self, conv: nn.Conv2d, *, kernels: int) -> None:
        from timm.layers import CondConv2d

        super().__init__()
        self.routing_fn = nn.Linear(conv.in_channels, kernels)
        self.conv = CondConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, num_experts=kernels)

    def forward(self, x: Tensor) -> Tensor:
        routing = torch.sigmoid(self.routing_fn(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return self.conv(x, routing)


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------

Shape = tuple[int, int, int, int]


@dataclass
class Case:
    module: str  # what is compared, e.g. "SE (r=16)"
    shape: Shape
    impls: dict[str, Callable[[], nn.Module]]  # "ours" first
    notes: dict[str, str] = field(default_factory=dict)  # per implementation


def _conv3x3(c: int, *, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False)


def _ours_replace(path: str, conv: nn.Conv2d, **params: object) -> nn.Module:
    from attnsurgeon import kinds

    new, _ = kinds.builder(path)(conv, nn.BatchNorm2d(conv.out_channels), init="paper", **params)
    return new


def build_cases(shapes: list[Shape], head_shapes: list[Shape], only: set[str] | None) -> list[Case]:
    from timm.layers import EcaModule, GlobalContext, SelectiveKernel, SEModule
    from timm.layers.cbam import CbamModule
    from timm.layers.coord_attn import CoordAttn

    from attnsurgeon.layers.afp import AFP
    from attnsurgeon.layers.cbam import CBAM
    from attnsurgeon.layers.coord import CoordAttention
    from attnsurgeon.layers.dual_pool import DualPool
    from attnsurgeon.layers.eca import ECA, adaptive_kernel_size
    from attnsurgeon.layers.global_context import GlobalContext as OurGlobalContext
    from attnsurgeon.layers.squeeze_excite import SqueezeExcite

    cases: list[Case] = []

    def want(key: str) -> bool:
        return only is None or key in only

    for shape in shapes:
        c = shape[1]
        if want("se"):
            cases.append(Case("SE r=16", shape, {
                "ours": lambda c=c: SqueezeExcite(c, reduction=16),
                # rd_divisor=1: timm rounds the hidden width up to a multiple of 8 by default
                "timm": lambda c=c: SEModule(c, rd_ratio=1 / 16, rd_divisor=1),
                "seed": lambda c=c: SeedSENet1(c, 16),
            }))
        if want("cbam"):
            cases.append(Case("CBAM r=16 k=7", shape, {
                "ours": lambda c=c: CBAM(c, reduction=16, kernel_size=7),
                "timm": lambda c=c: CbamModule(c, rd_ratio=1 / 16, rd_divisor=1, spatial_kernel_size=7, mlp_bias=True),
                "seed": lambda c=c: SeedCBAM(c, 16, 7),
            }, notes={"seed": "no MLP biases, no spatial BN"}))
        if want("sk"):
            cases.append(Case("SK M=2 G=32 r=16 L=32", shape, {
                "ours": lambda c=c: _ours_replace("attnsurgeon.layers.selective_kernel:from_conv",
                                                  _conv3x3(c, groups=32), branches=2, groups=32,
                                                  reduction=16, min_dim=32),
                "timm": lambda c=c: SelectiveKernel(c, c, kernel_size=[3, 5], groups=32,
                                                    rd_channels=max(c // 16, 32), split_input=False),
                "seed": lambda c=c: SeedSKConv(c, c, M=2, r=16, L=32),
            }))
        if want("dynconv"):
            cases.append(Case("dynconv K=4 r=4 3x3", shape, {
                "ours": lambda c=c: _ours_replace("attnsurgeon.layers.dynamic_conv:from_conv",
                                                  _conv3x3(c), kernels=4, temperature=30.0, reduction=4),
                "timm": lambda c=c: TimmCondConv(_conv3x3(c), kernels=4),
                "seed": lambda c=c: SeedDynamicConv2d(c, c, 3, ratio=0.25, padding=1, bias=False, K=4, temperature=34),
            }, notes={"timm": "CondConv2d, sigmoid routing (1 linear)", "seed": "attention FCs without bias"}))
        if want("afp"):
            cases.append(Case("AFP r=2", shape, {
                "ours": lambda c=c: AFP(c, reduction=2),
                "seed": lambda c=c: SeedAFP(c),
            }, notes={"timm": "no timm equivalent"}))
        if want("eca"):
            k = adaptive_kernel_size(c)
            cases.append(Case(f"ECA k={k}", shape, {
                "ours": lambda c=c: ECA(c),
                # channels=None: timm's own adaptive rule (the reference code's) could pick another k
                "timm": lambda k=k: EcaModule(None, kernel_size=k),
            }, notes={"seed": "no seed code"}))
        if want("coord"):
            cases.append(Case("coord r=32", shape, {
                "ours": lambda c=c: CoordAttention(c, reduction=32),
                # timm rounds the mid width to a multiple of 8 and drops the biases by default
                "timm": lambda c=c: CoordAttn(c, rd_channels=max(8, c // 32), bias=True),
            }, notes={"seed": "no seed code"}))
        if want("gc"):
            cases.append(Case("GC r=16 add", shape, {
                "ours": lambda c=c: OurGlobalContext(c, reduction=16, fusion="add"),
                "timm": lambda c=c: GlobalContext(c, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16,
                                                  init_last_zero=True),
            }, notes={"timm": "LayerNorm2d (over C/r, same on a 1x1 map)", "seed": "no seed code"}))
        zoo_cases(cases, shape, want)
    for shape in head_shapes:
        c = shape[1]
        if want("dualpool"):
            cases.append(Case("dual-pool head", shape, {
                "ours": lambda c=c: DualPool(c),
                "seed": lambda c=c: SeedDualPool(c),
            }, notes={"timm": "no timm equivalent"}))
    return cases


def zoo_cases(cases: list[Case], shape: Shape, want: Callable[[str], bool]) -> None:
    """The kinds added later (ema, simam, nl, triplet, ela) and timm's variants (se
    effective, eca circular, cbam light), against timm where timm has the module."""
    from timm.layers.cbam import LightCbamModule
    from timm.layers.coord_attn import EfficientLocalAttn
    from timm.layers.eca import CecaModule
    from timm.layers.non_local_attn import NonLocalAttn
    from timm.layers.squeeze_excite import EffectiveSEModule

    from attnsurgeon.layers import cbam, eca, ela, ema, non_local, simam, squeeze_excite, triplet

    c = shape[1]
    no_timm = {"timm": "no timm equivalent", "seed": "no seed code"}
    if want("ema"):
        cases.append(Case("EMA factor=32", shape, {"ours": lambda c=c: ema.build(c)}, notes=no_timm))
    if want("simam"):
        cases.append(Case("SimAM", shape, {"ours": lambda c=c: simam.build(c)}, notes=no_timm))
    if want("triplet"):
        cases.append(Case("triplet k=7", shape, {"ours": lambda c=c: triplet.build(c)}, notes=no_timm))
    if want("nl"):
        cases.append(Case("NL r=2", shape, {
            "ours": lambda c=c: non_local.build(c),
            # timm's NonLocalAttn: the same embedded Gaussian; its width C/r set to ours
            "timm": lambda c=c: NonLocalAttn(c, rd_channels=c // 2),
        }, notes={"timm": "W_z with bias, scale 1/sqrt(C)", "seed": "no seed code"}))
    if want("ela"):
        cases.append(Case("ELA k=7", shape, {
            "ours": lambda c=c: ela.build(c),
            "timm": lambda c=c: EfficientLocalAttn(c),
        }, notes={"seed": "no seed code"}))
        cases.append(Case("ELA-L (authors' form)", shape, {"ours": lambda c=c: ela.build(c, variant="L")},
                          notes=no_timm))
    if want("ese"):
        cases.append(Case("SE effective", shape, {
            "ours": lambda c=c: squeeze_excite.build(c, variant="effective"),
            "timm": lambda c=c: EffectiveSEModule(c),
        }, notes={"seed": "no seed code"}))
    if want("ceca"):
        k = eca.adaptive_kernel_size(c)
        cases.append(Case(f"ECA circular k={k}", shape, {
            "ours": lambda c=c: eca.build(c, padding="circular"),
            "timm": lambda k=k: CecaModule(None, kernel_size=k),
        }, notes={"seed": "no seed code"}))
    if want("lcbam"):
        cases.append(Case("CBAM light", shape, {
            "ours": lambda c=c: cbam.build(c, variant="light"),
            "timm": lambda c=c: LightCbamModule(c, rd_ratio=1 / 16, rd_divisor=1, mlp_bias=True),
        }, notes={"seed": "no seed code"}))


def _ours_note(module: nn.Module, x: Tensor) -> str:
    """Which eager path our dynamic conv takes for this input (it picks per call)."""
    pick = getattr(module, "uses_stacked", None)
    if pick is None:
        return ""
    return "stacked form" if pick(x) else "per-sample form"


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: dict[str, float]
    ratios: dict[str, tuple[float, float, float]]  # other -> (q1, median, q3) of ours/other
    calls_per_sample: int


def _precision(device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 on the CPU; on CUDA bf16 autocast (the GPU protocol of bench_models.py)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step(module: nn.Module, x: Tensor, mode: str, grad_out: Tensor | None) -> Callable[[], None]:
    if mode == "fwd":
        def run() -> None:
            with torch.inference_mode(), _precision(x.device):
                module(x)
        return run
    params = list(module.parameters())

    def run_bwd() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with _precision(x.device):
            out = module(x)
        out.backward(grad_out.to(out.dtype))
    return run_bwd


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def time_case(modules: dict[str, nn.Module], shape: Shape, mode: str, *, reps: int, warmup: int,
              target_ms: float, seed: int = 0, device: torch.device | None = None) -> Timing:
    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device, memory_format=_memory_format(device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    grad_out = None
    if mode == "fwd":
        for m in modules.values():
            m.eval()
    else:
        for m in modules.values():
            m.train()
        x.requires_grad_(True)
        with torch.no_grad():
            out_shapes = {name: m(x).shape for name, m in modules.items()}
        # one output gradient, shaped per implementation (the seed's dual pool flattens)
        grad_out = torch.randn(next(iter(out_shapes.values())), generator=gen).to(device)
    steps = {name: _step(m, x, mode, None if grad_out is None else grad_out.reshape(out_shapes[name]))
             for name, m in modules.items()}

    # warm-up, and calibrate the calls per sample on the median implementation
    per_call = time_interleaved(steps, rounds=1, warmup=warmup, sync=sync)
    calls = max(1, round(target_ms / 1e3 / statistics.median(s[0] for s in per_call.values())))
    samples = time_interleaved(steps, rounds=reps, calls=calls, sync=sync)
    median_ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    ours = samples["ours"]
    ratios = {name: _quartiles([a / b for a, b in zip(ours, s, strict=True)])
              for name, s in samples.items() if name != "ours"}
    return Timing(median_ms, ratios, calls)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(q: tuple[float, float, float] | None) -> str:
    if q is None:
        return "(ref)"
    return f"**{q[1]:.2f}** [{q[0]:.2f}, {q[2]:.2f}]"


def _fmt_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes, few repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 31, quick 3)")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="approximate time of one sample (default 20, quick 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bf16 autocast, channels_last")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of se,cbam,sk,dynconv,afp,eca,coord,gc,dualpool,"
                             "ema,simam,triplet,nl,ela,ese,ceca,lcbam")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    valid = {"se", "cbam", "sk", "dynconv", "afp", "eca", "coord", "gc", "dualpool",
             "ema", "simam", "triplet", "nl", "ela", "ese", "ceca", "lcbam"}
    only = None
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        if only - valid:
            parser.error(f"--only: unknown {sorted(only - valid)}; valid: {sorted(valid)}")

    try:
        import timm
    except ImportError:
        print("bench_layers needs timm: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.quick:
        shapes: list[Shape] = [(2, 64, 16, 16)]
        head_shapes: list[Shape] = [(2, 512, 7, 7)]
        reps, warmup, target_ms = args.reps or 3, 1, args.target_ms or 2.0
    else:
        shapes = [(8, 64, 56, 56), (8, 256, 14, 14), (8, 512, 7, 7)]
        head_shapes = [(8, 512, 7, 7), (8, 2048, 7, 7)]
        reps, warmup, target_ms = args.reps or 31, 3, args.target_ms or 20.0
    if reps < 1:
        parser.error(f"--reps must be >= 1, got {reps}")

    cases = build_cases(shapes, head_shapes, only)
    load_before = _load()
    started = time.perf_counter()
    rows: list[str] = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.module} {_fmt_shape(case.shape)}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        modules = {name: make().to(device, memory_format=_memory_format(device))
                   for name, make in case.impls.items()}
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
        x = torch.randn(case.shape, device=device)
        with torch.no_grad():
            shapes_out = {name: tuple(m.eval()(x).flatten(1).shape) for name, m in modules.items()}
        if len(set(shapes_out.values())) != 1:
            raise RuntimeError(f"{case.module}: output shapes differ: {shapes_out}")
        notes = dict(case.notes)
        ours_note = _ours_note(modules["ours"], x)
        if ours_note:
            notes["ours"] = ours_note
        gc.collect()
        fwd = time_case(modules, case.shape, "fwd", reps=reps, warmup=warmup, target_ms=target_ms, device=device)
        bwd = time_case(modules, case.shape, "fwd+bwd", reps=reps, warmup=warmup, target_ms=target_ms,
                        device=device)
        impl_names = [n for n in ("ours", "timm", "seed") if n in modules or n in notes]
        for name in impl_names:
            if name not in modules:
                rows.append(f"| {case.module} | {_fmt_shape(case.shape)} | {name} | - | - | - | - | - "
                            f"| {notes[name]} |")
                continue
            rows.append(
                f"| {case.module} | {_fmt_shape(case.shape)} | {name} | {params[name]:,} "
                f"| {_fmt_ms(fwd.median_ms[name])} | {_fmt_ratio(fwd.ratios.get(name))} "
                f"| {_fmt_ms(bwd.median_ms[name])} | {_fmt_ratio(bwd.ratios.get(name))} "
                f"| {notes.get(name, '')} |")
    elapsed = time.perf_counter() - started

    print(f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}; threads {torch.get_num_threads()} (interop 1); "
          f"{'quick' if args.quick else 'full'} mode: {reps} interleaved rounds, "
          f"~{target_ms:g} ms per sample, {warmup} warm-up calls; "
          f"load average {load_before} before, {_load()} after; {elapsed:.0f} s.")
    print()
    print("Times are medians per call in ms. `ours/impl` is the median over rounds of ours' time "
          "divided by that implementation's in the same round (quartiles in brackets); "
          "above 1 means ours is slower. fwd: eval mode, inference_mode; fwd+bwd: train mode, "
          "input and parameter gradients.")
    print()
    print("| module | input NxCxHxW | impl | params | fwd ms | ours/impl fwd | fwd+bwd ms | ours/impl fwd+bwd | note |")
    print("|---|---|---|---:|---:|---|---:|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
