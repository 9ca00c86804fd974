"""Shared test helpers: a CLI runner and small models."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnsurgeon.cli import app


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("insert", "resnet18", ...)`` -> click Result."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args))

    return run


@pytest.fixture
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
