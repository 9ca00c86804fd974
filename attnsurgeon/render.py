"""Rich tables for the commands' results. Torch-free: it renders plain data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from itertools import groupby
from typing import Any

from rich.console import Console
from rich.table import Table

from .kinds import HEADS, KINDS, POSITIONS

__all__ = ["blocks_table", "comparison_table", "kinds_data", "print_kinds", "print_summary", "si"]


def si(n: float, unit: str = "") -> str:
    """Human-readable count: 25557032 -> '25.56M'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for factor, suffix, digits in ((1e9, "G", 3), (1e6, "M", 2), (1e3, "K", 1)):
        if n >= factor:
            v = n / factor
            return f"{sign}{v:.{0 if suffix == 'K' and v >= 100 else digits}f}{suffix}{unit}"
    return f"{sign}{n:g}{unit}"


def _plus(n: float) -> str:
    return ("+" if n > 0 else "") + si(n) if n else "0"


def print_kinds(console: Console) -> None:
    """The kinds as a short text listing: it reads better than a table at 80 columns."""
    for spec in KINDS.values():
        where = (f"insert kind, default position [bold]{spec.default_position}[/]"
                 if spec.mode == "insert" else "replace kind (no --position)")
        console.print(f"[bold cyan]{spec.name}[/]  {spec.title}: {where}", highlight=False, soft_wrap=True)
        for p in spec.params:
            extra = f" (one of {', '.join(map(str, p.choices))})" if p.choices else ""
            symbol = f" [{p.symbol}]" if p.symbol else ""
            console.print(f"    --param {p.name}={p.default}{symbol}  {p.help}{extra}", highlight=False, markup=False, soft_wrap=True)
        if spec.note:
            console.print(f"    {spec.note}", style="dim", highlight=False, soft_wrap=True)
        console.print(f"    paper: {spec.paper}", style="dim", highlight=False, soft_wrap=True)
    console.print(f"positions: {', '.join(POSITIONS)}", highlight=False, soft_wrap=True)
    console.print("heads (--head): " + "; ".join(f"{k}: {v}" for k, v in HEADS.items()),
                  highlight=False, soft_wrap=True)


def kinds_data() -> dict[str, Any]:
    return {
        "kinds": [
            {
                "name": s.name, "title": s.title, "mode": s.mode, "paper": s.paper,
                "default_position": s.default_position, "note": s.note,
                "params": [
                    {"name": p.name, "type": p.type.__name__, "default": p.default,
                     "symbol": p.symbol, "help": p.help, "minimum": p.minimum,
                     "choices": list(p.choices)}
                    for p in s.params
                ],
            }
            for s in KINDS.values()
        ],
        "positions": list(POSITIONS),
        "heads": HEADS,
    }


def blocks_table(model: str, blocks: Sequence[dict[str, Any]]) -> Table:
    slots = {" ".join(b["slots"]) for b in blocks}
    table = Table(title=f"{model}: {len(blocks)} residual blocks",
                  caption=f"slots: {' | '.join(sorted(slots))}" if slots else None)
    for col in ("block", "type", "in", "out", "stride", "downsample", "spatial convs"):
        table.add_column(col, justify="right" if col in ("in", "out", "stride") else "left")
    for _stage, items in groupby(blocks, key=lambda b: b["stage"]):
        for b in items:
            table.add_row(b["name"], b["type"], str(b["in_channels"]), str(b["out_channels"]),
                          str(b["stride"]), "yes" if b["downsample"] else "",
                          ", ".join(b["spatial_convs"]))
        table.add_section()
    return table


def summary_table(data: dict[str, Any]) -> Table:
    table = Table(title=f"{data['model']}: parameters and MACs "
                        f"(MACs at 1x3x{data['input_size']}x{data['input_size']})")
    for col in ("stage", "params before", "params after", "added", "% added",
                "MACs before", "MACs after", "MACs added"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=col == "stage")

    def add(row: dict[str, Any], style: str = "") -> None:
        table.add_row(
            row["name"], si(row["params_before"]), si(row["params_after"]),
            _plus(row["params_added"]), f"{row['params_added_pct']:.2f}%",
            si(row["macs_before"]), si(row["macs_after"]), _plus(row["macs_added"]), style=style,
        )

    for row in data["groups"]:
        add(row)
    table.add_section()
    add(data["total"], style="bold")
    return table


def changes_table(changes: Sequence[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(changes)} modules inserted or replaced")
    for col in ("rule", "kind", "where", "blocks", "module", "params added"):
        table.add_column(col, justify="right" if col in ("rule", "params added") else "left")
    key = lambda c: (c["rule"], c["attn"], c["where"], c["stage"], c["module"])  # noqa: E731
    for (rule, attn, where, _stage, module), group in groupby(changes, key=key):
        items = list(group)
        blocks = _span(items[0]["block"], items[-1]["block"], len(items))
        table.add_row(str(rule) if rule else "head", attn, where, blocks, module,
                      _plus(sum(c["params_added"] for c in items)))
    return table


def _span(first: str, last: str, n: int) -> str:
    """``layer1.0``, ``layer1.2``, 3 -> ``layer1.0-2 (3)``."""
    if n == 1:
        return first
    stage, _, tail = last.rpartition(".")
    if first.startswith(stage + ".") and tail.isdigit():
        return f"{first}-{tail} ({n})"
    return f"{first} .. {last} ({n})"


def latency_line(lat: dict[str, Any], macs: dict[str, Any]) -> str:
    """``latency (cpu ..., batch 1): 12.1 ms -> 13.4 ms (x1.11), MACs x1.00``."""
    threads = f", {lat['threads']} threads" if lat.get("threads") else ""
    mac_ratio = macs["macs_after"] / macs["macs_before"] if macs["macs_before"] else float("inf")
    return (f"latency ({lat['device']}: {lat['device_name']}{threads}; batch {lat['batch']}, "
            f"median of {lat['rounds']} interleaved rounds): {lat['before_ms']:.3g} ms -> "
            f"{lat['after_ms']:.3g} ms (x{lat['ratio']:.2f}; MACs x{mac_ratio:.2f})")


def print_summary(console: Console, data: dict[str, Any]) -> None:
    console.print(summary_table(data))
    if data.get("latency"):
        console.print(latency_line(data["latency"], data["total"]), highlight=False, soft_wrap=True)
    if data["changes"]:
        console.print(changes_table(data["changes"]))
    p = data.get("preservation")
    if p:
        console.print(
            f"preservation ({data['recipe'].get('init', 'paper')} init, probe {p['probe']}): "
            f"max |Δlogits| {p['max_abs']:.3g} (logit scale {p['logit_scale']:.3g}, "
            f"relative {p['relative']:.3g}), top-1 agreement {100 * p['top1_agreement']:.0f}%",
            highlight=False, soft_wrap=True,
        )


def comparison_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="recipes compared")
    table.add_column("recipe", no_wrap=True)
    table.add_column("model", no_wrap=True)
    timed = any(data.get("latency") for data in rows)
    for col in ("params", "+params", "+%", "MACs", "+MACs", *(("ms before", "ms after", "latency x") if timed else ())):
        table.add_column(col, justify="right", no_wrap=True)
    for data in rows:
        t, lat = data["total"], data.get("latency")
        times = (f"{lat['before_ms']:.3g}", f"{lat['after_ms']:.3g}", f"{lat['ratio']:.2f}") if lat else ("-",) * 3
        table.add_row(Path(data.get("source", "")).stem, data["model"], si(t["params_after"]),
                      _plus(t["params_added"]), f"{t['params_added_pct']:.2f}%",
                      si(t["macs_after"]), _plus(t["macs_added"]), *(times if timed else ()))
    if timed:
        lat = next(d["latency"] for d in rows if d.get("latency"))
        table.caption = f"latency: {lat['device']}, batch {lat['batch']}, median of {lat['rounds']} interleaved rounds"
    return table
