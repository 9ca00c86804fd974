"""attnsurgeon: attention surgery for torchvision models.

Importing the package does not import torch; the functions below load it on first use.

>>> import attnsurgeon, torchvision
>>> model = torchvision.models.resnet18()
>>> changes = attnsurgeon.apply(model, "se", layers="layer3:", init="preserve")
>>> model = attnsurgeon.load("se_r50.pt")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "apply",
    "export_onnx",
    "freeze_original",
    "load",
    "new_modules",
    "param_groups",
    "set_dynconv_form",
    "set_temperature",
    "temperature_schedule",
    "unfreeze",
]

_LAZY = {
    "apply": "attnsurgeon.surgery",
    "load": "attnsurgeon.checkpoint",
    "export_onnx": "attnsurgeon.onnx_export",
    "set_temperature": "attnsurgeon.layers.dynamic_conv",
    "set_dynconv_form": "attnsurgeon.layers.dynamic_conv",
    "param_groups": "attnsurgeon.training",
    "freeze_original": "attnsurgeon.training",
    "unfreeze": "attnsurgeon.training",
    "new_modules": "attnsurgeon.training",
    "temperature_schedule": "attnsurgeon.layers.dynamic_conv",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnsurgeon' has no attribute {name!r}")
