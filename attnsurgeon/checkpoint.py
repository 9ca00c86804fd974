"""The ``.pt`` checkpoint: plain data that ``torch.load(..., weights_only=True)`` reads.

Layout (``format_version`` 1)::

    {"format": "attnsurgeon", "format_version": 1,
     "model": "resnet50", "model_kwargs": {}, "recipe": {...plain data...},
     "state_dict": {...}, "weights": "none" | "DEFAULT" | "file:<name>",
     "versions": {"attnsurgeon": ..., "torch": ..., "torchvision": ...},
     "preservation": {...} | None}

:func:`load` rebuilds the unmodified torchvision model, re-applies the recipe to get the
same structure, and loads the state_dict strictly. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from . import __version__
from .errors import UsageError
from .recipe import Recipe, recipe_from_data

if TYPE_CHECKING:
    from .surgery import Change

__all__ = ["FORMAT", "FORMAT_VERSION", "atomic_write", "check_output", "load", "read", "save"]

FORMAT = "attnsurgeon"
FORMAT_VERSION = 1


def check_output(path: str | Path, *, force: bool, suffix: str | None = None) -> Path:
    """Fail early (before any work) if ``path`` exists and ``force`` is off."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise UsageError(f"-o: expected a {suffix} file, got {str(path)!r}")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; use --force to overwrite it")
    if path.is_dir():
        raise UsageError(f"{path} is a directory")
    if not path.parent.exists():
        raise UsageError(f"-o: directory {path.parent} does not exist")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place.

    A crash or error leaves no partial ``path`` behind (the temp file is removed).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(
    path: str | Path,
    model: nn.Module,
    *,
    model_name: str,
    recipe: Recipe,
    model_kwargs: dict[str, Any] | None = None,
    weights: str = "none",
    preservation: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` and how it was made to ``path``, atomically."""
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "recipe": recipe.to_data(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "weights": weights,
        "versions": {"attnsurgeon": __version__, "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__)},
        "preservation": preservation,
    }
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def read(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint's plain data (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zip errors, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: not a readable attnsurgeon checkpoint ({first})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not an attnsurgeon checkpoint (no format='{FORMAT}' field)")
    if data.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{path}: checkpoint format_version {data.get('format_version')!r} is not "
            f"supported (this attnsurgeon reads {FORMAT_VERSION})"
        )
    for key in ("model", "model_kwargs", "recipe", "state_dict"):
        if key not in data:
            raise UsageError(f"{path}: checkpoint has no {key!r} field")
    return data


def recipe_of(data: dict[str, Any], path: str | Path) -> Recipe:
    return recipe_from_data(data["recipe"], source=str(path))


def rebuild(
    data: dict[str, Any], path: str | Path, *, base: nn.Module | None = None
) -> tuple[nn.Module, list[Change]]:
    """The model a checkpoint's data describes, with its weights loaded, and the changes
    its recipe made to the torchvision model (a copy of ``base`` when given: the
    unmodified model, already built)."""
    from .surgery import apply_recipe
    from .zoo import build_model

    model = copy.deepcopy(base) if base is not None else build_model(
        data["model"], model_kwargs=data["model_kwargs"])
    changes = apply_recipe(model, recipe_of(data, path))
    missing, unexpected = model.load_state_dict(with_metadata(data["state_dict"], model), strict=False)
    if missing or unexpected:
        raise UsageError(
            f"{path}: state_dict does not match the rebuilt model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model, changes


def with_metadata(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with ``model``'s own ``_metadata`` (module versions) where it has none.

    A plain dict of tensors (what a checkpoint or a re-keyed weights file holds) has lost
    the metadata, and some modules refuse to load without it (MNASNet checks its
    version). The file describes this very architecture, so the model's own is right.
    """
    if hasattr(state, "_metadata"):
        return state
    state = OrderedDict(state)
    state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    return state


def load(path: str | Path) -> nn.Module:
    """Rebuild the model saved by ``attnsurgeon insert`` (in train mode, like torchvision).

    >>> model = attnsurgeon.load("se_resnet50.pt").eval()
    """
    return rebuild(read(path), path)[0]
