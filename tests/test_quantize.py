"""export-onnx --precision fp16|int8: the CLI contract, and quantized files of trained models.

The trained models are a quarter-width MobileNetV2 on scikit-learn's digits at 32x32,
trained once per session; each attention kind is inserted into it with ``init="preserve"``
and fine-tuned for a few steps, so its gates are trained, not random.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon import onnx_rewrites, quantize
from attnsurgeon.calibration import find_images, load_images, preprocessing_for, split
from attnsurgeon.checkpoint import save
from attnsurgeon.recipe import Recipe

SIZE = 32
MODEL_KWARGS = {"num_classes": 10, "width_mult": 0.25}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- data and models, once per session


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Digits as PNGs (all, and a 100-image calibration folder in class subfolders), and the
    preprocessed arrays the model trains on (the same pipeline the CLI uses)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    data = sklearn.load_digits()
    root = tmp_path_factory.mktemp("digits")
    every, calib = root / "all", root / "calib"
    every.mkdir()
    for i, (img, label) in enumerate(zip(data.images, data.target, strict=True)):
        png = Image.fromarray((img * 255 / 16).astype(np.uint8)).convert("RGB")
        png.save(every / f"{i:04d}.png")
        if i % 18 == 0:  # 100 images, in ImageFolder's class subfolders
            (calib / str(label)).mkdir(parents=True, exist_ok=True)
            png.save(calib / str(label) / f"{i:04d}.png")
    prep = preprocessing_for("mobilenet_v2", input_size=SIZE)
    x = load_images(find_images(every, count=len(data.images)), prep, show_progress=False)
    return {"x": x, "y": data.target.astype(np.int64), "calib": calib, "prep": prep}


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, steps: int, lr: float) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(xt), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def base(digits: dict[str, object]) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(**MODEL_KWARGS)
    _train(model, digits["x"], digits["y"], steps=200, lr=5e-3)
    with torch.no_grad():
        acc = (model(torch.from_numpy(digits["x"])).argmax(1).numpy() == digits["y"]).mean()
    assert acc > 0.8, f"the base model did not learn the digits (accuracy {acc:.2f})"
    return model


def _with_kind(base: nn.Module, digits: dict[str, object], kind: str, layers: str) -> tuple[nn.Module, Recipe]:
    model = copy.deepcopy(base)
    position = "mid" if attnsurgeon.kinds.get_kind(kind).mode == "insert" and kind not in ("afp", "nl") else None
    attnsurgeon.apply(model, kind, position=position, layers=layers, init="preserve", seed=0)
    _train(model, digits["x"], digits["y"], steps=20, lr=1e-3)
    from attnsurgeon.recipe import rule_from_options

    rule = rule_from_options(kind, position=position, layers=layers, params={})
    return model, Recipe(model="mobilenet_v2", rules=(rule,), init="preserve", seed=0)


@pytest.fixture(scope="session")
def coord_checkpoint(base: nn.Module, digits: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the last four blocks: each CLI test below exports it, and every block would double that time
    model, recipe = _with_kind(base, digits, "coord", layers="features.14:")
    path = tmp_path_factory.mktemp("ckpt") / "coord.pt"
    save(path, model, model_name="mobilenet_v2", recipe=recipe, model_kwargs=MODEL_KWARGS)
    return path


# ---------------------------------------------------------------- the CLI contract: bad input


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "int4"], "--precision must be one of fp32, fp16, int8, got 'int4'"),
    (["--precision", "int8"], "--precision int8 needs --calibration DIR"),
    (["--calibration", "."], "--calibration is for --precision int8 or fp16"),
    (["--precision", "fp16", "--quantize-all"], "--quantize-all is for --precision int8"),
    (["--precision", "fp16", "--min-agreement", "1.5"], "--min-agreement must be between 0 and 1, got 1.5"),
    (["--precision", "fp16", "--min-agreement", "nan"], "--min-agreement must be between 0 and 1"),
    (["--precision", "int8", "--calibration", "missing_dir"], "--calibration: missing_dir: no such folder"),
    (["--precision", "int8", "--calibration", "{empty}"], "no JPEG or PNG image in"),
    (["--precision", "int8", "--calibration", "{file}"], "is not a folder"),
    (["--precision", "int8", "--calibration", "{one}"], "only one JPEG or PNG image"),
    (["--precision", "int8", "--calibration", "{one}", "--calibration-count", "1"],
     "--calibration-count must be between 2 and"),
    (["--precision", "int8", "--calibration", "{one}", "--mean", "0.5,0.5"], "--mean must be three"),
    (["--precision", "int8", "--calibration", "{one}", "--std", "0.5,0,0.5"], "--std values must be > 0"),
    (["--precision", "fp16", "--mean", "0.5,0.5,0.5"], "--mean/--std preprocess --calibration images"),
    (["--precision", "fp16", "--no-verify"], "--no-verify: a fp16 file is always checked"),
    (["--precision", "fp16", "--keep-float", "layer1"], "--keep-float is for --precision int8"),
    (["--precision", "int8", "--calibration", "{two}", "--keep-float", "layer1,,fc"],
     "--keep-float takes dotted module paths separated by commas"),
    (["--precision", "fp16", "--policy", "se=branch"], "--policy is for --precision int8"),
    (["--precision", "int8", "--calibration", "{two}", "--policy", "se=none", "--quantize-all"],
     "--policy and --quantize-all do not go together"),
    (["--precision", "int8", "--calibration", "{two}", "--policy", "se"], "--policy takes KIND=POLICY pairs"),
    (["--precision", "int8", "--calibration", "{two}", "--policy", "sqex=none"], "--policy: unknown kind 'sqex'"),
    (["--precision", "int8", "--calibration", "{two}", "--policy", "se=all"], "--policy: unknown policy 'all' for se"),
    # checked once the model is built, before the (here unreadable) images are decoded
    (["--precision", "int8", "--calibration", "{two}", "--keep-float", "layer1,layer9"],
     "--keep-float: ResNet has no module 'layer9' (its top-level modules: conv1, bn1"),
    (["--precision", "int8", "--calibration", "{two}", "--policy", "se=branch"],
     "--policy: ResNet has no se module (its attention kinds: none)"),
    (["--precision", "int8", "--calibration", "{two}", "--attn", "eca", "--policy", "eca=branch,se=none"],
     "--policy: ResNet has no se module (its attention kinds: eca)"),
])
def test_bad_options_one_line_exit_2_nothing_written(cli, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes(b"")
    (tmp_path / "two").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "two" / name).write_bytes(b"")
    (tmp_path / "file").write_text("x")
    args = [a.format(empty=tmp_path / "empty", file=tmp_path / "file", one=tmp_path / "one", two=tmp_path / "two")
            for a in args]
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = cli("export-onnx", "resnet18", "--input-size", "32", "-o", str(out), *args)
    finally:
        os.chdir(cwd)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert _listing(out.parent) == []


def test_precision_options_are_checked_before_torch_is_imported(tmp_path: Path) -> None:
    code = ("import sys; from typer.testing import CliRunner; from attnsurgeon.cli import app; "
            "r = CliRunner().invoke(app, ['export-onnx', 'resnet18', '-o', 'x.onnx', '--precision', 'int8', "
            "'--calibration', 'missing']); "
            "assert r.exit_code == 2, r.output; assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    assert _listing(tmp_path) == []


def test_unreadable_image_is_named_and_nothing_written(cli, tmp_path: Path) -> None:
    folder = tmp_path / "cal"
    (folder / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(folder / "cat" / "good.png")
    (folder / "cat" / "bad.jpg").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    r = cli("export-onnx", "resnet18", "--input-size", "32", "--precision", "int8", "--calibration", str(folder),
            "-o", str(out / "m.onnx"))
    assert r.exit_code == 2, r.output
    assert f"--calibration: cannot read {folder / 'cat' / 'bad.jpg'}: not a readable JPEG or PNG image" in r.output
    assert _listing(out) == []


def test_find_images_flat_and_class_folders_seeded_sample(tmp_path: Path) -> None:
    from PIL import Image

    for sub in ("", "a", "b"):
        (tmp_path / sub).mkdir(exist_ok=True)
        for i in range(5):
            Image.new("L", (4, 4)).save(tmp_path / sub / f"{i}.PNG" if sub == "a" else tmp_path / sub / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("x")
    assert len(find_images(tmp_path, count=100)) == 15
    sample = find_images(tmp_path, count=6)
    assert len(sample) == 6 and sample == find_images(tmp_path, count=6)
    assert split(6) == (5, 1) and split(300) == (240, 60) and split(2) == (1, 1)


# ---------------------------------------------------------------- graph walk


def test_attention_nodes_find_gate_branch_and_fused_multiply(tmp_path: Path) -> None:
    """SE at standard on a ResNet: the block's fused addcmul puts the squeeze's ReduceMean and the
    gate's Mul outside the module's scope; the walk still finds them, and nothing of the block."""
    import onnx

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    attnsurgeon.apply(model, "se", layers="layer4.1")
    export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=False)
    found = quantize.attention_nodes(onnx.load(str(tmp_path / "m.onnx")), model)
    ops = sorted((a["role"], a["op"]) for a in found)
    assert ops == [("apply", "Mul"), ("branch", "Conv"), ("branch", "Conv"), ("branch", "ReduceMean"),
                   ("branch", "Relu"), ("gate", "Sigmoid")]
    assert {a["module"] for a in found} == {"layer4.1.attn_standard"} and {a["kind"] for a in found} == {"se"}
    assert quantize.nodes_to_keep_float(found, quantize_all=True) == []


@pytest.mark.parametrize(("name", "branch_ops"), [
    ("mobilenet_v3_small", ["Conv", "Conv", "ReduceMean", "Relu"]),  # hard sigmoid gate
    ("efficientnet_b0", ["Conv", "Conv", "Mul", "ReduceMean", "Sigmoid"]),  # SiLU inside: not a gate
])
def test_attention_nodes_find_the_models_own_squeeze_excitation(tmp_path: Path, name: str,
                                                                  branch_ops: list[str]) -> None:
    """torchvision's built-in SqueezeExcitation (MobileNetV3, EfficientNet) is quantized by SE's
    policy: every one is found, with SE's roles; one replaced by our SE is found once, as ours."""
    import onnx

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    builtin = [p for p, m in model.named_modules() if isinstance(m, torchvision.ops.SqueezeExcitation)]
    export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=False)
    found = quantize.attention_nodes(onnx.load(str(tmp_path / "m.onnx")), model)
    assert sorted({a["module"] for a in found}) == sorted(builtin) and {a["kind"] for a in found} == {"se"}
    one = [a for a in found if a["module"] == builtin[0]]
    assert sorted(a["op"] for a in one if a["role"] == "branch") == branch_ops
    assert [(a["role"], a["op"]) for a in one if a["role"] != "branch"] == [
        ("gate", "HardSigmoid" if name == "mobilenet_v3_small" else "Sigmoid"), ("apply", "Mul")]

    attnsurgeon.apply(model, "se", position="builtin", layers=builtin[0].rsplit(".", 2)[0])
    export_onnx(model, tmp_path / "r.onnx", input_size=32, verify=False)
    replaced = quantize.attention_nodes(onnx.load(str(tmp_path / "r.onnx")), model)
    assert not isinstance(model.get_submodule(builtin[0]), torchvision.ops.SqueezeExcitation)  # ours, same path
    assert sorted({a["module"] for a in replaced}) == sorted(builtin) and {a["kind"] for a in replaced} == {"se"}
    assert [a["op"] for a in replaced if a["module"] == builtin[0] and a["role"] == "gate"] == ["Sigmoid"]
    assert len(replaced) == len({a["node"] for a in replaced})


def test_module_nodes_take_every_node_of_the_named_modules(tmp_path: Path) -> None:
    """--keep-float: every node traced in the named modules, the attention module's with its
    kind; the same through a wrapper (a segmentation model's); unknown or unused modules refused."""
    import onnx

    from attnsurgeon.errors import UsageError
    from attnsurgeon.onnx_export import export_onnx

    class Wrapper(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    attnsurgeon.apply(model, "se", layers="layer4.1")
    model.unused = nn.Conv2d(1, 1, 1)
    export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    attention = quantize.attention_nodes(proto, model)
    found = quantize.module_nodes(proto, model, ("bn1", "layer4.1"), attention=attention)
    assert {a["role"] for a in found} == {"keep-float"}
    assert {a["module"] for a in found} == {"bn1", "layer4.1"}
    stem = [a for a in found if a["module"] == "bn1"]
    assert [a["op"] for a in stem] == ["Conv"] and stem[0]["kind"] == "-"  # conv1, bn1 folded in, in bn1's scope
    block = [a for a in found if a["module"] == "layer4.1"]
    assert sum(a["op"] == "Conv" for a in block) == 4  # conv1, conv2, SE's two 1x1 convs
    se = {a["node"] for a in attention}
    assert se <= {a["node"] for a in block}  # the block holds its SE, the fused squeeze and multiply too
    assert {a["node"] for a in block if a["kind"] == "se"} == se

    export_onnx(Wrapper(model), tmp_path / "w.onnx", input_size=32, verify=False)
    wrapped = quantize.module_nodes(onnx.load(str(tmp_path / "w.onnx")), model, ("bn1", "layer4.1"), prefix="model.")
    assert [(a["op"], a["module"]) for a in wrapped] == [(a["op"], a["module"]) for a in found]
    assert {a["kind"] for a in wrapped if a["op"] == "Sigmoid"} == {"se"}  # by scope, under the prefix

    with pytest.raises(UsageError, match="ResNet has no module 'layer4.9'"):
        quantize.module_nodes(proto, model, ("layer4.9",))
    for unseen in ("unused", "conv1"):  # never runs; folded into bn1's node
        with pytest.raises(UsageError, match=f"module '{unseen}' has no node in the exported graph"):
            quantize.module_nodes(proto, model, (unseen,))


def test_int8_calibration_ranges_cover_every_image(tmp_path: Path) -> None:
    """The input's quantization range spans every calibration batch: onnxruntime's calibrater
    drops what it has collected every CalibMaxIntermediateOutputs batches, so with that option
    the range came from the last batch here (and 4 batches failed: "No data is collected")."""
    import onnx
    from onnx import numpy_helper

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=False)
    images = np.random.default_rng(0).uniform(-1, 1, (5 * quantize.CALIBRATION_BATCH, 3, 32, 32)).astype(np.float32)
    images[0, 0, 0, 0] = 10.0  # only the first batch reaches 10
    quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", images, exclude=[], show_progress=False)
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    first = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    scale, zero = float(inits[first.input[1]]), int(inits[first.input[2]])
    assert scale * (255 - zero) == pytest.approx(10.0, rel=0.01)


def test_spatial_means_become_global_pools_with_the_same_outputs(tmp_path: Path) -> None:
    """ReduceMean over H and W (kept or dropped) becomes GlobalAveragePool (+ Squeeze), which
    onnxruntime runs on uint8; a mean over one axis or of a 3-D tensor stays; an excluded
    mean stays float with its Squeeze, no quantize/dequantize between them."""
    import onnx
    import onnxruntime as ort

    from attnsurgeon.onnx_export import export_onnx

    class Means(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            kept = y.mean((2, 3), keepdim=True)  # (N, 4, 1, 1)
            dropped = y.mean((-1, -2))  # (N, 4)
            rows = y.mean(3, keepdim=True).mean(2)  # one axis at a time
            flat = y.flatten(2).mean((1, 2))  # rank 3
            return (y * kept.sigmoid()).mean((2, 3)) + dropped + rows + flat[:, None]

    torch.manual_seed(0)
    export_onnx(Means().eval(), tmp_path / "m.onnx", input_size=32, dynamic_batch=False, verify=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    means = [n.name for n in proto.graph.node if n.op_type == "ReduceMean"]
    pools = onnx_rewrites.spatial_means_as_pools(proto)
    squeezes = {pool: squeeze for pool, squeeze in pools.items() if squeeze}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GlobalAveragePool") == len(pools) == 3 and ops.count("Squeeze") == len(squeezes) == 2
    assert ops.count("ReduceMean") == len(means) - 3 == 3  # the two one-axis means and the 3-D one
    onnx.checker.check_model(proto, full_check=True)
    used = {t for n in proto.graph.node for t in n.input}
    assert all(t.name in used for t in proto.graph.initializer)  # the means' axes went with them
    onnx.save(proto, str(tmp_path / "p.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    run = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for f in ("m.onnx", "p.onnx")]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-6, atol=1e-6)

    pooled = next(iter(squeezes))
    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[pooled], show_progress=False)
    assert info["means_as_pools"] == 3
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {t: n for n in q.node for t in n.output}
    squeeze = next(n for n in q.node if n.name == squeezes[pooled])
    assert producer[squeeze.input[0]].name == pooled  # float pool straight into its float Squeeze


def test_a_pool_onnxruntime_would_refuse_stays_a_mean(tmp_path: Path) -> None:
    """The mean of an instance-normalised map is ~0 on every image, so its calibrated range is
    tiny against its input's, and onnxruntime's uint8 pool raises "parameter out of computation
    range": that mean goes back to a ReduceMean between dequantize and quantize; the other
    stays a pool; the file runs at its size and at another (dynamic height and width)."""
    import onnx

    from attnsurgeon.onnx_export import export_onnx

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(4, 4, affine=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y).mean((2, 3)) + y.mean((2, 3))

    torch.manual_seed(0)
    export_onnx(Normed().eval(), tmp_path / "m.onnx", input_size=32, dynamic_hw=True, verify=False)
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)
    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[], show_progress=False)
    assert info["means_as_pools"] == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("GlobalAveragePool") == 1 and ops.count("ReduceMean") == 1
    session = quantize._session(tmp_path / "q.onnx")
    for size in (32, 77):
        (out,) = session.run(None, {"input": x[:2, :, :size, :size] if size <= 32 else
                                    np.resize(x[:2], (2, 3, size, size)).astype(np.float32)})
        assert out.shape == (2, 4) and np.isfinite(out).all()


def test_one_axis_means_become_depthwise_convs_with_the_same_outputs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A mean over H alone or W alone (kept or dropped) of a map with static sizes becomes a
    depthwise Conv with a 1/L kernel (+ Squeeze), the same function; an excluded mean stays, and
    so does every mean of a file with a dynamic height and width. Quantized, onnxruntime runs
    the convs on uint8 (QLinearConv), and the file gives what the ReduceMeans gave."""
    import onnx

    from attnsurgeon.onnx_export import export_onnx

    class Strips(nn.Module):  # coordinate attention's and ELA's pooling
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).relu()
            rows = y.mean(3, keepdim=True)  # (N, 4, H, 1)
            cols = y.mean(2)  # (N, 4, W)
            kept = y.mean(2, keepdim=True)  # excluded below
            return (y * rows.sigmoid() * cols.unsqueeze(2).sigmoid() + kept).flatten(1)

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)
    export_onnx(Strips().eval(), tmp_path / "m.onnx", input_size=32, verify=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    del proto.graph.value_info[:]  # the lengths come from shape inference, not the exporter's notes
    means = [n.name for n in proto.graph.node if n.op_type == "ReduceMean"]
    assert len(means) == 3
    assert onnx_rewrites.axis_means_as_convs(proto, skip=[means[2]]) == means[:2]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("ReduceMean") == 1 and ops.count("Conv") == 3 and ops.count("Squeeze") == 1
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "c.onnx"))
    run = [quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("m.onnx", "c.onnx")]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)

    export_onnx(Strips().eval(), tmp_path / "d.onnx", input_size=32, dynamic_hw=True, verify=False)
    assert onnx_rewrites.axis_means_as_convs(onnx.load(str(tmp_path / "d.onnx"))) == []  # no static length

    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[], show_progress=False)
    assert info["axis_means_as_convs"] == 3
    assert [n.op_type for n in quantize.onnxruntime_graph(tmp_path / "q.onnx").node].count("QLinearConv") == 4
    monkeypatch.setattr(quantize, "axis_means_as_convs", lambda proto, **kwargs: [])
    quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "r.onnx", x, exclude=[], show_progress=False)
    got, want = (quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("q.onnx", "r.onnx"))
    step = np.abs(want).max() / 255
    assert np.abs(got - want).max() <= 2 * step  # the same rounding points: at most a step apart


def test_shared_biases_get_copies_of_their_own(tmp_path: Path) -> None:
    """onnxruntime's quantizer names its own copy of a shared bias the bias's name and a number,
    unique among initializers only; here that is the name of a reshaped activation ("b0"), and
    the file failed ("Quantization parameter shared mode is not supported for weight yet", as
    MobileNetV2 + ELA at 224x224 did). Each node now reads a copy of its own, under a free name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = 4
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(np.ones(c, np.float32), "s"), numpy_helper.from_array(np.zeros(c, np.float32), "b"),
               numpy_helper.from_array(np.array([0, c, 8, 8], np.int64), "shape"),
               numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("InstanceNormalization", ["h", "s", "b"], ["n"], name="norm1"),
             helper.make_node("Reshape", ["n", "shape"], ["b0"], name="reshape"),
             helper.make_node("Sigmoid", ["b0"], ["g"], name="sigmoid"),
             helper.make_node("InstanceNormalization", ["g", "s", "b"], ["logits"], name="norm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, c, 8, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "m.onnx"))
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)

    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert onnx_rewrites.own_biases(proto) == 1
    assert [n.input[2] for n in proto.graph.node if n.op_type == "InstanceNormalization"] == ["b", "b_norm2"]
    quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[], show_progress=False)
    got, want = (quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("q.onnx", "m.onnx"))
    cosine = np.sum(got * want) / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cosine > 0.99


def test_narrow_grouped_convs_quantize_as_dense_block_diagonal_convs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A grouped conv of 2 channels a group (EMA's, SK's, ResNeXt's narrowest) is quantized as
    a dense conv with a block-diagonal weight, which onnxruntime runs by its fast path; one of
    8 a group, a depthwise one and one kept in float stay grouped. The file computes what
    the grouped one does: its int8 weights are the grouped ones with zeros, and its outputs
    match the file quantized without the rewrite to within two rounding steps."""
    import onnx
    from onnx import helper, numpy_helper

    from attnsurgeon.onnx_export import export_onnx

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.narrow = nn.Conv2d(16, 16, 3, padding=1, groups=8)  # 2 a group: rewritten
            self.wide = nn.Conv2d(16, 16, 3, padding=1, groups=2)  # 8 a group: stays
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.kept = nn.Conv2d(16, 16, 3, padding=1, groups=8)  # kept float: stays

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.narrow(torch.relu(self.stem(x))))
            return self.kept(torch.relu(self.depthwise(torch.relu(self.wide(y))))).mean((2, 3))

    torch.manual_seed(0)
    export_onnx(Grouped().eval(), tmp_path / "m.onnx", input_size=32, dynamic_hw=True, verify=False)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    group = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "group"))
             for n in graph.node if n.op_type == "Conv"}
    names = [n for n, g in group.items() if g == 8]
    assert len(names) == 2 and sorted(group.values()) == [1, 2, 8, 8, 16]
    narrow, kept = names  # in graph order
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)

    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[kept], show_progress=False)
    assert info["grouped_as_dense"] == 1
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {t.name: t for t in q.initializer}
    producer = {t: n for n in q.node for t in n.output}
    convs = {n.name: n for n in q.node if n.op_type == "Conv"}
    after = {name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "group"))
             for name, n in convs.items()}
    assert after[narrow] == 1 and after[kept] == 8 and sorted(after.values()) == [1, 1, 2, 8, 16]
    weight_dq = producer[convs[narrow].input[1]]
    w = numpy_helper.to_array(inits[weight_dq.input[0]])  # the int8 weight
    assert w.dtype == np.int8 and w.shape == (16, 16, 3, 3)
    blocks = np.zeros((16, 16), dtype=bool)
    for g in range(8):
        blocks[2 * g:2 * g + 2, 2 * g:2 * g + 2] = True
    assert not w[~blocks].any() and w[blocks].any()

    monkeypatch.setattr(onnx_rewrites, "DENSE_GROUP_WIDTH", 1)  # no conv qualifies
    grouped = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "g.onnx", x, exclude=[kept], show_progress=False)
    assert grouped["grouped_as_dense"] == 0
    run = [quantize._session(tmp_path / f).run(None, {"input": x[:4]})[0] for f in ("q.onnx", "g.onnx")]
    step = float(np.abs(run[1]).max()) / 127
    np.testing.assert_allclose(run[0], run[1], atol=2 * step)


@pytest.mark.parametrize("dynamic_hw", [False, True])
def test_attention_pooling_reads_the_map_channels_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       dynamic_hw: bool) -> None:
    """GC's context, ``x.flatten(2) @ softmax(...).transpose(1, 2)``, becomes the weights' row
    times the map's channels-last rows: the same function in float (a dynamic H and W too, whose
    shape nodes go with the flattening), one pooling kept in float stays, and in INT8 the file
    gives what the file quantized without the rewrite gives. onnxruntime then runs it with
    fewer transposes: the one written here cancels against its own around the uint8 convs."""
    import onnx
    import onnxruntime as ort

    from attnsurgeon.layers.global_context import GlobalContext
    from attnsurgeon.onnx_export import export_onnx

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.gc = GlobalContext(16, reduction=4)
            self.mid = nn.Conv2d(16, 8, 1)  # a width of its own: its flattening's shape is its own
            self.kept = GlobalContext(8, reduction=4)
            self.head = nn.Conv2d(8, 8, 1)
            for m in (self.gc, self.kept):
                nn.init.normal_(m.transform[-1].weight, std=0.3)  # not the identity it starts as

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.kept(self.mid(self.gc(torch.relu(self.stem(x)))))).mean((2, 3))

    torch.manual_seed(0)
    export_onnx(Pooled().eval(), tmp_path / "m.onnx", input_size=32, dynamic_hw=dynamic_hw, verify=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    assert onnx_rewrites.attention_pools_channels_last(proto, skip=[matmuls[1]]) == matmuls[:1]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Transpose") == 2  # kept's column, the new one
    if dynamic_hw:  # the Concat that made the flattening's shape went with it
        assert ops.count("Concat") < [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node].count("Concat")
    used = {t for n in proto.graph.node for t in n.input} | {o.name for o in proto.graph.output}
    assert all(used & set(n.output) for n in proto.graph.node)  # no node left computing for nothing
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "c.onnx"))
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)
    run = [quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("m.onnx", "c.onnx")]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)

    def transposes(path: Path) -> int:  # in the graph onnxruntime runs, layout changes included
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node].count("Transpose")

    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[], show_progress=False)
    assert info["pools_channels_last"] == 2
    monkeypatch.setattr(quantize, "attention_pools_channels_last", lambda proto, **kwargs: [])
    quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "r.onnx", x, exclude=[], show_progress=False)
    got, want = (quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("q.onnx", "r.onnx"))
    np.testing.assert_allclose(got, want, atol=float(np.abs(want).max()) / 255)  # within one rounding step
    assert transposes(tmp_path / "q.onnx") < transposes(tmp_path / "r.onnx")


def test_hard_gates_become_clips_of_uint8_convs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hard-sigmoid gate (SE's, through its reshapes) has its affine folded into the conv that
    makes its input and becomes a Clip; a HardSwish, and a hard sigmoid whose input also feeds
    something else, get a depthwise 1x1 conv of their own; a gate kept in float stays. The same
    function in float; in INT8 onnxruntime then runs none of them in float, and the file gives
    what the file quantized without the rewrite gives, to about a rounding step."""
    import onnx
    from rich.console import Console

    from attnsurgeon.layers.squeeze_excite import SqueezeExcite
    from attnsurgeon.onnx_export import export_onnx

    class Hard(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.se = SqueezeExcite(16, gate="hard_sigmoid")
            self.kept = SqueezeExcite(16, gate="hard_sigmoid")
            self.mix = nn.Conv2d(16, 16, 1)
            self.head = nn.Conv2d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.hardswish(self.stem(x))
            x = self.kept(self.se(x))
            y = self.mix(x)
            x = y * nn.functional.hardsigmoid(y) + y  # the hard sigmoid's input feeds the add too
            return self.head(x).mean((2, 3))

    torch.manual_seed(0)
    model = Hard().eval()
    for m in model.modules():  # gates that vary, not the ones at the start
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.5)
    export_onnx(model, tmp_path / "m.onnx", input_size=32, dynamic_hw=False, verify=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("HardSigmoid") == 3 and ops.count("HardSwish") == 1
    kept = [n.name for n in proto.graph.node if n.op_type == "HardSigmoid"][1]  # self.kept's gate
    done = onnx_rewrites.hard_gates_as_clips(proto, skip=[kept])
    assert len(done) == 3 and kept not in done
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("HardSigmoid") == 1 and "HardSwish" not in ops and ops.count("Clip") == 3
    assert sum(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
               for n in proto.graph.node) == 2  # the HardSwish's and the shared input's affines
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "c.onnx"))
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32)
    run = [quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("m.onnx", "c.onnx")]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)

    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x, exclude=[kept], show_progress=False)
    assert info["hard_gates_as_clips"] == 3
    summary = quantize.export_quantized(model, tmp_path / "e.onnx", precision="int8", input_size=32, opset=18,
                                        images=x, min_agreement=0.0, show_progress=False)
    console = Console(record=True, width=400)
    quantize.print_quantized_summary(console, summary)
    n = summary["quantized"]["hard_gates_as_clips"]
    assert n >= 3 and f"; {n} hard sigmoids or swishes as Clip of a uint8 conv" in console.export_text()
    ran = [n.op_type for n in quantize.onnxruntime_graph(tmp_path / "q.onnx").node]
    assert ran.count("HardSigmoid") == 1 and "HardSwish" not in ran and "Clip" not in ran
    monkeypatch.setattr(quantize, "hard_gates_as_clips", lambda proto, **kwargs: [])
    quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "r.onnx", x, exclude=[kept], show_progress=False)
    got, want = (quantize._session(tmp_path / f).run(None, {"input": x})[0] for f in ("q.onnx", "r.onnx"))
    ran = [n.op_type for n in quantize.onnxruntime_graph(tmp_path / "r.onnx").node]
    assert ran.count("HardSigmoid") + ran.count("HardSwish") == 4  # in float, onnxruntime's own form
    np.testing.assert_allclose(got, want, atol=3 * float(np.abs(want).max()) / 255)  # a few rounding steps


def test_quantized_files_hand_out_float_outputs(tmp_path: Path) -> None:
    """The classifier's output is not rounded to uint8: the graph output comes from the Gemm
    itself, which onnxruntime still runs as an integer QGemm (float output), and its values
    are not on a 256-step grid (rounded, 64 images x 10 classes would take at most 256
    distinct values). A hand-made graph: an output whose tensor also feeds another node
    keeps its pair."""
    import onnx
    from onnx import TensorProto, helper

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    export_onnx(model.eval(), tmp_path / "m.onnx", input_size=32, verify=False)
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32), dtype=np.float32)
    info = quantize.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", x[:16], exclude=[], show_progress=False)
    assert info["float_outputs"] == 1
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {t: n for n in graph.node for t in n.output}
    assert producer[graph.output[0].name].op_type == "Gemm"
    assert not any(t.name.startswith(graph.output[0].name + "_") for t in graph.initializer)  # the pair's constants
    assert [n.op_type for n in quantize.onnxruntime_graph(tmp_path / "q.onnx").node][-1] == "QGemm"
    (out,) = quantize._session(tmp_path / "q.onnx").run(None, {"input": x})
    assert len(np.unique(out)) > 256
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(out - want).max() < 0.1 * np.abs(want).max()

    # hand-made: t -> Q -> DQ -> y (freed); u -> Q -> DQ -> z, and u -> Relu -> w (kept)
    def pair(src: str, out: str) -> list[onnx.NodeProto]:
        return [helper.make_node("QuantizeLinear", [src, "s", "zp"], [src + "_q"], name=src + "_Q"),
                helper.make_node("DequantizeLinear", [src + "_q", "s", "zp"], [out], name=src + "_DQ")]
    nodes = [helper.make_node("Neg", ["a"], ["t"], name="neg"), helper.make_node("Abs", ["a"], ["u"], name="abs"),
             *pair("t", "y"), *pair("u", "z"), helper.make_node("Relu", ["u"], ["w"], name="relu")]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "y", "z", "w")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", value[:1], value[1:],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("zp", TensorProto.UINT8, [], [0])]))
    assert onnx_rewrites.outputs_in_float(proto) == 1
    assert [(n.name, list(n.output)) for n in proto.graph.node] == [
        ("neg", ["y"]), ("abs", ["u"]), ("u_Q", ["u_q"]), ("u_DQ", ["z"]), ("relu", ["w"])]
    assert {t.name for t in proto.graph.initializer} == {"s", "zp"}  # still used by the kept pair
    onnx.checker.check_model(proto, full_check=True)


def test_timing_sessions_do_not_spin_wait(tmp_path: Path) -> None:
    """ort_latency's sessions turn onnxruntime's spin-waiting off (threads filling a 2-core
    machine made float run twice as slow, and the INT8 speed-up swing from x1.04 to x1.77);
    the sessions that only compute outputs keep onnxruntime's defaults."""
    from attnsurgeon.onnx_export import export_onnx

    export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), tmp_path / "m.onnx", input_size=32, verify=False)
    key = "session.intra_op.allow_spinning"
    timing = quantize._session(tmp_path / "m.onnx", threads=2).get_session_options()
    assert timing.get_session_config_entry(key) == "0" and timing.intra_op_num_threads == 2
    plain = quantize._session(tmp_path / "m.onnx").get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: onnxruntime's default
        plain.get_session_config_entry(key)
    (ms,) = quantize.ort_latency([tmp_path / "m.onnx"], input_size=32, rounds=3)
    assert ms > 0


@pytest.mark.parametrize(("kind", "want"), [
    # SimAM with preserve's blend 1 + alpha (s - 1): the blend's Sub/Mul/Add go with the gate, the Mul by x applies
    ("simam", {("gate", "Sigmoid"): 1, ("apply", "Mul"): 1}),
    # ELA: its SiLU's Sigmoid is no gate; the walk back crosses the SiLU and GroupNorm's affine to the pooling
    ("ela", {("gate", "Sigmoid"): 2, ("apply", "Mul"): 2, ("branch", "ReduceMean"): 2, ("branch", "Conv"): 2,
             ("branch", "InstanceNormalization"): 2, ("branch", "Sigmoid"): 2}),
    # non-local: the query-key MatMul (the softmax's logits) is branch, the MatMul by the values applies
    ("nl", {("gate", "Softmax"): 1, ("branch", "MatMul"): 1, ("apply", "MatMul"): 1}),
])
def test_attention_nodes_see_through_constant_ops_silu_and_logits(tmp_path: Path, kind: str,
                                                                   want: dict[tuple[str, str], int]) -> None:
    import collections

    import onnx

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    attnsurgeon.apply(model, kind, layers="layer4.1", init="preserve", seed=0)
    export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=False)
    found = collections.Counter((a["role"], a["op"]) for a in
                                quantize.attention_nodes(onnx.load(str(tmp_path / "m.onnx")), model))
    assert {k: found[k] for k in want} == want
    assert found[("apply", "Mul")] + found[("apply", "MatMul")] == want.get(("apply", "Mul"), 0) + want.get(
        ("apply", "MatMul"), 0)  # no Mul by a constant, and no SiLU product, taken for an apply


# ---------------------------------------------------------------- trained models through the CLI


@pytest.mark.heavy  # trains a model (session fixture) and exports it: ~15-30 s
def test_int8_export_of_trained_coord_model(cli, coord_checkpoint: Path, digits: dict[str, object],
                                            tmp_path: Path) -> None:
    out = tmp_path / "ca_int8.onnx"
    r = cli("export-onnx", str(coord_checkpoint), "--input-size", str(SIZE), "--precision", "int8",
            "--calibration", str(digits["calib"]), "--calibration-count", "100", "--json", "-o", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    q = data["quantized"]
    assert data["precision"] == "int8" and q["passed"]
    assert q["calibration"]["calibrate"] == 80 and q["calibration"]["held_out"] == 20
    assert q["calibration"]["preprocessing"]["crop"] == SIZE
    assert q["agreement"]["images"] == 20 and q["agreement"]["top1_agreement"] >= 0.9
    assert q["agreement"]["cosine_mean"] > 0.95
    assert {a["kind"] for a in q["float_nodes"]} == ({"coord"} if quantize.DEFAULT_POLICY["coord"] != "none" else set())
    assert q["policies"] == {"coord": quantize.DEFAULT_POLICY["coord"]}
    assert q["latency"]["float_ms"] > 0 and q["latency"]["quantized_ms"] > 0 and q["latency"]["spin_wait"] is False
    assert data["verification"]["passed"]  # the fp32 graph's check, as for fp32 files
    assert out.stat().st_size == data["file_size"] < q["float_file_size"]
    assert q["size_ratio"] == pytest.approx(data["file_size"] / q["float_file_size"])
    assert _listing(tmp_path) == ["ca_int8.onnx"]


@pytest.mark.heavy  # two exports of a ResNet-18 (random weights: the agreement is forced)
def test_failed_agreement_exits_1_and_removes_the_file_unless_keep_failed(
        cli, digits: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = quantize.compare_outputs

    def half(*args: object, **kwargs: object) -> dict[str, object]:
        result = real(*args, **kwargs)
        return {**result, "top1_agreement": 0.5, "agreeing": result["compared"] // 2}

    monkeypatch.setattr(quantize, "compare_outputs", half)
    out = tmp_path / "m.onnx"
    args = ["export-onnx", "resnet18", "--attn", "se", "--layers", "layer4", "--input-size", str(SIZE),
            "--precision", "int8", "--calibration", str(digits["calib"]), "--calibration-count", "20", "-o", str(out)]
    r = cli(*args)
    assert r.exit_code == 1, r.output
    assert "m.onnx (int8) FAILED verification: top-1 agreement with the float model 50.0% (2/4) < " \
           "--min-agreement 90.0%; no file written" in r.output
    assert _listing(tmp_path) == []
    r = cli(*args, "--keep-failed", "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["quantized"]["passed"] is False
    assert _listing(tmp_path) == ["m.onnx"]


@pytest.mark.heavy  # trains a model (session fixture) and exports it: ~15-30 s
def test_keep_float_leaves_the_named_modules_float(cli, coord_checkpoint: Path, digits: dict[str, object],
                                                   tmp_path: Path) -> None:
    import onnx
    from rich.console import Console

    out = tmp_path / "m.onnx"
    r = cli("export-onnx", str(coord_checkpoint), "--input-size", str(SIZE), "--precision", "int8",
            "--calibration", str(digits["calib"]), "--calibration-count", "40", "--min-agreement", "0.5",
            "--keep-float", "features.0", "--policy", "coord=branch+apply", "--json", "-o", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    q = data["quantized"]
    assert q["keep_float"] == ["features.0"]
    assert q["policies"] == {"coord": "branch+apply"} and quantize.DEFAULT_POLICY["coord"] != "branch+apply"
    assert {a["role"] for a in q["float_nodes"]} == {"gate", "branch", "apply", "keep-float"}  # --policy's, --keep-float's
    assert q["float_outputs"] == 1
    user = [a for a in q["float_nodes"] if a["role"] == "keep-float"]
    assert sorted(a["op"] for a in user) == ["Clip", "Conv"] and {a["module"] for a in user} == {"features.0"}
    proto = onnx.load(str(out))
    producer = {t: n.op_type for n in proto.graph.node for t in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    stem = next(n for n in convs if n.name == next(a["node"] for a in user if a["op"] == "Conv"))
    assert all(t not in producer or producer[t] != "DequantizeLinear" for t in stem.input)  # float in, float weight
    floats = {a["node"] for a in q["float_nodes"]}  # the stem, and coordinate attention's branch convs
    assert all(producer.get(n.input[1]) == "DequantizeLinear" for n in convs if n.name not in floats)  # int8
    console = Console(record=True, width=200)  # the summary the CLI prints without --json, from the same data
    quantize.print_quantized_summary(console, data)
    text = console.export_text()
    assert "kept in float (--keep-float features.0): 2 nodes of 1 module (Conv 1, Clip 1)" in text
    assert "coord: branch+apply (branch+apply) (--policy)" in text and "; outputs in float" in text
    assert q["means_as_pools"] >= 1 and f"; {q['means_as_pools']} mean" in text  # the classifier's pool at least


@pytest.mark.heavy  # trains a model (session fixture) and exports it: ~15-30 s
def test_fp16_without_calibration_checks_on_random_inputs(cli, coord_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m16.onnx"
    r = cli("export-onnx", str(coord_checkpoint), "--input-size", str(SIZE), "--precision", "fp16", "--json",
            "-o", str(out))
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)["quantized"]
    assert q["method"] == "onnxruntime.transformers.float16.convert_float_to_float16"
    assert q["check_images"].startswith("16 random N(0,1) inputs")
    import onnx

    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert q["agreement"]["top1_agreement"] == 1.0 and q["agreement"]["cosine_min"] > 0.999
    assert q["size_ratio"] < 0.8  # weights halve; the exporter's per-node metadata (names, stack traces) does not


@pytest.mark.heavy  # one export of a ResNet-18 per precision: ~5-10 s each
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_static_batch_file_calibrates_and_checks_one_image_a_run(cli, digits: dict[str, object], tmp_path: Path,
                                                                  precision: str) -> None:
    import onnx

    out = tmp_path / "m.onnx"
    calibration = ["--calibration", str(digits["calib"]), "--calibration-count", "20"] if precision == "int8" else []
    r = cli("export-onnx", "resnet18", "--attn", "se", "--layers", "layer4", "--input-size", str(SIZE),
            "--static-batch", "--precision", precision, *calibration, "--min-agreement", "0", "--json", "-o", str(out))
    assert r.exit_code == 0, r.output  # was: onnxruntime refused the batches of 8 and 16 images
    q = json.loads(r.stdout)["quantized"]
    assert q["error"] is None and q["agreement"]["images"] == (4 if precision == "int8" else 16)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, SIZE, SIZE]


# ---------------------------------------------------------------- every kind, trained, quantized


EVERY_KIND = ("se", "cbam", "eca", "coord", "gc", "sk", "dynconv", "afp", "ema", "simam", "nl", "triplet",
              "ela", "odconv")


@pytest.mark.heavy  # trains and exports one model: ~30-60 s
def test_int8_agreement_of_a_trained_model_with_every_kind(base: nn.Module, digits: dict[str, object],
                                                           tmp_path: Path) -> None:
    """Every kind in one trained MobileNetV2, one block each (features.2 to features.15), so
    one training and one export check them all: agreement, and the nodes each kind's default
    policy keeps in float."""
    model = copy.deepcopy(base)
    for i, kind in enumerate(EVERY_KIND):
        insert = attnsurgeon.kinds.get_kind(kind).mode == "insert"
        position = "mid" if insert and kind not in ("afp", "nl") else None
        attnsurgeon.apply(model, kind, position=position, layers=f"features.{i + 2}", init="preserve", seed=0)
    _train(model, digits["x"], digits["y"], steps=20, lr=1e-3)
    images = load_images(find_images(digits["calib"], count=100), digits["prep"], show_progress=False)
    summary = quantize.export_quantized(model, tmp_path / "m.onnx", precision="int8", input_size=SIZE, opset=20,
                                        images=images, show_progress=False)
    q = summary["quantized"]
    assert q["passed"] and q["agreement"]["top1_agreement"] >= 0.9
    kept = {a["kind"] for a in q["float_nodes"]}
    assert kept == {k for k in EVERY_KIND if quantize.DEFAULT_POLICY[k] != "none"}
    assert q["run_as_integer"] == []  # what the defaults keep in float, onnxruntime runs in float
    assert set(quantize.DEFAULT_POLICY) == set(EVERY_KIND)
    assert q["attention_nodes"] > len(EVERY_KIND)


def test_default_policy_is_the_rule_over_the_measured_rows() -> None:
    """DEFAULT_POLICY is what the benchmark's rule picks over every seed's rows of the
    committed results file (README, "Measured on trained models"): a default changed by hand,
    or rows added without the default that follows them, fails here."""
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_quantize", root / "bench_quantize.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = json.loads((root / "bench_quantize_results.json").read_text())
    assert bench.choose_per_kind(rows) == quantize.DEFAULT_POLICY
    # the rule itself, on 1,440 images (margin 3.6): fewest float nodes among the near ones ...
    ms = {"none": 1.0, "gate+apply": 0.97, "branch": 0.9, "branch+apply": 0.8}
    assert bench._pick({"none": 1430, "gate+apply": 1431, "branch": 1429, "branch+apply": 1420}, ms, 1440) == "none"
    # ... unless a near one is a quarter faster, or agrees as well and is 5% faster
    assert bench._pick({"none": 1430, "gate+apply": 1431, "branch": 1429, "branch+apply": 1429},
                       {**ms, "branch+apply": 0.7}, 1440) == "branch+apply"
    assert bench._pick({"none": 1430, "gate+apply": 1431, "branch": 1430, "branch+apply": 1420}, ms, 1440) == "branch"
    assert bench._pick({"none": 1430, "gate+apply": 1431, "branch": 1429, "branch+apply": 1420},
                       {**ms, "gate+apply": 0.96}, 1440) == "none"


def test_hard_sigmoid_gate_preserve_is_exact_and_trainable() -> None:
    from attnsurgeon.layers import coord, eca, squeeze_excite

    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0))
    for module in (squeeze_excite.build(16, init="preserve", gate="hard_sigmoid"),
                   eca.build(16, init="preserve", gate="hard_sigmoid"),
                   coord.build(16, init="preserve", gate="hard_sigmoid")):
        module.eval()
        assert isinstance(module.gate, nn.Hardsigmoid)
        assert torch.equal(module(x), x)  # exact, not 1 - 1.2e-7
        module.train()
        module(x).square().sum().backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert any(g.abs().sum() > 0 for g in grads)  # the gate still learns


def test_gate_and_apply_kept_float_stay_float_in_onnxruntime(tmp_path: Path) -> None:
    """The shape ops that carry a gate's weights to its multiply are part of the gate: kept in
    float with it, so the multiply gets a float operand. Quantized, they handed the multiply
    two dequantized inputs, and onnxruntime fused it into a QLinearMul (a depthwise dynamic
    convolution's K weighted outputs): a node reported as float ran in INT8."""
    import onnx

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    attnsurgeon.apply(model, "dynconv", layers="features.2")
    export_onnx(model, tmp_path / "f.onnx", input_size=32, verify=False)
    found = quantize.attention_nodes(onnx.load(str(tmp_path / "f.onnx")), model)
    applies = {a["node"] for a in found if a["role"] == "apply"}
    assert len(applies) == 4 and {a["op"] for a in found if a["role"] == "gate"} == {"Softmax", "Unsqueeze", "Split"}
    keep = [a["node"] for a in found if quantize.policy_keeps("gate+apply", a["role"])]
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", images, exclude=keep, show_progress=False)
    ran = {n.name: n.op_type for n in quantize.onnxruntime_graph(tmp_path / "q.onnx").node}
    assert {ran.get(name) for name in applies} == {"Mul"}


def test_non_local_product_kept_float_stays_float_in_onnxruntime(tmp_path: Path) -> None:
    """The reshapes and the scale that make the non-local query-key product's operands are
    part of its branch, and the scale multiplies theta before the product: the product gets a
    float operand. With dequantized operands only, onnxruntime moved the dequantize past the
    reshapes and fused the "float" product into a MatMulIntegerToFloat, slower than the float
    MatMul (MobileNetV2 + non-local in every block, INT8, 224x224: x0.66 -> x1.02 of float)."""
    import onnx

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    attnsurgeon.apply(model, "nl", layers="features.14")
    export_onnx(model, tmp_path / "f.onnx", input_size=64, verify=False)
    found = quantize.attention_nodes(onnx.load(str(tmp_path / "f.onnx")), model)
    branch = [a["op"] for a in found if a["role"] == "branch"]
    assert sorted(branch) == ["MatMul", "Mul", "Reshape", "Reshape", "Transpose"]
    keep = [a["node"] for a in found if quantize.policy_keeps("branch+apply", a["role"])]
    images = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", images, exclude=keep, show_progress=False)
    ran = [n.op_type for n in quantize.onnxruntime_graph(tmp_path / "q.onnx").node]
    assert sum(op in ("MatMul", "FusedMatMul") for op in ran) == 2  # the query-key product and the apply
    assert not {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"} & set(ran)


def test_a_gate_kept_float_alone_is_reported_as_run_in_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Sigmoid kept in float between quantized neighbours is, to onnxruntime, a quantized
    sigmoid (DequantizeLinear -> Sigmoid -> QuantizeLinear): it runs QLinearSigmoid, and the
    summary says so rather than counting it as float (a policy of the gate alone)."""
    from rich.console import Console

    monkeypatch.setitem(quantize.DEFAULT_POLICY, "ema", "gate")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    attnsurgeon.apply(model, "ema", position="mid", layers="features.14")
    images = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    summary = quantize.export_quantized(model, tmp_path / "q.onnx", precision="int8", input_size=32, opset=18,
                                        images=images, min_agreement=0.0, show_progress=False)
    q = summary["quantized"]
    gates = {a["node"] for a in q["float_nodes"] if a["op"] in ("Sigmoid", "Softmax")}
    assert {a["ran_as"] for a in q["run_as_integer"]} == {"QLinearSigmoid", "QLinearSoftmax"}
    assert {a["node"] for a in q["run_as_integer"]} == gates and len(gates) == 5
    console = Console(record=True, width=300)
    quantize.print_quantized_summary(console, summary)
    assert "onnxruntime's CPU provider fuses 5 into integer ops (QLinearSigmoid 3, QLinearSoftmax 2)" \
        in console.export_text()
