"""The README's figures come from the tool: its worked example is the tool's very output,
and every row of its recipe comparison table matches ``summarize --recipe ... --json``.
New rows are picked up as they are added; rows on models beyond ResNet-18/34 are @heavy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from attnsurgeon.render import si

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
LIGHT_MODELS = ("resnet18", "resnet34")


def code_block_after(marker: str) -> list[str]:
    """The lines of the fenced block that starts with the line ``marker``."""
    block = README.split(f"```\n{marker}\n", 1)[1].split("\n```", 1)[0]
    return block.splitlines()


WORKED = "$ attnsurgeon insert resnet18 --attn se --layers layer3: -o se_resnet18.pt"


def test_worked_example_is_the_tools_output(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")  # the README shows the tables at 80 columns
    expected = code_block_after(WORKED)
    argv = WORKED.split()[2:]
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    got = [line.rstrip() for line in result.stdout.splitlines()]
    assert got == [line.rstrip() for line in expected[:-1]]
    assert result.stderr.strip() == expected[-1] == "wrote se_resnet18.pt"


def comparison_rows() -> list[list[str]]:
    """The body rows of the README's "recipes compared" table, as cells."""
    lines = README.split("recipes compared\n", 1)[1].split("\n```", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]


ROWS = comparison_rows()


def test_comparison_table_has_rows():
    assert len(ROWS) >= 7 and all(len(r) == 7 for r in ROWS)


@pytest.mark.parametrize("row", [
    pytest.param(r, id=r[0], marks=() if r[1] in LIGHT_MODELS else (pytest.mark.heavy,)) for r in ROWS
])
def test_comparison_row_is_the_tools(cli, row):
    name, model, params, plus_params, pct, macs, plus_macs = row
    recipe = ROOT / "recipes" / f"{name}.toml"
    assert recipe.is_file(), f"README row {name!r} names no recipe in recipes/"
    result = cli("summarize", "--recipe", str(recipe), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    t = data["total"]
    plus = lambda n: ("+" if n > 0 else "") + si(n) if n else "0"  # noqa: E731  (render._plus)
    assert [model, params, plus_params, pct, macs, plus_macs] == [
        data["model"], si(t["params_after"]), plus(t["params_added"]), f"{t['params_added_pct']:.2f}%",
        si(t["macs_after"]), plus(t["macs_added"])]


def test_recipe_table_names_shipped_recipes():
    """The README's list of shipped recipes names files that exist."""
    section = README.split("| recipe | reproduces |", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"`([a-z0-9_{},]+)`", section)
    assert names
    for name in names:
        m = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
        for expanded in ([m.group(1) + part + m.group(3) for part in m.group(2).split(",")] if m else [name]):
            assert (ROOT / "recipes" / f"{expanded}.toml").is_file(), expanded


EXPORT = "$ attnsurgeon export-onnx se_resnet18.pt -o se_resnet18.onnx"


@pytest.mark.heavy
def test_export_example_figures(cli, tmp_path, monkeypatch):
    """Size, opset, node count, inputs and outputs of the README's export example (the
    export time and verification errors vary by machine and are not compared)."""
    monkeypatch.chdir(tmp_path)
    assert cli(*WORKED.split()[2:]).exit_code == 0
    result = cli(*EXPORT.split()[2:], "--no-verify")
    assert result.exit_code == 0, result.output
    expected = code_block_after(EXPORT)
    untimed = lambda line: re.sub(r"exported in [\d.]+ s", "exported in - s", line.rstrip())  # noqa: E731
    got = [untimed(line) for line in result.stdout.splitlines()]
    assert got[:3] == [untimed(line) for line in expected[:3]]
