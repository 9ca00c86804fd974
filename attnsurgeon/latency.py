"""Measured latency of a model before and after surgery (``--latency``).

MACs say how much arithmetic the attention adds; they do not say what it costs on a real
device, where gates, pooling and memory traffic (uncounted in MACs) can dominate. This
module times both models on one device in one run:

* eval mode, under ``torch.inference_mode()``, on a fixed random batch of
  ``batch x 3 x input_size x input_size``;
* ``warmup`` untimed calls of each model, then ``rounds`` rounds; each round times one
  call of each model, in the order original, modified on even rounds and modified,
  original on odd ones (ABBA), so load drifts and cache effects hit both alike
  (:func:`time_interleaved`, which the benchmarks use too);
* on CUDA the device is synchronised before and after each timed call;
* reported: the median time per call of each model, half the interquartile range of
  its rounds (the spread), and the ratio after / before.

Default batch (:func:`default_batch`): 1 on CPU, the latency of one image as an online
service sees it, and quick even for large models; 64 on CUDA, because at batch 1 a GPU is
bound by kernel launches and the ratio would count operators rather than their cost.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .options import DEVICES, LatencyOptions, check_latency_options
from .torch_state import evaluating, input_dtype

__all__ = ["DEVICES", "LatencyOptions", "check_device", "check_latency_options", "default_batch", "measure_latency",
           "time_interleaved"]



def default_batch(device: str) -> int:
    """1 on CPU, 64 on CUDA (see the module docstring)."""
    return 64 if device == "cuda" else 1


def check_device(options: LatencyOptions | None) -> None:
    """Raise UsageError for ``--device cuda`` on a machine without CUDA."""
    if options is not None and options.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")


def _half_iqr(samples: list[float]) -> float:
    """Half the interquartile range: the spread of the middle half of the rounds."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / 2


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def time_interleaved(
    steps: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 0,
    calls: int = 1,
    sync: Callable[[], object] = lambda: None,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each step, one sample per round, the steps interleaved.

    ``warmup`` untimed rounds of every step come first. Each round then times ``calls``
    calls of each step, in an order rotated by one each round (for two steps: AB, BA, AB,
    ...), so drifts in load, clock and caches hit every step alike. ``sync`` is called
    before and after each timed sample (``torch.cuda.synchronize`` on a GPU).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = timer()
            for _ in range(calls):
                steps[name]()
            sync()
            samples[name].append((timer() - start) / calls)
    return samples


def measure_latency(
    original: nn.Module,
    modified: nn.Module,
    *,
    input_size: int,
    options: LatencyOptions | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time ``original`` and ``modified`` side by side (module docstring).

    The models are not changed: on CUDA copies are timed; on CPU the models themselves,
    with every submodule's train/eval mode restored afterwards.

    Args:
        original, modified: the models before and after surgery.
        input_size: H = W of the input batch.
        options: device, batch, rounds and warm-up calls (default: :class:`LatencyOptions`'s).
        timer: the clock (seconds); tests inject a fake one.

    Returns:
        Plain data: ``device``, ``device_name``, ``batch``, ``input``, ``threads``,
        ``rounds``, ``warmup``, ``before_ms``, ``after_ms`` (medians per call),
        ``before_spread_ms``, ``after_spread_ms`` (half the interquartile range of the
        rounds) and ``ratio`` (``after_ms / before_ms``).
    """
    options = options or LatencyOptions()
    device = torch.device(options.device)
    batch = options.batch or default_batch(options.device)
    models = [original, modified]
    if device.type != "cpu":
        models = [copy.deepcopy(m).to(device) for m in models]
    dtype = input_dtype(models[0])
    x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before_model, after_model = models
    with evaluating(before_model), evaluating(after_model), torch.inference_mode():
        samples = time_interleaved({"before": lambda: before_model(x), "after": lambda: after_model(x)},
                                   rounds=options.rounds, warmup=options.warmup, sync=sync, timer=timer)
    before, after = (1e3 * statistics.median(samples[k]) for k in ("before", "after"))
    before_spread, after_spread = (1e3 * _half_iqr(samples[k]) for k in ("before", "after"))
    return {
        "device": options.device,
        "device_name": _device_name(device),
        "batch": batch,
        "input": [batch, 3, input_size, input_size],
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "rounds": options.rounds,
        "warmup": options.warmup,
        "before_ms": before,
        "after_ms": after,
        "before_spread_ms": before_spread,
        "after_spread_ms": after_spread,
        "ratio": after / before if before > 0 else float("inf"),
    }
