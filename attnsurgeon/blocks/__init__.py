"""Block adapters: where each block's slots and convolutions are, one file per family.

A :class:`Family` recognises its torchvision block classes by exact type and describes
each block as a :class:`BlockInfo`: dotted name, stage, channels at every slot, stride,
shortcut, convolution sites and built-in Squeeze-and-Excitation. It also turns a block
into its *slotted* form, a subclass whose forward runs the insertion positions below
(``nn.Identity`` until filled; the README's Positions section), without renaming any child, so every state_dict
key of the original model stays valid::

    x ─┬─ [identity] ─ downsample? ────────────────────────────────────┐
       │                                                              (+) ─ act ─ [post] ─>
       └─ [pre] ─ conv ... main conv ─ norm ─ act ─ [mid] ─ ... ─ norm ─ [standard] ┘

Adding a family is one file in this package that defines ``FAMILY`` and one line in
:data:`_FAMILIES`; nothing outside ``blocks/`` changes.

**Stage aliases.** Every block also gets a family-independent alias ``stageN``: the
blocks whose output has *nominal* stride ``2**(N+1)`` relative to the input (stage1 =
1/4, stage2 = 1/8, stage3 = 1/16, stage4 = 1/32; stage0 = 1/2, where MobileNetV2,
MobileNetV3-Large and EfficientNets have their first blocks). The nominal stride counts a dilated
conv's dilation as the stride it stands in for, so a segmentation backbone (dilated
stages) gets the same aliases as its classifier. Where a family has native stages
(ResNet ``layerN``, RegNet ``blockN``, ConvNeXt, EfficientNet, MNASNet), a native stage
takes the alias of its deepest block. Strides are measured by one forward pass on the
``meta`` device (no memory, no arithmetic); a model that cannot run there gets no aliases
(its blocks are still selected by name), never aliases guessed from block order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d, SqueezeExcitation

from .. import kernels
from ..kinds import POSITIONS
from ..torch_state import evaluating

__all__ = [
    "NORMS", "SLOT_ATTR", "BlockInfo", "ConvSite", "Family", "HeadInfo", "Slotted", "SlottedInverted",
    "describe_branch", "find_blocks", "find_head", "make_slotted", "unsupported_message",
]

SLOT_ATTR = {pos: f"attn_{pos}" for pos in POSITIONS if pos != "builtin"}
NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)  # norms a conv site may have after its conv


@dataclass(frozen=True)
class ConvSite:
    """A convolution of a block, relative to the block, with the norm and activation after it.

    ``act`` is the path of an activation module that belongs to this conv alone (a
    replace kind such as SK may take it over); ``act_layer`` is the activation's class
    even where the module is shared (ResNet's one ``relu``), so replacements can apply
    the same one.
    """

    conv: str
    norm: str | None
    spatial: bool  # kernel larger than 1x1
    main: bool = False  # the block's main spatial conv (what SK replaces)
    act: str | None = None
    act_layer: type[nn.Module] | None = None


@dataclass(frozen=True)
class BlockInfo:
    """One block as the user sees it in ``attnsurgeon blocks``."""

    name: str
    stage: str  # native stage ("layer3"); the alias where the family has none
    type: str
    in_channels: int
    out_channels: int
    mid_channels: int  # after the main spatial conv (the expanded width)
    stride: int
    shortcut: bool  # has a residual connection
    downsample: bool  # its shortcut has a projection
    convs: tuple[ConvSite, ...]
    builtin: str | None = None  # path of a built-in SqueezeExcitation, relative to the block
    builtin_channels: int = 0
    dilation: int = 1  # of the main spatial conv
    alias: str = ""  # stageN, filled in by find_blocks

    @property
    def slots(self) -> tuple[str, ...]:
        """The positions this block really has, in POSITIONS order."""
        have = {"standard", "pre", "mid", "post"}
        if self.shortcut:
            have.add("identity")
        if self.builtin:
            have.add("builtin")
        return tuple(p for p in POSITIONS if p in have)

    def slot_channels(self, position: str) -> int:
        """Channels of the tensor a module at ``position`` sees."""
        return {"pre": self.in_channels, "identity": self.in_channels, "mid": self.mid_channels,
                "builtin": self.builtin_channels}.get(position, self.out_channels)

    def to_data(self) -> dict[str, object]:
        return {
            "name": self.name, "stage": self.stage, "alias": self.alias, "type": self.type,
            "in_channels": self.in_channels, "mid_channels": self.mid_channels,
            "out_channels": self.out_channels, "stride": self.stride, "dilation": self.dilation,
            "shortcut": self.shortcut, "downsample": self.downsample,
            "builtin_se": self.builtin,
            "spatial_convs": [c.conv for c in self.convs if c.spatial],
            "convs": [c.conv for c in self.convs],
            "slots": list(self.slots),
        }


@dataclass(frozen=True)
class HeadInfo:
    """Where the classifier's global pool is and how many channels it pools."""

    pool: str
    channels: int


@dataclass(frozen=True)
class Family:
    """A family of torchvision blocks: what one adapter file provides.

    Args:
        name: shown in messages, e.g. ``"MobileNetV2/V3"``.
        slotted: each torchvision block class (matched by exact type: a subclass such as
            a quantizable block has its own forward) -> its slotted subclass.
        describe: ``describe(block) -> BlockInfo`` with ``name``/``stage`` left empty
            (``stage`` may be set to "" for families without native stages).
        native_stages: whether a block's parent module is a stage (``layer3``).
        head: ``head(model) -> HeadInfo | None`` for ``--head``.
    """

    name: str
    slotted: Mapping[type[nn.Module], type[nn.Module]]
    describe: Callable[[nn.Module], BlockInfo]
    native_stages: bool = True
    head: Callable[[nn.Module], HeadInfo | None] = field(default=lambda model: None)

    def recognises(self, module: nn.Module) -> bool:
        return type(module) in self.slotted or type(module) in self.slotted.values()

    @property
    def block_names(self) -> str:
        return ", ".join(dict.fromkeys(t.__name__ for t in self.slotted))


class Slotted(nn.Module):
    """Mixin of the slotted block classes: the slot modules and a branch with ``mid``.

    ``_body`` names the block's ``nn.Sequential`` branch and ``_mid`` the index of the
    child after which ``attn_mid`` runs (set by the family's ``prepare``).
    """

    attn_pre: nn.Module
    attn_mid: nn.Module
    attn_standard: nn.Module
    attn_post: nn.Module
    attn_identity: nn.Module
    _body: str = ""
    _mid: int = -1

    @classmethod
    def prepare(cls, block: nn.Module) -> None:
        """Set what the forward needs beyond the slots (``_mid``); called once."""
        if cls._body:
            block._mid = scan_branch(getattr(block, cls._body), cls._body)[1]

    def _init_slots(self) -> None:
        for attr in SLOT_ATTR.values():
            setattr(self, attr, nn.Identity())

    def _standard_add(self, out: Tensor, identity: Tensor, act: nn.Module | None = None) -> Tensor:
        """``act(attn_standard(out) + identity)``, fused where the slot's module offers it.

        A module with ``gate_add(x, identity)`` (SE, ECA, CBAM: see :mod:`attnsurgeon.layers`)
        folds its last gate multiply into the add, one pass that never writes the gated
        tensor: memory traffic, not arithmetic, is what a gate costs, most of all on a GPU.
        Where the fused GPU kernels run (:mod:`attnsurgeon.kernels`), the block's ReLU joins
        that pass too (``gate_add(x, identity, relu=True)``). The same function, to float
        rounding; a module with hooks runs as itself, so the hooks still fire.
        """
        gate = self.attn_standard
        fused = getattr(gate, "gate_add", None)
        if fused is not None and not kernels.has_hooks(gate):
            if act is not None and type(act) is nn.ReLU and kernels.active(out, identity) \
                    and not kernels.has_hooks(act) and getattr(type(gate), "FUSES_RELU", False):
                return fused(out, identity, relu=True)
            out = fused(out, identity)
        else:
            out = gate(out) + identity
        return out if act is None else act(out)

    def _gate_mid(self, y: Tensor, norm: nn.Module, act: nn.Module | None) -> Tensor:
        """``attn_mid(act(norm(y)))``, ``y`` the main conv's output.

        In eval mode without autograd, where the kernels run and the gate offers
        ``gate_norm_act`` (SE, ECA, coordinate attention, CBAM), the norm (an eval-mode BatchNorm
        is a per-channel affine) and the activation join the gate's passes over ``y``, and
        ``act(norm(y))`` is never written: the same function, to float rounding. Training,
        other norms or activations, and hooks keep this plain path.
        """
        gate = self.attn_mid
        fused = getattr(gate, "gate_norm_act", None)
        if fused is not None and not torch.is_grad_enabled() and kernels.active(y) \
                and not any(kernels.has_hooks(m) for m in (gate, norm, act) if m is not None):
            pre = kernels.NormAct.of(norm, act)
            if pre is not None:
                return fused(y, pre)
        out = norm(y)
        return gate(out if act is None else act(out))

    def _body_out(self, x: Tensor) -> Tensor:
        """``pre``, then the body with ``mid`` after child ``_mid``: the branch up to ``standard``."""
        out = self.attn_pre(x)
        for i, layer in enumerate(getattr(self, self._body)):
            if i != self._mid:
                out = layer(out)
            elif _conv_norm_act(layer) and hasattr(self.attn_mid, "gate_norm_act"):
                out = self._gate_mid(layer[0](out), layer[1], layer[2])  # see _gate_mid
            else:
                out = self.attn_mid(layer(out))
        return out


class SlottedInverted(Slotted):
    """The slotted forward of an inverted residual: its shortcut is ``x`` itself, present
    where the flag named by ``_residual`` is set (MobileNetV2/V3, EfficientNet, MNASNet)."""

    _residual = "use_res_connect"

    def forward(self, x: Tensor) -> Tensor:
        out = self._body_out(x)
        if not getattr(self, self._residual):
            out = self.attn_standard(out)
        elif self._drops_path:  # the drop sits between the gate and the add: no fusing
            out = self._drop_path(self.attn_standard(out)) + self.attn_identity(x)
        else:
            out = self._standard_add(out, self.attn_identity(x))
        return self.attn_post(out)

    _drops_path = False  # True where the family drops the branch (EfficientNet's stochastic depth)

    def _drop_path(self, out: Tensor) -> Tensor:
        return out


def _conv_norm_act(layer: nn.Module) -> bool:
    """Whether ``layer`` is a plain (conv, norm, activation) Sequential without hooks of its
    own (torchvision's ``Conv2dNormActivation``), which may run one child at a time."""
    return isinstance(layer, nn.Sequential) and type(layer).forward is nn.Sequential.forward \
        and len(layer) == 3 and not (layer._forward_hooks or layer._forward_pre_hooks)


def scan_branch(body: nn.Sequential, prefix: str) -> tuple[list[ConvSite], int, str | None]:
    """Conv sites, ``mid`` index and built-in SE of a block branch that is one Sequential.

    The branch is a sequence of ``Conv2dNormActivation``-like children (conv, norm, act)
    or of bare convs, norms and activations (MobileNetV2's projection, MNASNet), and may
    hold a ``torchvision.ops.SqueezeExcitation``. The *main* conv is the first spatial
    one (the depthwise conv of an inverted residual, the 3x3 of a bottleneck, the fused
    3x3 of FusedMBConv); ``mid`` goes after the child that ends its norm and activation.

    Returns:
        ``(convs, mid_index, builtin_path)``, paths relative to the block.
    """
    flat: list[tuple[int, str, nn.Module]] = []  # (index of the body child, path, module)
    builtin = None
    for i, (name, child) in enumerate(body.named_children()):
        if isinstance(child, SqueezeExcitation):
            builtin = f"{prefix}.{name}"
        elif isinstance(child, nn.Sequential) and len(child) and _is_conv(child[0]):
            flat.extend((i, f"{prefix}.{name}.{sub}", m) for sub, m in child.named_children())
        else:
            flat.append((i, f"{prefix}.{name}", child))
    convs: list[ConvSite] = []
    mid = -1
    for j, (i, path, module) in enumerate(flat):
        if not _is_conv(module):
            continue
        norm = act = act_layer = None
        end = i
        rest = flat[j + 1:]
        if rest and isinstance(rest[0][2], NORMS):
            norm, end = rest[0][1], rest[0][0]
            rest = rest[1:]
            if rest and not _is_conv(rest[0][2]) and not isinstance(rest[0][2], (SqueezeExcitation, *NORMS)) \
                    and not list(rest[0][2].parameters()):
                act, act_layer, end = rest[0][1], type(rest[0][2]), rest[0][0]
        spatial = tuple(module.kernel_size) != (1, 1)
        main = spatial and mid < 0
        if main:
            mid = end
        convs.append(ConvSite(path, norm, spatial, main=main, act=act, act_layer=act_layer))
    return convs, mid, builtin


def _is_conv(module: nn.Module) -> bool:
    """A Conv2d, or what a replace kind put in its place (it keeps Conv2d's attributes)."""
    return isinstance(module, nn.Conv2d) or all(
        hasattr(module, a) for a in ("in_channels", "out_channels", "kernel_size", "stride"))


def describe_branch(block: nn.Module, body: str, *, shortcut: bool, downsample: str | None = None) -> BlockInfo:
    """A :class:`BlockInfo` (name and stage left empty) for a block whose branch is the
    Sequential ``body``, with an optional projection ``downsample`` (a conv-norm Sequential)
    on its shortcut."""
    convs, _, builtin = scan_branch(getattr(block, body), body)
    branch = [block.get_submodule(c.conv) for c in convs]
    if downsample is not None:
        convs.append(ConvSite(f"{downsample}.0", f"{downsample}.1", spatial=False))
    main = next(block.get_submodule(c.conv) for c in convs if c.main)
    se = block.get_submodule(builtin) if builtin else None
    return BlockInfo(
        name="", stage="", type=torchvision_type(block).__name__,
        in_channels=int(branch[0].in_channels), mid_channels=int(main.out_channels),
        out_channels=int(branch[-1].out_channels),
        stride=max(int(m.stride[0]) for m in branch), shortcut=shortcut,
        downsample=downsample is not None, convs=tuple(convs), builtin=builtin,
        builtin_channels=int(se.fc1.in_channels) if se is not None else 0,
        dilation=int(getattr(main, "dilation", (1, 1))[0]),
    )


def torchvision_type(block: nn.Module) -> type[nn.Module]:
    """The torchvision class a (possibly slotted) block was built as."""
    return next(c for c in type(block).__mro__ if c.__module__.startswith("torchvision"))


from . import convnext as _convnext  # noqa: E402  (families register below)
from . import efficientnet as _efficientnet  # noqa: E402
from . import mnasnet as _mnasnet  # noqa: E402
from . import mobilenet as _mobilenet  # noqa: E402
from . import regnet as _regnet  # noqa: E402
from . import resnet as _resnet  # noqa: E402

_FAMILIES: tuple[Family, ...] = (
    _resnet.FAMILY, _mobilenet.FAMILY, _efficientnet.FAMILY, _regnet.FAMILY, _convnext.FAMILY,
    _mnasnet.FAMILY,
)


def _family(module: nn.Module) -> Family | None:
    return next((f for f in _FAMILIES if f.recognises(module)), None)


def find_blocks(model: nn.Module) -> list[tuple[BlockInfo, nn.Module]]:
    """Every block a family recognises, in module order, with stages and stage aliases."""
    found = []
    for name, module in model.named_modules():
        family = _family(module)
        if family is not None:
            parent = name.rpartition(".")[0]
            info = replace(family.describe(module), name=name,
                           stage=parent if family.native_stages and parent else "")
            found.append((info, module))
    if not found:
        return found
    aliases = _aliases(model, found)  # none where the strides cannot be measured: no guesses
    return [(replace(info, alias=aliases.get(info.name, ""),
                     stage=info.stage or aliases.get(info.name) or info.name), m)
            for info, m in found]


def _aliases(model: nn.Module, found: list[tuple[BlockInfo, nn.Module]]) -> dict[str, str]:
    """``stageN`` per block name (see the module docstring)."""
    strides = _output_strides(model, found)
    if any(info.name not in strides for info, _ in found):
        return {}  # numbering stages in order instead would make stage4 mean another stride
    nominal = {info.name: strides[info.name] * info.dilation for info, _ in found}
    by_stage: dict[str, int] = {}
    for info, _ in found:
        if info.stage:
            by_stage[info.stage] = max(by_stage.get(info.stage, 0), nominal[info.name])
    result = {}
    for info, _ in found:
        stride = by_stage.get(info.stage, nominal[info.name])
        result[info.name] = f"stage{max(0, round(math.log2(max(stride, 1))) - 1)}"
    return result


def _output_strides(model: nn.Module, found: list[tuple[BlockInfo, nn.Module]]) -> dict[str, int]:
    """Each block's output stride, from one forward of an image on the meta device
    (parameters swapped for meta tensors: nothing is computed or copied), through the
    deepest module around all blocks that takes an image: the blocks' common ancestor
    (a detector's backbone body) or one above it (RegNet's trunk takes the stem's output)."""
    size = 256
    sizes: dict[str, int] = {}
    hooks = [block.register_forward_hook(_record(sizes, info.name)) for info, block in found]
    path = _common_prefix([info.name for info, _ in found])
    try:
        while True:
            root = model.get_submodule(path)
            state = {k: torch.empty_like(v, device="meta")
                     for k, v in (*root.named_parameters(), *root.named_buffers())}
            sizes.clear()
            try:
                with evaluating(root), torch.no_grad():
                    torch.func.functional_call(root, state, (torch.empty(1, 3, size, size, device="meta"),))
                return {name: max(1, round(size / width)) for name, width in sizes.items()}
            except Exception:  # not an image's module (odd inputs, detector wrappers)
                if not path:
                    return {}
                path = path.rpartition(".")[0]
    finally:
        for h in hooks:
            h.remove()


def _record(sizes: dict[str, int], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, Tensor):
            sizes[name] = int(output.shape[-1])
    return hook


def _common_prefix(names: list[str]) -> str:
    """The dotted path of the deepest module that contains every block (not a block)."""
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts, strict=False):  # up to the shortest name
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    if len(prefix) == min(len(p) for p in parts):  # a single block: go to its parent
        prefix = prefix[:-1]
    return ".".join(prefix)


def make_slotted(block: nn.Module) -> nn.Module:
    """Give ``block`` its slots, in place and idempotently; returns the same object."""
    family = _family(block)
    if family is None:
        raise TypeError(f"no adapter for {type(block).__name__}")
    if isinstance(block, Slotted):
        return block
    cls = family.slotted[type(block)]
    block.__class__ = cls
    block._init_slots()
    cls.prepare(block)
    return block


def find_head(model: nn.Module) -> HeadInfo | None:
    for family in _FAMILIES:
        head = family.head(model)
        if head is not None:
            return head
    return None


def unsupported_message(model: nn.Module, name: str) -> str:
    """One line: the block classes a model has, why they are not supported (a class that
    only shares a supported one's name, or subclasses it with its own forward), and the
    families that are supported."""
    counts = Counter(
        type(m) for m in model.modules()
        if not type(m).__module__.startswith(("torch.nn", "torchvision.ops"))
        and any(True for _ in m.children()) and type(m) is not type(model)
    )
    found = [c for c, n in counts.most_common() if n > 1][:4] or [c for c, _ in counts.most_common(4)]
    known = {cls: family.name for family in _FAMILIES for cls in family.slotted}
    by_name = {cls.__name__: (cls, family) for cls, family in known.items()}
    shown = []
    for cls in found:
        twin = by_name.get(cls.__name__)
        base = next((k for k in known if issubclass(cls, k)), None)
        if twin is not None and twin[0] is not cls:
            shown.append(f"{cls.__module__}.{cls.__name__}, another class than {twin[1]}'s {cls.__name__}")
        elif base is not None:
            shown.append(f"{cls.__name__}, a subclass of {known[base]}'s {base.__name__} with its own forward")
        else:
            shown.append(cls.__name__)
    supported = "; ".join(f"{f.name} ({f.block_names})" for f in _FAMILIES)
    seen = f": its block classes are not supported ({'; '.join(shown)})" if shown else ""
    return f"{name}: found no supported blocks{seen}; supported families: {supported}"
