"""SimAM: a parameter-free attention module.

Paper: SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks
(Yang, Zhang, Li, Xie; ICML 2021), https://proceedings.mlr.press/v139/yang21o.html

Each neuron's weight is its inverse minimal energy (Eq. 5-6 of the paper), computed from
the mean and variance of its channel over H x W::

    d   = (x - mean_HW(x))^2
    e   = d / (4 (sum_HW(d) / (HW - 1) + lambda)) + 0.5
    out = x * sigmoid(e)

with lambda = 1e-4, the authors' default (github.com/ZjjConan/SimAM; their README's example
training commands pass 0.1). No parameters: ResNet-50 with SimAM stays at 25.56M, as the
authors' ImageNet table prints.

Departures from the paper:

* ``--init paper`` is the paper's module exactly (no parameters, no buffers);
* ``--init preserve`` (not in the paper; SimAM has no parameter that could make it the
  identity): a learnable blend ``alpha`` (one scalar per module, initialised to 0) so
  that ``out = x * (1 + alpha * (sigmoid(e) - 1))``: exactly ``x`` at the start, the
  paper's SimAM at ``alpha = 1``, with a nonzero gradient for ``alpha`` from the first
  step. The preserved module has 1 parameter (``alpha``) and its checkpoint that key;
  the recipe records the init, so a checkpoint rebuilds the same module;
* a 1 x 1 map (HW = 1) has no variance to divide by; there ``HW - 1`` is taken as 1, so
  ``e = 0.5`` (the paper's code divides by zero).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import check_init

__all__ = ["SimAM", "build"]


class SimAM(nn.Module):
    """SimAM on any number of channels (parameter-free; ``blend`` adds ``alpha``).

    Args:
        e_lambda: lambda, the regulariser of the energy (Eq. 5).
        blend: add the learnable blend ``alpha`` of ``--init preserve`` (module docstring).
    """

    alpha: nn.Parameter | None

    def __init__(self, *, e_lambda: float = 1e-4, blend: bool = False) -> None:
        super().__init__()
        if e_lambda <= 0:
            raise ValueError(f"e_lambda must be > 0, got {e_lambda}")
        self.e_lambda = e_lambda
        self.alpha = nn.Parameter(torch.zeros(())) if blend else None

    def _scale(self, x: Tensor) -> Tensor:
        """sigmoid(e), the per-neuron weights of Eq. 6, shape of ``x``."""
        n = max(x.shape[-1] * x.shape[-2] - 1, 1)
        d = (x - x.mean((2, 3), keepdim=True)).square()
        e = d / (4 * (d.sum((2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        return torch.sigmoid(e)

    def forward(self, x: Tensor) -> Tensor:
        s = self._scale(x)
        if self.alpha is not None:
            s = 1 + self.alpha * (s - 1)
        return x * s

    def reset_parameters(self) -> None:
        """The paper's form: alpha (where present) 1."""
        if self.alpha is not None:
            nn.init.ones_(self.alpha)

    def preserve_(self) -> None:
        """Start as exactly the identity (alpha = 0)."""
        if self.alpha is None:
            raise RuntimeError("SimAM.preserve_ needs blend=True (build it with init='preserve')")
        nn.init.zeros_(self.alpha)


def build(channels: int, *, init: str = "paper", e_lambda: float = 1e-4) -> SimAM:
    """``channels`` is unused (SimAM works on any number of channels)."""
    check_init(init)
    module = SimAM(e_lambda=e_lambda, blend=init == "preserve")
    if init == "preserve":
        module.preserve_()
    return module
