"""The project's error type.

Everything a user can get wrong (a model name, a layer spec, a ``--param``, a file) raises
:class:`UsageError`. The CLI turns it into one line on stderr and exit status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UsageError", "suggest"]


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
