"""What changed: parameters and MACs per stage, the modules added, preservation error.

MACs are counted by ``torch.utils.flop_counter`` (convolutions, linear layers and matrix
products; it counts a multiply-add as 2 FLOPs, and we report MACs = FLOPs / 2) for one
image of ``input_size`` x ``input_size``. Element-wise work (gates, pooling, activations)
is not counted, as in the papers' tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .surgery import Change

__all__ = ["GroupStats", "ModelStats", "measure", "preservation", "summary_data"]


@dataclass(frozen=True)
class GroupStats:
    name: str
    params: int
    macs: int


@dataclass(frozen=True)
class ModelStats:
    groups: tuple[GroupStats, ...]

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def macs(self) -> int:
        return sum(g.macs for g in self.groups)

    def by_name(self) -> dict[str, GroupStats]:
        return {g.name: g for g in self.groups}


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def _group_of(name: str, stages: Sequence[str], seen_stage: bool) -> str:
    for stage in stages:
        if name == stage or name.startswith(stage + "."):
            return stage
    return "head" if seen_stage else "stem"


def measure(model: nn.Module, stages: Sequence[str], *, input_size: int) -> ModelStats:
    """Parameters and MACs of ``model``, grouped into stem, each stage, and head.

    Top-level children before the first stage are the stem, those after it the head. A
    model with no stages is grouped by its top-level children.
    """
    children = [name for name, _ in model.named_children()]
    order: list[str] = []
    owner: dict[str, str] = {}
    seen = False
    for child in children:
        group = _group_of(child, stages, seen) if stages else child
        if group in stages:
            seen = True
        owner[child] = group
        if group not in order:
            order.append(group)
    params = dict.fromkeys(order, 0)
    for pname, p in model.named_parameters():
        top = pname.split(".")[0]
        params[owner.get(top, "head")] = params.get(owner.get(top, "head"), 0) + p.numel()

    flop = FlopCounterMode(display=False)
    x = torch.zeros(1, 3, input_size, input_size, device=_device(model), dtype=_dtype(model))
    with evaluating(model), torch.no_grad(), flop:
        model(x)
    counts = flop.get_flop_counts()
    prefix = type(model).__name__
    macs = dict.fromkeys(order, 0)
    for child in children:
        flops = sum(counts.get(f"{prefix}.{child}", {}).values())
        macs[owner[child]] += int(flops) // 2
    accounted = sum(macs.values())
    total = int(flop.get_total_flops()) // 2
    if total > accounted:  # ops called in the model's own forward, outside any child
        macs["head" if "head" in macs else order[-1]] += total - accounted
    return ModelStats(tuple(GroupStats(g, params.get(g, 0), macs[g]) for g in order))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def preservation(
    original: nn.Module, modified: nn.Module, *, input_size: int, batch: int = 4, seed: int = 0
) -> dict[str, float]:
    """How far ``modified`` is from ``original`` on a fixed random probe batch (eval mode).

    Returns ``max_abs`` (max |delta logits|), ``logit_scale`` (max |original logits|),
    ``relative`` (their ratio) and ``top1_agreement`` (fraction of equal argmax).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, input_size, input_size, generator=gen)
    x = x.to(device=_device(original), dtype=_dtype(original))
    with evaluating(original), evaluating(modified), torch.no_grad():
        a, b = original(x), modified(x)
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    return {
        "max_abs": diff,
        "logit_scale": scale,
        "relative": diff / scale if scale > 0 else float("inf"),
        "top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item(),
        "probe": f"{batch}x3x{input_size}x{input_size} N(0,1), seed {seed}",
    }


def summary_data(
    *,
    model_name: str,
    recipe: dict[str, Any],
    before: ModelStats,
    after: ModelStats,
    changes: Sequence[Change],
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
        "groups": rows,
        "total": _row("total", before.params, after.params, before.macs, after.macs),
        "changes": [c.to_data() for c in changes],
        "preservation": preservation,
    }


def _row(name: str, pb: int, pa: int, mb: int, ma: int) -> dict[str, Any]:
    return {
        "name": name,
        "params_before": pb, "params_after": pa, "params_added": pa - pb,
        "params_added_pct": 100.0 * (pa - pb) / pb if pb else 0.0,
        "macs_before": mb, "macs_after": ma, "macs_added": ma - mb,
    }
