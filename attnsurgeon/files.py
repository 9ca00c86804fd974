"""The tool's edge with the file system: output checks, atomic writes, safe loads.

The lowest layer of the package besides :mod:`errors`: it imports nothing else of it, so
:mod:`zoo`, :mod:`checkpoint` and :mod:`onnx_export` all stand on it. Importing it does not
import torch (:func:`load_plain` does, when called), so commands check their options and
output paths with it before any model is touched.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError, first_line, foreign_error

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["MAX_INPUT_SIZE", "MIN_INPUT_SIZE", "atomic_write", "check_input_size", "check_output", "load_plain",
           "with_metadata"]

MIN_INPUT_SIZE = 32  # ResNets downsample 32x: smaller inputs vanish before the head
# 2048 covers detection and segmentation sizes; beyond it one probe batch of a ResNet-50
# needs tens of GB. Checked up front, so the answer is a line, not an allocation failure.
MAX_INPUT_SIZE = 2048


def check_input_size(size: int, where: str = "--input-size") -> int:
    """Raise UsageError unless ``MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE``."""
    if size < MIN_INPUT_SIZE:
        raise UsageError(f"{where} must be >= {MIN_INPUT_SIZE}, got {size}")
    if size > MAX_INPUT_SIZE:
        raise UsageError(f"{where} must be <= {MAX_INPUT_SIZE}, got {size} (larger inputs need more "
                         "memory than a probe is worth)")
    return size


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


def load_plain(path: str | Path, *, what: str, kind: str) -> Any:
    """``torch.load(path, weights_only=True)``, with one clear line for every way a file
    can fail to be a PyTorch file: missing, a directory, unreadable, empty, not a
    ``torch.save`` archive, or holding objects other than plain data and tensors.

    Args:
        what: how the message names the file, e.g. ``"--weights-file: x.pth"``.
        kind: what the file should hold, e.g. ``"state_dict"``.
    """
    import torch  # here, not above: the output and input checks must not import torch

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
