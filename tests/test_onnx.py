"""ONNX export: every kind and position exports with a dynamic batch and matches PyTorch.

Each case exports once. Besides the verification ``export_onnx`` reports (checker, batch 1
and 3), each case runs the file in onnxruntime on its own at batch 2, a batch size the
export never saw. Kinds go on two blocks, ``layer3.1`` and ``layer4.0`` (one with a
downsample shortcut), of a ResNet-18 with one block in the other stages (:func:`short_resnet`):
the rest of the model only adds export time.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

import attnsurgeon
from attnsurgeon import export_onnx
from attnsurgeon.errors import UsageError
from attnsurgeon.kinds import KINDS, POSITIONS
from attnsurgeon.onnx_export import VerificationError, print_export_summary
from attnsurgeon.surgery import apply

ATOL = 1e-4
LAYERS = "layer3.1:layer4.0"
# Every kind at its default position, and every position with two kinds of different
# shapes (a channel gate and a spatial one): positions are wired in the block, the same
# for every kind, and each export costs seconds. (builtin: resnet18 has no built-in SE;
# tests/test_families.py exports it on MobileNetV3.)
SLOTS = [p for p in POSITIONS if p != "builtin"]
CASES = sorted({(name, spec.default_position) for name, spec in KINDS.items()}
               | {(k, p) for k in ("se", "cbam") for p in SLOTS}, key=lambda c: (c[0], c[1] or ""))


@torch.library.custom_op("attnsurgeon_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Mystery(nn.Module):
    """A module whose operator has no ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mystery(x)


class Cheat(nn.Module):
    """Adds 1 only while being exported: the file cannot match PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if torch.compiler.is_exporting() else x


def tiny(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), middle, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def short_resnet(num_classes: int = 1000) -> ResNet:
    """torchvision's ResNet-18 with blocks (1, 1, 2, 1) per stage instead of (2, 2, 2, 2): the
    same family, strides and ``layer3.1``/``layer4.0``, a third less to export (2.6 s against
    3.6 s a file here)."""
    return ResNet(BasicBlock, [1, 1, 2, 1], num_classes=num_classes)


def _perturb_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine, so eval-mode norms are really tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def ort_errors(model: nn.Module, path, batches=(2,), size: int = 64, check: bool = False) -> list[float]:
    """Max |onnxruntime - PyTorch eval| per batch size, computed without attnsurgeon."""
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    errors = []
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == expected.shape
        errors.append(float(np.abs(got - expected).max()))
    return errors


def check_case(model: nn.Module, path, classes: int = 1000, check: bool = False) -> dict:
    data = export_onnx(model, path, input_size=64, atol=ATOL)
    assert data["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]
    assert data["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", classes]}]
    v = data["verification"]
    assert v["passed"] and v["checker"] == "passed"
    assert [r["batch"] for r in v["runs"]] == [1, 3]
    assert all(r["max_abs"] < ATOL for r in v["runs"])
    assert max(ort_errors(model, path, check=check)) < ATOL
    assert data["file_size"] == path.stat().st_size and data["nodes"] > 0
    return data


@pytest.mark.heavy
@pytest.mark.parametrize("kind", sorted(set(KINDS) - {"odconv"}))
def test_dynamic_hw_traced_where_a_map_is_1x1(kind, tmp_path):
    """Traced at 32x32 (layer4 at 1x1) and run at larger sizes: broadcasts onto a map that was
    1x1 at the trace must not keep that shape in the graph. ODConv is checked on a smaller net
    in tests/test_odconv.py (its layer4 here took 30 s of export)."""
    torch.manual_seed(0)
    model = short_resnet(num_classes=10)
    apply(model, kind, layers="layer4")
    data = export_onnx(model.eval(), tmp_path / "m.onnx", input_size=32, dynamic_hw=True, atol=ATOL)
    assert data["verification"]["passed"] and len({tuple(r["shape"]) for r in data["verification"]["runs"]}) > 1


@pytest.mark.parametrize("kind, position", CASES, ids=[f"{k}-{p}" if p else k for k, p in CASES])
@pytest.mark.heavy
def test_every_kind_exports_with_dynamic_batch(tmp_path, kind, position):
    torch.manual_seed(0)
    model = short_resnet()
    apply(model, kind, position=position, layers=LAYERS, seed=0)
    _perturb_norms(model)
    check_case(model, tmp_path / "m.onnx")


@pytest.mark.heavy
def test_dual_pool_head_exports(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    apply(model, head="dual-pool", seed=0)
    _perturb_norms(model)
    check_case(model, tmp_path / "m.onnx", classes=10)


@pytest.mark.heavy
def test_bottleneck_se_resnet50_exports(tmp_path):
    model = torchvision.models.resnet50()
    apply(model, "se", position="standard", seed=0)
    _perturb_norms(model)
    check_case(model, tmp_path / "m.onnx", check=True)


def test_api_restores_train_mode_and_names_culprit(tmp_path):
    model = tiny(nn.Identity()).train()
    export_onnx(model, tmp_path / "t.onnx", input_size=32)
    assert model.training
    bad = tiny(nn.Sequential(nn.ReLU(), Mystery()))
    with pytest.raises(UsageError, match=r"module '1\.1' \(Mystery\), operator attnsurgeon_test\.mystery"):
        export_onnx(bad, tmp_path / "bad.onnx", input_size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["t.onnx"]  # no file, no temp file


def test_api_traces_activations_out_of_place_and_restores_their_flags(tmp_path):
    """The exporter sees ReLU6(inplace=True) out of place (its in-place form costs MobileNetV2
    a third of its export time); the model keeps its flags, and the file still matches it."""
    seen = []
    relu6, relu = nn.ReLU6(inplace=True), nn.ReLU(inplace=False)
    for m in (relu6, relu):
        m.register_forward_pre_hook(lambda m, args: seen.append((m, m.inplace, torch.compiler.is_exporting())))
    data = export_onnx(tiny(nn.Sequential(relu6, relu)), tmp_path / "t.onnx", input_size=32)
    assert data["verification"]["passed"]
    traced = {(type(m).__name__, flag) for m, flag, exporting in seen if exporting}
    assert traced == {("ReLU6", False), ("ReLU", False)}
    assert {(type(m).__name__, flag) for m, flag, exporting in seen if not exporting} >= {("ReLU6", True)}
    assert relu6.inplace is True and relu.inplace is False
    assert "Clip" in {n.op_type for n in onnx.load(str(tmp_path / "t.onnx")).graph.node}
@pytest.mark.heavy
def test_api_failed_verification(tmp_path, monkeypatch):
    path = tmp_path / "c.onnx"
    with pytest.raises(VerificationError, match="FAILED verification.*no file written") as e:
        export_onnx(tiny(Cheat()), path, input_size=32)
    assert not e.value.kept and not e.value.summary["verification"]["passed"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VerificationError, match="FAILED verification.*kept"):
        export_onnx(tiny(Cheat()), path, input_size=32, keep_failed=True)
    assert [p.name for p in tmp_path.iterdir()] == ["c.onnx"]

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(VerificationError, match="onnx.checker: Nodes in a graph must be topologically sorted"):
        export_onnx(tiny(nn.Identity()), tmp_path / "d.onnx", input_size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["c.onnx"]


class Cancelling(nn.Module):
    """``conv(x + 1e4) - conv(1e4)``: float32 rounds the large terms, each runtime its own way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.full_like(x, 1e4)
        return self.conv(x + big) - self.conv(big)


def test_rounding_beyond_the_tolerance_is_judged_against_float64(tmp_path):
    """PyTorch and onnxruntime both round this model's float32 sums by more than the tolerance
    allows between them, and both are as close to the float64 result: it passes; a file that
    computes something else still fails, and its message gives both errors against float64."""
    def head(*middle: nn.Module) -> nn.Module:
        return nn.Sequential(Cancelling(), *middle, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    torch.manual_seed(0)
    summary = export_onnx(head(), tmp_path / "m.onnx", input_size=32)
    runs = summary["verification"]["runs"]
    assert all(r["max_abs"] > 1e-4 + 1e-5 * r["max_output"] for r in runs)  # the float32 tolerance fails them
    assert all(r["passed"] and r["onnx_vs_float64"] <= 1e-4 + 4 * r["torch_vs_float64"] for r in runs)
    console = Console(record=True, width=200)
    print_export_summary(console, summary)
    assert console.export_text().count("judged against the model in float64") == len(runs)
    with pytest.raises(VerificationError, match=r"from float64 where PyTorch's float32 is .*no file written"):
        export_onnx(head(Cheat()), tmp_path / "c.onnx", input_size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def one_line_error(result, code: int, match: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.heavy
def test_cli_from_checkpoint_dynamic_hw(cli, tmp_path):
    pt, out = tmp_path / "r18.pt", tmp_path / "r18.onnx"
    result = cli("insert", "resnet18", "--attn", "cbam", "--layers", "layer4", "--input-size", "64", "-o", str(pt))
    assert result.exit_code == 0, result.output
    result = cli("export-onnx", str(pt), "-o", str(out), "--input-size", "64", "--dynamic-hw", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is JSON only
    assert data["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert data["outputs"][0]["shape"] == ["batch", 1000]
    assert [r["shape"] for r in data["verification"]["runs"]] == [[1, 3, 64, 64], [3, 3, 64, 64], [3, 3, 96, 80]]
    assert data["verification"]["passed"] and data["recipe"]["insert"][0]["attn"] == "cbam"
    assert max(ort_errors(attnsurgeon.load(pt), out, size=48, check=True)) < ATOL
    # a checkpoint carries its surgery: options are an error; an existing output needs --force
    one_line_error(cli("export-onnx", str(pt), "--attn", "se", "-o", str(tmp_path / "x.onnx")), 2,
                   "takes no surgery options")
    before = out.read_bytes()
    one_line_error(cli("export-onnx", str(pt), "-o", str(out)), 2, "exists; use --force")
    assert out.read_bytes() == before


@pytest.mark.heavy
def test_cli_model_name_dynconv_text_summary(cli, tmp_path):
    out = tmp_path / "dy.onnx"
    result = cli("export-onnx", "resnet18", "--attn", "dynconv", "--layers", "layer4", "-o", str(out),
                 "--opset", "18", "--input-size", "64")
    assert result.exit_code == 0, result.output
    for text in ("opset 18", "input: float32 [batch, 3, 64, 64]", "logits: float32 [batch, 1000]", "PASSED"):
        assert text in result.stdout
    assert onnx.load(str(out)).opset_import[0].version == 18


@pytest.mark.heavy
def test_cli_static_batch(cli, tmp_path):
    out = tmp_path / "s.onnx"
    result = cli("export-onnx", "resnet18", "--attn", "se", "--layers", "layer4", "-o", str(out),
                 "--input-size", "32", "--static-batch", "--json")
    assert result.exit_code == 0, result.output
    assert [r["batch"] for r in json.loads(result.stdout)["verification"]["runs"]] == [1]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [(d.dim_param, d.dim_value) for d in dims] == [("", 1), ("", 3), ("", 32), ("", 32)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension"):
        session.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})


@pytest.mark.heavy
def test_cli_failed_verification_exit_1(cli, tmp_path, monkeypatch):
    from attnsurgeon import onnx_export

    monkeypatch.setattr(onnx_export, "VERIFY_RTOL", 0.0)  # with --atol 0: any rounding fails,
    monkeypatch.setattr(onnx_export, "FLOAT64_FACTOR", 0.0)  # also against float64
    out = tmp_path / "f.onnx"
    result = cli("export-onnx", "resnet18", "-o", str(out), "--input-size", "32", "--atol", "0")
    one_line_error(result, 1, "FAILED verification")
    assert "FAIL" in result.stdout and list(tmp_path.iterdir()) == []
    result = cli("export-onnx", "resnet18", "-o", str(out), "--input-size", "32", "--atol", "0", "--keep-failed")
    one_line_error(result, 1, "FAILED verification")
    assert [p.name for p in tmp_path.iterdir()] == ["f.onnx"]


@pytest.mark.heavy
def test_cli_exporter_failure_is_one_line(cli, tmp_path, monkeypatch):
    from attnsurgeon.layers import squeeze_excite

    monkeypatch.setattr(squeeze_excite, "build", lambda channels, *, init, **params: Mystery())
    result = cli("export-onnx", "resnet18", "--attn", "se", "--layers", "layer4.1", "-o", str(tmp_path / "m.onnx"),
                 "--input-size", "32")
    one_line_error(result, 2, "module 'layer4.1.attn_standard' (Mystery), operator attnsurgeon_test.mystery")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--opset", "12"], "--opset must be between 18 and 23, got 12"),
    (["--atol", "-1"], "--atol must be >= 0"),
    (["--input-size", "8"], "--input-size must be >= 32"),
])
def test_cli_bad_options(cli, tmp_path, argv, message):
    one_line_error(cli("export-onnx", "resnet18", "-o", str(tmp_path / "m.onnx"), *argv), 2, message)
    assert list(tmp_path.iterdir()) == []
