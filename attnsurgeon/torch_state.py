"""Context managers that set a piece of torch state and put it back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["evaluating", "input_dtype", "seeded"]


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


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run with the CPU generator seeded by ``seed`` (unchanged for ``None``), then restore it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype an input to ``model`` should have: its first floating-point parameter's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
