"""Rich tables for the commands' results. Torch-free: it renders plain data."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from .kinds import HEADS, KINDS, POSITIONS
from .options import FLOAT64_FACTOR, SMALL_OUTPUT_RTOL

__all__ = ["blocks_table", "comparison_table", "kinds_data", "print_export_summary", "print_kinds", "print_summary",
           "print_table", "results_console", "si", "terminal_width"]

MIN_WIDTH = 40  # narrower than this, no table can show its numbers; print wider instead
DEFAULT_WIDTH = 80  # no terminal anywhere (a pipe into a file, cron): the classic width


def terminal_width() -> int:
    """The width to render for: ``COLUMNS`` if it is a sensible number, else the width of
    whichever of stdout, stderr or stdin is a terminal (so a table piped into ``less`` or a
    file still fits the terminal it was typed in), else 80; never below 40."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return max(int(columns), MIN_WIDTH)
    for fd in (1, 2, 0):
        try:
            return max(os.get_terminal_size(fd).columns, MIN_WIDTH)
        except (OSError, ValueError):
            continue
    return DEFAULT_WIDTH


def results_console() -> Console:
    """The console for results (stdout) at :func:`terminal_width`; made per command, so it
    sees the environment of the moment. The user's text prints verbatim (no emoji codes)."""
    return Console(width=terminal_width(), emoji=False)


def messages_console() -> Console:
    """The console for warnings and errors (stderr), made per message at :func:`terminal_width`:
    one made once took ``COLUMNS`` as it was then, and rich's width from ``COLUMNS=0`` is 0,
    at which every later message printed nothing."""
    return Console(stderr=True, width=terminal_width(), emoji=False)


def _delta(console: Console) -> str:
    """The Greek Delta where the output can encode it, else "d" (an ASCII terminal)."""
    try:
        "Δ".encode(console.encoding)
    except (UnicodeEncodeError, LookupError):
        return "d"
    return "Δ"


def print_table(console: Console, table: Table, *, drop: Sequence[str] = ()) -> None:
    """Print ``table`` so that it fits the console without cutting a number: headers wrap
    at their spaces, then columns named in ``drop`` are left out, in that order, until its
    narrowest layout fits (the caption says which; ``--json`` has them all). Numbers never wrap or shorten; a table that
    still does not fit is printed wider than the console rather than cut."""
    wide = console.options.update_width(1 << 16)

    def narrowest() -> int:
        """The table's narrowest width that cuts nothing: a no-wrap column at its widest
        cell (rich would otherwise shorten it with an ellipsis), any other at its longest
        word; plus padding and borders."""
        width = table._extra_width + sum(table.padding[1] + table.padding[3] for _ in table.columns)
        for column in table.columns:
            sizes = [Measurement.get(console, wide, cell) for cell in (column.header, *column.cells)]
            width += max(m.maximum if column.no_wrap else m.minimum for m in sizes)
        return width

    if narrowest() > console.width:  # first wrap the headers wider than their cells ("params before")
        for column in table.columns:
            cells = max((Measurement.get(console, wide, c).maximum for c in column.cells), default=0)
            if isinstance(column.header, str) and len(column.header) > cells:
                column.header = column.header.replace(" ", "\n")
    dropped = []
    for header in drop:
        if narrowest() <= console.width:
            break
        victim = next((c for c in table.columns if c.header in (header, header.replace(" ", "\n"))), None)
        if victim is not None and len(table.columns) > 1:
            table.columns.remove(victim)
            dropped.append(header)
    if dropped:
        note = f"left out to fit {console.width} columns: {', '.join(dropped)} (--json has all)"
        table.caption = f"{table.caption} {note}" if table.caption else note
    needed = narrowest()
    width = console.width
    console.width = max(needed, width)  # print() caps a wider width at the console's
    try:
        console.print(table)
    finally:
        console.width = width


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
    title = f"{model}: {_count(len(blocks), 'block')}, {shortcut} with a shortcut" + (
        f", {builtin} with a built-in SE" if builtin else "")
    example = blocks[len(blocks) // 2]  # the footer names this family's own stages
    native = example["stage"] not in (example["name"], example["alias"])
    stage = (f"the block's parent, e.g. {example['stage']}" if native
             else f"in this family its alias, e.g. {example['stage']}")
    table = Table(title=title, caption=(
        f"--layers takes a block, its stage ({stage}) or the alias stageN "
        "(output stride 2^(N+1)). Positions: standard, pre, mid, post in every block; identity "
        "with a shortcut; builtin with a built-in SE."))
    for col in ("block", "alias", "type", "in", "mid", "out", "stride", "shortcut",
                *(("built-in SE",) if builtin else ()), "spatial convs"):
        table.add_column(col, justify="right" if col in ("in", "mid", "out", "stride") else "left",
                         no_wrap=col != "spatial convs")
    for _stage, items in groupby(blocks, key=lambda b: b["stage"]):
        for b in items:
            short = ("proj" if b["downsample"] else "yes") if b["shortcut"] else ""
            stride = str(b["stride"]) + (f" d{b['dilation']}" if b["dilation"] > 1 else "")
            table.add_row(b["name"], b["alias"], b["type"], str(b["in_channels"]),
                          str(b["mid_channels"]), str(b["out_channels"]), stride, short,
                          *((b["builtin_se"] or "",) if builtin else ()), ", ".join(b["spatial_convs"]))
        table.add_section()
    return table


# columns each table may leave out to fit the terminal, the least needed first
BLOCKS_DROP = ("spatial convs", "type", "built-in SE", "shortcut", "alias")
SUMMARY_DROP = ("% added", "MACs after", "params after")
CHANGES_DROP = ("module", "note")
COMPARISON_DROP = ("model", "MACs", "+%")


def summary_table(data: dict[str, Any]) -> Table:
    size = f"1x3x{data['input_size']}x{data['input_size']}"
    if data.get("resized_to"):
        size += ", which the model resizes to 1x3x{}x{}".format(*data["resized_to"])
    table = Table(title=f"{data['model']}: parameters and MACs (MACs at {size})")
    for col in ("stage", "params before", "params after", "added", "% added",
                "MACs before", "MACs after", "MACs added"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)

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


def _count(n: int, noun: str) -> str:
    """``1 module``, ``2 modules``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def changes_table(changes: Sequence[dict[str, Any]]) -> Table:
    table = Table(title=f"{_count(len(changes), 'module')} inserted or replaced")
    notes = any(c.get("note") for c in changes)
    for col in ("rule", "kind", "where", "blocks", "module", "params added", *(["note"] if notes else [])):
        table.add_column(col, justify="right" if col in ("rule", "params added") else "left",
                         no_wrap=col not in ("blocks", "note"))

    def key(c: dict[str, Any]) -> tuple[Any, ...]:
        return c["rule"], c["attn"], c["where"], c["stage"], c["module"], c.get("note", "")

    for (rule, attn, where, _stage, module, note), group in groupby(changes, key=key):
        items = list(group)
        blocks = _span([c["block"] for c in items])
        table.add_row(str(rule) if rule else "head", attn, where, blocks, module,
                      _plus(sum(c["params_added"] for c in items)), *([note] if notes else []))
    return table


def skipped_lines(skipped: Sequence[dict[str, Any]]) -> list[str]:
    """``rule 1: skipped 7 selected blocks without an 'identity' position: features.1, ...``."""
    lines = []
    for (rule, position), group in groupby(skipped, key=lambda s: (s["rule"], s["position"])):
        names = [s["block"] for s in group]
        article = "an" if position[:1] in "aeiou" else "a"
        lines.append(f"rule {rule}: skipped {_count(len(names), 'selected block')} "
                     f"without {article} {position!r} position: {_span(names, count=False)}")
    return lines


def _runs(blocks: Sequence[str]) -> list[tuple[str, int, int]]:
    """Split block names into runs of consecutive numbers under one prefix:
    ``layer1.0, layer1.1, layer2.0`` -> ``[("layer1.", 0, 1), ("layer2.", 0, 0)]``;
    a name that does not end in a number is a run of its own (``("avgpool", -1, -1)``)."""
    runs: list[tuple[str, int, int]] = []
    for name in blocks:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if m is None:
            runs.append((name, -1, -1))
            continue
        prefix, number = m.group(1), int(m.group(2))
        if runs and runs[-1][0] == prefix and runs[-1][2] == number - 1:
            runs[-1] = (prefix, runs[-1][1], number)
        else:
            runs.append((prefix, number, number))
    return runs


def _span(blocks: Sequence[str], *, count: bool = True) -> str:
    """Block names, each run of consecutive blocks of one stage written once, for every
    family: ``layer1.0, layer1.1, layer1.2`` -> ``layer1.0-2 (3)``,
    ``trunk_output.block3.block3-0 ... block3-3`` -> ``trunk_output.block3.block3-0..3 (4)``;
    runs are joined by commas, with the total in brackets (without it when ``count`` is
    False)."""
    parts = []
    for prefix, lo, hi in _runs(blocks):
        if lo < 0:
            parts.append(prefix)
        elif lo == hi:
            parts.append(f"{prefix}{lo}")
        else:
            parts.append(f"{prefix}{lo}{'..' if prefix.endswith('-') else '-'}{hi}")
    text = ", ".join(parts)
    return f"{text} ({len(blocks)})" if count and len(blocks) > 1 else text


def duration(ms: float) -> str:
    """A time in milliseconds in a unit that suits it: ``0.0123`` -> ``12.3 us``,
    ``12.3`` -> ``12.3 ms``, ``1940`` -> ``1.94 s``."""
    if ms < 1:
        return f"{ms * 1e3:.3g} us"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def _timed(lat: dict[str, Any], which: str) -> str:
    """``12.1 ms +- 0.3`` : the median, and half the interquartile range where measured."""
    spread = lat.get(f"{which}_spread_ms")
    text = duration(lat[f"{which}_ms"])
    if spread is None:
        return text
    unit = text.rsplit(" ", 1)[1]
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    return f"{text} +- {spread / scale:.2g}"


def latency_line(lat: dict[str, Any], macs: dict[str, Any]) -> str:
    """``latency (cpu ..., batch 1): 12.1 ms +- 0.3 -> 13.4 ms +- 0.2 (x1.11), MACs x1.00``."""
    threads = f", {lat['threads']} threads" if lat.get("threads") else ""
    mac_ratio = macs["macs_after"] / macs["macs_before"] if macs["macs_before"] else float("inf")
    return (f"latency ({lat['device']}: {lat['device_name']}{threads}; batch {lat['batch']}, "
            f"median +- half the interquartile range of {lat['rounds']} interleaved rounds): "
            f"{_timed(lat, 'before')} -> {_timed(lat, 'after')} (x{lat['ratio']:.2f}; MACs x{mac_ratio:.2f})")


def print_summary(console: Console, data: dict[str, Any]) -> None:
    print_table(console, summary_table(data), drop=SUMMARY_DROP)
    if data.get("latency"):
        console.print(latency_line(data["latency"], data["total"]), highlight=False, soft_wrap=True)
    if data["changes"]:
        print_table(console, changes_table(data["changes"]), drop=CHANGES_DROP)
    for line in skipped_lines(data.get("skipped", ())):
        console.print(line, highlight=False, soft_wrap=True)
    p = data.get("preservation")
    if p:
        console.print(preservation_line(p, data["recipe"].get("init", "paper"), delta=_delta(console)),
                      highlight=False, soft_wrap=True)


def preservation_line(p: dict[str, Any], init: str, *, delta: str = "Δ") -> str:
    """``preservation (preserve init, probe ...): max |Δlogits| 2e-06 (logit scale 2.8, ...)``."""
    logits = p.get("compared", "logits") == "logits"
    return (
        f"preservation ({init} init, probe {p['probe']}): "
        + (f"max |{delta}logits| {p['max_abs']:.3g} (logit scale {p['logit_scale']:.3g}, "
           if logits else f"max |{delta}{p['compared']}| {p['max_abs']:.3g} (scale {p['logit_scale']:.3g}, ")
        + (f"relative {p['relative']:.3g})" if p.get("relative") is not None else "no relative figure: all zero)")
        + (f", top-1 agreement {100 * p['top1_agreement']:.0f}%" if p.get("top1_agreement") is not None else "")
        + ("; NOT JUDGED: outputs too small (random weights?)" if p.get("too_small") else "")
        + ("; function NOT kept: built-in modules were replaced" if p.get("function_kept") is False else "")
    )


def comparison_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="recipes compared")
    table.add_column("recipe", no_wrap=True)
    table.add_column("model", no_wrap=True)
    timed = any(data.get("latency") for data in rows)
    timing = ("time before", "time after", "latency x") if timed else ()
    for col in ("params", "+params", "+%", "MACs", "+MACs", *timing):
        table.add_column(col, justify="right", no_wrap=True)
    for data in rows:
        t, lat = data["total"], data.get("latency")
        times = (duration(lat["before_ms"]), duration(lat["after_ms"]), f"{lat['ratio']:.2f}") if lat else ("-",) * 3
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
    table = Table(title=f"onnxruntime vs PyTorch (eval), atol {v['atol']:g} + rtol {v['rtol']:g}: {verdict}",
                  caption=f"onnx.checker full_check {v['checker']}; {v['provider']}; {v['seconds']:.1f} s")
    for col in ("batch", "input", "max abs error", "max rel error", "result"):
        table.add_column(col, justify="left" if col in ("input", "result") else "right")
    for r in v["runs"]:
        table.add_row(str(r["batch"]), dims(r["shape"]), f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}",
                      "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    console.print(table)
    for r in v["runs"]:
        if "onnx_vs_float64" in r:
            console.print(f"  input {dims(r['shape'])} judged against the model in float64: onnxruntime "
                          f"{r['onnx_vs_float64']:.2e} from it, PyTorch's float32 {r['torch_vs_float64']:.2e} "
                          f"(allowed: atol + {FLOAT64_FACTOR:g}x PyTorch's)", style=None if r["passed"] else "red",
                          highlight=False, soft_wrap=True)
    if v.get("small_outputs") is not None:
        console.print(f"  warning: the model's outputs are at most {v['small_outputs']:.2g} (random weights?), "
                      f"too small for atol {v['atol']:g} to judge: runs also had to be within a relative "
                      f"error of {SMALL_OUTPUT_RTOL:g}", style="yellow", highlight=False, soft_wrap=True)
    if v["error"]:
        console.print(f"  {escape(v['error'])}", style="red", highlight=False, soft_wrap=True)
