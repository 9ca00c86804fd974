"""Fused GPU kernels for the gates (SE, ECA, CBAM, coordinate attention, GC), and the
plain PyTorch form each one replaces.

A gate costs little arithmetic and several passes over a feature map: pool it, multiply
it by the gate, add the shortcut, apply the block's activation. On a GPU those passes,
not the MACs, are the cost. The functions here compute one step of a gate each, e.g.
:func:`scale` is ``act(x * s + identity)``; on CUDA tensors they run Triton kernels (one
read of each input and one write, backward included: see :mod:`attnsurgeon.kernels._ops`)
and everywhere else the plain form below, which is the reference the kernels are tested
against (on the CPU, in Triton's interpreter). A :class:`NormAct` (a block's eval-mode
BatchNorm and activation) passed as ``pre`` is applied as the kernels read the map, so a
gate at ``mid`` never writes ``act(bn(y))``; those paths are for inference (no autograd).

When the kernels run (:func:`active`): CUDA tensors of float32, bfloat16 or float16, 4-D,
in contiguous or channels_last layout (others are copied), at most 2**31 elements; never
under ``torch.jit`` tracing, ONNX export, ``torch.export`` or ``torch.fx`` tracing, so
exported graphs are the plain form. Under ``torch.compile`` the plain form runs by
default: Inductor fuses its multiply, add and ReLU and its reductions into kernels of its
own and can merge them with the neighbouring ops, which an opaque custom op prevents.
That rule is a reasoned default; the GPU measurement that should confirm it is still to
be taken. ``ATTNSURGEON_FUSED=compile`` (or ``set_enabled("compile")``) hands the custom
ops, with their fake and autograd registrations, to the compiler instead;
``ATTNSURGEON_FUSED=0`` (or ``set_enabled(False)``, or ``with use_fused(False):``) turns
the kernels off everywhere, for A/B measurements.

Departures from the plain form: the kernels compute in float32 and round once at the
end, where the plain form rounds each intermediate in bfloat16/float16; gradients of
gates are summed in float32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "NormAct", "active", "context_pool", "coord_pool", "enabled", "exporting", "has_hooks", "mean_max_hw",
    "norm_act_mean_max",
    "scale", "scale_hw", "scale_spatial", "set_enabled", "shift", "spatial_pool", "use_fused",
]

MODES = ("off", "eager", "compile")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_C = 65535  # grid limits of the launches (channels and positions per sample)
_MAX_P = 1 << 20
_MAX_CONTEXT_C = 4096  # GC's pooling kernel holds all channels of a block of positions at once


def _parse(mode: bool | str) -> str:
    if isinstance(mode, bool):
        return "eager" if mode else "off"
    value = mode.strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("", "1", "on", "true", "yes", "eager"):
        return "eager"
    if value == "compile":
        return "compile"
    raise ValueError(f"fused-kernel mode must be one of {MODES} (or 0/1), got {mode!r}")


_mode = _parse(os.environ.get("ATTNSURGEON_FUSED", "1"))
_interpret = False  # tests: run the kernels on CPU tensors in Triton's interpreter
_impl: ModuleType | None = None
_loaded = False


def _load() -> ModuleType | None:
    """:mod:`._ops` (imports Triton), or None where Triton is missing."""
    global _impl, _loaded
    if not _loaded:
        _loaded = True
        try:
            from . import _ops
        except ImportError:
            _impl = None
        else:
            _impl = _ops
    return _impl


def _ops_loaded() -> ModuleType:
    """:mod:`._ops`, once :func:`active` said the kernels apply (so it is loaded)."""
    impl = _load()
    if impl is None:
        raise RuntimeError("fused kernels requested without Triton")
    return impl


def set_enabled(mode: bool | str) -> None:
    """``False``/``"off"``: plain form everywhere; ``True``/``"eager"`` (the default): kernels
    on CUDA outside compilation; ``"compile"``: also under ``torch.compile``."""
    global _mode
    _mode = _parse(mode)
    if _mode == "compile":
        _load()  # not while dynamo traces


def enabled() -> str:
    """The current mode: ``"off"``, ``"eager"`` or ``"compile"``."""
    return _mode


@contextmanager
def use_fused(mode: bool | str) -> Iterator[None]:
    """Set the mode inside a ``with`` block, and put the previous one back."""
    before = _mode
    set_enabled(mode)
    try:
        yield
    finally:
        set_enabled(before)


def _interpret_on_cpu(flag: bool) -> None:
    """Test hook: let :func:`active` take CPU tensors, which the kernels then process in
    Triton's interpreter; only with ``TRITON_INTERPRET=1`` set before Triton was imported."""
    global _interpret
    if flag and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the CPU kernel path needs TRITON_INTERPRET=1 before triton is imported")
    _interpret = flag


def exporting() -> bool:
    """Whether ``torch.export`` (and so the ONNX exporter) is tracing. It reads the flag behind
    ``torch.compiler.is_exporting()``, because Dynamo in torch 2.10 and 2.11 (checked; not in
    2.14) answers that call with True under every ``torch.compile``, which sent compiled
    models down their export path."""
    return bool(torch.compiler._is_exporting_flag)


def _tensor_ok(t: Tensor, like: Tensor) -> bool:
    return t.dtype in _DTYPES and t.device == like.device


def active(x: object, *others: object) -> bool:
    """Whether the fused kernels take the feature map ``x`` (and ``others`` of its shape, or None)."""
    if _mode == "off" or not isinstance(x, Tensor):  # fx's Proxy is no Tensor
        return False
    if x.device.type != "cuda" and not (_interpret and x.device.type == "cpu"):
        return False  # first, so the CPU path pays for little more than this
    if torch.compiler.is_compiling():
        if _mode != "compile" or exporting():
            return False
    elif torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if x.dim() != 4:
        return False
    n, c, h, w = x.shape
    if x.dtype not in _DTYPES or not 0 < x.numel() < 2**31 or c > _MAX_C or h * w > _MAX_P:
        return False
    for t in others:
        if t is not None and not (isinstance(t, Tensor) and t.shape == x.shape and _tensor_ok(t, x)):
            return False
    return _load() is not None


def _gate_ok(g: object, x: Tensor, *ones: int) -> bool:
    """``g`` has the shape of ``x`` with the axes ``ones`` (of 1, 2, 3) set to 1, and a kernel dtype."""
    shape = tuple(1 if i in ones else size for i, size in enumerate(x.shape))
    return isinstance(g, Tensor) and tuple(g.shape) == shape and _tensor_ok(g, x)


def _small_ok(t: object, x: Tensor, shape: tuple[int, ...]) -> bool:
    """``t`` is a tensor of ``shape`` (a parameter), on x's device, in a kernel dtype."""
    return isinstance(t, Tensor) and tuple(t.shape) == shape and _tensor_ok(t, x)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule has forward hooks (a fused path would skip them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


_ACTS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
_PRE_CODES = {"identity": 1, "relu": 2, "relu6": 3, "silu": 4, "hardswish": 5}  # PRE of _triton._prologue
_ACT_FNS = {"identity": lambda t: t, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}


@dataclass(frozen=True)
class NormAct:
    """A block's eval-mode BatchNorm as the per-channel affine ``y * scale + shift`` (float32,
    (C,)) and the activation after it: what the kernels apply to a map as they read it, so
    that a gate at ``mid`` pools and gates ``act(norm(y))`` without it being written."""

    scale: Tensor
    shift: Tensor
    act: str  # identity, relu, relu6, silu or hardswish

    @staticmethod
    def of(norm: nn.Module, act: nn.Module | None) -> NormAct | None:
        """``norm`` (a BatchNorm2d in eval mode with running statistics, or a FrozenBatchNorm2d)
        and ``act`` (None, ReLU, ReLU6, SiLU or Hardswish) as a NormAct; None for other pairs."""
        if type(norm) not in (nn.BatchNorm2d, FrozenBatchNorm2d) or norm.training and type(norm) is nn.BatchNorm2d:
            return None
        name = "identity" if act is None else _ACTS.get(type(act))
        weight, bias, mean, var, eps = (getattr(norm, k) for k in ("weight", "bias", "running_mean",
                                                                   "running_var", "eps"))
        if name is None or not isinstance(mean, Tensor) or not isinstance(var, Tensor):
            return None  # a BatchNorm without running statistics normalises by the batch's
        scale = torch.rsqrt(var.float() + eps)
        if isinstance(weight, Tensor):
            scale = scale * weight.float()
        shift = -mean.float() * scale
        return NormAct(scale, shift + bias.float() if isinstance(bias, Tensor) else shift, name)

    def __call__(self, y: Tensor) -> Tensor:
        """The plain form: ``act(y * scale + shift)``, computed in float32, in y's dtype."""
        z = torch.addcmul(self.shift.view(-1, 1, 1), y.float(), self.scale.view(-1, 1, 1))
        return _ACT_FNS[self.act](z).to(y.dtype)

    def takes(self, y: Tensor) -> bool:
        """Whether the kernels take this prologue on ``y`` (one value per channel, y's device)."""
        shape = (y.shape[1],)
        return self.scale.shape == self.shift.shape == shape and self.scale.device == self.shift.device == y.device

    def args(self) -> tuple[Tensor, Tensor, int]:
        return self.scale, self.shift, _PRE_CODES[self.act]


def _finish(out: Tensor, identity: Tensor | None, relu: bool) -> Tensor:
    if identity is not None:
        out = out + identity
    return torch.relu(out) if relu else out


def scale(x: Tensor, s: Tensor, identity: Tensor | None = None, *, relu: bool = False,
          pre: NormAct | None = None) -> Tensor:
    """``x * s``, plus ``identity``, then ReLU: a channel gate ``s`` (N, C, 1, 1) applied
    (SE, ECA, GC with fusion scale, CBAM's channel gate); with ``pre``, of ``pre(x)``."""
    if pre is not None:
        if identity is None and not relu and active(x) and pre.takes(x) and _gate_ok(s, x, 2, 3):
            return _ops_loaded().norm_act_apply(x, *pre.args(), s.reshape(x.shape[:2]), None, None, None)
        x = pre(x)
    if active(x, identity) and _gate_ok(s, x, 2, 3):
        n, c = x.shape[:2]
        return _ops_loaded().gate_apply(x, s.reshape(n, c), None, None, None, None, identity, relu)
    if identity is None:
        return _finish(x * s, None, relu)
    return _finish(torch.addcmul(identity, x, s), None, relu)


def shift(x: Tensor, t: Tensor, identity: Tensor | None = None, *, relu: bool = False) -> Tensor:
    """``x + t``, plus ``identity``, then ReLU: GC's fusion by addition (t: (N, C, 1, 1))."""
    if active(x, identity) and _gate_ok(t, x, 2, 3):
        n, c = x.shape[:2]
        return _ops_loaded().gate_apply(x, None, t.reshape(n, c), None, None, None, identity, relu)
    return _finish(x + t, identity, relu)


def scale_spatial(x: Tensor, s: Tensor, g: Tensor, identity: Tensor | None = None, *,
                  relu: bool = False, pre: NormAct | None = None) -> Tensor:
    """``x * s * g``, plus ``identity``, then ReLU: CBAM's channel gate ``s`` (N, C, 1, 1)
    and spatial gate ``g`` (N, 1, H, W) in one pass; with ``pre``, of ``pre(x)``."""
    if pre is not None:
        if identity is None and not relu and active(x) and pre.takes(x) and _gate_ok(s, x, 2, 3) \
                and _gate_ok(g, x, 1):
            n, c, h, w = x.shape
            return _ops_loaded().norm_act_apply(x, *pre.args(), s.reshape(n, c), g.reshape(n, h * w), None, None)
        x = pre(x)
    if active(x, identity) and _gate_ok(s, x, 2, 3) and _gate_ok(g, x, 1):
        n, c, h, w = x.shape
        return _ops_loaded().gate_apply(x, s.reshape(n, c), None, g.reshape(n, h * w), None, None, identity, relu)
    xs = x * s
    if identity is None:
        return _finish(xs * g, None, relu)
    return _finish(torch.addcmul(identity, xs, g), None, relu)


def scale_hw(x: Tensor, g_h: Tensor, g_w: Tensor, identity: Tensor | None = None, *,
             relu: bool = False, pre: NormAct | None = None) -> Tensor:
    """``x * g_h * g_w``, plus ``identity``, then ReLU: coordinate attention's gates
    ``g_h`` (N, C, H, 1) and ``g_w`` (N, C, 1, W) in one pass; with ``pre``, of ``pre(x)``."""
    if pre is not None:
        if identity is None and not relu and active(x) and pre.takes(x) and _gate_ok(g_h, x, 3) \
                and _gate_ok(g_w, x, 2):
            n, c, h, w = x.shape
            return _ops_loaded().norm_act_apply(x, *pre.args(), None, None, g_h.reshape(n, c, h),
                                                g_w.reshape(n, c, w))
        x = pre(x)
    if active(x, identity) and _gate_ok(g_h, x, 3) and _gate_ok(g_w, x, 2):
        n, c, h, w = x.shape
        return _ops_loaded().gate_apply(x, None, None, None, g_h.reshape(n, c, h), g_w.reshape(n, c, w), identity, relu)
    return _finish(x * g_h * g_w, identity, relu)


def mean_max_hw(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max over H and W, each (N, C, 1, 1), in one read (CBAM's channel pooling)."""
    if active(x):
        n, c = x.shape[:2]
        mean, top, _ = _ops_loaded().mean_max_hw(x)
        return mean.view(n, c, 1, 1), top.view(n, c, 1, 1)
    return x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)


def spatial_pool(x: Tensor, s: Tensor, *, pre: NormAct | None = None) -> tuple[Tensor, Tensor]:
    """Mean and max over the channels of ``x * s``, each (N, 1, H, W), without writing
    ``x * s`` (CBAM's spatial pooling of the channel-gated map); with ``pre``, of ``pre(x) * s``."""
    if active(x) and _gate_ok(s, x, 2, 3) and (pre is None or pre.takes(x)):
        n, c, h, w = x.shape
        impl = _ops_loaded()
        if pre is None:
            mean, top, _ = impl.spatial_pool(x, s.reshape(n, c))
        else:
            mean, top = impl.norm_act_spatial_pool(x, *pre.args(), s.reshape(n, c))
        return mean.view(n, 1, h, w), top.view(n, 1, h, w)
    xs = (x if pre is None else pre(x)) * s
    return xs.mean(1, keepdim=True), xs.amax(1, keepdim=True)


def coord_pool(x: Tensor, *, pre: NormAct | None = None) -> tuple[Tensor, Tensor]:
    """Mean over W (N, C, H, 1) and mean over H (N, C, 1, W), in one read; with ``pre``, of
    ``pre(x)``, which is not written."""
    if active(x) and (pre is None or pre.takes(x)):
        n, c, h, w = x.shape
        impl = _ops_loaded()
        z_h, z_w = impl.coord_pool(x) if pre is None else impl.norm_act_coord_pool(x, *pre.args())
        return z_h.view(n, c, h, 1), z_w.view(n, c, 1, w)
    if pre is not None:
        x = pre(x)
    return x.mean(3, keepdim=True), x.mean(2, keepdim=True)


def norm_act_mean_max(y: Tensor, pre: NormAct) -> tuple[Tensor, Tensor]:
    """Mean and max over H and W of ``pre(y)``, each (N, C, 1, 1), in one read, without
    writing ``pre(y)`` (the squeeze of SE, ECA and CBAM's channel gate at ``mid``)."""
    if active(y) and pre.takes(y):
        n, c = y.shape[:2]
        mean, top = _ops_loaded().norm_act_mean_max(y, *pre.args())
        return mean.view(n, c, 1, 1), top.view(n, c, 1, 1)
    z = pre(y)
    return z.mean((2, 3), keepdim=True), z.amax((2, 3), keepdim=True)


def context_pool(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """GC's attention pooling, (N, C, 1, 1): ``sum_p softmax_p(conv(x))[p] * x[:, :, p]``
    with ``conv`` the 1x1 conv C -> 1 of ``weight`` (1, C, 1, 1) and ``bias`` (1,). The
    kernels read x once (a streaming softmax over the positions) where the plain form
    reads it for the logits and again for the weighted sum."""
    c = x.shape[1] if isinstance(x, Tensor) and x.dim() == 4 else 0
    if active(x) and c <= _MAX_CONTEXT_C and _small_ok(weight, x, (1, c, 1, 1)) and _small_ok(bias, x, (1,)):
        context, _ = _ops_loaded().context_pool(x, weight.reshape(c), bias)
        return context.to(x.dtype).view(x.shape[0], c, 1, 1)
    weights = F.conv2d(x, weight, bias).flatten(2).softmax(-1)  # (N, 1, HW)
    return (x.flatten(2) @ weights.transpose(1, 2)).unsqueeze(-1)
