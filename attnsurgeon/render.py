"""Rich tables for the commands' results. Torch-free: it renders plain data."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .kinds import HEADS, KINDS, POSITIONS

__all__ = ["blocks_table", "comparison_table", "kinds_data", "print_export_summary", "print_kinds", "print_summary",
           "si"]


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
            if p.maximum is not None:
                extra += f" (at most {p.maximum:g})"
            symbol = f" [{p.symbol}]" if p.symbol else ""
            console.print(f"    --param {p.name}={p.default}{symbol}  {p.help}{extra}", highlight=False,
                          markup=False, soft_wrap=True)
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
                     "maximum": p.maximum, "choices": list(p.choices)}
                    for p in s.params
                ],
            }
            for s in KINDS.values()
        ],
        "positions": list(POSITIONS),
        "heads": HEADS,
    }


def blocks_table(model: str, blocks: Sequence[dict[str, Any]]) -> Table:
    shortcut = sum(b["shortcut"] for b in blocks)
    builtin = sum(bool(b["builtin_se"]) for b in blocks)
    title = f"{model}: {len(blocks)} blocks, {shortcut} with a shortcut" + (
        f", {builtin} with a built-in SE" if builtin else "")
    table = Table(title=title, caption=(
        "--layers takes a block, its stage (the block's parent, e.g. layer3) or the alias stageN "
        "(output stride 2^(N+1)). Positions: standard, pre, mid, post in every block; identity "
        "with a shortcut; builtin with a built-in SE."))
    for col in ("block", "alias", "type", "in", "mid", "out", "stride", "shortcut", "built-in SE",
                "spatial convs"):
        table.add_column(col, justify="right" if col in ("in", "mid", "out", "stride") else "left",
                         no_wrap=col in ("block", "alias", "type"))
    for _stage, items in groupby(blocks, key=lambda b: b["stage"]):
        for b in items:
            short = ("proj" if b["downsample"] else "yes") if b["shortcut"] else ""
            stride = str(b["stride"]) + (f" d{b['dilation']}" if b["dilation"] > 1 else "")
            table.add_row(b["name"], b["alias"], b["type"], str(b["in_channels"]),
                          str(b["mid_channels"]), str(b["out_channels"]), stride, short,
                          b["builtin_se"] or "", ", ".join(b["spatial_convs"]))
        table.add_section()
    return table


def summary_table(data: dict[str, Any]) -> Table:
    size = f"1x3x{data['input_size']}x{data['input_size']}"
    if data.get("resized_to"):
        size += ", which the model resizes to 1x3x{}x{}".format(*data["resized_to"])
    table = Table(title=f"{data['model']}: parameters and MACs (MACs at {size})")
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
    notes = any(c.get("note") for c in changes)
    for col in ("rule", "kind", "where", "blocks", "module", "params added", *(["note"] if notes else [])):
        table.add_column(col, justify="right" if col in ("rule", "params added") else "left")
    def key(c: dict[str, Any]) -> tuple[Any, ...]:
        return c["rule"], c["attn"], c["where"], c["stage"], c["module"], c.get("note", "")

    for (rule, attn, where, _stage, module, note), group in groupby(changes, key=key):
        items = list(group)
        blocks = _span([c["block"] for c in items])
        table.add_row(str(rule) if rule else "head", attn, where, blocks, module,
                      _plus(sum(c["params_added"] for c in items)), *([note] if notes else []))
    return table


def skipped_lines(skipped: Sequence[dict[str, Any]]) -> list[str]:
    """``rule 1: skipped 7 blocks without a 'identity' position: features.1, ...``."""
    lines = []
    for (rule, position), group in groupby(skipped, key=lambda s: (s["rule"], s["position"])):
        names = [s["block"] for s in group]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(f"rule {rule}: skipped {len(names)} selected block{'s' * (len(names) > 1)} "
                     f"without a {position!r} position: {shown}")
    return lines


def _span(blocks: Sequence[str]) -> str:
    """``layer1.0, layer1.1, layer1.2`` -> ``layer1.0-2 (3)``; blocks that are not one run
    of a stage are listed (``layer1.0, layer1.2``), the middle elided past four."""
    first, last, n = blocks[0], blocks[-1], len(blocks)
    if n == 1:
        return first
    stage = first.rpartition(".")[0]
    tails = [b.rpartition(".")[2] for b in blocks]
    if (all(b.rpartition(".")[0] == stage for b in blocks) and all(t.isdigit() for t in tails)
            and [int(t) for t in tails] == list(range(int(tails[0]), int(tails[0]) + n))):
        return f"{first}-{tails[-1]} ({n})"
    return ", ".join(blocks) if n <= 4 else f"{first}, {blocks[1]}, ..., {last} ({n})"


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
    for line in skipped_lines(data.get("skipped", ())):
        console.print(line, highlight=False, soft_wrap=True)
    p = data.get("preservation")
    if p:
        logits = p.get("compared", "logits") == "logits"
        console.print(
            f"preservation ({data['recipe'].get('init', 'paper')} init, probe {p['probe']}): "
            + (f"max |Δlogits| {p['max_abs']:.3g} (logit scale {p['logit_scale']:.3g}, "
               if logits else f"max |Δ{p['compared']}| {p['max_abs']:.3g} (scale {p['logit_scale']:.3g}, ")
            + (f"relative {p['relative']:.3g})" if p.get("relative") is not None else "no relative figure: all zero)")
            + (f", top-1 agreement {100 * p['top1_agreement']:.0f}%" if p.get("top1_agreement") is not None else "")
            + (f"; NOT kept: {p['note']}" if p.get("function_kept") is False else ""),
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


def print_export_summary(console: Any, data: dict[str, Any]) -> None:
    """Print :func:`export_onnx`'s summary as a few lines and a table (rich)."""
    def dims(shape: list[Any]) -> str:
        return escape("[" + ", ".join(map(str, shape)) + "]")

    console.print(f"[bold]{escape(data['output'])}[/]  {si(data['file_size'], 'B')}  opset {data['opset']}  "
                  f"{data['nodes']} nodes  exported in {data['export_seconds']:.1f} s",
                  highlight=False, soft_wrap=True)
    for role, key in (("input ", "inputs"), ("output", "outputs")):
        for v in data[key]:
            console.print(f"  {role} {v['name']}: {v['dtype']} {dims(v['shape'])}", highlight=False)
    v = data["verification"]
    if v is None:
        console.print("  not verified (--no-verify)", style="yellow", highlight=False)
        return
    verdict = "[bold green]PASSED[/]" if v["passed"] else "[bold red]FAILED[/]"
    table = Table(title=f"onnxruntime vs PyTorch (eval), atol {v['atol']:g}: {verdict}",
                  caption=f"onnx.checker full_check {v['checker']}; {v['provider']}; {v['seconds']:.1f} s")
    for col in ("batch", "input", "max abs error", "max rel error", "result"):
        table.add_column(col, justify="left" if col in ("input", "result") else "right")
    for r in v["runs"]:
        table.add_row(str(r["batch"]), dims(r["shape"]), f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}",
                      "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    console.print(table)
    if v["error"]:
        console.print(f"  {escape(v['error'])}", style="red", highlight=False, soft_wrap=True)
