"""ECA, coordinate attention and GC: the papers' counts and formulas, init modes, training,
tracing, ONNX with dynamic H/W, the summary's MACs and the kinds listing.

Preservation per kind and position on resnet18 is in ``tests/test_preserve.py`` (these
kinds are in its ``INSERT_KINDS``), ONNX with a dynamic batch at every position in
``tests/test_onnx.py`` (it covers every registered kind), and the recipes' counts in
``tests/test_recipes.py``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import attnsurgeon
from attnsurgeon.layers import PRESERVE_LOGIT
from attnsurgeon.layers.coord import CoordAttention
from attnsurgeon.layers.eca import ECA, adaptive_kernel_size, reference_kernel_size
from attnsurgeon.layers.global_context import GlobalContext
from attnsurgeon.surgery import apply

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
KINDS = {"eca": ECA, "coord": CoordAttention, "gc": GlobalContext}
RESNET50 = 25_557_032  # torchvision resnet50
GATE = torch.sigmoid(torch.tensor(PRESERVE_LOGIT)).item()


def _resnet50_params(*args, **kwargs) -> int:
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    apply(model, *args, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _new_params(model: nn.Module, cls: type) -> dict[str, nn.Parameter]:
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, cls)
            for p_name, p in m.named_parameters()}


# --- ECA --------------------------------------------------------------------------------

# ResNet-50's bottleneck outputs: t = (log2 C + 1) / 2 = 4.5, 5, 5.5, 6
@pytest.mark.parametrize("channels, paper_rule, reference_rule", [
    (64, 3, 3), (128, 3, 5), (256, 5, 5), (512, 5, 5), (1024, 5, 5), (2048, 5, 7), (4096, 7, 7),
])
def test_eca_adaptive_kernel_rules(channels: int, paper_rule: int, reference_rule: int) -> None:
    assert adaptive_kernel_size(channels) == paper_rule
    assert reference_kernel_size(channels) == reference_rule
    assert ECA(channels).kernel_size == paper_rule


def test_eca_resnet50_adds_the_papers_80_parameters() -> None:
    assert _resnet50_params("eca") - RESNET50 == 80  # k = 5 in all 16 bottlenecks
    # the reference code's rounding (int, then up to odd) gives k = 5, 5, 5, 7: 86, not 80
    blocks = {256: 3, 512: 4, 1024: 6, 2048: 3}
    assert sum(n * reference_kernel_size(c) for c, n in blocks.items()) == 86
    # the released ECA-Net50 (k = 3, 5, 5, 7 per stage) also has 80; the recipe builds it
    recipe_model = _resnet50_params(recipe=RECIPES / "eca_resnet50.toml")
    assert recipe_model - RESNET50 == 80
    # the paper's 24.37M (the backbone, and ECA-Net50) is this count in units of 2^20
    assert round(RESNET50 / 2**20, 2) == round(recipe_model / 2**20, 2) == 24.37


def test_eca_recipe_kernels_per_stage() -> None:
    model = torchvision.models.resnet50()
    apply(model, recipe=RECIPES / "eca_resnet50.toml")
    kernels = {f"layer{i}": {b.attn_standard.kernel_size for b in getattr(model, f"layer{i}")} for i in range(1, 5)}
    assert kernels == {"layer1": {3}, "layer2": {5}, "layer3": {5}, "layer4": {7}}


def test_eca_module_is_the_papers_formula() -> None:
    torch.manual_seed(0)
    eca = ECA(40, kernel_size=5)
    nn.init.normal_(eca.conv.weight)
    x = torch.randn(3, 40, 6, 5)
    y = x.mean((2, 3))  # GAP
    w = eca.conv.weight[0, 0]
    padded = F.pad(y, (2, 2))
    s = torch.sigmoid(torch.stack([padded[:, i:i + 5] @ w for i in range(40)], dim=1))  # 1-D conv, no bias
    torch.testing.assert_close(eca(x), x * s[:, :, None, None])
    assert eca.conv.bias is None and sum(p.numel() for p in eca.parameters()) == 5


def test_eca_rejects_even_kernel_and_cli_names_it(cli, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 4"):
        ECA(64, kernel_size=4)
    result = cli("insert", "resnet18", "--attn", "eca", "--param", "kernel_size=4", "-o", str(tmp_path / "m.pt"))
    assert result.exit_code == 2 and "kernel_size must be one of" in result.stderr and "4" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_eca_macs_in_summary(cli) -> None:
    """The 1-D conv is counted: C * k multiply-adds per module (resnet18 at 64x64)."""
    data = json.loads(cli("summarize", "resnet18", "--attn", "eca", "--input-size", "64", "--json").stdout)
    kernels = {64: 3, 128: 3, 256: 5, 512: 5}  # 2 blocks per stage
    assert data["total"]["params_added"] == sum(2 * k for k in kernels.values())
    assert data["total"]["macs_added"] == sum(2 * c * k for c, k in kernels.items())
    per_stage = {g["name"]: g["macs_added"] for g in data["groups"]}
    assert per_stage["layer4"] == 2 * 512 * 5 and per_stage["stem"] == 0


# --- coordinate attention ---------------------------------------------------------------


class OfficialCoordAtt(nn.Module):
    """The official ``CoordAtt`` (github.com/Andrew-Qibin/CoordAttention, coordatt.py) with
    its AdaptiveAvgPool2d pools, permutes and torch.split, for comparison."""

    def __init__(self, ours: CoordAttention) -> None:
        super().__init__()
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        self.ours = ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.ours
        n, c, h, w = x.size()
        x_h = self.pool_h(x)
        x_w = self.pool_w(x).permute(0, 1, 3, 2)
        y = o.act(o.bn1(o.conv1(torch.cat([x_h, x_w], dim=2))))
        x_h, x_w = torch.split(y, [h, w], dim=2)
        a_h = o.conv_h(x_h).sigmoid()
        a_w = o.conv_w(x_w.permute(0, 1, 3, 2)).sigmoid()
        return x * a_w * a_h


@pytest.mark.parametrize("training", [True, False])
def test_coord_matches_the_official_code(training: bool) -> None:
    torch.manual_seed(0)
    ours = CoordAttention(48, reduction=4)
    with torch.no_grad():  # non-trivial BN, so train and eval differ
        ours.bn1.running_mean.normal_()
        ours.bn1.running_var.uniform_(0.5, 2)
        ours.bn1.weight.uniform_(0.5, 1.5)
        ours.bn1.bias.normal_()
    official = OfficialCoordAtt(copy.deepcopy(ours))
    x = torch.randn(2, 48, 7, 5)  # H != W
    torch.testing.assert_close(ours.train(training)(x), official.train(training)(x))
    torch.testing.assert_close(ours.bn1.running_mean, official.ours.bn1.running_mean)


@pytest.mark.parametrize("channels, mid", [(16, 8), (96, 8), (384, 12), (1280, 40)])
def test_coord_mid_width_is_max_8_c_over_r(channels: int, mid: int) -> None:
    ca = CoordAttention(channels)
    assert ca.conv1.out_channels == mid and ca.conv_h.out_channels == channels
    assert all(c.bias is not None for c in (ca.conv1, ca.conv_h, ca.conv_w))


def test_mobilenet_v2_with_ca_matches_the_papers_count() -> None:
    """CA on the expanded channels after the depthwise conv of every inverted residual with
    expansion (the official mbv2_ca.py): the ``mid`` position of features.2 on.

    The official README's ImageNet table prints 3.95M for "MobileNetV2 + CA" (3.5M for
    MobileNetV2): torchvision's 3,504,872 + 16 modules = 3,950,648. The same modules
    wired in by hand (depthwise conv, then CA) give the same count and the same function.
    """
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    by_hand = copy.deepcopy(model)
    base = sum(p.numel() for p in model.parameters())
    changes = apply(model, "coord", position="mid", layers="features.2:", seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert len(changes) == 16 and base == 3_504_872
    assert total == 3_950_648 and round(total / 1e6, 2) == 3.95
    modules = iter(b.attn_mid for b in model.features[2:18])
    for block in by_hand.modules():
        if isinstance(block, InvertedResidual) and len(block.conv) == 4:  # pw, dw, pw-linear, bn
            depthwise = block.conv[1]
            assert depthwise[0].groups == depthwise[0].in_channels  # the depthwise conv
            block.conv[1] = nn.Sequential(depthwise, next(modules))
    assert sum(p.numel() for p in by_hand.parameters()) == total
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(x))


def test_coord_paper_init_is_mbv2_ca() -> None:
    torch.manual_seed(0)
    ca = CoordAttention(256)
    for conv in (ca.conv1, ca.conv_h, ca.conv_w):
        assert torch.count_nonzero(conv.bias) == 0
        expected = math.sqrt(2 / conv.out_channels)  # normal(0, sqrt(2 / (k*k*out)))
        assert 0.8 * expected < conv.weight.std().item() < 1.2 * expected
    assert torch.equal(ca.bn1.weight, torch.ones(8)) and torch.equal(ca.bn1.bias, torch.zeros(8))


# --- GC ---------------------------------------------------------------------------------


def _gc_params(c: int, r: int = 16) -> int:
    h = c // r
    return (c + 1) + (c * h + h) + 2 * h + (h * c + c)


def test_gc_resnet50_counts() -> None:
    blocks = {256: 3, 512: 4, 1024: 6, 2048: 3}
    everywhere = RESNET50 + sum(n * _gc_params(c) for c, n in blocks.items())
    c3_c5 = everywhere - 3 * _gc_params(256)
    assert _resnet50_params("gc") == everywhere == 28_105_032
    assert _resnet50_params("gc", layers="layer2:layer4") == c3_c5 == 28_078_773
    assert _resnet50_params("gc", layers="layer2:layer4", params={"reduction": 4}) == 35_557_941


@pytest.mark.parametrize("fusion", ["add", "scale"])
def test_gc_module_is_the_papers_formula(fusion: str) -> None:
    torch.manual_seed(0)
    gc = GlobalContext(32, reduction=4, fusion=fusion)
    for p in gc.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 5, 6)
    logits = torch.einsum("c,nchw->nhw", gc.conv_mask.weight[0, :, 0, 0], x) + gc.conv_mask.bias
    a = logits.flatten(1).softmax(-1)  # softmax over all positions
    context = torch.einsum("ncp,np->nc", x.flatten(2), a)
    w1, ln, w2 = gc.transform[0], gc.transform[1], gc.transform[3]
    hidden = context @ w1.weight[:, :, 0, 0].T + w1.bias
    hidden = F.layer_norm(hidden, (8,), ln.weight.flatten(), ln.bias.flatten())
    t = torch.relu(hidden) @ w2.weight[:, :, 0, 0].T + w2.bias
    expected = x + t[:, :, None, None] if fusion == "add" else x * torch.sigmoid(t)[:, :, None, None]
    torch.testing.assert_close(gc(x), expected)


def test_gc_paper_init_is_mmcvs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 6)
    gc = GlobalContext(64)
    assert torch.equal(gc(x), x)  # add: the zero last conv makes it the identity, by design
    assert gc.conv_mask.weight.abs().sum() > 0 and torch.count_nonzero(gc.conv_mask.bias) == 0
    std = gc.conv_mask.weight.std().item()
    assert 0.7 * math.sqrt(2 / 64) < std < 1.3 * math.sqrt(2 / 64)  # Kaiming normal, fan-in
    torch.testing.assert_close(GlobalContext(64, fusion="scale")(x), 0.5 * x)  # sigmoid(0)


def test_gc_zero_last_conv_moves_first_then_everything() -> None:
    """With W_v2 = 0 the first step can only move W_v2; the second moves every parameter."""
    torch.manual_seed(0)
    gc = GlobalContext(32, reduction=4)
    opt = torch.optim.SGD(gc.parameters(), lr=0.1)
    x, target = torch.randn(4, 32, 5, 5), torch.randn(4, 32, 5, 5)
    before = {n: p.detach().clone() for n, p in gc.named_parameters()}
    moved = []
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(gc(x), target).backward()
        opt.step()
        moved.append({n for n, p in gc.named_parameters() if not torch.equal(p.detach(), before[n])})
    assert moved[0] == {"transform.3.weight", "transform.3.bias"}
    assert moved[1] == set(before)


# --- every kind -------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["paper", "preserve"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_in_train_and_eval(kind: str, init: str) -> None:
    from attnsurgeon.kinds import builder, get_kind

    module = builder(get_kind(kind))(24, init=init)
    x = torch.randn(3, 24, 9, 7)
    for training in (True, False):
        y = module.train(training)(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind, params, expected", [
    ("eca", {}, lambda x: GATE * x),
    ("coord", {}, lambda x: GATE**2 * x),
    ("gc", {}, lambda x: x),
    ("gc", {"fusion": "scale"}, lambda x: GATE * x),
])
def test_preserve_init_is_as_exact_as_the_form_allows(kind, params, expected, training: bool) -> None:
    from attnsurgeon.kinds import builder, get_kind

    module = builder(get_kind(kind))(32, init="preserve", **params).train(training)
    x = 3 * torch.randn(4, 32, 6, 5)
    torch.testing.assert_close(module(x), expected(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["paper", "preserve"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_reach_every_new_parameter_within_two_steps(kind: str, init: str, x64) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    apply(model, kind, layers="layer3:", init=init)
    new = _new_params(model, KINDS[kind])
    assert new
    # GC's conv_mask bias shifts every softmax logit alike: its gradient is 0 by
    # construction (mmcv's ContextBlock has the same bias); only rounding noise reaches it
    shift_invariant = {n for n in new if n.endswith("conv_mask.bias")}
    reached: set[str] = set()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model.train()(x64), torch.tensor([1, 2])).backward()
        reached |= {n for n, p in new.items() if p.grad is not None and p.grad.abs().sum() > 0}
        for n in shift_invariant:
            assert new[n].grad.abs().max() < 1e-7, n
        opt.step()
    assert reached >= set(new) - shift_invariant, sorted(set(new) - shift_invariant - reached)


@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_export_of_resnet18(kind: str, x64) -> None:
    model = torchvision.models.resnet18().eval()
    apply(model, kind, position="identity" if kind == "coord" else "standard", seed=0)
    exported = torch.export.export(model, (x64,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x64), model(x64))


@pytest.mark.parametrize("kind, params", [("eca", {}), ("coord", {}), ("gc", {}), ("gc", {"fusion": "scale"})])
@pytest.mark.heavy
def test_onnx_dynamic_hw_matches_pytorch(kind: str, params: dict, tmp_path: Path) -> None:
    """Dynamic batch and H/W: export_onnx verifies 1x3x64x64, 3x3x64x64 and 3x3x96x80;
    onnxruntime at batch 2 and 48x48 is checked here on its own. The new modules' weights
    are perturbed, so no path is idle (GC's zero last conv would make it the identity)."""
    from test_onnx import ATOL, _perturb_norms, ort_errors

    model = torchvision.models.resnet18()
    apply(model, kind, layers="layer3:", params=params, seed=0)
    _perturb_norms(model)
    with torch.no_grad():
        for p in _new_params(model, KINDS[kind]).values():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    data = attnsurgeon.export_onnx(model.eval(), tmp_path / "m.onnx", input_size=64, dynamic_hw=True)
    assert data["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    runs = data["verification"]["runs"]
    assert [r["shape"] for r in runs] == [[1, 3, 64, 64], [3, 3, 64, 64], [3, 3, 96, 80]]
    assert data["verification"]["passed"] and max(r["max_abs"] for r in runs) < ATOL
    assert max(ort_errors(model, tmp_path / "m.onnx", size=48)) < ATOL


def test_kinds_lists_the_three_with_params_and_papers(cli) -> None:
    data = json.loads(cli("kinds", "--json").stdout)
    kinds = {k["name"]: k for k in data["kinds"]}
    expected = {
        "eca": ("1910.03151", {"kernel_size": 0, "gamma": 2.0, "b": 1.0, "padding": "zeros", "gate": "sigmoid"}),
        "coord": ("2103.02907", {"reduction": 32, "min_dim": 8, "gate": "sigmoid"}),
        "gc": ("1904.11492", {"reduction": 16, "fusion": "add"}),
    }
    for name, (arxiv, defaults) in expected.items():
        assert f"arxiv.org/abs/{arxiv}" in kinds[name]["paper"]
        assert {p["name"]: p["default"] for p in kinds[name]["params"]} == defaults
        assert kinds[name]["mode"] == "insert" and kinds[name]["default_position"] == "standard"
    assert "0 = adaptive" in next(p["help"] for p in kinds["eca"]["params"] if p["name"] == "kernel_size")
    assert {"add", "scale"} == set(next(p["choices"] for p in kinds["gc"]["params"] if p["name"] == "fusion"))
