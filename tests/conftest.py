"""Shared test helpers: a CLI runner and small models."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnsurgeon.cli import app

# The tests use small inputs, where a second thread buys little; one thread keeps the
# suite's time steady when other processes share the machine's two cores.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The quick loop, and tests marked ``cuda`` skipped where there is no CUDA device.

    The quick loop (``python -m pytest -q -m "not heavy"``) runs every test function once:
    a parametrized one with its first case that is not marked ``heavy``; its other cases
    are marked ``heavy`` here. Tests too slow for the loop carry ``@pytest.mark.heavy``
    themselves. The whole suite (``python -m pytest -q``, CI) runs everything.
    """
    sampled: set[str] = set()
    for item in items:
        if getattr(item, "callspec", None) is None or item.get_closest_marker("heavy"):
            continue
        function = item.nodeid.partition("[")[0]
        if function in sampled:
            item.add_marker(pytest.mark.heavy)
        sampled.add(function)
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
