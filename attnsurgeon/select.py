"""Layer specs: which residual blocks a rule touches.

Grammar (names as ``attnsurgeon blocks MODEL`` prints them)::

    spec  := "all" | item ("," item)*
    item  := name | [name] ":" [name]        # inclusive range, open at either end
    name  := stage ("layer3") | block ("layer3.1") | stage alias ("stage3")

A range runs from the first block of its start to the last block of its end, in model
order. Stage aliases (``stage0..stage4``, by output stride: see :mod:`attnsurgeon.blocks`)
name the same depth in every family. Torch-free: it works on names only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import UsageError, suggest

__all__ = ["select_blocks", "check_spec_syntax"]


def check_spec_syntax(spec: str, *, where: str = "--layers") -> None:
    """Reject a malformed spec before any model is loaded."""
    if not spec.strip():
        raise UsageError(f"{where}: empty layer spec (use 'all', a stage, a block or A:B)")
    if spec.strip() == "all":
        return
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise UsageError(f"{where}: empty item in layer spec {spec!r}")
        if item.count(":") > 1:
            raise UsageError(f"{where}: a range has one ':', got {item!r}")
        if item == ":":
            raise UsageError(f"{where}: a range needs at least one end, got {item!r} (use 'all')")


def select_blocks(
    spec: str, blocks: Sequence[tuple[str, ...]], *, where: str = "--layers"
) -> list[int]:
    """Return the sorted indices of ``blocks`` in ``spec``.

    ``blocks`` holds ``(block_name, stage_name)`` or ``(block_name, stage_name, alias)``
    tuples in model order.

    Raises:
        UsageError: for a malformed spec, an unknown name, a reversed range, or a spec that
            selects nothing. Messages list the valid names.
    """
    check_spec_syntax(spec, where=where)
    if not blocks:
        raise UsageError(f"{where}: the model has no blocks to select")
    names = [b[0] for b in blocks]
    groups: dict[str, list[int]] = {}  # stage, then alias -> its block indices
    for column in range(1, max(len(b) for b in blocks)):
        for i, b in enumerate(blocks):
            if b[column] and i not in groups.setdefault(b[column], []):  # "": no alias
                groups[b[column]].append(i)
    stages = list(groups)
    if spec.strip() == "all":
        return list(range(len(blocks)))

    def span(name: str) -> tuple[int, int]:
        if name in names:
            i = names.index(name)
            return i, i
        if name in groups:
            return groups[name][0], groups[name][-1]
        alias = re.fullmatch(r"stage(\d+)", name)
        aliases = [g for g in stages if re.fullmatch(r"stage\d+", g)]
        if alias is not None and aliases:
            raise UsageError(
                f"{where}: the model has no {name} block (none works at output stride "
                f"{2 ** (int(alias.group(1)) + 1)}); its blocks are in {', '.join(aliases)}")
        valid = stages + names
        raise UsageError(
            f"{where}: unknown layer {name!r}" + suggest(name, valid, limit=len(stages))
            + f"; stages: {', '.join(stages)}; blocks: {names[0]} ... {names[-1]}"
        )

    chosen: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        if ":" in item:
            left, right = (p.strip() for p in item.split(":"))
            lo = span(left)[0] if left else 0
            hi = span(right)[1] if right else len(blocks) - 1
            if lo > hi:
                raise UsageError(f"{where}: range {item!r} is reversed ({left} comes after {right})")
            chosen.update(range(lo, hi + 1))
        else:
            lo, hi = span(item)
            chosen.update(range(lo, hi + 1))
    if not chosen:
        raise UsageError(f"{where}: layer spec {spec!r} selects no block")
    return sorted(chosen)
