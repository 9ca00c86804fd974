"""CBAM, AFP and the dual-pool head: shapes, gradients, tracing, paper counts, init modes, CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon.kinds import POSITIONS
from attnsurgeon.layers import PRESERVE_LOGIT
from attnsurgeon.layers.afp import AFP
from attnsurgeon.layers.afp import build as build_afp
from attnsurgeon.layers.cbam import CBAM
from attnsurgeon.layers.cbam import build as build_cbam
from attnsurgeon.layers.dual_pool import DualPool
from attnsurgeon.layers.dual_pool import build as build_dual_pool
from attnsurgeon.surgery import apply

# (apply kwargs, class of the new modules) for each module under test
SURGERIES = {
    "cbam": ({"attn": "cbam"}, CBAM),
    "afp": ({"attn": "afp"}, AFP),
    "dual-pool": ({"head": "dual-pool"}, DualPool),
}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """A resnet18 whose BNs look trained (non-trivial affine and running statistics)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _new_modules(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


# --- the modules alone ------------------------------------------------------------------


@pytest.mark.parametrize("build", [build_cbam, build_afp])
@pytest.mark.parametrize("init", ["paper", "preserve"])
def test_insert_modules_keep_shape_in_train_and_eval(build, init: str) -> None:
    module = build(24, init=init)
    x = torch.randn(3, 24, 9, 7)
    for training in (True, False):
        y = module.train(training)(x)
        assert y.shape == x.shape
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("training", [True, False])
def test_dual_pool_maps_to_pooled_vector(training: bool) -> None:
    head = build_dual_pool(16).train(training)
    x = torch.randn(3, 16, 5, 6)
    y = head(x)
    assert y.shape == (3, 16, 1, 1)
    # dropout: eval is deterministic, train drops (p = 0.5 over 48 values: all kept ~ 2^-48)
    assert torch.equal(y, head(x)) is (not training)


def test_cbam_honours_reduction_and_kernel_size() -> None:
    # the CBAM blog post's MLP hard-codes // 16 and ignores its ratio argument
    module = build_cbam(64, reduction=8, kernel_size=3)
    assert module.channel.fc1.out_channels == 8
    assert module.spatial.conv.kernel_size == (3, 3)
    assert module.spatial.conv.padding == (1, 1)
    assert isinstance(module.spatial.bn, nn.BatchNorm2d)
    assert build_cbam(64).channel.fc1.out_channels == 4
    with pytest.raises(ValueError, match="got 4"):
        build_cbam(64, kernel_size=4)


def test_afp_branch_widths_generalise_the_seed() -> None:
    # the seed hard-codes C = 3: 1x1 convs to 1 and 2 channels, SE hidden int(3 * 0.5) = 1
    seed_sized = AFP(3)
    assert seed_sized.dconv_a[0].out_channels == 1 and len(seed_sized.dconv_a) == 3
    assert seed_sized.dconv_b[0].out_channels == 2 and len(seed_sized.dconv_b) == 2
    assert seed_sized.se.fc1.out_channels == 1
    odd = AFP(9, reduction=3)
    assert odd.dconv_a[-1].out_channels + odd.dconv_b[-1].out_channels == 9
    assert odd.se.fc1.out_channels == 3
    assert torch.equal(odd.w.detach(), torch.ones(4))
    with pytest.raises(ValueError, match="got 1"):
        AFP(1)


@pytest.mark.parametrize("training", [True, False])
def test_cbam_preserve_gates_are_constant_in_train_and_eval(training: bool) -> None:
    module = build_cbam(32, init="preserve").train(training)
    x = torch.randn(4, 32, 6, 6) * 3
    gate = torch.sigmoid(torch.tensor(PRESERVE_LOGIT))
    torch.testing.assert_close(module.channel._scale(x), torch.full((4, 32, 1, 1), gate.item()))
    torch.testing.assert_close(module.spatial._scale(x), torch.full((4, 1, 6, 6), gate.item()))
    torch.testing.assert_close(module(x), x * gate**2)


def test_cbam_paper_init_is_the_official_codes() -> None:
    module = build_cbam(64)
    assert torch.count_nonzero(module.channel.fc1.bias) == 0
    assert torch.count_nonzero(module.channel.fc2.bias) == 0
    assert torch.count_nonzero(module.spatial.bn.weight) == 0  # spatial gate starts at 0.5
    std = module.spatial.conv.weight.std().item()
    assert 0.5 * math.sqrt(2 / 49) < std < 1.5 * math.sqrt(2 / 49)  # Kaiming normal, fan-out 49


def test_afp_preserve_weights() -> None:
    a = torch.softmax(build_afp(8, init="preserve").w, 0)
    others = 1 / (3 + math.exp(PRESERVE_LOGIT))
    torch.testing.assert_close(a, torch.tensor([others, others, others, 1 - 3 * others]))
    assert 3.2e-7 < 1 - a[3].item() < 3.6e-7  # float32: 1 - 3.58e-7, the nearest to 1 - 3.38e-7


def test_afp_preserve_survives_onnx_optimiser() -> None:
    # written as a_4 * x, the folded constant a_4 = 1 - 3.4e-7 is within onnxscript's
    # mul_by_1 tolerance and the product became x: a relative drift of 3.4e-7
    import onnxruntime

    module = build_afp(8, init="preserve").eval()
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 100
    program = torch.onnx.export(module, (x,), dynamo=True)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = module(x)
    assert (torch.from_numpy(got) - expected).abs().max() < 1e-6 * expected.abs().max()


# --- inside resnet18 --------------------------------------------------------------------


@pytest.mark.parametrize("name", SURGERIES)
def test_gradients_reach_every_new_parameter(base: nn.Module, x64: torch.Tensor, name: str) -> None:
    kwargs, cls = SURGERIES[name]
    model = copy.deepcopy(base).train()
    apply(model, **kwargs, seed=0)
    new = [p for m in _new_modules(model, cls) for p in m.parameters()]
    assert new
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # step 1: every new parameter is in the graph; CBAM's paper init (spatial BN gamma = 0,
    # as the official code) stops the spatial conv's gradient until gamma has moved once
    model(x64).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new)
    opt.step()
    opt.zero_grad()
    model(x64).logsumexp(1).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in new)


@pytest.mark.parametrize("name", SURGERIES)
def test_fx_and_export_match_eager(base: nn.Module, x64: torch.Tensor, name: str) -> None:
    kwargs, _ = SURGERIES[name]
    model = copy.deepcopy(base)
    apply(model, **kwargs, seed=0)
    model.eval()
    with torch.no_grad():
        expected = model(x64)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x64), expected, rtol=0, atol=1e-6)
    exported = torch.export.export(model, (x64,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "expected"), [("resnet50", 28.09), ("resnet101", 49.33)])
def test_cbam_parameter_counts_match_paper_table_4(name: str, expected: float) -> None:
    with torch.device("meta"):
        model = torchvision.models.get_model(name)
        changes = apply(model, "cbam")
    assert {c.where for c in changes} == {"standard"}
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == expected


# Preserve tolerance: each CBAM multiplies by sigmoid(16)^2 = 1 - 2.4e-7 and each AFP moves
# 3.4e-7 of its weight off the identity, so 8 modules change the logits by at most ~3e-6
# of their scale (we see 0.3e-5 - 1.3e-5). 3e-5 leaves room for float32 rounding and is
# four orders of magnitude below what paper init changes (> 0.1 of the scale).
PRESERVE_RTOL = 3e-5


@pytest.mark.parametrize("attn", ["cbam", "afp"])
@pytest.mark.parametrize("position", [p for p in POSITIONS if p != "builtin"])  # ResNets have no built-in SE
def test_positions_and_init_modes(
    base: nn.Module, x64: torch.Tensor, attn: str, position: str
) -> None:
    with torch.no_grad():
        reference = base(x64)
    scale = reference.abs().max().item()
    errors = {}
    for init in ("preserve", "paper"):
        model = copy.deepcopy(base)
        changes = apply(model, attn, position=position, init=init, seed=0)
        assert len(changes) == 8 and {c.where for c in changes} == {position}
        model.eval()
        with torch.no_grad():
            out = model(x64)
        assert out.shape == (2, 1000)
        errors[init] = (out - reference).abs().max().item() / scale
    assert errors["preserve"] < PRESERVE_RTOL
    assert errors["paper"] > 0.1


def test_dual_pool_head_via_apply(base: nn.Module, x64: torch.Tensor) -> None:
    with torch.no_grad():
        reference = base(x64)
    for init in ("preserve", "paper"):
        model = copy.deepcopy(base)
        (change,) = apply(model, head="dual-pool", init=init, seed=0)
        assert isinstance(model.avgpool, DualPool) and change.path == "avgpool"
        assert change.params_added == 512 * 1024 + 512
        model.eval()
        with torch.no_grad():
            out = model(x64)
        assert out.shape == (2, 1000)
        error = (out - reference).abs().max().item()
        if init == "preserve":
            # [I | 0] passes the average pool through; products with 0 and 1 are exact
            assert error <= 1e-6
        else:
            assert error > 1e-2


# --- CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--head", "dual-pool")])
def test_cli_insert_and_load(cli, tmp_path, x64: torch.Tensor, extra: tuple[str, ...]) -> None:
    path = tmp_path / "x.pt"
    args = ("insert", "resnet18", "--attn", "cbam", *extra, "--input-size", "64", "-o", str(path))
    result = cli(*args)
    assert result.exit_code == 0, result.output
    first, second = attnsurgeon.load(path).eval(), attnsurgeon.load(path).eval()
    assert len(_new_modules(first, CBAM)) == 8
    assert isinstance(first.avgpool, DualPool) is bool(extra)
    with torch.no_grad():
        out = first(x64)
        assert out.shape == (2, 1000)
        assert torch.equal(out, second(x64))
