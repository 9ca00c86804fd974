"""--latency: the timing protocol (interleaved rounds, medians, ratio) and the CLI fields.

Speed itself is never asserted; a fake clock checks the arithmetic and the call order.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from attnsurgeon.latency import LatencyOptions, default_batch, measure_latency


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now


class _Costly(nn.Module):
    """Advances the fake clock by ``seconds`` per call and records its name."""

    def __init__(self, name: str, seconds: float, clock: _Clock) -> None:
        super().__init__()
        self.name, self.seconds, self.clock = name, seconds, clock
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training and torch.is_inference_mode_enabled()
        self.clock.now += self.seconds
        self.clock.calls.append(self.name)
        return self.conv(x)


def test_rounds_interleave_and_the_ratio_is_after_over_before():
    clock = _Clock()
    before, after = _Costly("A", 0.010, clock).train(), _Costly("B", 0.030, clock).train()
    data = measure_latency(before, after, input_size=8, options=LatencyOptions(rounds=4, warmup=1), timer=clock)
    assert clock.calls == ["A", "B"] + ["A", "B", "B", "A"] * 2  # warm-up, then ABBA rounds
    assert data["before_ms"] == pytest.approx(10.0) and data["after_ms"] == pytest.approx(30.0)
    assert data["ratio"] == pytest.approx(3.0)
    assert (data["device"], data["batch"], data["input"], data["rounds"]) == ("cpu", 1, [1, 3, 8, 8], 4)
    assert before.training and after.training  # modes restored


def test_default_batch():
    assert default_batch("cpu") == 1 and default_batch("cuda") == 64


@pytest.mark.parametrize("command", ["summarize", "insert"])
def test_cli_latency_json(cli, tmp_path, command):
    extra = ["-o", str(tmp_path / "m.pt")] if command == "insert" else []
    result = cli(command, "resnet18", "--attn", "se", "--layers", "layer4", "--input-size", "32",
                 "--latency", "--batch", "2", "--json", *extra)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    lat = data["latency"]
    assert lat["device"] == "cpu" and lat["batch"] == 2 and lat["input"] == [2, 3, 32, 32]
    assert lat["before_ms"] > 0 and lat["after_ms"] > 0
    assert lat["ratio"] == pytest.approx(lat["after_ms"] / lat["before_ms"])
    assert data["total"]["macs_added"] > 0  # beside the MAC deltas


def test_cli_latency_text_and_no_latency_by_default(cli):
    result = cli("summarize", "resnet18", "--attn", "se", "--layers", "layer4", "--input-size", "32", "--latency")
    assert result.exit_code == 0, result.output
    assert "latency (cpu:" in result.stdout and "batch 1" in result.stdout
    # the median in a unit that suits it, with its spread: "12.1 ms +- 0.3 -> 13.4 ms +- 0.2"
    assert re.search(r"[\d.]+ (us|ms|s) \+- [\d.e+-]+ -> [\d.]+ (us|ms|s) \+- ", result.stdout), result.stdout
    plain = cli("summarize", "resnet18", "--attn", "se", "--input-size", "32", "--json")
    assert json.loads(plain.stdout)["latency"] is None


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "add --latency"),
    (["--batch", "4"], "add --latency"),
    (["--latency", "--batch", "0"], "--batch must be from 1 to 4096, got 0"),
    (["--latency", "--batch", "99999999999999999999"], "--batch must be from 1 to 4096, got 99999999999999999999"),
    (["--latency", "--batch", "4611686018427387904"], "--batch must be from 1 to 4096"),
    (["--latency", "--device", "tpu"], "got 'tpu'"),
])
def test_cli_latency_errors(cli, args, message):
    result = cli("summarize", "resnet18", "--attn", "se", *args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_cuda_without_cuda_is_a_usage_error(cli):
    result = cli("summarize", "resnet18", "--attn", "se", "--latency", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.cuda
def test_cli_latency_on_cuda(cli):
    result = cli("summarize", "resnet18", "--attn", "se", "--input-size", "64", "--latency",
                 "--device", "cuda", "--json")
    assert result.exit_code == 0, result.output
    lat = json.loads(result.stdout)["latency"]
    assert lat["device"] == "cuda" and lat["batch"] == 64 and lat["threads"] is None
    assert lat["ratio"] == pytest.approx(lat["after_ms"] / lat["before_ms"])
