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
import os
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from . import __version__
from .errors import UsageError, first_line, foreign_error
from .recipe import Recipe, recipe_from_data

if TYPE_CHECKING:
    from .surgery import Change

__all__ = ["FORMAT", "FORMAT_VERSION", "atomic_write", "build_base", "check_output", "load", "load_plain", "read",
           "save"]

FORMAT = "attnsurgeon"
FORMAT_VERSION = 1


def check_output(path: str | Path, *, force: bool, suffix: str | tuple[str, ...] | None = None,
                 hint: str = "") -> Path:
    """Fail early (before any work) if ``path`` cannot be written: a wrong suffix, an
    existing file without ``force``, a directory, or a folder that is missing or not
    writable (tried by creating and removing a temp file there).

    Args:
        suffix: the suffix (or suffixes) the file must have.
        hint: appended to the wrong-suffix message (e.g. which command writes that suffix).
    """
    path = Path(path)
    suffixes = (suffix,) if isinstance(suffix, str) else suffix
    if suffixes is not None and path.suffix not in suffixes:
        want = " or ".join(suffixes)
        raise UsageError(f"-o: expected a {want} file, got {str(path)!r}{hint}")
    if path.is_dir():
        raise UsageError(f"-o: {path} is a directory")
    if (path.exists() or path.is_symlink()) and not force:  # a dangling link too
        raise UsageError(f"{path} exists; use --force to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"-o: directory {path.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"-o: cannot write to {path.parent} ({e.strerror or e})") from None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place.

    A crash, an error or a signal that unwinds (Ctrl-C; SIGTERM in the CLI) leaves no
    partial ``path`` and no temp file behind. The file gets the permissions a plain
    ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s private 0600.

    Raises:
        UsageError: the write failed for want of space, quota or permission (the
            message names ``path``); other errors of ``write`` propagate unchanged.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # the folder became unwritable, or full, since check_output
        error = foreign_error(e, writing=path)
        if error is None:
            raise
        raise error from e
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = foreign_error(e, writing=path) if isinstance(e, (OSError, RuntimeError)) else None
        if error is None:
            raise
        raise error from e


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


def load_plain(path: str | Path, *, what: str, kind: str) -> Any:
    """``torch.load(path, weights_only=True)``, with one clear line for every way a file
    can fail to be a PyTorch file: missing, a directory, unreadable, empty, not a
    ``torch.save`` archive, or holding objects other than plain data and tensors.

    Args:
        what: how the message names the file, e.g. ``"--weights-file: x.pth"``.
        kind: what the file should hold, e.g. ``"state_dict"``.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what}: no such file")
    if path.is_dir():
        raise UsageError(f"{what} is a directory, not a file")
    if not path.is_file():  # a device, FIFO or socket: reading may never end
        raise UsageError(f"{what} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UsageError(f"{what} cannot be read ({e.strerror or e})") from None
    article = "an" if kind[:1] in "aeiou" else "a"
    if not head:
        raise UsageError(f"{what} is empty, not {article} {kind}")
    try:
        zipped = zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # a damaged end record, which is_zipfile lets through: torch.load says more
        zipped = True
    if not zipped and head[:1] != b"\x80":  # torch.save: a zip; legacy: a pickle
        raise UsageError(f"{what} is not a loadable {kind}: not a file torch.save wrote")
    try:
        with warnings.catch_warnings():  # a damaged file's warnings would be a second line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zip errors, ...
        raise UsageError(f"{what} is not a loadable {kind} ({first_line(e)})") from None


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
) -> tuple[nn.Module, list[Change]]:
    """The model a checkpoint's data describes, with its weights loaded, and the changes
    its recipe made to the torchvision model (a copy of ``base`` when given: the
    unmodified model, already built)."""
    from .surgery import apply_recipe
    from .zoo import fit_state_dict

    model = copy.deepcopy(base) if base is not None else build_base(data, path)
    changes = apply_recipe(model, recipe_of(data, path))
    fit_state_dict(model, data["state_dict"], source=f"{path}: state_dict")
    return model, changes


def build_base(data: dict[str, Any], path: str | Path) -> nn.Module:
    """The unmodified torchvision model a checkpoint's data was made from (random weights,
    the architecture its state_dict needs); errors name the file."""
    from .zoo import build_model

    try:
        return build_model(data["model"], model_kwargs=data["model_kwargs"], like=data["state_dict"])
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


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
