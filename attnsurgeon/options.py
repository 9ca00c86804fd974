"""Checks of what the command line gives, done before torch is imported.

A typo in a model name, a number out of range or a path that is not a regular file is
reported in a fraction of a second, instead of after the seconds that ``import torch``
takes. Nothing here imports torch; the modules that need torch re-export what they use.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, suggest
from .files import check_input_size
from .model_names import MODEL_NAMES

__all__ = ["DEFAULT_OPSET", "DEVICES", "FLOAT64_FACTOR", "MAX_BATCH", "MAX_OPSET", "MAX_RECIPE_BYTES", "MIN_OPSET",
           "SMALL_OUTPUT", "SMALL_OUTPUT_RTOL", "LatencyOptions", "check_export_args", "check_latency_options",
           "check_model_name", "check_regular_file", "show_path"]

# A timing batch beyond this only exhausts memory (a ResNet-50 at 224 and batch 4096
# already needs tens of GB); checked up front, so the answer is a line, not a traceback.
MAX_BATCH = 4096
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a larger file is not one
DEFAULT_OPSET = 20  # torch.onnx's default (torch.onnx._constants.ONNX_DEFAULT_OPSET)
MIN_OPSET = 18  # the opset of torch.onnx's operator library; lower needs down-conversion
MAX_OPSET = 23  # the newest opset torch 2.14's exporter accepts (ONNX_MAX_OPSET)
DEVICES = ("cpu", "cuda")
# Outputs this small (random weights of MobileNet, EfficientNet, MNASNet give logits of
# 1e-9 to 1e-14) make an absolute tolerance vacuous and a relative figure noise: the
# summary warns, and ONNX verification also requires SMALL_OUTPUT_RTOL.
SMALL_OUTPUT = 1e-4
SMALL_OUTPUT_RTOL = 1e-3
# A run outside the tolerance passes ONNX verification when onnxruntime's error against the
# model run in float64 is at most atol + this many times PyTorch's own float32 error (a
# different summation order: 0.7x to 2.2x measured on convs that cancel large terms).
FLOAT64_FACTOR = 4.0


def show_path(path: str | Path) -> str:
    """``path`` as a message shows it: on one line (a newline or other control character
    is escaped, as ``repr`` would), otherwise as typed."""
    text = str(path)
    if text.isprintable():
        return text
    return repr(text)[1:-1]


def check_model_name(name: str | None) -> str:
    """Return ``name`` if torchvision has a model of that name (:data:`MODEL_NAMES`)."""
    if not name:
        raise UsageError("no model given: name one (e.g. resnet50) or use a recipe with 'model = ...'")
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown model {name!r}" + suggest(name, MODEL_NAMES))
    return name


def check_export_args(*, input_size: int, opset: int, atol: float) -> None:
    """Raise UsageError for an unusable input size, opset or tolerance."""
    check_input_size(input_size)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    if not atol >= 0:  # also rejects NaN
        raise UsageError(f"--atol must be >= 0, got {atol}")


def check_regular_file(path: str | Path, what: str) -> Path:
    """Return ``path`` if it is a regular file; a device, FIFO or socket could block a read
    forever (a FIFO) or never end (``/dev/zero``). ``what`` names the file in messages,
    e.g. ``"--recipe: r.toml"``."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file") from None
    except OSError as e:
        raise UsageError(f"{what} cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{what} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{what} is not a regular file")
    return path


@dataclass(frozen=True)
class LatencyOptions:
    """What ``--latency``, ``--device`` and ``--batch`` asked for (``batch`` None: default)."""

    device: str = "cpu"
    batch: int | None = None
    rounds: int = 15
    warmup: int = 3


def check_latency_options(latency: bool, device: str | None, batch: int | None) -> LatencyOptions | None:
    """The options of ``--latency/--device/--batch`` as :class:`LatencyOptions` (or None).

    Whether CUDA is there is asked later (:func:`attnsurgeon.latency.check_device`), once
    torch is imported.

    Raises:
        UsageError: ``--device``/``--batch`` without ``--latency``, an unknown device, or a
            batch outside 1 to :data:`MAX_BATCH`.
    """
    if not latency:
        if device is not None or batch is not None:
            raise UsageError("--device and --batch set up --latency; add --latency")
        return None
    device = device or "cpu"
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"--batch must be from 1 to {MAX_BATCH}, got {batch}")
    return LatencyOptions(device=device, batch=batch)
