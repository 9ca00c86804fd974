"""Shared test helpers: a CLI runner and small models."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnsurgeon.cli import app

# The tests use small inputs, where a second thread buys little; one thread keeps the
# suite's time steady when other processes share the machine's two cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip (visibly, with -ra) on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
