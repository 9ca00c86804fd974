"""ODConv: the paper's formula in both forms, the authors' parameter counts, preserve on
every family, export with a dynamic batch, bf16 and channels_last, checkpoints."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon import set_temperature
from attnsurgeon.layers import odconv
from attnsurgeon.layers.odconv import ODConv2d, from_conv, has_unfolded_form
from attnsurgeon.surgery import apply
from attnsurgeon.training import new_modules


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _reference(od: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula, one sample at a time: y = (sum_k a_w a_f a_c a_s W_k) * x + b."""
    a_c, a_f, a_s, a_w = od.attention(x, od.temperature)
    bank = od.bank()  # (K, C_out, C_in / g, kh, kw)
    out = []
    for n in range(x.shape[0]):
        w = bank if a_w is None else bank * a_w[n][:, None, None, None, None]
        w = w.sum(0)
        if a_s is not None:
            w = w * a_s[n].view(1, 1, *od.kernel_size)
        if a_f is not None:
            w = w * a_f[n][:, None, None, None]
        w = w * a_c[n].view(od.groups, 1, -1).expand(-1, od.out_channels // od.groups, -1).reshape(
            od.out_channels, -1)[:, :, None, None]  # input channel c of group j sits at j * C_in/g + c
        out.append(F.conv2d(x[n:n + 1], w, od.bias, od.stride, od.padding, od.dilation, od.groups))
    return torch.cat(out)


GEOMETRIES = [  # (C_in, C_out, kernel, stride, padding, dilation, groups, bias, K)
    (8, 16, 3, 1, 1, 1, 1, False, 4),
    (8, 16, 3, 2, 1, 1, 2, False, 4),  # grouped, stride 2
    (16, 16, 3, 1, 2, 2, 16, True, 3),  # depthwise, dilated, with a bias (ConvNeXt's has one)
    (16, 16, 7, 2, 3, 1, 16, True, 2),  # depthwise 7x7 stride 2
    (8, 12, 1, 1, 0, 1, 1, False, 4),  # 1x1: no spatial attention
    (8, 12, 1, 2, 0, 1, 1, False, 1),  # 1x1, K = 1: a plain conv between two gates
    (6, 8, (1, 3), 1, (0, 1), 1, 2, False, 4),  # non-square kernel
]


@pytest.mark.parametrize("c_in, c_out, k, s, p, d, g, bias, kernels", GEOMETRIES)
def test_both_forms_compute_the_papers_formula(c_in, c_out, k, s, p, d, g, bias, kernels, monkeypatch):
    torch.manual_seed(0)
    od = ODConv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, bias=bias, kernels=kernels,
                  temperature=2.0, reduction=2, min_dim=4)
    with torch.no_grad():  # non-trivial attention statistics
        od.attention.bn.running_mean.uniform_(-0.5, 0.5)
    od.eval()
    x = torch.randn(3, c_in, 9, 10, requires_grad=True)
    ref = _reference(od, x)
    a_c, a_f, a_s, a_w = od.attention(x, od.temperature)
    forms = [od(x)]
    if a_s is not None or a_w is not None:
        b = od.bias[:, None, None] if bias else 0
        w = od.kernels_per_sample(a_s, a_w, x.dtype)  # gates on the maps
        xc = x * a_c[:, :, None, None]
        f = a_f[:, :, None, None] if a_f is not None else 1
        forms += [od.forward_per_sample(xc, w) * f + b, od.forward_positions(xc, w) * f + b,
                  od.forward_unfolded(xc, a_s, a_w) * f + b]
        with monkeypatch.context() as m:  # the unfolded form as tracers build it: strided slices
            m.setattr(odconv, "_tracing", lambda x: True)
            forms.append(od.forward_unfolded(xc, a_s, a_w) * f + b)
        w = od.kernels_per_sample(a_s, a_w, x.dtype, gates=(a_c, a_f))  # gates in the kernels
        forms += [od.forward_per_sample(x, w) + b, od.forward_positions(x, w) + b]
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, od.weight), retain_graph=True)
    for y in forms:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), (x, od.weight), retain_graph=True)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_scaled_im2col_gradients(needs):
    """The unfolded form's im2col, which recomputes the unfolded map in its backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=needs[0])
    a_s = torch.rand(2, 4, dtype=torch.float64, requires_grad=needs[1])
    geometry = ((2, 2), (1, 2), (1, 0), (2, 1))  # kernel, dilation, padding, stride
    assert torch.autograd.gradcheck(lambda x, a: odconv._ScaledIm2col.apply(x, a, geometry), (x, a_s))
    want = F.unfold(x, *geometry).unflatten(1, (3, -1)) * a_s[:, None, :, None]
    torch.testing.assert_close(odconv._ScaledIm2col.apply(x, a_s, geometry), want)


def test_eager_choices():
    od = ODConv2d(64, 64, 3, padding=1)
    assert od.folds(torch.empty(2, 64, 56, 56))  # 36,864 kernel elements < 401,408 map elements
    assert not od.folds(torch.empty(2, 64, 7, 7))
    late = ODConv2d(512, 512, 3, padding=1)  # ResNet-18's layer4: unfolded, where dynconv stacks
    assert late.prefers_stacked(torch.empty(32, 512, 7, 7)) and not late.prefers_stacked(torch.empty(1, 512, 7, 7))
    assert not od.prefers_stacked(torch.empty(32, 64, 56, 56))


def test_form_choice_and_set_dynconv_form(monkeypatch):
    """The forms ODConv runs, chosen as dynconv's (``PerSampleForms``): the CPU rule, batch 1,
    forced forms, and what tracers get."""
    early, late = ODConv2d(64, 64, 3, padding=1), ODConv2d(512, 512, 3, padding=1)
    x_early, x_late = torch.empty(32, 64, 56, 56), torch.empty(32, 512, 7, 7)
    assert early.form_for(x_early) == "per_sample" and late.form_for(x_late) == "stacked"
    assert late.form_for(torch.empty(1, 512, 7, 7)) == "per_sample"
    assert attnsurgeon.set_dynconv_form(nn.Sequential(early, late), "per_sample") == 2
    assert late.form_for(x_late) == "per_sample" and "form=per_sample" in repr(late)
    late.form = "triton"  # no CUDA and no interpreter here: the kernel does not apply, the rule decides
    assert late.form_for(x_late) == "stacked"
    monkeypatch.setattr(attnsurgeon.kernels, "exporting", lambda: True)
    assert late.form_for(x_late) == "positions"  # a dynamic batch in float files
    with odconv.quantizable_export():
        assert late.form_for(x_late) == "stacked"  # the bank as a conv weight, for INT8


def test_attentions_the_authors_leave_out():
    dw = ODConv2d(32, 32, 3, groups=32, kernels=4)
    assert dw.attention.filter_fc is None and dw.attention.spatial_fc is not None  # depthwise: no a_f
    pw = ODConv2d(32, 64, 1, kernels=1)
    assert pw.attention.spatial_fc is None and pw.attention.kernel_fc is None  # 1x1, K = 1
    assert pw.attention.filter_fc is not None and pw.attention.channel_fc is not None
    # the squeeze is max(C_in // r, min_dim) wide, no bias; the heads have biases (theirs)
    assert ODConv2d(512, 512, 3).attention.fc.weight.shape[0] == 32
    assert dw.attention.fc.weight.shape[0] == 16 and dw.attention.fc.bias is None
    # a 3x3 conv 64 -> 64, K = 4: the bank, and the attention of the authors' module
    od = ODConv2d(64, 64, 3, kernels=4)
    hidden = 16
    expected = 4 * 64 * 64 * 9 + 64 * hidden + 2 * hidden + (hidden + 1) * (64 + 64 + 9 + 4)
    assert _count(od) == expected


# --- the authors' printed parameter counts (their README's tables) ------------------------

def _meta(name: str, **params) -> nn.Module:
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
        if params:
            apply(model, "odconv", params=params)
    return model


@pytest.mark.parametrize("kernels, printed", [(1, 11.94e6), (4, 44.90e6)])
def test_resnet18_counts(kernels, printed):
    """ResNet-18 + ODConv (1x) 11.94M, (4x) 44.90M: both 3x3 convs of every block."""
    assert abs(_count(_meta("resnet18", kernels=kernels)) - printed) <= 0.005e6


def test_mobilenet_v2_counts_and_the_last_conv():
    """MobileNetV2 (1.0x) + ODConv (1x) 4.94M, (4x) 11.51M: the authors replace every conv
    of every inverted residual and also the last 1x1 conv (features.18, 320 -> 1280), which
    is no block, so a recipe reaches all but that conv."""
    for kernels, printed, surgery, whole in ((1, 4.94e6, 4_900_145, 4_940_185), (4, 11.51e6, 10_243_225, 11_512_149)):
        model = _meta("mobilenet_v2", kernels=kernels, target="all")
        assert _count(model) == surgery
        with torch.device("meta"):
            last = model.features[18][0]
            model.features[18][0] = from_conv(last, None, kernels=kernels)[0]
        assert _count(model) == whole  # what the recipes' comments cite
        assert abs(whole - printed) <= 0.005e6


def test_resnet50_counts_without_the_shortcut_convs():
    """ResNet-50 + ODConv (1x) 28.64M, (4x) 90.67M: the three convs of every bottleneck;
    the downsample 1x1 convs stay static (``target=all`` would replace them too)."""
    for kernels, printed in ((1, 28.64e6), (4, 90.67e6)):
        model = _meta("resnet50")
        with torch.device("meta"):
            for block in (b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer):
                for name in ("conv1", "conv2", "conv3"):
                    setattr(block, name, from_conv(getattr(block, name), None, kernels=kernels)[0])
        assert abs(_count(model) - printed) <= 0.005e6


# --- preserve ------------------------------------------------------------------------------

def _randomise_norms(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name, target", [("resnet18", "all"), ("mobilenet_v2", "all")])
def test_preserve_keeps_the_function(name, target):
    torch.manual_seed(0)
    model = _randomise_norms(getattr(torchvision.models, name)(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    changes = apply(model, "odconv", params={"target": target}, init="preserve")
    assert len(changes) == (19 if name == "resnet18" else 50)
    with torch.no_grad():
        assert _rel(model(x), before) <= 1e-4


def test_preserve_on_a_depthwise_conv_with_bias_and_on_tracing():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 7, padding=3, groups=32)  # ConvNeXt's
    od = from_conv(conv, None, init="preserve", kernels=3)[0].eval()
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        assert _rel(od(x), conv(x)) <= 1e-6
        traced = torch.fx.symbolic_trace(od)  # the positions form
        assert _rel(traced(x), conv(x)) <= 1e-6


def test_preserve_trains():
    torch.manual_seed(0)
    od = from_conv(nn.Conv2d(8, 8, 3, padding=1), None, init="preserve")[0].train()
    od(torch.randn(4, 8, 6, 6)).square().sum().backward()
    a = od.attention
    for head in (a.channel_fc, a.filter_fc, a.spatial_fc):
        assert head.weight.grad.abs().sum() > 0  # every gate can move off 1/2
    # the K kernels are equal, so the kernel attention has no gradient until they part
    assert a.kernel_fc.weight.grad.abs().sum() == 0 and od.weight.grad.abs().sum() > 0


# --- whole models: every family, checkpoints, export -------------------------------------

@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "mnasnet0_5",
                                  pytest.param("convnext_tiny", marks=pytest.mark.heavy)])
def test_every_family_trains(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    changes = apply(model, "odconv", layers="stage4", params={"target": "all", "kernels": 2})
    assert changes and all(c.module == "ODConv2d" for c in changes)
    grouped = [m for m in model.modules() if isinstance(m, ODConv2d) and m.groups > 1]
    assert grouped, "the last stage of every family here has depthwise or grouped convs"
    model.train()
    y = model(torch.randn(2, 3, 64, 64))
    y.sum().backward()
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, ODConv2d))


def test_convnext_depthwise_with_bias():
    """ConvNeXt's 7x7 depthwise conv (bias, no norm after it) without building ConvNeXt."""
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(0)
    block = nn.Sequential(CNBlock(32, layer_scale=1e-6, stochastic_depth_prob=0.0)).eval()
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        before = block(x)
    changes = apply(block, "odconv", init="preserve")
    assert [c.where for c in changes] == ["block.0"]
    od = block[0].block[0]
    assert isinstance(od, ODConv2d) and od.groups == 32 and od.bias is not None
    with torch.no_grad():
        assert _rel(block(x), before) <= 1e-5


def test_checkpoint_round_trip(cli, tmp_path):
    out = tmp_path / "od.pt"
    result = cli("insert", "resnet18", "--attn", "odconv", "--layers", "layer4", "--param", "kernels=2",
                 "--param", "temperature=4", "-o", str(out))
    assert result.exit_code == 0, result.output
    model = attnsurgeon.load(out).eval()
    again = attnsurgeon.load(out).eval()
    ods = [m for m in model.modules() if isinstance(m, ODConv2d)]
    assert len(ods) == 4 and all(m.kernels == 2 and float(m.temperature) == 4.0 for m in ods)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
    state = torch.load(out, weights_only=True)["state_dict"]
    assert state["layer4.0.conv1.weight"].shape == (2 * 512, 256, 3, 3)


def test_exports_with_a_dynamic_batch():
    torch.manual_seed(0)
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10)).eval()
    apply(model, "odconv", layers="layer4", params={"target": "all"})
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_dynamic_batch():
    torch.manual_seed(0)
    od = nn.Sequential(ODConv2d(8, 8, 3, stride=2, padding=1, groups=2, reduction=2, min_dim=4),  # grouped
                       ODConv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=True, min_dim=4)).eval()  # depthwise
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(od, (torch.randn(2, 8, 10, 10),), dynamo=True,
                                dynamic_shapes=({0: batch},), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    for n in (1, 5):
        x = torch.randn(n, 8, 10, 10)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), od(x), rtol=1e-5, atol=1e-5)


def test_onnx_dynamic_hw_traced_on_a_1x1_map(tmp_path):
    """Traced where the ODConv's map is 1x1 and run on 2x2 and larger."""
    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.AvgPool2d(32, ceil_mode=True),
                        ODConv2d(16, 16, 3, padding=1, bias=True, reduction=4, min_dim=4)).eval()
    data = export_onnx(net, tmp_path / "od.onnx", input_size=32, dynamic_hw=True)
    runs = data["verification"]["runs"]
    assert data["verification"]["passed"] and any(r["shape"][2] > 32 for r in runs)


class _Block(nn.Module):
    """ResNet's basic block with an ODConv for its first conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ODConv2d(c, c, 3, padding=1, reduction=4, min_dim=4), nn.BatchNorm2d(c),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x)


def test_onnx_dynamic_hw_in_a_resnet_traced_on_a_1x1_map(tmp_path):
    """A ResNet-like net whose ODConv map is 1x1 at the traced 32x32, exported with a dynamic
    H and W and run at 2x2 and larger maps. The positions form reshaped a strided slice of the
    input, whose contiguity check asks whether H' and W' are 1; torch.export kept the traced
    answer as a guard (H, W <= 32), so every size after it became a constant 1 in the file
    (onnxruntime: "Shape mismatch attempting to re-use buffer")."""
    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    stem = [m for c in (3, 16, 16, 16, 16) for m in (nn.Conv2d(c, 16, 3, stride=2, padding=1, bias=False),
                                                      nn.BatchNorm2d(16), nn.ReLU())]  # 32x32 -> 1x1
    net = nn.Sequential(*stem, _Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # BN statistics away from identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    data = export_onnx(net.eval(), tmp_path / "od.onnx", input_size=32, dynamic_hw=True)
    runs = data["verification"]["runs"]
    assert data["verification"]["passed"] and any(r["shape"][2] > 32 for r in runs)
    session = ort.InferenceSession(str(tmp_path / "od.onnx"), providers=["CPUExecutionProvider"])
    for n, h, w in ((2, 64, 64), (1, 100, 70), (3, 224, 224)):  # 2x2, 4x3 and 7x7 maps at the ODConv
        x = torch.randn(n, 3, h, w)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.heavy
def test_cli_export_onnx_verifies(cli, tmp_path):
    out = tmp_path / "od.onnx"
    result = cli("export-onnx", "resnet18", "--attn", "odconv", "--layers", "layer1", "-o", str(out),
                 "--input-size", "64")
    assert result.exit_code == 0, result.output
    assert out.exists()


# --- bf16, channels_last, training helpers --------------------------------------------

def test_int8_export_quantizes_the_kernel_bank(tmp_path):
    """INT8 export traces the unfolded form, whose kernel bank is a Conv weight: the quantizer
    stores it in int8 (in the positions form it fed per-sample MatMuls and stayed float, and an
    INT8 ODConv-ResNet-18 was 99% of its float file); the file still agrees with the model."""
    import numpy as np
    import onnx

    from attnsurgeon.quantize import export_quantized

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          ODConv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    _randomise_norms(model).eval()
    assert has_unfolded_form(model) and not has_unfolded_form(ODConv2d(8, 8, 1, kernels=1))
    # the bank, 4 x 128 x 64 x 9 = 294,912 elements, is over the exporter's folding limit
    images = np.random.default_rng(0).standard_normal((30, 3, 32, 32)).astype(np.float32)
    summary = export_quantized(model, tmp_path / "q.onnx", precision="int8", input_size=32, opset=18,
                               images=images, calibration={"folder": "random"}, min_agreement=0.0,
                               show_progress=False)
    q = summary["quantized"]
    assert q["size_ratio"] < 0.4  # 0.94 in the positions form
    proto = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in proto.graph.node for o in n.output}
    int8 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 7 and q["float_nodes"] == []  # the stem, the bank, the attention's 5 (no surgery: no policy)
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" and producers[n.input[1]].input[0] in int8
               for n in convs)
    assert q["agreement"]["cosine_mean"] > 0.99


def test_int8_export_of_a_depthwise_odconv_runs_depthwise_convs(tmp_path):
    """A depthwise ODConv's unfolded form is K depthwise convs (a ``kh * kw`` x 1 kernel down
    the stacked slices), which onnxruntime's QLinearConv runs by its depthwise kernel; before,
    one grouped conv with K outputs per group took its generic path (MobileNetV2 + ODConv
    INT8 at 224x224: 76 ms -> 39 ms). Each kernel is an int8 initializer; the file agrees."""
    import numpy as np
    import onnx
    from onnx import helper

    from attnsurgeon.quantize import export_quantized

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          ODConv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    _randomise_norms(model).eval()
    images = np.random.default_rng(0).standard_normal((30, 3, 32, 32)).astype(np.float32)
    summary = export_quantized(model, tmp_path / "q.onnx", precision="int8", input_size=32, opset=18,
                               images=images, calibration={"folder": "random"}, min_agreement=0.0,
                               show_progress=False)
    proto = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in proto.graph.node for o in n.output}
    int8 = {t.name: tuple(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}

    def group(node: onnx.NodeProto) -> int:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)

    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if group(n) == 64]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)
    assert [int8[producers[n.input[1]].input[0]] for n in depthwise] == [(64, 1, 9, 1)] * 4  # K = 4
    assert summary["quantized"]["agreement"]["cosine_mean"] > 0.99


@pytest.mark.parametrize("size, stacked", [(12, False), (4, True)])
def test_bf16_autocast_and_channels_last(size, stacked):
    torch.manual_seed(0)
    od = ODConv2d(16, 32, 3, stride=2, padding=1, groups=2, kernels=4).eval()
    x = torch.randn(2, 16, size, size)
    assert od.prefers_stacked(x) == stacked
    with torch.no_grad():
        ref = od(x)
        last = od.to(memory_format=torch.channels_last)
        y = last(x.contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = od(x)
        assert yb.dtype == torch.bfloat16
        assert _rel(yb.float(), ref) < 0.05


def test_new_modules_and_temperature():
    model = torchvision.models.resnet18(num_classes=10)
    apply(model, "odconv", layers="layer3:")
    found = new_modules(model)
    assert [name for name, _ in found] == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1",
                                           "layer3.1.conv2", "layer4.0.conv1", "layer4.0.conv2",
                                           "layer4.1.conv1", "layer4.1.conv2"]
    assert all(isinstance(m, ODConv2d) for _, m in found)
    assert set_temperature(model, 2.5) == 8
    od = model.layer3[0].conv1
    x = torch.randn(2, 128, 8, 8)
    _, _, _, a_w = od.attention.eval()(x, od.temperature)
    z = od.attention.act(od.attention.bn(od.attention.fc(x.mean((2, 3), keepdim=True))))
    torch.testing.assert_close(a_w, (od.attention.kernel_fc(z).flatten(1) / 2.5).softmax(1))
    with pytest.raises(ValueError, match="got 0"):
        set_temperature(model, 0)


@pytest.mark.parametrize("param, message", [("kernels=0", "kernels must be >= 1"),
                                            ("kernels=65", "kernels must be <= 64"),
                                            ("target=every", "target must be one of"),
                                            ("reduction=0.5", "reduction must be int")])
def test_bad_params_are_one_line(cli, tmp_path, param, message):
    out = tmp_path / "x.pt"
    result = cli("insert", "resnet18", "--attn", "odconv", "--param", param, "-o", str(out))
    assert result.exit_code == 2 and message in result.output and not out.exists()
