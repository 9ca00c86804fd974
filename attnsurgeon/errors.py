"""The project's error type.

Everything a user can get wrong (a model name, a layer spec, a ``--param``, a file) raises
:class:`UsageError`. The CLI turns it into one line on stderr and exit status 2; anything
else is a bug and keeps its traceback.

The machine can fail a correct request too: a full disk, a directory that cannot be
written, not enough memory for an input size. :func:`foreign_error` is the one place that
turns those foreign exceptions into a :class:`UsageError` with one clear line.
:class:`VerificationError` (an ONNX file that does not match PyTorch) exits with status 1.
"""

from __future__ import annotations

import difflib
import errno
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["UsageError", "VerificationError", "first_line", "foreign_error", "suggest"]

# errno values that mean "this file cannot be written here", whatever wrote it
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# what torch's C++ writer and allocator say (they raise RuntimeError, not OSError)
_WRITE_FAILED = ("file write failed", "failed writing", "unexpected pos")
_OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


class UsageError(Exception):
    """A mistake in what the user asked for; the message says what and how to fix it."""


def suggest(value: str, valid: Iterable[str], *, limit: int = 8) -> str:
    """Return ``" (did you mean: a, b?)"`` or a list of valid names, ready to append."""
    valid = list(valid)
    close = difflib.get_close_matches(value, valid, n=3, cutoff=0.6)
    if close:
        return f" (did you mean: {', '.join(close)}?)"
    if len(valid) <= limit:
        return f" (valid: {', '.join(valid)})"
    return f" (valid: {', '.join(valid[:limit])}, ... {len(valid) - limit} more)"


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none), in our words
    where torch's would mislead: its advice to retry a refused file with
    ``weights_only=False`` is not ours to give for a file from anywhere."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Weights only load failed" in first:
        if "Unsupported global" in text:
            return "it holds pickled objects beyond tensors and plain data, which are never unpickled"
        return "a damaged pickle"
    return first


def foreign_error(exc: BaseException, *, writing: object | None = None) -> UsageError | None:
    """The :class:`UsageError` that stands for ``exc``, or ``None`` when ``exc`` is a bug.

    Maps a failed write (``OSError`` such as ENOSPC, EDQUOT, EFBIG, EACCES, EROFS, or torch's
    "file write failed"), an ``OSError`` met while reading, and an allocation failure
    (``MemoryError``, torch's "out of memory" / "can't allocate memory") to one line, and
    a parser's ``RecursionError`` (input nested too deeply) too.

    Args:
        exc: the exception caught.
        writing: the file being written when ``exc`` happened, if any: the message names it.
    """
    if isinstance(exc, UsageError):
        return exc
    if isinstance(exc, RecursionError):  # a parser (TOML, pickle) met input nested too deeply
        return UsageError("input nested too deeply to read (Python's recursion limit)")
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(s in text.lower() for s in _OUT_OF_MEMORY)
    ):
        return UsageError(f"out of memory ({_memory_reason(text)}); try a smaller --input-size, "
                          "--batch or --param value, or free some memory")
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno != errno.EPIPE:
        reason = exc.strerror or first
        if writing is not None:
            if exc.errno in _WRITE_ERRNOS:
                return UsageError(f"cannot write {writing}: {reason}; nothing was written")
            return None
        return UsageError(f"{exc.filename}: {reason}" if exc.filename is not None else reason)
    if writing is not None and isinstance(exc, RuntimeError) and any(s in text for s in _WRITE_FAILED):
        return UsageError(f"cannot write {writing}: the write failed (disk full or file too large?); "
                          "nothing was written")
    return None


def _memory_reason(text: str) -> str:
    """``"... you tried to allocate 120000000000 bytes ..."`` -> ``"tried to allocate 120.0 GB"``."""
    m = re.search(r"allocate (\d+) bytes", text)
    return f"tried to allocate {int(m.group(1)) / 1e9:.1f} GB" if m else "allocation failed"


class VerificationError(Exception):
    """The exported file does not compute what the PyTorch model computes.

    ``summary`` holds the export summary with the failing figures; ``kept`` says whether
    the file was kept (``keep_failed``) or removed.
    """

    def __init__(self, message: str, summary: dict[str, Any], *, kept: bool) -> None:
        super().__init__(message)
        self.summary = summary
        self.kept = kept
