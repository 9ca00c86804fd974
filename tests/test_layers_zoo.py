"""The kinds added after the first eight (ema, simam, nl, triplet, ela) and timm's variants
of older kinds (se effective, eca circular, cbam light): parity with the reference code,
parameter counts against the papers, --init preserve at every position, checkpoints,
ONNX with dynamic H and W, channels_last and bf16 autocast. Every-family coverage, the
default-position ONNX export and torch.compile come from the registry-driven tests
(test_families.py, test_onnx.py, test_training_stacks.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon.checkpoint import save
from attnsurgeon.layers import cbam, eca, ela, ema, global_context, non_local, simam, squeeze_excite, triplet
from attnsurgeon.onnx_export import export_onnx
from attnsurgeon.recipe import Recipe, make_rule
from attnsurgeon.surgery import apply, apply_recipe

NEW = ("ema", "simam", "nl", "triplet", "ela")
VARIANTS = [("se", {"variant": "effective"}), ("eca", {"padding": "circular"}), ("cbam", {"variant": "light"}),
            ("ela", {"variant": "B"}), ("ela", {"variant": "L"})]
POSITIONS = ("standard", "pre", "mid", "post", "identity")
EXACT = {"simam", "nl"}  # preserve is exactly the identity


def _x(n: int = 2, c: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(0))


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _perturbed_resnet18() -> nn.Module:
    """A random resnet18 with non-default norms; small gammas on each branch's last norm,
    as in trained ResNets (see tests/test_preserve.py)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    g = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            low, high = (0.15, 0.45) if name.endswith("bn2") else (0.5, 1.5)
            m.weight.data.copy_(low + (high - low) * torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


# ---- parity with the reference implementations -------------------------------------

def _authors_ema(module: ema.EMA, x: torch.Tensor) -> torch.Tensor:
    """The authors' EMA forward (github.com/YOLOonMe/EMA-attention-module), on our weights."""
    b, c, h, w = x.shape
    gx = x.reshape(b * module.groups, -1, h, w)
    x_h = gx.mean(3, keepdim=True)
    x_w = gx.mean(2, keepdim=True).permute(0, 1, 3, 2)
    hw = module.conv1x1(torch.cat([x_h, x_w], dim=2))
    x_h, x_w = torch.split(hw, [h, w], dim=2)
    x1 = module.gn(gx * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
    x2 = module.conv3x3(gx)
    x11 = x1.mean((2, 3)).reshape(b * module.groups, -1, 1).permute(0, 2, 1).softmax(-1)
    x12 = x2.reshape(b * module.groups, c // module.groups, -1)
    x21 = x2.mean((2, 3)).reshape(b * module.groups, -1, 1).permute(0, 2, 1).softmax(-1)
    x22 = x1.reshape(b * module.groups, c // module.groups, -1)
    weights = (x11 @ x12 + x21 @ x22).reshape(b * module.groups, 1, h, w)
    return (gx * weights.sigmoid()).reshape(b, c, h, w)


def test_ema_matches_the_authors_code_and_picks_a_dividing_group_count():
    m = ema.build(256)
    x = _x(2, 256, 9)
    torch.testing.assert_close(m(x), _authors_ema(m, x))
    # the 3x3 branch runs as one grouped conv: its gradients are the authors' form's too
    grads = []
    for forward in (m, lambda x: _authors_ema(m, x)):
        m.zero_grad()
        forward(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5 * theirs.abs().max().item())
    assert m.groups == 32 and _count(m) == 10 * 8**2 + 4 * 8
    assert ema.EMA(96).groups == 32 and ema.EMA(24).groups == 24 and ema.EMA(40).groups == 20


def test_simam_is_the_papers_formula_and_parameter_free():
    x = _x(2, 8, 7)
    n = 7 * 7 - 1
    d = (x - x.mean((2, 3), keepdim=True)) ** 2
    expected = x * torch.sigmoid(d / (4 * (d.sum((2, 3), keepdim=True) / n + 1e-4)) + 0.5)
    torch.testing.assert_close(simam.build(8)(x), expected)
    assert _count(simam.build(8)) == 0 and _count(simam.build(8, init="preserve")) == 1
    assert torch.isfinite(simam.build(8)(_x(2, 8, 1))).all()  # 1x1 maps: no division by zero


def test_non_local_is_the_embedded_gaussian_and_starts_as_the_identity():
    m = non_local.build(16)
    x = _x(2, 16, 6)
    assert torch.equal(m(x), x) and torch.equal(m.eval()(x), x)
    nn.init.normal_(m.norm.weight)
    theta, phi, g = (f(x).flatten(2) for f in (m.theta, m.phi, m.g))
    attn = torch.einsum("nci,ncj->nij", theta, phi).div(8**0.5).softmax(-1)
    y = torch.einsum("nij,ncj->nci", attn, g).reshape(2, 8, 6, 6)
    torch.testing.assert_close(m(x), x + m.norm(m.conv_out(y)))
    assert non_local.pairwise_macs(16, 6, 6) == 4 * 16 * 8 * 36 + 2 * 8 * 36 * 36


def test_triplet_matches_the_authors_module():
    """Authors' TripletAttention (MODELS/triplet_attention.py): permute, Z-pool [max; mean],
    BasicConv (conv + BN), sigmoid, mean of the three branches."""
    m = triplet.build(16).eval()
    assert m.gate_c.bn.weight.item() == 0 and m.gate_h.bn.weight.item() == 1  # the authors' init
    for gate in (m.gate_h, m.gate_w, m.gate_c):
        nn.init.normal_(gate.bn.weight)
    x = _x(2, 16, 5)

    def branch(gate: triplet.ZPoolGate, v: torch.Tensor) -> torch.Tensor:
        z = torch.cat((torch.max(v, 1)[0].unsqueeze(1), torch.mean(v, 1).unsqueeze(1)), dim=1)
        return v * torch.sigmoid(gate.bn(gate.conv(z)))

    out1 = branch(m.gate_h, x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    out2 = branch(m.gate_w, x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
    torch.testing.assert_close(m(x), (1 / 3) * (branch(m.gate_c, x) + out1 + out2))
    assert _count(m) == 300


def test_ela_effective_se_circular_eca_light_cbam_and_gc_match_timm():
    """timm's modules with their own weights loaded: the same function (timm's light CBAM
    has no MLP biases: ours are zeroed for the comparison)."""
    from timm.layers.cbam import LightCbamModule
    from timm.layers.coord_attn import EfficientLocalAttn
    from timm.layers.eca import CecaModule
    from timm.layers.global_context import GlobalContext
    from timm.layers.squeeze_excite import EffectiveSEModule

    x = _x(2, 64, 7)
    pairs: list[tuple[nn.Module, nn.Module]] = []
    t = EfficientLocalAttn(64)
    ours = ela.build(64)
    ours.load_state_dict(t.state_dict())
    pairs.append((ours, t))
    t = EffectiveSEModule(64)
    ours = squeeze_excite.build(64, variant="effective")
    ours.load_state_dict(t.state_dict())
    pairs.append((ours, t))
    t = CecaModule(64)
    ours = eca.build(64, padding="circular", kernel_size=t.conv.kernel_size[0])
    ours.conv.weight.data.copy_(t.conv.weight)
    pairs.append((ours, t))
    t = LightCbamModule(64)
    ours = cbam.build(64, variant="light")
    state = {k.replace("spatial.conv.conv", "spatial.conv").replace("spatial.conv.bn", "spatial.bn"): v
             for k, v in t.state_dict().items()}
    ours.load_state_dict({**ours.state_dict(), **state})
    nn.init.zeros_(ours.channel.fc1.bias)
    nn.init.zeros_(ours.channel.fc2.bias)
    pairs.append((ours, t))
    t = GlobalContext(64, rd_ratio=1 / 16)
    nn.init.normal_(t.mlp_scale.fc2.weight)
    ours = global_context.build(64, fusion="scale")
    ours.load_state_dict({"conv_mask.weight": t.conv_attn.weight, "conv_mask.bias": t.conv_attn.bias,
                          "transform.0.weight": t.mlp_scale.fc1.weight, "transform.0.bias": t.mlp_scale.fc1.bias,
                          "transform.1.weight": t.mlp_scale.norm.weight.view(-1, 1, 1),
                          "transform.1.bias": t.mlp_scale.norm.bias.view(-1, 1, 1),
                          "transform.3.weight": t.mlp_scale.fc2.weight, "transform.3.bias": t.mlp_scale.fc2.bias})
    ours.transform[1].eps = t.mlp_scale.norm.eps
    pairs.append((ours, t))
    for ours, theirs in pairs:
        ours.eval(), theirs.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6, msg=type(theirs).__name__)
    assert _count(ela.build(64)) == 2 * (7 + 2) * 64
    assert _count(squeeze_excite.build(64, variant="effective")) == 64 * 64 + 64
    assert _count(cbam.build(64, variant="light")) == _count(cbam.build(64)) - 49


# ---- parameter counts against the papers' tables ----------------------------------

@pytest.mark.parametrize("model, kind, position, expected", [
    # Triplet attention paper / authors' README: ResNet-50 + triplet attention (k = 7) 25.56M
    ("resnet50", "triplet", "standard", 25_561_832),
    # EMA authors' ImageNet table (MobileNetV2, 224): MobileNetv2-EMA 3.55M
    ("mobilenet_v2", "ema", "mid", 3_550_156),
    # SimAM: parameter-free, ResNet-50 + SimAM = ResNet-50 (25.56M)
    ("resnet50", "simam", "standard", 25_557_032),
])
def test_parameter_counts_match_the_papers(model, kind, position, expected):
    m = getattr(torchvision.models, model)()
    apply(m, kind, position=position)
    assert _count(m) == expected
    assert round(expected / 1e6, 2) in (25.56, 3.55)


def test_non_local_counts_match_the_papers_relative_figures():
    """The non-local paper's counts are relative to its ResNet-101 C2D video baseline (400
    classes, 43.2M): the 5-block model is 1.2x (Table 2e); the 5-block ResNet-50 is ~70% of
    the ResNet-101 baseline (Section 5.1). Its 1x1x1 convs have the parameters of 1x1 ones."""
    five = "layer2.1,layer2.3,layer3.1,layer3.3,layer3.5"
    r101 = torchvision.models.resnet101(num_classes=400)
    base = _count(r101)
    affine = sum(_count(m) for m in r101.modules() if isinstance(m, nn.BatchNorm2d))
    assert round((base - affine) / 1e6, 1) == 43.2  # the paper counts no norm parameters
    apply(r101, "nl", position="post", layers=five)
    assert round(_count(r101) / base, 1) == 1.2
    r50 = torchvision.models.resnet50(num_classes=400)
    apply(r50, "nl", position="post", layers=five)
    assert 0.65 <= _count(r50) / base <= 0.75


def test_ela_paper_versions_are_the_authors_module():
    """variant=T|B|S|L: one conv and GroupNorm shared by both strips, no SiLU; the versions'
    k, conv groups and GroupNorm groups as the authors' code sets them."""
    c = 96
    for version, (k, per_group, norm_groups) in {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16),
                                                 "L": (7, 8, 16)}.items():
        m = ela.build(c, variant=version)
        assert (m.conv.kernel_size, m.conv.groups, m.norm.num_groups) == ((k,), c // per_group, norm_groups)
        assert _count(m) == k * c * per_group + 2 * c
    m = ela.build(c, variant="L").eval()
    nn.init.normal_(m.norm.weight), nn.init.normal_(m.norm.bias)
    x = _x(c=c, size=9)[..., :7]
    pool_h, pool_w = x.mean(3), x.mean(2)
    gate = [torch.sigmoid(F.group_norm(F.conv1d(p, m.conv.weight, padding=3, groups=c // 8), 16,
                                       m.norm.weight, m.norm.bias)) for p in (pool_h, pool_w)]
    with torch.no_grad():
        torch.testing.assert_close(m(x), x * gate[0].unsqueeze(3) * gate[1].unsqueeze(2))


# ---- --init preserve at every position; the paper init changes the function -------

CASES = [(k, p, {}) for k in NEW for p in POSITIONS] + [(k, "standard", params) for k, params in VARIANTS]


@pytest.mark.parametrize("kind, position, params", CASES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_preserve_keeps_the_function(kind, position, params):
    base = _perturbed_resnet18()
    x = _x()
    with torch.no_grad():
        ref = base(x)
        model = copy.deepcopy(base)
        apply(model, kind, position=position, params=params, init="preserve", seed=0)
        out = model.eval()(x)
    error = ((out - ref).abs().max() / ref.abs().max()).item()
    if kind in EXACT:
        assert torch.equal(out, ref)
    assert error <= 1e-4, (kind, position, error)
    if kind not in ("nl",):  # nl's paper init is the identity too (zero-init BN)
        paper = copy.deepcopy(base)
        apply(paper, kind, position=position, params=params, init="paper", seed=0)
        with torch.no_grad():
            assert ((paper.eval()(x) - ref).abs().max() / ref.abs().max()).item() > 1e-3


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_y_400mf"])
@pytest.mark.parametrize("kind, params", VARIANTS, ids=[k for k, _ in VARIANTS])
def test_variants_preserve_on_other_families(name, kind, params):
    """timm's variants under --init preserve on an inverted-residual and a RegNet family
    (the calibrated models of tests/test_families.py), at mid."""
    from test_families import base, probe, rel_error

    model, x = base(name).eval(), probe()
    with torch.no_grad():
        ref = model(x)
        apply(model, kind, position="mid", params=params, init="preserve", seed=0)
        assert rel_error(ref, model.eval()(x)) <= 1e-4


@pytest.mark.parametrize("kind", ["simam", "ema", "triplet", "ela", "nl", "se"])
def test_preserved_modules_learn(kind):
    """Five Adam steps from --init preserve (all parameters, as in fine-tuning; the pattern
    of tests/test_preserve.py): the loss falls, a gradient reaches every new parameter and
    every new module moves."""
    params = {"variant": "effective"} if kind == "se" else {}
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    changes = apply(model, kind, layers="layer3:", params=params, init="preserve", seed=0)
    new = {n: p for n, p in model.named_parameters() if any(n.startswith(c.path + ".") for c in changes)}
    before = {n: p.detach().clone() for n, p in new.items()}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    # 64 px: layer4 is 2x2 there; at 1x1 the non-local softmax is over one position and
    # theta, phi get no gradient, by construction
    x, y = torch.randn(4, 3, 64, 64, generator=gen), torch.arange(4)
    losses, reached = [], set()
    for _ in range(5):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        reached |= {n for n, p in new.items() if p.grad is not None and p.grad.abs().max() > 0}
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert set(new) == reached, sorted(set(new) - reached)
    still = [c.path for c in changes if all(torch.equal(new[n], before[n]) for n in new if n.startswith(c.path + "."))]
    assert not still, still


# ---- checkpoints, ONNX, training stacks -------------------------------------------

def test_checkpoint_round_trip_both_inits(cli, tmp_path):
    """simam's state_dict differs by init (preserve's alpha): the recipe rebuilds the right one."""
    x = _x()
    for init in ("paper", "preserve"):
        path = tmp_path / f"{init}.pt"
        result = cli("insert", "resnet18", "--attn", "simam", "--layers", "layer4", "--init", init,
                     "--input-size", "64", "-o", str(path))
        assert result.exit_code == 0, result.output
        model = attnsurgeon.load(path).eval()
        assert (any(n.endswith("alpha") for n, _ in model.named_parameters())) == (init == "preserve")
    path = tmp_path / "zoo.pt"
    recipe = _zoo_recipe()
    model = _zoo_model()
    save(path, model, model_name="resnet18", recipe=recipe)
    loaded = attnsurgeon.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _zoo_recipe() -> Recipe:
    """resnet18 with every new kind and variant, two a block from layer3 on (one each, preserve)."""
    kinds = [(k, {}) for k in NEW] + VARIANTS
    blocks = [f"layer{stage}.{b}" for stage in (3, 4, 2, 1) for b in (0, 1)]  # two kinds a block
    slots = [(blocks[i // 2], POSITIONS[i % 4]) for i in range(len(kinds))]
    rules = tuple(make_rule(kind, layers=layers, position=position, params=params, where="test")
                  for (layers, position), (kind, params) in zip(slots, kinds, strict=True))
    return Recipe(model="resnet18", rules=rules, init="preserve", seed=0)


def _zoo_model() -> nn.Module:
    """:func:`_zoo_recipe` applied, with the non-local BNs opened so exports really compare."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    apply_recipe(model, _zoo_recipe())
    for m in model.modules():
        if isinstance(m, non_local.NonLocal):
            nn.init.normal_(m.norm.weight)
    return model.eval()


@pytest.mark.heavy
def test_onnx_with_dynamic_batch_and_hw(tmp_path):
    """All new kinds and variants in one export (each kind's own dynamic-batch export at its
    default position runs in tests/test_onnx.py)."""
    data = export_onnx(_zoo_model(), tmp_path / "zoo.onnx", input_size=64, dynamic_hw=True)
    assert data["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    v = data["verification"]
    assert v["passed"] and len({tuple(r["shape"]) for r in v["runs"]}) == 3
    assert all(r["max_abs"] < 1e-4 for r in v["runs"])


def test_channels_last_and_bf16_autocast():
    model = _zoo_model()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(last(xl), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = last(xl)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.03


def test_new_modules_are_new_for_training():
    model = _zoo_model()
    names = [n for n, _ in attnsurgeon.new_modules(model)]
    assert len(names) == len(NEW) + len(VARIANTS) and all(".attn_" in n for n in names)


def test_nl_warns_where_it_costs_more_than_its_stage(cli):
    result = cli("summarize", "resnet18", "--attn", "nl", "--layers", "layer1", "--input-size", "160")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "layer1" in lines[0] and "(HW)^2" in lines[0]
    quiet = cli("summarize", "resnet18", "--attn", "nl", "--layers", "layer4", "--input-size", "160")
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr
