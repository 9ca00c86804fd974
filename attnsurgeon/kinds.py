"""What a user can ask for: attention kinds, their parameters, positions and heads.

This module is metadata only and never imports torch, so ``attnsurgeon kinds`` and
``--help`` stay instant, and every option and recipe is validated before a model is
loaded. The modules themselves live in :mod:`attnsurgeon.layers`; a kind names its
builder as ``"module:function"`` and :func:`builder` imports it on first use.

Two families of kinds:

* **insert** kinds add a module at a *position* of a block
  (``standard | pre | mid | post | identity | builtin``); their builder is
  ``build(channels, *, init, **params) -> nn.Module``.
* **replace** kinds swap convolutions of the block for a richer operator; their builder is
  ``from_conv(conv, norm, *, act, init, **params) -> (new_conv, new_norm | None)``, where
  ``norm`` and ``act`` are the norm and activation after the conv (or ``None``) and
  ``new_norm`` replaces the norm (``None`` keeps it). A replacement that replaces the norm
  also takes over the activation where it belongs to the conv alone; a shared one (ResNet's
  ``relu``) stays, and must then be idempotent (ReLU, ReLU6). Which convolutions of a block
  it takes is data too: :attr:`KindSpec.convs` (or a parameter named by
  :attr:`KindSpec.convs_param`), one of :data:`CONV_TARGETS`.

Every module a builder returns is marked new (:func:`attnsurgeon.layers.mark_new`) by the
surgery, so :mod:`attnsurgeon.training` finds it wherever the builder lives.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UsageError, suggest
from .layers import INIT_MODES

__all__ = [
    "CONV_TARGETS",
    "HEADS",
    "HEAD_BUILDERS",
    "INIT_MODES",
    "KINDS",
    "POSITIONS",
    "KindSpec",
    "Param",
    "builder",
    "get_kind",
    "parse_cli_params",
    "register",
]

POSITIONS: tuple[str, ...] = ("standard", "pre", "mid", "post", "identity", "builtin")
# which convolutions of a block a replace kind takes: the block's main spatial conv (what
# SK replaces), every spatial (k > 1) conv, or every conv (1x1 and downsample ones too)
CONV_TARGETS: tuple[str, ...] = ("main", "spatial", "all")
HEADS: dict[str, str] = {
    "avg": "the model's own global average pool (no change)",
    "dual-pool": "concat(global avg pool, global max pool) -> 1x1 reduce -> dropout -> classifier",
}
HEAD_BUILDERS: dict[str, str] = {"dual-pool": "attnsurgeon.layers.dual_pool:build"}

ParamType = type[int] | type[float] | type[str]


@dataclass(frozen=True)
class Param:
    """One ``--param`` a kind takes: name, type, default, allowed values, meaning."""

    name: str
    type: ParamType
    default: Any
    help: str
    symbol: str = ""  # the paper's symbol, e.g. "r"
    minimum: float | None = None
    maximum: float | None = None  # where a larger value only exhausts memory (a typo's guard)
    choices: tuple[Any, ...] = ()

    def parse(self, raw: object, *, where: str) -> Any:
        """Convert ``raw`` (a CLI string or a TOML value) and check it; raise UsageError."""
        value: Any
        if isinstance(raw, str) and self.type is not str:
            try:
                value = self.type(raw)
            except ValueError:
                raise UsageError(
                    f"{where}: {self.name} must be {self.type.__name__}, got {raw!r}"
                ) from None
        elif self.type is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, self.type) and not isinstance(raw, bool):
            value = raw
        else:
            raise UsageError(
                f"{where}: {self.name} must be {self.type.__name__}, got {raw!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{where}: {self.name} must be a finite number, got {raw!r}")
        if self.choices and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise UsageError(f"{where}: {self.name} must be one of {allowed}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise UsageError(f"{where}: {self.name} must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise UsageError(f"{where}: {self.name} must be <= {self.maximum:g}, got {value!r}")
        return value


@dataclass(frozen=True)
class KindSpec:
    """An attention kind: how the user names it, what it takes, where it comes from."""

    name: str
    title: str
    paper: str  # "Title (Authors, Venue): URL"
    mode: Literal["insert", "replace"]
    builder: str  # "module:function", imported lazily
    params: tuple[Param, ...] = ()
    default_position: str | None = None
    note: str = ""
    convs: str | None = None  # replace kinds: one of CONV_TARGETS
    convs_param: str | None = None  # a param whose value (one of CONV_TARGETS) chooses instead

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve_params(self, given: Mapping[str, object], *, where: str) -> dict[str, Any]:
        """Check ``given`` against this kind's params and fill in defaults."""
        by_name = {p.name: p for p in self.params}
        out = self.defaults()
        for key, raw in given.items():
            if not isinstance(key, str):
                raise UsageError(f"{where}: parameter names are strings, got {key!r}")
            if key not in by_name:
                raise UsageError(
                    f"{where}: kind {self.name!r} takes no parameter {key!r}"
                    + suggest(key, by_name)
                )
            out[key] = by_name[key].parse(raw, where=where)
        return out

    def conv_targets(self, params: Mapping[str, Any]) -> str:
        """Which convolutions this replace kind takes with ``params``: one of :data:`CONV_TARGETS`."""
        if self.convs_param is not None:
            return str(params.get(self.convs_param, self.defaults()[self.convs_param]))
        if self.convs is None:
            raise ValueError(f"kind {self.name!r} replaces no convolutions")
        return self.convs

    def resolve_position(self, position: str | None, *, where: str) -> str | None:
        if self.mode == "replace":
            if position is not None:
                raise UsageError(
                    f"{where}: {self.name!r} replaces convolutions and takes no position "
                    f"(got {position!r}); use its params instead"
                    + (f" ({', '.join(self.param_names)})" if self.params else "")
                )
            return None
        if position is None:
            return self.default_position
        if position not in POSITIONS:
            raise UsageError(f"{where}: unknown position {position!r}" + suggest(position, POSITIONS))
        return position


KINDS: dict[str, KindSpec] = {}


def register(spec: KindSpec) -> KindSpec:
    """Add a kind to the registry; a second kind with the same name is a bug."""
    if spec.name in KINDS:
        raise ValueError(f"attention kind {spec.name!r} is already registered")
    if spec.mode == "insert" and spec.default_position not in POSITIONS:
        raise ValueError(f"insert kind {spec.name!r} needs a default position")
    if spec.mode == "replace":
        by_name = {p.name: p for p in spec.params}
        if spec.convs_param is not None:
            choices = by_name[spec.convs_param].choices if spec.convs_param in by_name else ()
            if not choices or not set(choices) <= set(CONV_TARGETS):
                raise ValueError(f"replace kind {spec.name!r}: convs_param {spec.convs_param!r} must be a param "
                                 f"with choices among {CONV_TARGETS}")
        elif spec.convs not in CONV_TARGETS:
            raise ValueError(f"replace kind {spec.name!r} needs convs, one of {CONV_TARGETS}")
    KINDS[spec.name] = spec
    return spec


def get_kind(name: str, *, where: str = "--attn") -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise UsageError(f"{where}: unknown attention kind {name!r}" + suggest(name, KINDS)) from None


def builder(spec: KindSpec | str) -> Callable[..., Any]:
    """Import and return a builder (this is where torch gets imported).

    ``spec`` is a kind, or a ``"module:function"`` path such as a head builder.
    """
    path = spec if isinstance(spec, str) else spec.builder
    module_name, _, func = path.partition(":")
    return getattr(importlib.import_module(module_name), func)


def parse_cli_params(items: list[str] | None) -> dict[str, str]:
    """``["reduction=8", "kernel_size=3"]`` -> ``{"reduction": "8", ...}`` (values still raw)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"--param: expected KEY=VALUE, got {item!r}")
        if key in out:
            raise UsageError(f"--param: {key!r} given twice")
        out[key] = value
    return out


_REDUCTION = Param("reduction", int, 16, "channel reduction ratio of the bottleneck MLP", "r", minimum=1)
_GATE = Param("gate", str, "sigmoid", "gate activation: 'sigmoid' (the paper's) or 'hard_sigmoid' "
              "(MobileNetV3's ReLU6(x + 3) / 6; --init preserve is exact)",
              choices=("sigmoid", "hard_sigmoid"))

register(KindSpec(
    name="se",
    title="Squeeze-and-Excitation",
    paper="Squeeze-and-Excitation Networks (Hu, Shen, Sun; CVPR 2018): https://arxiv.org/abs/1709.01507",
    mode="insert",
    builder="attnsurgeon.layers.squeeze_excite:build",
    params=(
        _REDUCTION,
        Param("variant", str, "standard", "'standard' (the paper's SE) or 'effective': eSE, one FC C -> C "
              "and a hard sigmoid (gate and reduction unused; CenterMask, Lee & Park, CVPR 2020: "
              "https://arxiv.org/abs/1911.06667; timm's 'ese')", choices=("standard", "effective")),
        _GATE,
    ),
    default_position="standard",
))

register(KindSpec(
    name="cbam",
    title="Convolutional Block Attention Module",
    paper="CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon; ECCV 2018): https://arxiv.org/abs/1807.06521",
    mode="insert",
    builder="attnsurgeon.layers.cbam:build",
    params=(
        _REDUCTION,
        Param("kernel_size", int, 7, "kernel of the spatial attention conv", "k", choices=(3, 7)),
        Param("variant", str, "standard", "'standard' (the paper's CBAM) or 'light': each gate pools once, "
              "0.5 (avg + max), one MLP pass and a 1-channel spatial conv (timm's 'lcbam', no paper)",
              choices=("standard", "light")),
    ),
    default_position="standard",
))

register(KindSpec(
    name="sk",
    title="Selective Kernel convolution",
    paper="Selective Kernel Networks (Li, Wang, Hu, Yang; CVPR 2019): https://arxiv.org/abs/1903.06586",
    mode="replace",
    builder="attnsurgeon.layers.selective_kernel:from_conv",
    params=(
        Param("branches", int, 2, "number of paths; path m has the replaced conv's kernel at m times its "
              "dilation (the paper's 3x3 with dilation m, on a 3x3 conv)", "M",
              minimum=1, maximum=8),
        Param("groups", int, 32, "groups of the extra paths (path 1 keeps the replaced conv's)", "G", minimum=1),
        Param("reduction", int, 16, "reduction ratio of the fuse FC", "r", minimum=1),
        Param("min_dim", int, 32, "lower bound of the fuse FC width d = max(C/r, L)", "L",
              minimum=1, maximum=4096),
    ),
    note="replaces the block's main spatial conv (whatever its kernel) and the norm after it",
    convs="main",
))

register(KindSpec(
    name="dynconv",
    title="Dynamic convolution",
    paper="Dynamic Convolution: Attention over Convolution Kernels (Chen et al.; CVPR 2020): https://arxiv.org/abs/1912.03458",
    mode="replace",
    builder="attnsurgeon.layers.dynamic_conv:from_conv",
    params=(
        Param("kernels", int, 4, "number of kernels aggregated per sample", "K", minimum=1, maximum=64),
        Param("temperature", float, 30.0, "softmax temperature (anneal to 1 while training)", "tau", minimum=1e-6),
        Param("reduction", int, 4, "reduction ratio of the attention MLP", "r", minimum=1),
        Param("target", str, "spatial", "which convs of the block: 'spatial' (3x3) or 'all' "
              "(also 1x1 and downsample convs: the paper's DY-ResNet)", choices=("spatial", "all")),
    ),
    note="replaces convs; the norms after them stay",
    convs_param="target",
))

register(KindSpec(
    name="afp",
    title="Adaptive feature processing (AFP) fusion",
    paper="Few-shot image classification based on adaptive feature fusion and transformation "
    "(Computer Engineering and Applications, 2021; no arXiv version), as in "
    "https://blog.csdn.net/weixin_43312117/article/details/121374486",
    mode="insert",
    builder="attnsurgeon.layers.afp:build",
    params=(
        Param("reduction", int, 2, "reduction ratio of the SE inside the DConv branch", "r", minimum=1),
    ),
    default_position="post",
    note="four branches (max-pool, avg-pool, DConv+SE, identity) fused by softmax weights",
))

register(KindSpec(
    name="eca",
    title="Efficient Channel Attention",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks "
    "(Wang, Wu, Zhu, Li, Zuo, Hu; CVPR 2020): https://arxiv.org/abs/1910.03151",
    mode="insert",
    builder="attnsurgeon.layers.eca:build",
    params=(
        Param("kernel_size", int, 0, "kernel of the 1-D conv across channels; 0 = adaptive: the "
              "odd number nearest to (log2(C) + b) / gamma, ties to the smaller", "k",
              choices=(0, 1, 3, 5, 7, 9)),
        Param("gamma", float, 2.0, "gamma of the adaptive kernel rule (unused when kernel_size > 0)",
              "gamma", minimum=0.1),
        Param("b", float, 1.0, "b of the adaptive kernel rule (unused when kernel_size > 0)", "b",
              minimum=-64, maximum=64),
        Param("padding", str, "zeros", "padding of the channel axis: 'zeros' (the paper) or 'circular' "
              "(timm's 'ceca', same parameters)", choices=("zeros", "circular")),
        _GATE,
    ),
    default_position="standard",
    note="k parameters per module; 80 on ResNet-50 (the paper's count)",
))

register(KindSpec(
    name="coord",
    title="Coordinate attention",
    paper="Coordinate Attention for Efficient Mobile Network Design (Hou, Zhou, Feng; CVPR 2021): "
    "https://arxiv.org/abs/2103.02907",
    mode="insert",
    builder="attnsurgeon.layers.coord:build",
    params=(
        Param("reduction", int, 32, "reduction ratio of the shared 1x1 conv", "r", minimum=1),
        Param("min_dim", int, 8, "lower bound of the mid width max(min_dim, C // r)", "",
              minimum=1, maximum=4096),
        _GATE,
    ),
    default_position="standard",
    note="gates along H and along W, from means over one axis each",
))

register(KindSpec(
    name="gc",
    title="Global Context block",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond "
    "(Cao, Xu, Lin, Wei, Hu; ICCV-W 2019 / TPAMI): https://arxiv.org/abs/1904.11492",
    mode="insert",
    builder="attnsurgeon.layers.global_context:build",
    params=(
        Param("reduction", int, 16, "bottleneck ratio of the transform (hidden width C / r)", "r", minimum=1),
        Param("fusion", str, "add", "'add' (the GC block: x + transform) or 'scale' "
              "(x * sigmoid(transform))", choices=("add", "scale")),
    ),
    default_position="standard",
    note="softmax attention pooling -> C/r bottleneck with LayerNorm -> add to every position; "
    "timm's 'gca' is fusion=add, its 'gc' fusion=scale with reduction=8 (the same modules)",
))

register(KindSpec(
    name="ema",
    title="Efficient Multi-Scale Attention",
    paper="Efficient Multi-Scale Attention Module with Cross-Spatial Learning "
    "(Ouyang, He, Zhang, Luo, Guo, Zhan, Huang; ICASSP 2023): https://arxiv.org/abs/2305.13563",
    mode="insert",
    builder="attnsurgeon.layers.ema:build",
    params=(
        Param("factor", int, 32, "number of channel groups G (the authors' factor); where G does not "
              "divide C the largest divisor of C below G is used", "G", minimum=1, maximum=4096),
    ),
    default_position="standard",
    note="per group of C/G channels: a 1x1 branch (H and W strip gates) and a 3x3 branch, each "
    "weighting the other's map; 10(C/G)^2 + 4(C/G) parameters",
))

register(KindSpec(
    name="simam",
    title="SimAM (parameter-free)",
    paper="SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks "
    "(Yang, Zhang, Li, Xie; ICML 2021): https://proceedings.mlr.press/v139/yang21o.html",
    mode="insert",
    builder="attnsurgeon.layers.simam:build",
    params=(
        Param("e_lambda", float, 1e-4, "regulariser of the energy function", "lambda",
              minimum=1e-12, maximum=1e3),
    ),
    default_position="standard",
    note="no parameters under --init paper; --init preserve adds one learnable blend per module "
    "(x * (1 + alpha (sigmoid(e) - 1)), alpha = 0: exactly the identity)",
))

register(KindSpec(
    name="nl",
    title="Non-local block (embedded Gaussian)",
    paper="Non-local Neural Networks (Wang, Girshick, Gupta, He; CVPR 2018): https://arxiv.org/abs/1711.07971",
    mode="insert",
    builder="attnsurgeon.layers.non_local:build",
    params=(
        Param("reduction", int, 2, "channel ratio of theta, phi and g (hidden width C / r)", "r",
              minimum=1),
        Param("use_scale", int, 1, "1: divide the pairwise logits by sqrt(C / r) (mmcv's default); 0: don't",
              choices=(0, 1)),
    ),
    default_position="post",
    note="cost grows with (HW)^2: an (HW)x(HW) matrix per image; best on late, low-resolution "
    "stages; the tool warns where it costs more MACs than the stage itself. Zero-init "
    "BN after W_z: the identity at the start under either init",
))

register(KindSpec(
    name="triplet",
    title="Triplet attention",
    paper="Rotate to Attend: Convolutional Triplet Attention Module (Misra, Nalamada, Arasanipalai, Hou; "
    "WACV 2021): https://arxiv.org/abs/2010.03045",
    mode="insert",
    builder="attnsurgeon.layers.triplet:build",
    params=(
        Param("kernel_size", int, 7, "kernel of each branch's conv over [max; mean]", "k", choices=(3, 7)),
    ),
    default_position="standard",
    note="three Z-pool spatial gates on the (C,W), (H,C) and (H,W) views, averaged; 300 parameters per "
    "module at k = 7 (ResNet-50: 25.56M, the paper's)",
))

register(KindSpec(
    name="ela",
    title="Efficient local attention",
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks (Xu, Wan; 2024): "
    "https://arxiv.org/abs/2403.01123",
    mode="insert",
    builder="attnsurgeon.layers.ela:build",
    params=(
        Param("kernel_size", int, 7, "kernel of the depthwise 1-D convs along H and W", "k",
              choices=(1, 3, 5, 7, 9, 11, 13, 15)),
        Param("groups", int, 1, "GroupNorm groups (timm: 1); reduced to a divisor of C", "",
              minimum=1, maximum=4096),
        Param("variant", str, "timm", "'timm' (timm's form, with the kernel_size and groups above) or the "
              "paper's ELA-T, B, S, L in the authors' form (they set k and the groups themselves)",
              choices=("timm", "T", "B", "S", "L")),
    ),
    default_position="standard",
    note="timm's EfficientLocalAttn: H and W strips -> depthwise 1-D conv -> GroupNorm -> SiLU -> "
    "sigmoid; 2(k + 2)C parameters. variant=T|B|S|L: the authors' ELA (one conv and GroupNorm "
    "shared by both strips, no SiLU); T: k 5, depthwise, GN 32; B: k 7, depthwise, GN 16; "
    "S: k 5, C/8 conv groups, GN 16; L: k 7, C/8 conv groups, GN 16",
))

register(KindSpec(
    name="odconv",
    title="Omni-dimensional dynamic convolution",
    paper="Omni-Dimensional Dynamic Convolution (Li, Zhou, Yao; ICLR 2022): https://arxiv.org/abs/2209.07947",
    mode="replace",
    builder="attnsurgeon.layers.odconv:from_conv",
    params=(
        Param("kernels", int, 4, "number of kernels aggregated per sample (the paper's 'ODConv (Kx)')", "n",
              minimum=1, maximum=64),
        Param("temperature", float, 30.0, "temperature of the four attentions (anneal to 1 while training)",
              "tau", minimum=1e-6),
        Param("reduction", int, 16, "reduction ratio of the shared squeeze FC (the paper's r = 1/16)", "r",
              minimum=1),
        Param("min_dim", int, 16, "lower bound of the squeeze width max(C_in / r, min_dim)", "",
              minimum=1, maximum=4096),
        Param("target", str, "spatial", "which convs of the block: 'spatial' (kxk: ResNet-18's ODConv) or "
              "'all' (also 1x1 and downsample convs: MobileNetV2's ODConv)", choices=("spatial", "all")),
    ),
    note="attention over kernel positions, input and output channels and the K kernels; the norms stay",
    convs_param="target",
))
