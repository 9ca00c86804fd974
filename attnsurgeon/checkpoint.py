"""The ``.pt`` checkpoint: plain data that ``torch.load(..., weights_only=True)`` reads.

Layout (``format_version`` 1)::

    {"format": "attnsurgeon", "format_version": 1,
     "model": "resnet50", "model_kwargs": {}, "recipe": {...plain data...},
     "state_dict": {...}, "weights": "none" | "DEFAULT" | "file:<name>",
     "versions": {"attnsurgeon": ..., "torch": ..., "torchvision": ...},
     "preservation": {...} | None}

:func:`load` rebuilds the unmodified torchvision model, re-applies the recipe to get the
same structure, and loads the state_dict strictly. Nothing is ever unpickled.
:func:`read` checks every field's type (and parses the recipe) before anything is built,
so a damaged or hand-made file is one clear error, not a traceback.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from . import __version__
from .errors import UsageError
from .files import atomic_write, check_output, load_plain, with_metadata
from .recipe import Recipe, recipe_from_data
from .surgery import Changes, apply_recipe
from .zoo import build_model, fit_state_dict

# atomic_write, check_output, load_plain and with_metadata live in .files; re-exported here
__all__ = ["FORMAT", "FORMAT_VERSION", "atomic_write", "build_base", "check_output", "load", "load_plain", "read",
           "rebuild", "recipe_of", "save", "with_metadata"]

FORMAT = "attnsurgeon"
FORMAT_VERSION = 1


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
    def write(tmp: Path) -> None:
        # into a file object: given a path, torch.save names the zip's inner folder after
        # the random temp file, and the same command would not write the same bytes
        with open(tmp, "wb") as f:
            torch.save(data, f)

    atomic_write(path, write)


def read(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint's plain data (``weights_only=True``).

    Every field's type is checked and the recipe parsed, so what :func:`rebuild` gets is
    well formed.

    Raises:
        UsageError: the file is missing, unreadable, not an attnsurgeon checkpoint, of
            another format version, or has a missing or malformed field.
    """
    path = Path(path)
    data = load_plain(path, what=str(path), kind="attnsurgeon checkpoint")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not an attnsurgeon checkpoint (no format='{FORMAT}' field)")
    if data.get("format_version") != FORMAT_VERSION or isinstance(data.get("format_version"), bool):
        raise UsageError(
            f"{path}: checkpoint format_version {data.get('format_version')!r} is not "
            f"supported (this attnsurgeon reads {FORMAT_VERSION})"
        )
    for key in ("model", "model_kwargs", "recipe", "state_dict"):
        if key not in data:
            raise UsageError(f"{path}: checkpoint has no {key!r} field")
    _check_field(path, "model", data["model"], isinstance(data["model"], str), "a string")
    kwargs, state = data["model_kwargs"], data["state_dict"]
    _check_field(path, "model_kwargs", kwargs,
                 isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs), "a table of str keys")
    _check_field(path, "recipe", data["recipe"], isinstance(data["recipe"], Mapping), "a table")
    _check_field(path, "state_dict", state, isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()), "a dict of tensors")
    loads = sorted({"weights", "weights_backbone"} & set(kwargs))
    if loads:  # a checkpoint's weights are its state_dict; nothing is downloaded for it
        raise UsageError(f"{path}: checkpoint field 'model_kwargs' may not set {loads[0]!r}")
    weights, versions, pres = data.get("weights"), data.get("versions"), data.get("preservation")
    _check_field(path, "weights", weights, weights is None or isinstance(weights, str), "a string")
    _check_field(path, "versions", versions, versions is None or (isinstance(versions, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in versions.items())), "a table of strings")
    _check_field(path, "preservation", pres, pres is None or _is_preservation(pres),
                 "a table of the preservation figures")
    recipe = recipe_of(data, path)  # parse it now: a bad recipe is an error before any model is built
    if recipe.model not in (None, data["model"]):
        raise UsageError(f"{path}: checkpoint is of model {data['model']!r} but its recipe names {recipe.model!r}")
    return data


def _is_preservation(value: Any) -> bool:
    """What :func:`attnsurgeon.report.preservation` writes: a probe, figures and notes."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return (isinstance(value, dict) and isinstance(value.get("probe"), str)
            and all(number(value.get(k)) for k in ("max_abs", "logit_scale"))
            and all(value.get(k) is None or number(value.get(k)) for k in ("relative", "top1_agreement"))
            and all(isinstance(k, str) and isinstance(v, (str, int, float, bool, type(None)))
                    for k, v in value.items()))


def _check_field(path: Path, key: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        plain = isinstance(value, (str, int, float, bool, type(None))) and len(repr(value)) <= 60
        shown = repr(value) if plain else f"a {type(value).__name__}"
        raise UsageError(f"{path}: checkpoint field {key!r} must be {want}, got {shown}")


def recipe_of(data: dict[str, Any], path: str | Path) -> Recipe:
    return recipe_from_data(data["recipe"], source=f"{path}: recipe")


def rebuild(
    data: dict[str, Any], path: str | Path, *, base: nn.Module | None = None
) -> tuple[nn.Module, Changes]:
    """The model a checkpoint's data describes, with its weights loaded, and the changes
    its recipe made to the torchvision model (a copy of ``base`` when given: the
    unmodified model, already built)."""
    model = copy.deepcopy(base) if base is not None else build_base(data, path)
    changes = apply_recipe(model, recipe_of(data, path))
    fit_state_dict(model, data["state_dict"], source=f"{path}: state_dict")
    return model, changes


def build_base(data: dict[str, Any], path: str | Path) -> nn.Module:
    """The unmodified torchvision model a checkpoint's data was made from (random weights,
    the architecture its state_dict needs); errors name the file."""
    try:
        return build_model(data["model"], model_kwargs=data["model_kwargs"], like=data["state_dict"])
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


def load(path: str | Path) -> nn.Module:
    """Rebuild the model saved by ``attnsurgeon insert`` (in train mode, like torchvision).

    >>> model = attnsurgeon.load("se_resnet50.pt").eval()
    """
    return rebuild(read(path), path)[0]
