"""The CLI end to end: every command, the checkpoint round trip, and every user error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torchvision

import attnsurgeon
from attnsurgeon import checkpoint
from attnsurgeon.surgery import apply


def user_error(result, match: str) -> None:
    """Exit 2, one line on stderr that contains ``match``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def weights18(tmp_path):
    """A resnet18 state_dict with non-default BN statistics, as a user's file."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # train mode: running stats move
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_help_and_python_m():
    out = subprocess.run([sys.executable, "-m", "attnsurgeon", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "insert" in out.stdout and "export-onnx" in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["kinds"], ["kinds", "--json"], ["insert", "--help"]])
def test_fast_commands_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from attnsurgeon.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_kinds_lists_every_kind_with_params(cli):
    result = cli("kinds", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    names = {k["name"]: k for k in data["kinds"]}
    assert {"se", "cbam", "sk", "dynconv", "afp", "eca", "coord", "gc"} <= set(names)
    assert names["se"]["params"][0] == {**names["se"]["params"][0], "name": "reduction", "default": 16}
    assert "arxiv.org/abs/1709.01507" in names["se"]["paper"]
    text = cli("kinds").stdout
    assert "reduction=16" in text and "Squeeze-and-Excitation" in text


def test_blocks_table_and_json(cli):
    result = cli("blocks", "resnet50")
    assert result.exit_code == 0 and "layer3.5" in result.stdout and "Bottleneck" in result.stdout
    data = json.loads(cli("blocks", "resnet18", "--json").stdout)
    blocks = {b["name"]: b for b in data["blocks"]}
    assert len(blocks) == 8
    assert blocks["layer2.0"] == {
        **blocks["layer2.0"], "in_channels": 64, "out_channels": 128, "stride": 2,
        "downsample": True, "spatial_convs": ["conv1", "conv2"],
    }
    assert blocks["layer2.0"]["slots"] == ["standard", "pre", "mid", "post", "identity"]
    assert blocks["layer2.0"]["alias"] == "stage2" and blocks["layer2.0"]["mid_channels"] == 128


@pytest.mark.parametrize(
    "model, blocks", [("resnet34", 16), ("resnet101", 33), ("resnet152", 50), ("resnext50_32x4d", 16),
                      ("resnext101_32x8d", 33), ("resnext101_64x4d", 33), ("wide_resnet50_2", 16),
                      ("wide_resnet101_2", 33)],
)
def test_blocks_every_resnet_family_member(cli, model, blocks):
    data = json.loads(cli("blocks", model, "--json").stdout)
    assert len(data["blocks"]) == blocks
    assert data["blocks"][-1]["out_channels"] == (512 if model == "resnet34" else 2048)


def test_insert_summarize_load_round_trip(cli, tmp_path, weights18):
    wfile, original = weights18
    out = tmp_path / "r18.pt"
    result = cli("insert", "resnet18", "--attn", "se", "--position", "identity", "--layers", "layer3:",
                 "--param", "reduction=8", "--weights-file", str(wfile), "--seed", "7",
                 "--input-size", "64", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is JSON only
    assert data["total"]["params_added"] == sum(c["params_added"] for c in data["changes"]) > 0
    assert [c["block"] for c in data["changes"]] == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    # the file: safe to load, with the contract's fields
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "attnsurgeon" and raw["model"] == "resnet18"
    assert raw["recipe"]["insert"] == [{"attn": "se", "layers": "layer3:", "position": "identity",
                                        "params": {"reduction": 8, "variant": "standard", "gate": "sigmoid"}}]
    assert set(raw["versions"]) == {"attnsurgeon", "torch", "torchvision"}
    # load() rebuilds the very model: same as doing the surgery by hand
    expected = torchvision.models.resnet18()
    expected.load_state_dict(original.state_dict())
    apply(expected, "se", position="identity", layers="layer3:", params={"reduction": 8}, seed=7)
    loaded = attnsurgeon.load(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected.eval()(x))
    # summarize FILE.pt reports the same numbers and how the file was made
    summary = cli("summarize", str(out), "--input-size", "64", "--json")
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.stdout)["total"] == data["total"]
    text = cli("summarize", str(out), "--input-size", "64")
    assert "se at identity on layer3:" in text.stderr and "layer4" in text.stdout


def test_save_load_bit_identical(tmp_path, x64):
    from attnsurgeon.recipe import Recipe, make_rule

    model = torchvision.models.resnet18()
    recipe = Recipe(model="resnet18", rules=(make_rule("se", position="post", where="t"),))
    from attnsurgeon.surgery import apply_recipe

    apply_recipe(model, recipe)
    path = tmp_path / "m.pt"
    checkpoint.save(path, model, model_name="resnet18", recipe=recipe)
    again = checkpoint.load(path)
    with torch.no_grad():
        assert torch.equal(model.eval()(x64), again.eval()(x64))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left


def test_summarize_dry_run_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("summarize", "resnet50", "--attn", "se", "--position", "pre", "--layers", "layer2:layer3",
                 "--input-size", "64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["name"]: r for r in data["groups"]}
    assert rows["layer1"]["params_added"] == 0 and rows["layer4"]["params_added"] == 0
    assert rows["layer2"]["params_added"] > 0 and rows["layer3"]["macs_added"] > 0
    assert data["total"]["macs_after"] > data["total"]["macs_before"]
    assert list(tmp_path.iterdir()) == []


def test_summary_table_text(cli):
    result = cli("summarize", "resnet18", "--attn", "se", "--input-size", "64")
    assert result.exit_code == 0
    for word in ("params", "MACs", "layer4", "total", "SqueezeExcite", "preservation"):
        assert word in result.stdout


def test_force_overwrites(cli, tmp_path):
    out = tmp_path / "a.pt"
    assert cli("insert", "resnet18", "--attn", "se", "--input-size", "64", "-o", str(out)).exit_code == 0
    user_error(cli("insert", "resnet18", "--attn", "se", "-o", str(out)), "exists; use --force")
    assert cli("insert", "resnet18", "--attn", "se", "--input-size", "64", "-o", str(out), "--force").exit_code == 0


ERRORS = [
    (["insert", "resnet5O", "--attn", "se"], "unknown model 'resnet5O' (did you mean: resnet50"),
    (["insert", "resnet18", "--attn", "sse"], "unknown attention kind 'sse' (did you mean: se"),
    (["insert", "resnet18", "--attn", "se", "--layers", "layer9"], "unknown layer 'layer9'"),
    (["insert", "resnet18", "--attn", "se", "--layers", "layer4:layer2"], "reversed"),
    (["insert", "resnet18", "--attn", "se", "--layers", ""], "empty layer spec"),
    # the user's text comes back verbatim: rich would print ":b:" as an emoji
    (["insert", "resnet18", "--attn", "se", "--layers", "a:b:c"], "got 'a:b:c'"),
    (["insert", "resnet18", "--attn", "se", "--position", "middle"], "unknown position 'middle'"),
    (["insert", "resnet18", "--attn", "dynconv", "--position", "pre"], "takes no position"),
    (["insert", "resnet18", "--attn", "se", "--param", "reduction=zero"], "reduction must be int, got 'zero'"),
    (["insert", "resnet18", "--attn", "se", "--param", "reduction=0"], "reduction must be >= 1"),
    # a typo for kernels=4 is refused at once instead of exhausting memory for minutes
    (["insert", "resnet18", "--attn", "dynconv", "--param", "kernels=100000"], "kernels must be <= 64"),
    (["insert", "resnet18", "--attn", "eca", "--param", "b=1e9"], "b must be <= 64"),
    (["insert", "resnet18", "--attn", "se", "--param", "ratio=4"], "takes no parameter 'ratio'"),
    (["insert", "resnet18", "--attn", "se", "--param", "reduction"], "expected KEY=VALUE"),
    (["insert", "resnet18", "--attn", "se", "--weights", "IMAGENET9"], "has no weights 'IMAGENET9'"),
    (["insert", "resnet18", "--attn", "se", "--init", "zero"], "init must be one of paper, preserve"),
    (["insert", "resnet18", "--attn", "se", "--head", "triple"], "unknown head 'triple'"),
    (["insert", "vgg16", "--attn", "se"], "vgg16: found no supported blocks"),
    (["insert", "resnet18"], "nothing to insert"),
    (["insert", "resnet18", "--layers", "layer3"], "need --attn"),
    (["insert", "resnet18", "--attn", "se", "--weights-file", "/nonexistent.pth"], "no such file"),
    (["summarize", "/nonexistent.pt"], "no such file"),
]


@pytest.mark.parametrize("argv, message", ERRORS, ids=[m for _, m in ERRORS])
def test_user_errors(cli, tmp_path, argv, message):
    out = tmp_path / "x.pt"
    args = [*argv, "-o", str(out)] if argv[0] == "insert" else argv
    user_error(cli(*args), message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_weights_file_errors(cli, tmp_path, weights18):
    wfile, _ = weights18
    out = tmp_path / "x.pt"
    user_error(cli("insert", "resnet34", "--attn", "se", "--weights-file", str(wfile), "-o", str(out)),
               "does not fit ResNet: missing layer1.2.conv1.weight")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    user_error(cli("insert", "resnet18", "--attn", "se", "--weights-file", str(bad), "-o", str(out)),
               "is not a loadable state_dict")
    pickled = tmp_path / "model.pth"
    torch.save(torchvision.models.resnet18(), pickled)  # a whole pickled module: refused
    user_error(cli("insert", "resnet18", "--attn", "se", "--weights-file", str(pickled), "-o", str(out)),
               "is not a loadable state_dict (it holds pickled objects beyond tensors and plain data")
    assert not out.exists()


def test_weights_file_accepts_training_checkpoints(cli, tmp_path, weights18):
    _, model = weights18
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    out = tmp_path / "ok.pt"
    result = cli("insert", "resnet18", "--attn", "se", "--weights-file", str(wrapped), "--input-size", "64", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert torch.equal(torch.load(out, weights_only=True)["state_dict"]["conv1.weight"], model.conv1.weight)


@pytest.mark.heavy
def test_debug_variable_shows_traceback(tmp_path):
    env = {**__import__("os").environ, "ATTNSURGEON_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "attnsurgeon", "insert", "resnet18", "--attn", "sse", "-o",
                          str(tmp_path / "x.pt")], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr and "UsageError" in out.stderr


def test_checkpoint_rejects_foreign_files(tmp_path, cli):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    user_error(cli("summarize", str(foreign)), "not an attnsurgeon checkpoint")


def test_recipe_seed_is_used_unless_the_command_line_gives_one(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "resnet18"\nseed = 7\n[[insert]]\nattn = "se"\nlayers = "layer4.1"\n')

    def fc1(*extra: str) -> torch.Tensor:
        out = tmp_path / "m.pt"
        result = cli("insert", "--recipe", str(recipe), "--input-size", "64", "-o", str(out), "--force", *extra)
        assert result.exit_code == 0, result.output
        return torch.load(out, weights_only=True)["state_dict"]["layer4.1.attn_standard.fc1.weight"]

    def by_hand(seed: int) -> torch.Tensor:
        model = torchvision.models.resnet18()
        apply(model, "se", layers="layer4.1", seed=seed)
        return model.layer4[1].attn_standard.fc1.weight

    assert torch.equal(fc1(), by_hand(7))
    assert torch.equal(fc1("--seed", "3"), by_hand(3))


def test_error_text_in_brackets_is_printed_as_is(cli, tmp_path):
    recipe = tmp_path / "empty.toml"
    recipe.write_text('model = "resnet18"\n')
    user_error(cli("insert", "--recipe", str(recipe), "-o", str(tmp_path / "x.pt")), "no [[insert]] rule")


def test_a_checkpoint_takes_no_surgery_options(cli, tmp_path):
    out = tmp_path / "a.pt"
    assert cli("insert", "resnet18", "--attn", "se", "--input-size", "64", "-o", str(out)).exit_code == 0
    user_error(cli("summarize", str(out), "--param", "reduction=4"), "summarize FILE.pt takes no surgery options")
    user_error(cli("export-onnx", str(out), "--weights", "DEFAULT", "-o", str(tmp_path / "a.onnx")),
               "export-onnx FILE.pt takes no surgery options")


@pytest.mark.parametrize("blocks, shown", [
    (["layer1.0"], "layer1.0"),
    (["layer1.0", "layer1.1", "layer1.2"], "layer1.0-2 (3)"),
    (["layer1.0", "layer1.2"], "layer1.0, layer1.2 (2)"),  # not one run: listed, never "layer1.0-2"
    (["layer1.2", "layer2.0"], "layer1.2, layer2.0 (2)"),  # consecutive, but two stages
    (["features.8", "features.9", "features.10", "features.12", "features.13"],
     "features.8-10, features.12-13 (5)"),  # every block named, runs compressed
    # RegNet's names end in "-N": compressed as well, not listed one per line
    ([f"trunk_output.block3.block3-{i}" for i in range(4)], "trunk_output.block3.block3-0..3 (4)"),
])
def test_changes_table_block_spans(blocks, shown):
    from attnsurgeon.render import _span

    assert _span(blocks) == shown
