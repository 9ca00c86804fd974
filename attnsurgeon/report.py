"""What changed: parameters and MACs per stage, the modules added, preservation error.

MACs are counted by ``torch.utils.flop_counter`` (convolutions, linear layers and matrix
products; it counts a multiply-add as 2 FLOPs, and we report MACs = FLOPs / 2) for one
image of ``input_size`` x ``input_size`` (a detector resizes it first, to its own
``min_size``: the counts are then at that size, and the summary says so). Element-wise
work (gates, pooling, activations) is not counted, as in the papers' tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import UsageError, first_line
from .files import MAX_INPUT_SIZE, MIN_INPUT_SIZE, check_input_size  # re-exported: their old home
from .options import SMALL_OUTPUT
from .surgery import Changes
from .torch_state import evaluating, input_dtype
from .zoo import is_detector

__all__ = ["MAX_INPUT_SIZE", "MIN_INPUT_SIZE", "GroupStats", "ModelStats", "check_input_size", "measure",
           "preservation", "summary_data"]

@dataclass(frozen=True)
class GroupStats:
    name: str
    params: int
    macs: int


@dataclass(frozen=True)
class ModelStats:
    groups: tuple[GroupStats, ...]
    backbone_input: tuple[int, int] | None = None  # (H, W) the model's backbone got, where it has one

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def macs(self) -> int:
        return sum(g.macs for g in self.groups)

    def by_name(self) -> dict[str, GroupStats]:
        return {g.name: g for g in self.groups}


def _partition(model: nn.Module, blocks: Mapping[str, str]) -> list[tuple[str, str]]:
    """Split ``model`` into maximal submodules that each belong to one group.

    ``blocks`` maps each block's dotted path to its group (its stage). Returns ``(path,
    group)`` pairs in module order: a block is in its stage's group; a module that holds
    blocks deeper down (a stage, a detector's ``backbone``) is split further; any other
    module is in the ``stem`` before the first block, the ``head`` after the last, and in
    the next block's stage in between (ConvNeXt's downsampling layers). Without blocks,
    each top-level child is its own group.
    """
    parts: list[tuple[str, str | None]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path in blocks:
                parts.append((path, blocks[path]))
            elif any(b.startswith(path + ".") for b in blocks):
                visit(child, path)
            else:
                parts.append((path, None if blocks else path))

    visit(model, "")
    result, group = [], "stem"
    for i, (path, owner) in enumerate(parts):
        if owner is not None:
            group = owner
        else:
            following = next((g for _, g in parts[i + 1:] if g is not None), None)
            owner = "stem" if group == "stem" and following else following or "head"
        result.append((path, owner))
    return result


def measure(model: nn.Module, blocks: Mapping[str, str], *, input_size: int) -> ModelStats:
    """Parameters and MACs of ``model``, grouped into stem, each stage, and head (see
    :func:`_partition`; ``blocks`` maps block paths to stages). MACs of work done outside
    any submodule count as head."""
    parts = _partition(model, blocks)
    order = list(dict.fromkeys(g for _, g in parts))
    if "head" not in order:  # for parameters and work outside any child
        order.append("head")
    params = dict.fromkeys(order, 0)
    for path, group in parts:
        params[group] += sum(p.numel() for p in model.get_submodule(path).parameters())
    params["head"] += sum(p.numel() for p in model.parameters(recurse=False))

    flop = FlopCounterMode(display=False)
    x = torch.zeros(1, 3, input_size, input_size, device=_device(model), dtype=input_dtype(model))
    seen: list[tuple[int, int]] = []  # what the backbone gets: a detector resizes the input first

    def note_size(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.append((int(args[0].shape[-2]), int(args[0].shape[-1])))

    backbone = getattr(model, "backbone", None)
    hook = backbone.register_forward_pre_hook(note_size) if isinstance(backbone, nn.Module) else None
    try:
        with evaluating(model), torch.no_grad(), flop:
            model(x)
    except Exception as e:  # the model's own error: wrong input size, wrong input kind
        first = first_line(e)
        raise UsageError(
            f"cannot run {type(model).__name__} on a 1x3x{input_size}x{input_size} input to count "
            f"MACs ({first}); try another --input-size"
        ) from None
    finally:
        if hook is not None:
            hook.remove()
    counts = flop.get_flop_counts()
    prefix = type(model).__name__
    macs = dict.fromkeys(order, 0)
    for path, group in parts:
        macs[group] += int(sum(counts.get(f"{prefix}.{path}", {}).values())) // 2
    macs["head"] += int(flop.get_total_flops()) // 2 - sum(macs.values())
    return ModelStats(tuple(GroupStats(g, params[g], macs[g]) for g in order
                            if g != "head" or params[g] or macs[g]), seen[0] if seen else None)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def preservation(
    original: nn.Module, modified: nn.Module, *, input_size: int, batch: int = 4, seed: int = 0
) -> dict[str, Any] | None:
    """How far ``modified`` is from ``original`` on a fixed random probe batch (eval mode).

    Returns ``compared`` (``"logits"``), ``max_abs`` (max |delta logits|), ``logit_scale``
    (max |original logits|), ``relative`` (their ratio), ``top1_agreement`` (fraction of
    equal argmax, per pixel for segmentation) and ``too_small`` (the original's outputs are
    below ``SMALL_OUTPUT``: the figures cannot judge preservation). A detector's output (a list of boxes per
    image) has no logits: its backbone's feature maps are compared instead (``compared``
    is ``"backbone features"``, ``top1_agreement`` None). ``None`` for any other output.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, input_size, input_size, generator=gen)
    x = x.to(device=_device(original), dtype=input_dtype(original))
    detector = is_detector(original)  # compare its backbones: running the whole detector is wasted
    compared = "backbone features" if detector else "logits"
    with evaluating(original), evaluating(modified), torch.no_grad():
        if detector:
            a = _features(original.get_submodule("backbone")(x))
            b = _features(modified.get_submodule("backbone")(x))
        else:
            a, b = _logits(original(x)), _logits(modified(x))
    if a is None or b is None:
        return None
    if not bool(torch.isfinite(a).all()):
        raise UsageError("the unmodified model's outputs on the probe batch are not finite (NaN or infinity): "
                         "its weights are broken (a negative running_var?)")
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    return {
        "compared": compared,
        "max_abs": diff,
        "logit_scale": scale,
        "relative": diff / scale if scale > 0 else None,  # None: all-zero logits, no scale
        "too_small": scale < SMALL_OUTPUT,  # outputs too small to judge by (random weights of some families)
        "top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item() if compared == "logits" else None,
        "probe": f"{batch}x3x{input_size}x{input_size} N(0,1), seed {seed}",
    }


def _features(output: object) -> torch.Tensor | None:
    """A backbone's feature maps (a tensor, or a dict of them: an FPN's levels) as one
    flat tensor."""
    if isinstance(output, torch.Tensor):
        return output.flatten()
    if isinstance(output, Mapping) and output and all(isinstance(v, torch.Tensor) for v in output.values()):
        return torch.cat([v.flatten() for v in output.values()])
    return None


def _logits(output: object) -> torch.Tensor | None:
    """A classifier's ``(N, classes)`` logits, or a segmentation model's ``(N, classes, H,
    W)`` ``"out"`` (its top-1 agreement is then per pixel); ``None`` for anything else."""
    if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        output = output["out"]
    if isinstance(output, torch.Tensor) and output.dim() in (2, 4):
        return output
    return None


def summary_data(
    *,
    model_name: str,
    recipe: dict[str, Any],
    before: ModelStats,
    after: ModelStats,
    changes: Changes,
    input_size: int,
    preservation: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything the summary shows, as plain JSON-ready data."""
    b = before.by_name()
    rows = []
    for g in after.groups:
        pb = b[g.name].params if g.name in b else 0
        mb = b[g.name].macs if g.name in b else 0
        rows.append(_row(g.name, pb, g.params, mb, g.macs))
    return {
        "model": model_name,
        "recipe": recipe,
        "input_size": input_size,
        # a detector resizes the input itself: the MACs are at this (H, W)
        "resized_to": list(after.backbone_input) if after.backbone_input not in (
            None, (input_size, input_size)) else None,
        "groups": rows,
        "total": _row("total", before.params, after.params, before.macs, after.macs),
        "changes": [c.to_data() for c in changes],
        "skipped": [s.to_data() for s in changes.skipped],
        "preservation": preservation,
    }


def _row(name: str, pb: int, pa: int, mb: int, ma: int) -> dict[str, Any]:
    return {
        "name": name,
        "params_before": pb, "params_after": pa, "params_added": pa - pb,
        "params_added_pct": 100.0 * (pa - pb) / pb if pb else 0.0,
        "macs_before": mb, "macs_after": ma, "macs_added": ma - mb,
    }
