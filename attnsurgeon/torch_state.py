"""Context managers that set a piece of torch state and put it back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["evaluating", "input_dtype", "out_of_place", "seeded"]


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
def out_of_place(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model``'s in-place activations (``nn.ReLU(inplace=True)``, ``ReLU6``, ...) out of
    place meanwhile, and restore their flags afterwards. The outputs are the same; the ONNX
    exporter is not: it decomposes ``hardtanh_`` into prims under symbolic shapes, which made
    MobileNetV2's export take 7.2 s against 4.5 s out of place (this machine, 32x32)."""
    flagged = [m for m in model.modules() if isinstance(getattr(m, "inplace", None), bool) and m.inplace]
    for m in flagged:
        setattr(m, "inplace", False)  # noqa: B010 (nn.Module's __setattr__ types it Tensor | Module)
    try:
        yield model
    finally:
        for m in flagged:
            setattr(m, "inplace", True)  # noqa: B010


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
