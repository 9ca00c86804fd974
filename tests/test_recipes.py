"""Shipped recipes and recipe handling, through the command line.

* every ``recipes/*.toml`` builds, and ``summarize`` counts the parameters its opening
  comment cites (``# params: 28.1M``: the printed digits are the tolerance, half a unit
  of the last digit; ``# params: 27562140`` is exact; ``# tolerance: 0.1M`` widens it,
  with the reason in the comment);
* several ``--recipe`` (or a directory) print one comparison table;
* a bad recipe is one line on stderr naming file, rule and key, exit 2, no traceback;
* command-line values win over the recipe's top-level values.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from typer.testing import CliRunner

from attnsurgeon.cli import app

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.toml"))
LIGHT_MODELS = ("resnet18", "resnet34", "mobilenet_v2")  # everything else is @heavy

runner = CliRunner()
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def cited_params(text: str) -> tuple[float, float]:
    """The ``# params:`` count a recipe cites and its tolerance (see module docstring)."""
    m = re.search(r"^#\s*params:\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*([KMG]?)\s*$", text, re.M)
    if m is None:
        raise ValueError("no '# params: N' line")
    number, unit = m.group(1).replace(",", ""), _UNITS[m.group(2)]
    decimals = len(number.partition(".")[2])
    tolerance = 0.5 * 10.0**-decimals * unit
    t = re.search(r"^#\s*tolerance:\s*([0-9.]+)\s*([KMG]?)\s*$", text, re.M)
    if t is not None:
        tolerance = float(t.group(1)) * _UNITS[t.group(2)]
    return float(number) * unit, tolerance


def _param(path: Path):
    model = tomllib.loads(path.read_text()).get("model")
    marks = () if model in LIGHT_MODELS else (pytest.mark.heavy,)
    return pytest.param(path, id=path.stem, marks=marks)


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env={"COLUMNS": "250", **(env or {})})


def summarize_json(*args: str) -> dict:
    result = invoke("summarize", *args, "--json", "--input-size", "64")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- shipped recipes --------------------------------------------------------------------

def test_recipes_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    for expected in ("se_resnet50", "se_resnet50_pre", "se_resnet50_post", "se_resnet50_identity",
                     "se_resnet50_stage1", "se_resnet50_stage2", "se_resnet50_stage3",
                     "cbam_resnet50", "sknet50", "dy_resnet18", "se_resnet18_late",
                     "afp_resnet18", "dualpool_resnet18", "eca_resnet50", "gc_resnet50", "gc_resnet50_c3c5"):
        assert expected in names


def test_cited_params_parser() -> None:
    assert cited_params("# params: 28.1M\n") == (28.1e6, pytest.approx(0.05e6))
    assert cited_params("# x\n# params: 28.09M\n") == (pytest.approx(28.09e6), pytest.approx(5e3))
    assert cited_params("# params: 27,562,140\n") == (27562140, 0.5)
    assert cited_params("# params: 26.4M\n# tolerance: 0.1M\n") == (26.4e6, pytest.approx(1e5))
    with pytest.raises(ValueError):
        cited_params("# parameters: 28.1M")


@pytest.mark.parametrize("path", [_param(p) for p in SHIPPED])
def test_recipe_header_cites_its_source(path: Path) -> None:
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert lines[0].startswith("# "), "a recipe opens with a comment citing its source"
    assert ("table" in header.lower() and "arxiv.org" in header) or "blog post" in header
    cited_params(header)  # raises without a '# params:' line


@pytest.mark.parametrize("path", [_param(p) for p in SHIPPED])
def test_recipe_parameter_count_matches_citation(path: Path) -> None:
    expected, tolerance = cited_params(path.read_text())
    data = summarize_json("--recipe", str(path))
    got = data["total"]["params_after"]
    assert abs(got - expected) <= tolerance, f"{path.name}: counted {got:,}, cites {expected:,.0f} ± {tolerance:,.0f}"
    assert data["changes"], "the recipe changed nothing"
    assert data["model"] == tomllib.loads(path.read_text())["model"]


# --- comparison table -------------------------------------------------------------------

LIGHT = [RECIPES / "se_resnet18_late.toml", RECIPES / "dualpool_resnet18.toml"]


def test_several_recipes_print_one_comparison_table() -> None:
    counts = [cited_params(p.read_text())[0] for p in LIGHT]  # exact counts
    result = invoke("summarize", "--recipe", str(LIGHT[0]), "--recipe", str(LIGHT[1]), "--input-size", "64")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("recipes compared") == 1
    for path in LIGHT:
        assert path.stem in result.stdout
    assert "12.21M" in result.stdout and "11.86M" in result.stdout  # both totals, one table

    data = summarize_json("--recipe", str(LIGHT[0]), "--recipe", str(LIGHT[1]))
    assert [row["source"] for row in data["recipes"]] == [str(p) for p in LIGHT]
    assert [row["total"]["params_after"] for row in data["recipes"]] == counts


def test_recipe_directory_compares_its_files(tmp_path: Path) -> None:
    for path in LIGHT:
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "notes.txt").write_text("not a recipe")
    data = summarize_json("--recipe", str(tmp_path))
    assert [Path(row["source"]).name for row in data["recipes"]] == sorted(p.name for p in LIGHT)


# --- validation errors ------------------------------------------------------------------

R18 = 'model = "resnet18"\n'
BAD = {
    # name: (recipe text, substrings the one error line must contain)
    "toml_syntax": (R18 + '[[insert]]\nattn = "se\nlayers = "all"\n', ["invalid TOML", "line 3"]),
    "unknown_top_key": ('modle = "resnet18"\n[[insert]]\nattn = "se"\n',
                        ["unknown key 'modle'", "did you mean: model"]),
    "unknown_rule_key": (R18 + '[[insert]]\nattn = "se"\nlayer = "layer3"\n',
                         ["rule 1", "unknown key 'layer'", "did you mean: layers"]),
    "unknown_param": (R18 + '[[insert]]\nattn = "se"\nparams = { reductio = 8 }\n',
                      ["rule 1", "'reductio'", "did you mean: reduction"]),
    "layers_not_string": (R18 + '[[insert]]\nattn = "se"\nlayers = 3\n', ["rule 1", "layers must be a string"]),
    "param_string": (R18 + '[[insert]]\nattn = "se"\nparams = { reduction = "8" }\n',
                     ["rule 1", "params.reduction must be an integer"]),
    "param_float": (R18 + '[[insert]]\nattn = "se"\nparams = { reduction = 8.5 }\n',
                    ["rule 1", "reduction must be int", "8.5"]),
    "param_bool": (R18 + '[[insert]]\nattn = "se"\nparams = { reduction = true }\n',
                   ["rule 1", "reduction must be int"]),
    "param_range": (R18 + '[[insert]]\nattn = "se"\nparams = { reduction = 0 }\n',
                    ["rule 1", "reduction must be >= 1"]),
    "params_not_table": (R18 + '[[insert]]\nattn = "se"\nparams = 8\n', ["rule 1", "params must be a table"]),
    "init_not_string": (R18 + 'init = 1\n[[insert]]\nattn = "se"\n', ["init must be a string"]),
    "seed_not_int": (R18 + 'seed = "x"\n[[insert]]\nattn = "se"\n', ["seed must be an integer"]),
    "unknown_init": (R18 + 'init = "keep"\n[[insert]]\nattn = "se"\n', ["init must be one of", "'keep'"]),
    "unknown_head": (R18 + 'head = "dual"\n', ["unknown head 'dual'", "dual-pool"]),
    "missing_attn": (R18 + '[[insert]]\nlayers = "layer3"\n', ["rule 1", "missing key 'attn'"]),
    "unknown_kind": (R18 + '[[insert]]\nattn = "se"\n[[insert]]\nattn = "cbma"\n',
                     ["rule 2", "attn", "'cbma'", "did you mean: cbam"]),
    "bad_layer_spec": (R18 + '[[insert]]\nattn = "se"\nlayers = "layer1::layer2"\n',
                       ["rule 1", "layers", "'layer1::layer2'"]),
    "position_for_replace_kind": (R18 + '[[insert]]\nattn = "dynconv"\nposition = "pre"\n',
                                  ["rule 1", "takes no position", "'pre'"]),
    "unknown_position": (R18 + '[[insert]]\nattn = "se"\nposition = "sideways"\n',
                         ["rule 1", "unknown position 'sideways'", "standard"]),
    "unknown_layer": (R18 + '[[insert]]\nattn = "se"\nlayers = "layer3,layer5"\n',
                      ["rule 1", "layers", "unknown layer 'layer5'", "layer1"]),
    "block_of_other_model": (R18 + '[[insert]]\nattn = "se"\nlayers = "layer4.2"\n',
                             ["rule 1", "layers", "unknown layer 'layer4.2'"]),
    "range_selects_nothing": (R18 + '[[insert]]\nattn = "se"\nlayers = "layer3:layer1"\n',
                              ["rule 1", "layers", "reversed"]),
    "same_slot_twice": (R18 + '[[insert]]\nattn = "se"\nlayers = "layer2:"\n'
                        '[[insert]]\nattn = "cbam"\nposition = "standard"\nlayers = "layer3"\n',
                        ["rule 2", "layers 'layer3'", "standard position of layer3.0", "rule 1"]),
    "same_conv_twice": (R18 + '[[insert]]\nattn = "sk"\nlayers = "layer2"\n'
                        '[[insert]]\nattn = "dynconv"\nlayers = "layer2.1:layer3"\n',
                        ["rule 2", "layers 'layer2.1:layer3'", "layer2.1.conv1", "rule 1"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_recipe_is_one_line_naming_file_rule_and_key(name: str, tmp_path: Path) -> None:
    text, expected = BAD[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    out = tmp_path / "out.pt"
    result = invoke("insert", "--recipe", str(path), "-o", str(out), "--input-size", "64")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), "not a clean exit: a bug, not a user error"
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0], lines[0]
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert result.stdout == ""
    assert not out.exists() and not list(tmp_path.glob(".out.pt.*")), "partial output left behind"


def test_recipe_validation_needs_no_torch(tmp_path: Path) -> None:
    """Rule errors are found from the TOML alone, before torch (or a model) is loaded."""
    path = tmp_path / "bad.toml"
    path.write_text(BAD["param_string"][0])
    code = (
        "import sys\n"
        "from attnsurgeon.errors import UsageError\n"
        "from attnsurgeon.recipe import load_recipe\n"
        f"try:\n    load_recipe({str(path)!r})\nexcept UsageError as e:\n    print(e)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, torch_loaded = out.stdout.strip().splitlines()
    assert "params.reduction" in message and torch_loaded == "False"


# --- command line wins over the recipe ----------------------------------------------------

def _write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SE_R18 = '[[insert]]\nattn = "se"\nlayers = "layer4"\n'


def test_model_argument_wins_over_recipe(tmp_path: Path) -> None:
    path = _write(tmp_path, R18 + SE_R18)
    data = summarize_json("resnet34", "--recipe", str(path))
    assert data["model"] == "resnet34" and data["recipe"]["model"] == "resnet34"
    assert data["total"]["params_before"] == 21797672


def test_init_option_wins_over_recipe(tmp_path: Path) -> None:
    paper = _write(tmp_path, R18 + 'init = "paper"\n' + SE_R18, "paper.toml")
    preserve = _write(tmp_path, R18 + 'init = "preserve"\n' + SE_R18, "preserve.toml")
    assert summarize_json("--recipe", str(preserve))["recipe"]["init"] == "preserve"
    data = summarize_json("--recipe", str(paper), "--init", "preserve")
    assert data["recipe"]["init"] == "preserve" and data["preservation"]["relative"] < 1e-4
    data = summarize_json("--recipe", str(preserve), "--init", "paper")
    assert data["recipe"]["init"] == "paper" and data["preservation"]["relative"] > 1e-2


def test_weights_options_win_over_recipe(tmp_path: Path) -> None:
    # If the recipe's weights won, attnsurgeon would fetch (or fail to fetch) ImageNet weights.
    path = _write(tmp_path, R18 + 'weights = "IMAGENET1K_V1"\n' + SE_R18)
    out = tmp_path / "a.pt"
    result = invoke("insert", "--recipe", str(path), "--weights", "none", "-o", str(out), "--input-size", "64")
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["weights"] == "none"

    import torchvision

    wfile = tmp_path / "w18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wfile)
    out = tmp_path / "b.pt"
    result = invoke("insert", "--recipe", str(path), "--weights-file", str(wfile), "-o", str(out),
                    "--input-size", "64")
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["weights"] == "file:w18.pth"


@pytest.mark.parametrize("command", ["insert", "summarize"])
def test_help_says_command_line_wins(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "win over the recipe" in text
