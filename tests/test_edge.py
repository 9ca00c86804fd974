"""The edge of the tool: what a user types is checked before torch is imported, output
that never fails on encoding or terminal width, tables that fit, ``apply()`` that checks
before it changes, and messages that name the real reason."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from test_cli import user_error
from torch import nn

import attnsurgeon
from attnsurgeon.errors import UsageError
from attnsurgeon.model_names import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_model_names_are_torchvisions():
    """The package's list (checked before torch is imported) is the installed torchvision's."""
    assert list(MODEL_NAMES) == list(torchvision.models.list_models())


# --- errors before torch ---------------------------------------------------------------

NO_TORCH_CASES = [
    (["insert", "resnet18", "--attn", "sx", "-o", "x.pt"], "--attn: unknown attention kind 'sx'"),
    (["summarize", "resnet_50", "--attn", "se"], "unknown model 'resnet_50' (did you mean: resnet50"),
    (["insert", "resnet18", "--attn", "se", "--position", "idnetity", "-o", "x.pt"], "did you mean: identity?"),
    (["insert", "resnet18", "--attn", "se", "--layers", "a:b:c", "-o", "x.pt"], "a range has one ':'"),
    (["insert", "resnet18", "--attn", "se", "--param", "reductoin=4", "-o", "x.pt"], "did you mean: reduction?"),
    (["insert", "resnet18", "--attn", "se", "--attn", "cbam", "-o", "x.pt"], "--attn given 2 times (se, cbam)"),
    (["summarize", "resnet18", "--attn", "se", "--layers", "layer1", "--layers", "layer2"], "--layers given 2 times"),
    (["insert", "resnet18", "--attn", "se", "-o", "x.onnx"], "-o: expected a .pt or .pth file"),
    (["export-onnx", "resnt18", "--attn", "se", "-o", "x.onnx"], "unknown model 'resnt18'"),
    (["summarize", "resnet18", "--attn", "se", "--latency", "--batch", "99999999999999999999"],
     "--batch must be from 1 to 4096, got 99999999999999999999"),
    (["blocks", "resnt18"], "unknown model 'resnt18'"),
    (["insert", "resnet18", "--recipe", "fifo", "-o", "x.pt"], "--recipe: fifo is not a regular file"),
    (["insert", "resnet18", "--recipe", "/dev/zero", "-o", "x.pt"], "--recipe: /dev/zero is not a regular file"),
    (["insert", "resnet18", "--attn", "se", "--weights-file", "fifo", "-o", "x.pt"],
     "--weights-file: fifo is not a regular file"),
    (["summarize", "fifo"], "fifo is not a regular file"),
    (["insert", "resnet18", "--recipe", "deep.toml", "-o", "x.pt"], "deep.toml: invalid TOML: nested too deeply"),
    (["insert", "resnet18", "--recipe", "big.toml", "-o", "x.pt"], "big.toml: larger than 1024 KiB, not a recipe"),
    (["insert", "resnet18", "--recipe", "new\nline.toml", "-o", "x.pt"], "--recipe: new\\nline.toml: no such file"),
]


def test_typos_are_reported_before_torch_is_imported(tmp_path):
    """Every case in one interpreter: one line, exit 2, and torch never imported (a FIFO
    would hang the read: the subprocess's timeout turns that into a failure)."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "deep.toml").write_text("a = " + "[" * 600 + "\n")
    (tmp_path / "big.toml").write_text("# padding\n" * 200_000)
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from attnsurgeon.cli import app\n"
        "runner = CliRunner()\n"
        f"cases = {[argv for argv, _ in NO_TORCH_CASES]!r}\n"
        "results = [(r.exit_code, r.stderr) for r in (runner.invoke(app, argv) for argv in cases)]\n"
        "print(json.dumps({'results': results, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for (argv, message), (code, stderr) in zip(NO_TORCH_CASES, data["results"], strict=True):
        assert code == 2, (argv, stderr)
        assert stderr.count("\n") == 1 and message in stderr, (argv, stderr)
    assert data["torch"] is False, "torch was imported"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.toml", "deep.toml", "fifo"]


def test_recipe_nested_too_deeply_is_one_line_in_process(cli, tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 600 + "\n")
    user_error(cli("insert", "--recipe", str(deep), "-o", str(tmp_path / "x.pt")), "invalid TOML: nested too deeply")
    # whatever the recursion limit (libraries raise it; the parser then reached the end)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        user_error(cli("insert", "--recipe", str(deep), "-o", str(tmp_path / "x.pt")),
                   "invalid TOML: nested too deeply")
    finally:
        sys.setrecursionlimit(limit)


# --- output: encoding, width, removal on failure -----------------------------------------


@pytest.mark.heavy  # a subprocess, a whole model or an ONNX export: seconds
def test_ascii_stdout_does_not_fail_after_writing(tmp_path):
    env = {**ENV, "PYTHONIOENCODING": "ascii"}
    out = subprocess.run([sys.executable, "-m", "attnsurgeon", "insert", "resnet18", "--attn", "se",
                          "--input-size", "32", "-o", "se.pt"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "max |dlogits|" in out.stdout  # the Greek Delta spelt in ASCII
    assert (tmp_path / "se.pt").is_file()


def test_a_failure_after_writing_removes_the_file(cli, tmp_path, monkeypatch):
    import attnsurgeon.commands

    def broken(console, data):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(attnsurgeon.commands, "print_summary", broken)
    result = cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(tmp_path / "se.pt"))
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("columns", ["0", "-3", "junk"])
def test_a_nonsense_columns_still_prints(cli, monkeypatch, columns):
    """Results and messages: a stderr console made while COLUMNS was 0 had width 0 and printed
    nothing, and a later test's warnings vanished with it (messages now get a console each)."""
    monkeypatch.setenv("COLUMNS", columns)
    for argv in (["kinds"], ["blocks", "resnet18"]):
        result = cli(*argv)
        assert result.exit_code == 0 and len(result.stdout.splitlines()) > 10, (argv, result.stdout)
    from attnsurgeon.render import messages_console

    assert messages_console().width >= 40
    result = cli("insert", "resnet18", "--attn", "nope", "-o", "x.pt")
    assert result.exit_code == 2 and "error: " in result.stderr and "nope" in result.stderr


def test_width_follows_the_terminal_when_piped(monkeypatch):
    from attnsurgeon.render import terminal_width

    def size(fd: int) -> os.terminal_size:
        if fd != 2:
            raise OSError("not a terminal")
        return os.terminal_size((100, 40))

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", size)
    assert terminal_width() == 100  # stdout piped, stderr still the terminal
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: (_ for _ in ()).throw(OSError()))
    assert terminal_width() == 80  # no terminal at all


@pytest.mark.heavy  # a subprocess, a whole model or an ONNX export: seconds
def test_tables_fit_80_columns_and_keep_every_number(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("blocks", "regnet_y_400mf")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    blocks = json.loads(cli("blocks", "regnet_y_400mf", "--json").stdout)["blocks"]
    for b in blocks:  # every block's row still shows all its numbers, uncut
        (row,) = [line for line in lines if f" {b['name']} " in line]
        cells = [c.strip() for c in row.split("│")]
        for key in ("in_channels", "mid_channels", "out_channels", "stride"):
            assert str(b[key]) in cells, (b["name"], key, row)
    summary = cli("summarize", "regnet_y_400mf", "--attn", "cbam", "--input-size", "32")
    assert summary.exit_code == 0, summary.output
    table = summary.stdout.split("preservation")[0]
    assert max(len(line) for line in table.splitlines()) <= 80 and "…" not in table
    data = json.loads(cli("summarize", "regnet_y_400mf", "--attn", "cbam", "--input-size", "32", "--json").stdout)
    from attnsurgeon.render import si

    for row in data["groups"]:
        assert f" {row['name']} " in table and f" {si(row['params_before'])} " in table
    assert "trunk_output.block3.block3-0..5 (6)" in table  # one line per stage, as ResNet's layer3.0-5 (6)


# --- checkpoints, warnings ---------------------------------------------------------------


def test_same_command_writes_the_same_bytes(cli, tmp_path):
    digests = []
    for name in ("a.pt", "b.pt"):
        result = cli("insert", "resnet18", "--attn", "se", "--layers", "layer4", "--input-size", "32",
                     "-o", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_outputs_too_small_to_judge_are_said_to_be(cli):
    result = cli("summarize", "mobilenet_v2", "--attn", "se", "--layers", "stage4", "--input-size", "64")
    assert result.exit_code == 0, result.output
    assert "too small to judge preservation" in result.stderr
    assert "NOT JUDGED" in result.stdout
    fine = cli("summarize", "resnet18", "--attn", "se", "--layers", "layer4", "--input-size", "32")
    assert "too small" not in fine.stderr and "NOT JUDGED" not in fine.stdout


class _Tiny(nn.Module):
    """A classifier whose logits are about 1e-9, as random MobileNets' are."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)) * self.scale


@pytest.mark.heavy  # a subprocess, a whole model or an ONNX export: seconds
def test_onnx_parity_of_tiny_outputs_is_also_relative(tmp_path):
    from attnsurgeon.onnx_export import export_onnx, verify_onnx

    torch.manual_seed(0)
    model = _Tiny(1e-9).eval()
    summary = export_onnx(model, tmp_path / "tiny.onnx", input_size=32)
    assert summary["verification"]["passed"] and summary["verification"]["small_outputs"] < 1e-4
    other = copy.deepcopy(model)
    other.scale = 2e-9  # twice the outputs: the absolute error (1e-9) is far below atol
    result = verify_onnx(other, tmp_path / "tiny.onnx", input_size=32, atol=1e-4)
    assert all(r["max_abs"] < 1e-4 for r in result["runs"])
    assert result["passed"] is False


@pytest.mark.heavy  # an ONNX export: seconds
def test_onnx_parity_of_large_outputs_allows_float32_rounding(tmp_path):
    """Outputs of 1e4 (trained logits are tens) are rounded by more than atol in float32:
    a run passes within atol + 1e-5 x max|output|, and a larger relative error still fails."""
    from attnsurgeon.onnx_export import export_onnx, verify_onnx

    torch.manual_seed(0)
    model = _Tiny(1e4).eval()
    export_onnx(model, tmp_path / "big.onnx", input_size=32)
    other = copy.deepcopy(model)
    other.scale = 1e4 * (1 + 3e-6)  # off by 3e-6 of each output: float32 rounding's size, over atol
    result = verify_onnx(other, tmp_path / "big.onnx", input_size=32, atol=1e-4)
    assert result["passed"] and all(r["max_abs"] > 1e-4 for r in result["runs"]), result["runs"]
    other.scale = 1e4 * (1 + 1e-4)
    result = verify_onnx(other, tmp_path / "big.onnx", input_size=32, atol=1e-4)
    assert result["passed"] is False


def test_a_rule_that_more_than_doubles_the_model_is_warned_about(cli):
    result = cli("summarize", "resnet18", "--attn", "dynconv", "--param", "kernels=8", "--input-size", "32")
    assert result.exit_code == 0, result.output
    assert "more than the model's own" in result.stderr
    small = cli("summarize", "resnet18", "--attn", "se", "--input-size", "32")
    assert "more than the model's own" not in small.stderr


def test_offline_weights_print_one_line(cli, tmp_path, monkeypatch):
    """torch.hub writes "Downloading: ..." before it connects; offline that line must not
    precede the one error line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = cli("insert", "resnet18", "--attn", "se", "--weights", "DEFAULT", "--input-size", "32",
                 "-o", str(tmp_path / "se.pt"))
    user_error(result, "--weights DEFAULT: could not get https://download.pytorch.org/models/resnet18")
    assert "Downloading" not in result.output


# --- apply() -----------------------------------------------------------------------------


@pytest.mark.parametrize("build, kwargs, error, message", [
    (torchvision.models.resnet18, {"head": "dual_pool"}, UsageError,
     "unknown head 'dual_pool' (did you mean: dual-pool?)"),
    (torchvision.models.mobilenet_v2, {"head": "dual-pool"}, UsageError,
     "MobileNetV2 has no supported classifier head"),
    (torchvision.models.resnet18, {"layers": None}, TypeError, "apply: layers must be str, got NoneType"),
    (torchvision.models.resnet18, {"params": [("reduction", 4)]}, TypeError, "apply: params must be Mapping"),
    (torchvision.models.resnet18, {"seed": True}, TypeError, "apply: seed must be int"),
    (torchvision.models.resnet18, {"init": "presrve"}, UsageError, "init must be one of paper, preserve"),
])
def test_apply_checks_everything_before_changing_the_model(build, kwargs, error, message):
    model = build()
    before = str(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as e:
        attnsurgeon.apply(model, "se", **kwargs)
    assert message in str(e.value)
    assert str(model) == before[0]  # no module inserted
    assert model.state_dict().keys() == before[1].keys()


def test_apply_wants_a_model_not_its_name():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str; build it first"):
        attnsurgeon.apply("resnet18", "se")


# --- messages that name the real reason ----------------------------------------------------


@pytest.mark.parametrize("model, message", [
    ("shufflenet_v2_x0_5", "torchvision.models.shufflenetv2.InvertedResidual, another class than "
                           "MobileNetV2/V3's InvertedResidual"),
    ("quantized_resnet18", "QuantizableBasicBlock, a subclass of ResNet's BasicBlock with its own forward"),
])
def test_unsupported_blocks_say_why(cli, model, message):
    user_error(cli("blocks", model), message)


def test_no_stage0_block_is_said_so(cli):
    user_error(cli("summarize", "resnet18", "--attn", "se", "--layers", "stage0"),
               "--layers: the model has no stage0 block (none works at output stride 2); its blocks are in "
               "stage1, stage2, stage3, stage4")


def test_blocks_takes_a_checkpoint(cli, tmp_path):
    out = tmp_path / "se.pt"
    assert cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(out)).exit_code == 0
    result = cli("blocks", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18" and data["blocks"][0]["name"] == "layer1.0"
    text = cli("blocks", str(out))
    assert text.exit_code == 0 and "resnet18 after surgery" in text.stdout


def test_words_counted_right(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the footer on one line
    one = cli("summarize", "resnet18", "--attn", "se", "--layers", "layer4.1", "--input-size", "32")
    assert "1 module inserted or replaced" in one.stdout
    mb = cli("blocks", "mobilenet_v2")
    assert "e.g. stage" in mb.stdout and "layer3" not in mb.stdout  # its own stage names
    regnet = cli("blocks", "regnet_y_400mf")
    assert "e.g. trunk_output.block" in regnet.stdout and "layer3" not in regnet.stdout


def test_builtin_se_warning_once_and_not_about_training(cli, tmp_path):
    result = cli("insert", "mobilenet_v3_small", "--attn", "eca", "--position", "builtin", "--init", "preserve",
                 "--input-size", "64", "-o", str(tmp_path / "e.pt"))
    assert result.exit_code == 0, result.output
    assert result.output.count("SqueezeExcitation") == 1 and "trained" not in result.output


def test_sk_paths_take_the_convs_kernel(cli):
    text = cli("kinds").stdout
    assert "path m is a 3x3" not in text and "the replaced conv's kernel" in text


def test_durations_have_units():
    from attnsurgeon.render import duration

    assert (duration(0.0123), duration(12.3), duration(1940.0)) == ("12.3 us", "12.3 ms", "1.94 s")


def test_stage_recipes_follow_the_aliases():
    for n in (1, 2, 3):
        text = (ROOT / "recipes" / f"se_resnet50_stage{n}.toml").read_text()
        assert f'layers = "layer{n}"' in text  # layerN is the alias stageN on a ResNet
        assert f"stage {n + 1}" in text  # the paper's numbering, kept in the comment
    assert not (ROOT / "recipes" / "se_resnet50_stage4.toml").exists()
