"""Shared test helpers: a CLI runner and small models."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnsurgeon.cli import app

# The tests use small inputs, where a second thread buys little; one thread keeps the
# suite's time steady when other processes share the machine's two cores.
torch.set_num_threads(1)

# The files that take longest (seconds of test time in a cold run: 227, 196, 139, 129, 84),
# collected first: ``-n 2 --dist loadfile`` hands out whole files in collection order, and
# one of these handed out last (test_training_stacks.py was, alphabetically) can keep one
# core busy for minutes after the other has finished. The gain was not separable from the
# run-to-run noise (about 40 s) in the runs that measured it.
LONGEST_FIRST = ("test_families.py", "test_onnx.py", "test_training_stacks.py", "test_quantize.py",
                 "test_fused_kernels.py")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The quick loop, tests marked ``cuda`` skipped where there is no CUDA device, and the
    slowest files first (:data:`LONGEST_FIRST`).

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
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
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
