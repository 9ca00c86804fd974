"""Omni-dimensional dynamic convolution (ODConv).

Paper: Omni-Dimensional Dynamic Convolution (Li, Zhou, Yao; ICLR 2022),
https://arxiv.org/abs/2209.07947; the authors' code: https://github.com/OSVAI/ODConv
(``modules/odconv.py``), which this module follows.

Like dynamic convolution, ODConv holds K kernels ``W_k`` of the replaced conv's shape and
convolves each sample with an attention-weighted mix of them, but its attention has four
parts, computed in parallel from one squeeze::

    z   = ReLU(BN(FC(GAP(x))))                 # hidden width max(C_in // r, min_dim)
    a_c = sigmoid(FC_c(z) / tau)               # (C_in,)   input channels
    a_f = sigmoid(FC_f(z) / tau)               # (C_out,)  output channels (filters)
    a_s = sigmoid(FC_s(z) / tau)               # (kh, kw)  kernel positions
    a_w = softmax(FC_w(z) / tau)               # (K,)      kernels
    y   = (sum_k a_w,k  a_f * a_c * a_s * W_k) (*) x

The authors' code multiplies the input by ``a_c`` and the output by ``a_f`` (the same
function: each scales one axis of every kernel); here that happens where the feature maps
are smaller than a per-sample kernel (late, wide layers), and elsewhere the two gates go
into the per-sample kernels with ``a_s``, which saves two passes over the maps. As there,
``a_s``, ``a_c`` and ``a_f`` are shared by the K kernels, and a part that would be constant
is left out: ``a_f`` for a depthwise conv (``C_in == groups == C_out``: each output sees
one input, so ``a_c`` already covers it), ``a_s`` for a 1x1 kernel and ``a_w`` for K = 1;
a 1x1 conv with K = 1 is then a plain conv between two channel gates. The paper anneals
tau from 30 to 1 over the first 10 epochs (the authors' ``get_temperature``, which is
:func:`attnsurgeon.layers.dynamic_conv.temperature_schedule` with its defaults); set it
with :func:`attnsurgeon.set_temperature` (shared with ``dynconv``).

Four forms of the same function (equal to float rounding), chosen as dynamic convolution
chooses (``form``, :func:`attnsurgeon.set_dynconv_form`; ``"auto"``: the traced form under
tracers, per-sample at batch 1, measured once per shape on CUDA, the cost rule on CPU):

* *per-sample* (eager): aggregate one kernel per sample, ``a_s * sum_k a_w,k W_k``, and
  run the batch as one grouped conv with ``groups = N * groups`` (the authors' form, which
  makes the N x K mix first and sums it; here it is one ``(N, K) @ (K, ...)`` product);
* *unfolded*, the ``stacked`` form (eager on small feature maps, by dynamic convolution's
  CPU cost rule; and tracers inside :func:`quantizable_export`, which INT8 export uses): the
  input's strided slices as ``C_in * kh * kw`` channels (an im2col), scaled by ``a_s``, one
  1x1 conv holding all K kernels, then the ``a_w``-weighted sum of the K outputs. K times
  the multiply-adds but no per-sample kernel, which on late, wide layers is the larger cost.
  Its kernel bank is a conv weight, which a post-training quantizer stores in int8 per
  channel; in the positions form the bank is an operand of per-sample products of
  activations and stays float (an INT8 file of ODConv-ResNet-18 was 171 of the float
  file's 172 MiB). A depthwise conv's 1x1 conv is K depthwise convs instead, down the
  stacked slices (a fast path in onnxruntime's INT8 convs);
* *triton* (CUDA; ``torch.compile`` gets it as one op): dynamic convolution's Triton
  implicit-GEMM conv (:mod:`._dynconv_triton`) with a kernel mix per tap,
  ``a_s[n, t] * a_w[n, k]``, and both channel gates applied to each kernel tile as it is
  summed, so neither N kernels, nor K outputs, nor gated maps are stored; its backward gives
  the gradients of the tap mix (from which autograd gets ``a_s``'s and ``a_w``'s) and of
  the gates;
* *positions* (other tracers: ``torch.export``, ONNX, ``torch.compile`` where the Triton
  op does not apply, ``jit.trace``, fx): the per-sample kernels applied as ``kh * kw``
  per-sample matrix products of strided slices of the padded input, so no op depends on the
  batch size and the graph exports with a dynamic batch (slow in eager mode on a CPU);
  float files keep it, with K times fewer multiply-adds than the unfolded form.

Departures from the authors' code, and why:

* ``reduction`` is the integer r of hidden = C_in / r (r = 16 for their 0.0625): the same
  width for every C_in, since ``int(C * 0.0625) == C // 16``; ``min_dim`` is their
  ``min_channel`` (16). ``kernels`` defaults to 4, their 4x models and dynamic
  convolution's K; their training script defaults to 1 (the 1x models).
* A replaced conv with a bias (ConvNeXt's depthwise conv) keeps one static bias, added
  after ``a_f``; the authors' convs have none. Non-square kernels get a ``kh x kw``
  spatial attention (theirs is k x k).
* The K kernels are one 4-D parameter ``weight`` of shape ``(K * C_out, C_in / groups, kh,
  kw)`` in (kernel, out-channel) order, the authors' 5-D tensor flattened, so that it takes
  ``channels_last`` like any conv weight. tau is a persistent buffer (a checkpoint keeps the
  annealed value); its default is the annealing's start, 30.
* ``--init paper`` is theirs: each kernel kaiming-normal (fan_out, ReLU), the attention's
  1x1 convs likewise with zero biases, its BN weight 1 and bias 0.
* ``--init preserve`` (not in the paper) makes the output equal the replaced conv's, exactly
  up to float rounding: the four attention heads start at zero weights and biases, so every
  sigmoid gate is exactly 1/2 and the kernel softmax exactly 1/K, and every kernel is the
  conv's weight times ``2**m`` for the m sigmoid gates the layer has. Unlike the project's
  other gates (:data:`attnsurgeon.layers.PRESERVE_LOGIT`) they start at the sigmoid's
  steepest point. The squeeze FC gets no gradient until the heads move off zero, and the
  kernel attention none while the K kernels are equal; the kernels part as dynamic
  convolution's do (each gets ``sum_n a_w,nk g_n``).
* The attention's BatchNorm, like the authors', needs more than one sample per batch in
  training mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ._conv import replace_conv
from .dynamic_conv import (
    _ELEMENT_COST,
    PerSampleForms,
    _channels_last,
    _check_temperature,
    _compute_dtype,
    _mix,
    _pair,
    _Size,
    _triton,
)

if TYPE_CHECKING:
    from ._dynconv_triton import Blocks

__all__ = ["ODConv2d", "OmniAttention", "from_conv", "has_unfolded_form", "quantizable_export"]

_UNFOLDED = False  # set by quantizable_export: tracers get the unfolded form


@contextlib.contextmanager
def quantizable_export() -> Iterator[None]:
    """Meanwhile, tracers (``torch.export``, ONNX) get every ODConv's *unfolded* form, whose
    kernel bank is a conv weight a quantizer can quantize (module docstring)."""
    global _UNFOLDED
    previous, _UNFOLDED = _UNFOLDED, True
    try:
        yield
    finally:
        _UNFOLDED = previous


def has_unfolded_form(model: nn.Module) -> bool:
    """Whether :func:`quantizable_export` changes what a tracer sees of ``model`` (an ODConv
    that is not a 1x1 conv with K = 1: that one is a static conv in every form)."""
    return any(isinstance(m, ODConv2d) and not (m.attention.spatial_fc is None and m.attention.kernel_fc is None)
               for m in model.modules())


def _tracing(x: Tensor) -> bool:
    """True under torch.export / onnx export / compile (is_compiling), jit.trace, fx."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)


class _ScaledIm2col(torch.autograd.Function):
    """``unfold(x) * a_s`` as (N, C, kh * kw, H'W'), saving x rather than the unfolded map
    (kh * kw times larger), which the backward unfolds again for ``a_s``'s gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, a_s: Tensor, geometry: tuple) -> Tensor:
        ctx.save_for_backward(x, a_s)
        ctx.geometry = geometry
        return F.unfold(x, *geometry).unflatten(1, (x.shape[1], -1)).mul_(a_s[:, None, :, None])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, a_s = ctx.saved_tensors
        grad_x = grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = F.unfold(x, *ctx.geometry).unflatten(1, (x.shape[1], -1)).mul_(grad).sum((1, 3))
        if ctx.needs_input_grad[0]:
            grad_x = F.fold((grad * a_s[:, None, :, None]).flatten(1, 2), x.shape[2:], *ctx.geometry)
        return grad_x, grad_s, None


class OmniAttention(nn.Module):
    """The four attentions of ODConv from one squeeze (module docstring).

    ``forward(x, tau)`` returns ``(a_c, a_f, a_s, a_w)`` of shapes ``(N, C_in)``,
    ``(N, C_out)``, ``(N, kh * kw)`` and ``(N, K)``; an attention the layer leaves out is None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *,
                 groups: int, kernels: int, reduction: int, min_dim: int) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, min_dim)
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        depthwise = in_channels == groups == out_channels
        positions = kernel_size[0] * kernel_size[1]
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_channels, 1)
        self.spatial_fc = None if positions == 1 else nn.Conv2d(hidden, positions, 1)
        self.kernel_fc = None if kernels == 1 else nn.Conv2d(hidden, kernels, 1)
        self.reset_parameters()

    def heads(self) -> list[nn.Conv2d]:
        return [h for h in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc) if h is not None]

    def reset_parameters(self) -> None:
        """The authors' init: kaiming-normal (fan_out, ReLU) 1x1 convs, zero biases, BN 1/0."""
        for conv in (self.fc, *self.heads()):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.bn.reset_parameters()
        self.bn.reset_running_stats()

    @torch.no_grad()
    def zero_heads_(self) -> None:
        """Every sigmoid gate exactly 1/2 and the kernel softmax exactly 1/K, for any input."""
        for head in self.heads():
            head.weight.zero_()
            head.bias.zero_()

    def forward(self, x: Tensor, tau: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        z = self.act(self.bn(self.fc(x.mean((2, 3), keepdim=True))))

        def logits(head: nn.Conv2d | None) -> Tensor | None:
            return None if head is None else head(z).flatten(1) / tau

        c, f, s, w = (logits(h) for h in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc))
        return (c.sigmoid(), None if f is None else f.sigmoid(), None if s is None else s.sigmoid(),
                None if w is None else w.softmax(1))


class ODConv2d(PerSampleForms):
    """A conv whose kernel is mixed per sample by four attentions (module docstring).

    Args mirror ``nn.Conv2d`` (keyword-only after the kernel size) plus:
        kernels: K, the kernels mixed per sample (the paper's "ODConv (Kx)").
        temperature: tau of every attention (annealed 30 -> 1 in the paper).
        reduction: r of the squeeze's hidden width ``max(C_in // r, min_dim)``.
        min_dim: the lower bound of that width.

    Attributes:
        weight: ``(K * C_out, C_in / groups, kh, kw)``, ``weight[k * C_out + c]``.
        bias: ``(C_out,)`` static bias, or None.
        form: ``"auto"`` (default), ``"stacked"`` (the unfolded form), ``"per_sample"`` or
            ``"triton"``: which exact form runs in eager mode (module docstring;
            :func:`attnsurgeon.set_dynconv_form`); not saved in the state_dict.
    """

    ANNEALED = True  # its temperature buffer follows set_temperature

    temperature: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size,
        *,
        stride: _Size = 1,
        padding: _Size = 0,
        dilation: _Size = 1,
        groups: int = 1,
        bias: bool = False,
        kernels: int = 4,
        temperature: float = 30.0,
        reduction: int = 16,
        min_dim: int = 16,
    ) -> None:
        super().__init__()
        for name, value in (("kernels", kernels), ("reduction", reduction), ("groups", groups),
                            ("min_dim", min_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must divide in and out channels, got {groups} for {in_channels}, {out_channels}")
        _check_temperature(temperature)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.kernels = kernels
        self.form = "auto"
        self.triton_blocks: Blocks | None = None  # the Triton kernel's tiles (None: its defaults)
        self.weight = nn.Parameter(torch.empty(kernels * out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.attention = OmniAttention(in_channels, out_channels, self.kernel_size, groups=groups,
                                       kernels=kernels, reduction=reduction, min_dim=min_dim)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init: each kernel kaiming-normal (fan_out, ReLU); the attention's."""
        for kernel in self.bank():
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:  # not in the authors' code: nn.Conv2d's bias init
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.attention.reset_parameters()

    def bank(self) -> Tensor:
        """The kernels as ``(K, C_out, C_in / groups, kh, kw)`` (a view)."""
        return self.weight.unflatten(0, (self.kernels, -1))

    def gates(self) -> int:
        """m, the number of sigmoid gates this layer has (1 to 3)."""
        a = self.attention
        return 1 + (a.filter_fc is not None) + (a.spatial_fc is not None)

    @torch.no_grad()
    def preserve_(self, conv: nn.Conv2d) -> None:
        """Start as ``conv`` exactly: gates at 1/2, kernels ``2**m`` times conv's (docstring)."""
        self.attention.zero_heads_()
        self.bank().copy_((conv.weight * 2.0 ** self.gates()).unsqueeze(0).expand_as(self.bank()))
        if self.bias is not None and conv.bias is not None:
            self.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.run_form(x, self.form_for(x))

    def traced_form(self) -> str:
        """What tracers get: the unfolded form inside :func:`quantizable_export`, else positions."""
        return "stacked" if _UNFOLDED else "positions"

    def run_form(self, x: Tensor, form: str) -> Tensor:
        """The module's output in ``form``: ``stacked`` (unfolded), ``per_sample``, ``triton``
        or ``positions``."""
        a_c, a_f, a_s, a_w = self.attention(x, self.temperature)
        dtype = _compute_dtype(x, self.weight)
        if a_s is None and a_w is None:  # 1x1, K = 1: one static kernel between two gates
            y = F.conv2d(x * a_c.to(dtype)[:, :, None, None], self.weight, None, self.stride, self.padding,
                         self.dilation, self.groups)
            return self._finish(y, a_f)
        if form == "stacked":
            return self._finish(self.forward_unfolded(x * a_c.to(dtype)[:, :, None, None], a_s, a_w), a_f)
        if form.startswith("triton"):
            return self._finish(self.forward_triton(x, a_c, a_f, a_s, a_w, self.tiles(form)), None)
        fold = self.folds(x)
        w = self.kernels_per_sample(a_s, a_w, dtype, gates=(a_c, a_f) if fold else None)
        if not fold:
            x = x * a_c.to(dtype)[:, :, None, None]
        y = self.forward_positions(x, w) if form == "positions" else self.forward_per_sample(x, w)
        return self._finish(y, None if fold else a_f)

    def forward_triton(self, x: Tensor, a_c: Tensor, a_f: Tensor | None, a_s: Tensor | None,
                       a_w: Tensor | None, blocks: Blocks | None = None) -> Tensor:
        """The per-sample conv as dynamic convolution's Triton kernel (``_dynconv_triton``)
        with a mix per kernel tap, ``a_s[n, t] * a_w[n, k]``, and the channel gates: sample
        n's kernel at (o, i, t) is ``a_f[n, o] a_c[n, i] a_s[n, t] sum_k a_w[n, k] W_k``,
        summed tile by tile as the kernel goes; no bias."""
        dtype = _compute_dtype(x, self.weight)
        if a_w is None:
            pi = a_s[:, :, None]
        elif a_s is None:
            pi = a_w
        else:
            pi = a_s[:, :, None] * a_w[:, None, :]
        gates = (a_c, a_f if a_f is not None else a_c.new_ones(a_c.shape[0], self.out_channels))
        return _triton().dynamic_conv2d(x.to(dtype), self.weight.to(dtype), pi, kernels=self.kernels,
                                        stride=self.stride, padding=self.padding, dilation=self.dilation,
                                        groups=self.groups, kernel_major=True, gates=gates,
                                        blocks=blocks or self.triton_blocks)

    def _finish(self, y: Tensor, a_f: Tensor | None) -> Tensor:
        if a_f is not None:
            y = y * a_f.to(y.dtype)[:, :, None, None]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)[:, None, None]
        return y

    def prefers_stacked(self, x: Tensor) -> bool:
        """Dynamic convolution's CPU cost rule (its ``_ELEMENT_COST`` = 256 multiply-adds per
        per-sample kernel element): the unfolded form, which like dynconv's stacked one runs all
        K kernels, where ``K H'W' (1 + a / fan_in) < H'W' + a``, that is on small feature maps;
        never at batch 1. It still picked the faster form at each ResNet-18 shape timed after
        the unfolded form replaced a bmm (README)."""
        if x.shape[0] == 1:
            return False
        h, w = self.out_size(x)
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        return self.kernels * h * w * (1 + _ELEMENT_COST / fan_in) < h * w + _ELEMENT_COST

    def folds(self, x: Tensor) -> bool:
        """Whether the channel gates go into the per-sample kernels rather than onto the
        feature maps: where a kernel has fewer elements than the input and output maps."""
        if isinstance(x, torch.fx.Proxy):
            return False
        if torch.jit.is_tracing() or kernels.exporting():
            # one form whatever the traced map size: the size rule below would be a guard on
            # a dynamic H and W, and the graph would keep the form chosen for the traced size
            return True
        h_out, w_out = self.out_size(x)
        kernel = self.out_channels * self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        return kernel < self.in_channels * x.shape[2] * x.shape[3] + self.out_channels * h_out * w_out

    def kernels_per_sample(self, a_s: Tensor | None, a_w: Tensor | None, dtype: torch.dtype, *,
                           gates: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """``a_s * sum_k a_w,k W_k`` for every sample: ``(N, C_out, C_in / groups, kh * kw)``;
        with ``gates = (a_c, a_f)`` also times the input and output channel gates."""
        bank = self.weight.to(dtype).reshape(self.kernels, -1)
        if a_w is None:  # K = 1
            n = a_s.shape[0] if a_s is not None else 1
            w = bank.expand(n, -1)
        else:
            w = a_w.to(dtype) @ bank
        g, c_in, c_out = self.groups, self.in_channels // self.groups, self.out_channels
        w = w.reshape(w.shape[0], c_out, c_in, -1)
        scale = None if a_s is None else a_s.to(dtype)[:, None, None, :]
        if gates is not None:
            a_c, a_f = gates
            # input channel c of group j is a_c[j * c_in + c]; out-channel o is in group o // (c_out / g)
            channel = a_c.to(dtype).unflatten(1, (g, 1, c_in)).expand(-1, -1, c_out // g, -1).reshape(-1, c_out, c_in)
            if a_f is not None:
                channel = channel * a_f.to(dtype)[:, :, None]
            channel = channel[..., None]
            scale = channel if scale is None else channel * scale
        return w if scale is None else w * scale

    def forward_per_sample(self, x: Tensor, w: Tensor) -> Tensor:
        """The batch as one grouped conv with ``N * groups`` groups."""
        n = x.shape[0]
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, w.shape[2], *self.kernel_size), None,
                     self.stride, self.padding, self.dilation, self.groups * n)
        y = y.reshape(n, self.out_channels, *y.shape[2:])
        if _channels_last(x):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def forward_unfolded(self, x: Tensor, a_s: Tensor | None, a_w: Tensor | None) -> Tensor:
        """The stacked form, as one conv with a static weight: the input's ``kh * kw`` strided
        slices as ``C_in * kh * kw`` channels, scaled by ``a_s``, a 1x1 conv holding all K
        kernels (the weight a quantizer sees), then the ``a_w``-weighted sum. K times the
        multiply-adds of a per-sample kernel, none of its N kernels to build."""
        g, k, (kh, kw), (sh, sw) = self.groups, self.kernels, self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        n, h_out, w_out = x.shape[0], *self.out_size(x)
        if _tracing(x):  # strided slices: a graph without Im2Col, exported with a dynamic batch
            xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
            # a copy of each slice: see forward_positions
            cols = torch.stack([xp[:, :, i * dh: i * dh + sh * (h_out - 1) + 1: sh,
                                   j * dw: j * dw + sw * (w_out - 1) + 1: sw].clone(
                                       memory_format=torch.contiguous_format)
                                for i in range(kh) for j in range(kw)], 2)  # (N, C_in, kh * kw, H', W')
            if a_s is not None:
                cols = cols * a_s.to(cols.dtype)[:, None, :, None, None]
        else:  # eager: one im2col, the same channel order
            geometry = (self.kernel_size, self.dilation, self.padding, self.stride)
            if a_s is None:
                cols = F.unfold(x, *geometry)
            else:
                cols = _ScaledIm2col.apply(x, a_s.to(x.dtype), geometry)
            cols = cols.reshape(n, self.in_channels, kh * kw, h_out, w_out)
        if self.in_channels == g == self.out_channels:
            y = self._unfolded_depthwise(cols, a_w)
        else:
            cols = cols.reshape(n, -1, h_out, w_out)  # channel c * kh * kw + p, as the weight's (C_in / g, kh, kw)
            weight = self.weight.to(cols.dtype)
            if g > 1:  # a grouped conv's outputs come group by group: (K, g, C_out / g) -> (g, K, C_out / g)
                weight = weight.unflatten(0, (k, g, -1)).transpose(0, 1).flatten(0, 2)
            y = F.conv2d(cols, weight.reshape(k * self.out_channels, -1, 1, 1), None, 1, 0, 1, g)
            y = y.reshape(n, g, k, self.out_channels // g, h_out, w_out)
            y = y.squeeze(2) if a_w is None else (y * a_w.to(y.dtype)[:, None, :, None, None, None]).sum(2)
        y = y.reshape(n, self.out_channels, h_out, w_out)
        return y.contiguous(memory_format=torch.channels_last) if _channels_last(x) else y

    def _unfolded_depthwise(self, cols: Tensor, a_w: Tensor | None) -> Tensor:
        """A depthwise conv's unfolded form as K depthwise convs, each a ``kh * kw`` x 1 kernel
        down the stacked slices ``cols`` (N, C, kh * kw, H', W'); returns (N, C, 1, H'W').
        onnxruntime's QLinearConv has a fast path for depthwise convs and not for the general
        form's grouped conv with K outputs per group (MobileNetV2 + ODConv, INT8, 224x224:
        76 -> 39 ms; README)."""
        c, p = cols.shape[1:3]
        cols = cols.flatten(3)
        return _mix((F.conv2d(cols, w_i.to(cols.dtype).reshape(c, 1, p, 1), None, 1, 0, 1, c)
                     for w_i in self.bank().unbind(0)), None if a_w is None else a_w.to(cols.dtype))

    def forward_positions(self, x: Tensor, w: Tensor) -> Tensor:
        """The same conv as ``kh * kw`` per-sample matrix products (no op depends on N)."""
        g, (kh, kw), (sh, sw) = self.groups, self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        h_out, w_out = self.out_size(x)
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        w = w.to(x.dtype).unflatten(1, (g, -1))  # (N, g, C_out / g, C_in / g, kh * kw)
        y = None
        for i in range(kh):
            for j in range(kw):
                xs = xp[:, :, i * dh: i * dh + sh * (h_out - 1) + 1: sh, j * dw: j * dw + sw * (w_out - 1) + 1: sw]
                # a copy before the reshape (free in an ONNX graph): reshaping a strided slice
                # asks whether it is contiguous, which tests H' == 1 and W' == 1; traced on a
                # 1x1 map, torch.export keeps that answer as a guard (H, W at most the traced
                # size) and every size after it becomes a constant 1 in the exported graph
                xs = xs.clone(memory_format=torch.contiguous_format)
                xs = xs.unflatten(1, (g, -1)).flatten(3)  # (N, g, C_in / g, H'W')
                wp = w[..., i * kw + j]  # (N, g, C_out / g, C_in / g)
                term = wp * xs if self.in_channels == self.groups else wp @ xs
                y = term if y is None else y + term
        y = y.reshape(y.shape[0], self.out_channels, h_out, w_out)
        if _channels_last(x):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, kernels={self.kernels}"
                + ("" if self.form == "auto" else f", form={self.form}"))


def from_conv(
    conv: nn.Conv2d,
    norm: nn.Module | None,
    *,
    act: nn.Module | None = None,
    init: str = "paper",
    kernels: int = 4,
    temperature: float = 30.0,
    reduction: int = 16,
    min_dim: int = 16,
    target: str = "spatial",
) -> tuple[ODConv2d, None]:
    """Replace ``conv`` by an ODConv of the same geometry (groups included, so a depthwise
    conv stays depthwise); the ``norm`` and ``act`` after it stay.

    ``target`` (which convs of a block) is used by the surgery that picks the convs and
    only checked here.

    Raises:
        ValueError: a bad param, or a conv with string padding or a non-zeros padding mode.
    """
    if target not in ("spatial", "all"):
        raise ValueError(f"target must be 'spatial' or 'all', got {target!r}")
    od = replace_conv(conv, partial(ODConv2d, kernels=kernels, temperature=temperature, reduction=reduction,
                                    min_dim=min_dim),
                      kind="odconv", init=init, preserve=lambda new: new.preserve_(conv))
    return od, None

