"""Dynamic convolution: K kernels mixed per sample by a squeeze-and-excitation attention.

Paper: Dynamic Convolution: Attention over Convolution Kernels (Chen, Dai, Liu, Chen,
Yuan, Liu; CVPR 2020), https://arxiv.org/abs/1912.03458 (Sec. 3)::

    pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / tau)      # K weights per sample, sum to 1
    y     = (sum_k pi_k(x) W_k) * x + sum_k pi_k(x) b_k

FC1 reduces to ``C_in / r`` (r = 4); tau is annealed from 30 to 1 while training
(:func:`temperature_schedule`, :func:`set_temperature`).

Layout: the K kernels are one 4-D ``weight`` of shape ``(K * C_out, C_in / groups, kh, kw)``
ordered (group, kernel, out-channel of the group), the biases one ``(K * C_out,)`` vector,
so ``channels_last`` works as for any conv; :meth:`DynamicConv2d.bank` gives the
``(K, C_out, ...)`` view, and checkpoints with the older 5-D weight still load.

Three exact forms of the same function (``DynamicConv2d.form``, or :func:`set_dynconv_form`):

* *per-sample*: aggregate N kernels and run one conv with ``N * groups`` groups (fewest
  multiply-adds, but it stores N kernels and the batch size becomes part of the graph);
* *stacked*: one conv with all K kernels stacked, then the pi-weighted sum of the K outputs
  (K times the multiply-adds, no op depends on the batch, so it exports with a dynamic batch;
  a depthwise conv off CUDA runs it as K depthwise convs, :meth:`DynamicConv2d.forward_stacked`);
* *triton* (CUDA): one implicit-GEMM conv that sums each sample's kernel tile from the K
  kernels as it goes (:mod:`._dynconv_triton`): per-sample multiply-adds, neither N kernels
  nor K outputs stored; a ``torch.library`` op, so ``torch.compile`` keeps it whole.

``"auto"`` (default) picks per call: the stacked form under every tracer (export, ONNX,
jit/fx); the per-sample form at batch 1 (a plain conv); on CUDA, measured: the first call
with a new (shapes, dtypes, layouts, training) key times each form, the Triton form at each
of its tile sets that the shape can use (``_dynconv_triton.TILES``, e.g. ``triton:m128``)
(:meth:`DynamicConv2d.measure_forms`), and keeps the fastest whose peak memory is at most
the per-sample form's; under ``torch.compile`` the Triton op where it applies; on CPU the
cheaper by a cost rule per kernel element: per-sample ``H'W' + a`` against stacked
``K H'W' (1 + a / fan_in)``, with ``a = _ELEMENT_COST`` fitted to CPU timings (the README's
benchmark section has them). Under autocast pi is cast to the conv's compute dtype, so a
bf16 model stays bf16.

Departures from the paper:

* FC1 and FC2 have biases, as in SENet (the paper does not say; < 0.01% of the parameters);
  the hidden width is ``max(1, C_in // r)``.
* ``--init paper``: each kernel is initialised as ``nn.Conv2d.reset_parameters`` does, the
  FCs with PyTorch defaults (the paper names no initialisation).
* ``--init preserve``: all K kernels are copies of the replaced conv, so the output is the
  conv's for any attention; the kernels diverge in training (each kernel's gradient is
  weighted by its own pi), and until they do the FCs get no gradient.
* tau is a persistent buffer, so a checkpoint keeps the annealed value.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ._conv import replace_conv

if TYPE_CHECKING:
    from ._dynconv_triton import Blocks

__all__ = [
    "FORMS",
    "DynamicConv2d",
    "KernelAttention",
    "PerSampleForms",
    "from_conv",
    "set_dynconv_form",
    "set_temperature",
    "temperature_schedule",
]

FORMS = ("auto", "stacked", "per_sample", "triton")

_ELEMENT_COST = 256.0  # multiply-adds per per-sample kernel element (see the docstring)

_Size = int | tuple[int, int]


def _pair(value: _Size) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


_MEASURED: dict[tuple, str] = {}  # CUDA: the fastest form per (shapes, dtypes, layouts, training)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton() -> ModuleType | None:
    """The Triton kernel's module, imported on first use (None without triton)."""
    from . import _dynconv_triton

    return _dynconv_triton if _dynconv_triton.AVAILABLE else None


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


class KernelAttention(nn.Module):
    """Logits of the kernel attention, ``FC2(ReLU(FC1(GAP(x))))``, shape ``(N, K)``."""

    def __init__(self, in_channels: int, kernels: int, *, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Conv2d(in_channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, kernels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).flatten(1)


class PerSampleForms(nn.Module):
    """How dynamic convolution and ODConv choose between their exact forms (module
    docstring): ``form_for`` reads the module's ``form``, the tracer, the device and, on
    CUDA, timings (``measure_forms``), from what the module defines: ``run_form(x, form)``,
    ``prefers_stacked(x)`` (the CPU cost rule) and ``traced_form()`` (what tracers get)."""

    form: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out_channels: int
    triton_blocks: Blocks | None
    run_form: Callable[[Tensor, str], Tensor]
    prefers_stacked: Callable[[Tensor], bool]

    def traced_form(self) -> str:
        """The form tracers get (export, ONNX, jit, fx): one with no op that depends on N."""
        return "stacked"

    def form_for(self, x: Tensor) -> str:
        """Which form ``forward`` runs on ``x``: ``form``, tracing, device, cost (module docstring)."""
        if torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy) or kernels.exporting():
            return self.traced_form()
        if self.form == "stacked":
            return "stacked"
        if torch.compiler.is_compiling():  # torch.compile: the Triton op where it applies
            if self.form in ("auto", "triton") and self.triton_applies(x):
                static = self.form == "auto" and all(isinstance(size, int) for size in x.shape)
                return _MEASURED.get(self._key(x), "triton") if static else "triton"
            return self.traced_form()
        if self.form == "per_sample":
            return "per_sample"
        if self.form == "triton" and self.triton_applies(x):
            return "triton"
        if x.shape[0] == 1:
            return "per_sample"
        if x.device.type == "cuda":
            key = self._key(x)
            if key not in _MEASURED and torch.cuda.is_current_stream_capturing():  # no timing in a graph
                return "triton" if self.triton_applies(x) else "stacked"
            if key not in _MEASURED:
                _MEASURED[key] = _fastest_within_memory(self.measure_forms(x))
            return _MEASURED[key]
        return "stacked" if self.prefers_stacked(x) else "per_sample"

    def uses_stacked(self, x: Tensor) -> bool:
        """Whether ``forward`` runs the stacked form on ``x``."""
        return self.form_for(x) == "stacked"

    def triton_applies(self, x: Tensor) -> bool:
        """Whether the Triton kernel takes ``x`` (CUDA, or the interpreter; a dtype it handles)."""
        if not (x.device.type == "cuda" or _interpreting()):
            return False
        kernel = _triton()
        return kernel is not None and kernel.supports(x.device, _compute_dtype(x, self.weight), x.numel(),
                                                      self.weight.numel(), positions=x.shape[2] * x.shape[3])

    def triton_forms(self, x: Tensor, train: bool) -> list[str]:
        """The Triton form's tile sets worth timing on ``x`` (``_dynconv_triton.tile_forms``),
        or just ``triton`` where the module's ``triton_blocks`` fixes its tiles."""
        if self.triton_blocks is not None:
            return ["triton"]
        out = (x.shape[0], self.out_channels, *self.out_size(x))
        taps = self.weight.shape[2] * self.weight.shape[3]
        return _triton().tile_forms(tuple(x.shape), out, self.groups, taps, train=train)

    def out_size(self, x: Tensor) -> tuple[int, int]:
        """The conv's output height and width on ``x``."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.weight.shape[2:], self.stride, self.padding, self.dilation
        return ((x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def tiles(self, form: str) -> Blocks | None:
        """The tiles a timed Triton ``form`` names (``triton:m128``, ...); None for plain
        ``triton``, which runs the module's own ``triton_blocks`` (``forward_triton``)."""
        return None if form == "triton" else _triton().TILES[form]

    def _key(self, x: Tensor) -> tuple:
        """What the measured choice depends on: the module's class, shapes, dtypes, layouts,
        device, training."""
        return (type(self).__name__, x.device, tuple(x.shape), x.dtype, _compute_dtype(x, self.weight),
                _channels_last(x), _channels_last(self.weight), torch.is_grad_enabled() and self.weight.requires_grad,
                self.weight.shape, self.stride, self.padding, self.dilation, self.groups, self.bias is not None)

    def measure_forms(self, x: Tensor, *, reps: int = 3) -> dict[str, tuple[float, int]]:
        """Seconds per call of each form on ``x`` (the Triton form at each tile set of
        :meth:`triton_forms`; the best of ``reps`` after a warm-up) and,
        on CUDA, the bytes it allocates at its peak (0 elsewhere): forward, plus backward for
        every input when gradients are on. Parameters' ``.grad`` are not touched; on CUDA the
        peak-memory statistics are reset."""
        train = torch.is_grad_enabled() and self.weight.requires_grad
        forms = ["stacked", "per_sample"] + (self.triton_forms(x, train) if self.triton_applies(x) else [])
        x = x.detach().requires_grad_(train)
        cuda = x.device.type == "cuda"
        results = {}
        for form in forms:
            best, peak = math.inf, 0
            for rep in range(reps + 1):
                _sync(x)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(x.device)
                    before = torch.cuda.memory_allocated(x.device)
                start = time.perf_counter()
                y = self.run_form(x, form)
                if train:
                    inputs = [x, *(p for p in self.parameters() if p.requires_grad)]
                    torch.autograd.grad(y, inputs, torch.ones_like(y))
                del y
                _sync(x)
                if rep:
                    best = min(best, time.perf_counter() - start)
                if cuda:
                    peak = max(peak, torch.cuda.max_memory_allocated(x.device) - before)
            results[form] = (best, peak)
        return results


class DynamicConv2d(PerSampleForms):
    """A conv whose kernel is a per-sample, attention-weighted sum of K kernels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as ``nn.Conv2d`` (numeric padding, zeros mode); each of the K kernels has
            this shape.
        kernels: K, the number of kernels.
        temperature: tau, the softmax temperature (a persistent buffer).
        reduction: r, FC1 reduces C_in to ``C_in // r``.

    Attributes:
        weight: the K kernels, ``(K * C_out, C_in / groups, kh, kw)`` ordered (group,
            kernel, out-channel of the group); :meth:`bank` is the ``(K, C_out, ...)`` view.
        bias: ``(K * C_out,)`` in the same order, or None.
        form: ``"auto"`` (default), ``"stacked"``, ``"per_sample"`` or ``"triton"``: which
            exact form runs (module docstring); not saved in the state_dict.
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
        bias: bool = True,
        kernels: int = 4,
        temperature: float = 30.0,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        for name, value in (("kernels", kernels), ("reduction", reduction), ("groups", groups)):
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
        self.bias = nn.Parameter(torch.empty(kernels * out_channels)) if bias else None
        self.attention = KernelAttention(in_channels, kernels, reduction=reduction)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper init: every kernel as ``nn.Conv2d.reset_parameters`` initialises one.

        The bounds depend only on the fan-in, which all K kernels share, so one call on
        the whole bank draws from the same distribution as K separate convs.
        """
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.attention.fc1.reset_parameters()
        self.attention.fc2.reset_parameters()

    def _grouped(self, t: Tensor) -> Tensor:
        """``weight`` or ``bias`` viewed as ``(groups, K, C_out / groups, ...)`` (no copy)."""
        return t.unflatten(0, (self.groups, self.kernels, -1))

    def bank(self) -> Tensor:
        """The kernels as ``(K, C_out, C_in / groups, kh, kw)`` (a view when groups = 1)."""
        return self._grouped(self.weight).transpose(0, 1).flatten(1, 2)

    @torch.no_grad()
    def preserve_(self, conv: nn.Conv2d) -> None:
        """Every kernel (and bias) becomes a copy of ``conv``'s: the output is conv's."""
        g = self.groups
        self._grouped(self.weight).copy_(conv.weight.unflatten(0, (g, 1, -1)).expand(-1, self.kernels, -1, -1, -1, -1))
        if self.bias is not None and conv.bias is not None:
            self._grouped(self.bias).copy_(conv.bias.unflatten(0, (g, 1, -1)).expand(-1, self.kernels, -1))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Accept the old 5-D layout: ``weight (K, C_out, ...)`` and ``bias (K, C_out)``."""
        k, g = self.kernels, self.groups
        for name, dims in (("weight", 5), ("bias", 2)):
            key, param = prefix + name, getattr(self, name)
            old = state_dict.get(key)
            if param is None or not isinstance(old, Tensor) or old.dim() != dims or old.numel() != param.numel():
                continue
            if old.shape[0] == k:  # (K, C_out, ...) -> (groups, K, C_out / groups, ...) -> flat
                state_dict[key] = old.unflatten(1, (g, -1)).transpose(0, 1).reshape(param.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def kernel_attention(self, x: Tensor) -> Tensor:
        """pi(x): softmax over the K kernels at temperature tau, shape ``(N, K)``."""
        return (self.attention(x) / self.temperature).softmax(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.run_form(x, self.form_for(x))

    def run_form(self, x: Tensor, form: str) -> Tensor:
        """The module's output in ``form`` (``stacked``, ``per_sample`` or ``triton``)."""
        pi = self.kernel_attention(x)
        if form == "stacked":
            return self.forward_stacked(x, pi)
        if form.startswith("triton"):
            return self.forward_triton(x, pi, self.tiles(form))
        return self.forward_per_sample(x, pi)

    def prefers_stacked(self, x: Tensor) -> bool:
        """The CPU cost rule of the module docstring, for ``x`` (whatever its device)."""
        n = x.shape[0]
        positions = math.prod(self.out_size(x))
        fan_in = self.weight[0].numel()
        per_sample = positions + _ELEMENT_COST
        stacked = self.kernels * positions * (1 + _ELEMENT_COST / fan_in)
        return n > 1 and stacked < per_sample

    def forward_per_sample(self, x: Tensor, pi: Tensor) -> Tensor:
        """Aggregate one kernel per sample and run them as one grouped conv."""
        n, k = x.shape[0], self.kernels
        dtype = _compute_dtype(x, self.weight)
        pi = pi.to(dtype)
        # flatten each kernel in its memory order (C_in, kh, kw or, channels_last, kh, kw,
        # C_in), so that a channels_last bank is read without a copy
        last = _channels_last(self.weight)
        bank = self.weight.permute(0, 2, 3, 1) if last else self.weight
        inner = bank.shape[1:]
        bank = self._grouped(bank).transpose(0, 1).reshape(k, -1) if self.groups > 1 else bank.reshape(k, -1)
        weight = (pi @ bank.to(dtype)).reshape(-1, *inner)  # (N * C_out, ...), ordered (n, group, c)
        if last:
            weight = weight.permute(0, 3, 1, 2)
        bias = None
        if self.bias is not None:
            bias = (pi @ self._grouped(self.bias).transpose(0, 1).reshape(k, -1).to(dtype)).flatten()
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight, bias,
                     self.stride, self.padding, self.dilation, self.groups * n)
        y = y.reshape(n, self.out_channels, *y.shape[2:])
        if _channels_last(x):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def forward_triton(self, x: Tensor, pi: Tensor, blocks: Blocks | None = None) -> Tensor:
        """The per-sample conv as one Triton kernel that mixes the K kernels on the fly
        (``_dynconv_triton``), with ``blocks`` or the module's tiles; same function as the
        other two forms."""
        dtype = _compute_dtype(x, self.weight)
        y = _triton().dynamic_conv2d(x.to(dtype), self.weight.to(dtype), pi, kernels=self.kernels,
                                     stride=self.stride, padding=self.padding, dilation=self.dilation,
                                     groups=self.groups, blocks=blocks or self.triton_blocks)
        if self.bias is not None:
            bias = pi.to(dtype) @ self._grouped(self.bias).transpose(0, 1).reshape(self.kernels, -1).to(dtype)
            y = y + bias[:, :, None, None]
        return y

    def forward_stacked(self, x: Tensor, pi: Tensor) -> Tensor:
        """Run all K kernels as one conv on the bank as stored, then sum the K outputs
        weighted by pi.

        A depthwise conv off CUDA (and so in every ONNX file) runs as K depthwise convs
        instead, summed as they come: the stacked conv has K outputs per group, which
        PyTorch's CPU conv and onnxruntime's run by their generic grouped path. On
        MobileNetV2 at 224x224 its INT8 file took 87 ms against the float file's 17 (split:
        11 against 12), and in eager mode a 576-channel 14x14 layer took 24 ms against 2.7."""
        g, k = self.groups, self.kernels
        if self.in_channels == g == self.out_channels and not x.is_cuda:
            return self._forward_depthwise(x, pi)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, g)
        pi = pi.to(y.dtype)
        if _channels_last(y):  # mix in memory order, so the output stays channels_last
            y = y.permute(0, 2, 3, 1).unflatten(3, (g, k, -1))  # (N, H', W', g, K, C_out / g)
            return (y * pi[:, None, None, None, :, None]).sum(4).flatten(3).permute(0, 3, 1, 2)
        y = y.unflatten(1, (g, k, -1))  # (N, g, K, C_out / g, H', W')
        return (y * pi[:, None, :, None, None, None]).sum(2).flatten(1, 2)

    def _forward_depthwise(self, x: Tensor, pi: Tensor) -> Tensor:
        """The stacked form of a depthwise conv as K depthwise convs, one per kernel."""
        c, k = self.groups, self.kernels
        weights = self.weight.unflatten(0, (c, k)).unbind(1)  # K x (C, 1, kh, kw)
        biases = [None] * k if self.bias is None else self.bias.view(c, k).unbind(1)  # K x (C,)
        return _mix((F.conv2d(x, w_i, b_i, self.stride, self.padding, self.dilation, c)
                     for w_i, b_i in zip(weights, biases, strict=True)), pi.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, kernels={self.kernels}"
                + ("" if self.form == "auto" else f", form={self.form}"))


def _mix(outputs: Iterable[Tensor], weights: Tensor | None) -> Tensor:
    """``sum_k weights[:, k] * outputs[k]`` over the K outputs of one layer's kernels, one
    product and one sum per kernel (a single split of ``weights`` (N, K), one op in ONNX);
    the one output where ``weights`` is None (K = 1). ``outputs`` may be a generator: each
    is added as it comes, so no more than two maps are alive."""
    if weights is None:
        (y,) = outputs
        return y
    y = None
    for y_i, w_i in zip(outputs, weights[:, :, None, None].split(1, dim=1), strict=True):
        y = y_i * w_i if y is None else y + y_i * w_i
    assert y is not None  # K >= 1
    return y


def _fastest_within_memory(results: dict[str, tuple[float, int]]) -> str:
    """The fastest form among those whose peak memory is at most the per-sample form's
    (the reference code's algorithm): never hungrier than it, faster where possible."""
    limit = results["per_sample"][1]
    return min((form for form, (_, peak) in results.items() if peak <= limit), key=lambda form: results[form][0])


def _channels_last(t: Tensor) -> bool:
    """Whether a 4-D ``t`` is laid out channels_last (and not also plain contiguous);
    False for an fx proxy, which has no layout."""
    if isinstance(t, torch.fx.Proxy):
        return False
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a conv of ``x`` by ``weight`` runs in: autocast's, else the weight's."""
    if isinstance(x, torch.fx.Proxy):  # fx tracing: no device, no autocast
        return weight.dtype
    device = x.device.type  # a meta tensor (a shape-only trace) has no autocast; asking raises
    # torch.compile traces real devices only, and in torch 2.10 and 2.11 could not trace the first test
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)
    if available and torch.is_autocast_enabled(device) and weight.is_floating_point():
        return torch.get_autocast_dtype(device)
    return weight.dtype


def from_conv(
    conv: nn.Conv2d,
    norm: nn.Module | None,
    *,
    act: nn.Module | None = None,
    init: str = "paper",
    kernels: int = 4,
    temperature: float = 30.0,
    reduction: int = 4,
    target: str = "spatial",
) -> tuple[DynamicConv2d, None]:
    """Replace ``conv`` by a dynamic conv of the same geometry (groups included, so a
    depthwise conv stays depthwise); the ``norm`` and ``act`` after it stay.

    ``target`` (which convs of a block) is used by the surgery that picks the convs and
    only checked here.

    Raises:
        ValueError: a bad param, or a conv with string padding or a non-zeros padding mode.
    """
    if target not in ("spatial", "all"):
        raise ValueError(f"target must be 'spatial' or 'all', got {target!r}")
    dyn = replace_conv(conv, partial(DynamicConv2d, kernels=kernels, temperature=temperature, reduction=reduction),
                       kind="dynconv", init=init, preserve=lambda new: new.preserve_(conv))
    return dyn, None


def _check_temperature(value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")


def set_dynconv_form(model: nn.Module, form: str) -> int:
    """Choose which exact form every dynamic convolution (:class:`DynamicConv2d`, and
    :class:`~attnsurgeon.layers.odconv.ODConv2d`) in ``model`` runs in eager mode.

    ``"auto"`` (default): the device rule of the module docstring (measured on CUDA, the
    fitted cost rule on CPU); ``"stacked"`` (ODConv's unfolded form), ``"per_sample"`` or
    ``"triton"`` (where the kernel applies): that form. Exporters always get the traced
    form. All forms compute the same function.

    Returns:
        How many modules were set (0 if the model has none).

    Raises:
        ValueError: ``form`` is not one of :data:`FORMS`.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, PerSampleForms):
            module.form = form
            count += 1
    return count


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every dynamic convolution in ``model`` (``dynconv`` and
    ``odconv``: every module whose class sets ``ANNEALED``).

    Call it once per epoch (or step) with :func:`temperature_schedule`.

    Returns:
        How many were set (0 if the model has none).
    """
    _check_temperature(value)
    count = 0
    for module in model.modules():
        if getattr(type(module), "ANNEALED", False):
            module.temperature.fill_(value)
            count += 1
    return count


def temperature_schedule(epoch: float, *, start: float = 30.0, end: float = 1.0, epochs: int = 10) -> float:
    """The paper's annealing: tau falls linearly from ``start`` to ``end`` over ``epochs``.

    ``epoch`` counts from 0 and may be fractional (per-step annealing); from ``epochs``
    on, tau stays at ``end``. The default is the paper's 30 -> 1 over 10 epochs.

    Raises:
        ValueError: a negative epoch, ``epochs < 1``, or a temperature that is not > 0.
    """
    if not (epoch >= 0 and math.isfinite(epoch)):
        raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    _check_temperature(start)
    _check_temperature(end)
    return start + (end - start) * min(epoch / epochs, 1.0)
