"""Every torchvision CNN family: block adapters, positions, stage aliases, kinds, round trips.

One small model per family at 64x64, conditioned as a trained network is, so that
``--init preserve``'s tolerance means something:

* the last norm of every block's branch gets gammas in [0.15, 0.45] (trained residual
  networks have small ones there; with gammas near 1 a random network is chaotic and
  amplifies any perturbation, see tests/test_preserve.py);
* the BatchNorms are then calibrated (a few train-mode passes, cumulative average): a
  random network in eval mode with default running statistics shrinks its activations to
  ~1e-8 by the last MobileNet block, and then no relative tolerance means anything.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d, SqueezeExcitation

import attnsurgeon
from attnsurgeon import checkpoint
from attnsurgeon.blocks import find_blocks
from attnsurgeon.errors import UsageError
from attnsurgeon.kinds import KINDS
from attnsurgeon.recipe import Recipe, make_rule
from attnsurgeon.surgery import apply, apply_recipe
from attnsurgeon.zoo import build_model

TOLERANCE = 1e-4  # max|delta logits| / max|logits| under --init preserve
SIZE = 64

# blocks, blocks with a shortcut, and blocks per stage alias, as the architectures define
# them (MobileNetV2 Table 2, MobileNetV3-Small Table 2, EfficientNet-B0 Table 1, RegNetY-400MF
# depths 1/3/6/6, ConvNeXt-T 3/3/9/3, MNASNet-A1 repeats 3/3/3/2/4/1 with the first stage at 1/4)
FAMILIES = {
    "mobilenet_v2": (17, 10, {"stage0": 1, "stage1": 2, "stage2": 3, "stage3": 7, "stage4": 4}),
    "mobilenet_v3_small": (11, 6, {"stage1": 1, "stage2": 2, "stage3": 5, "stage4": 3}),
    "efficientnet_b0": (16, 9, {"stage0": 1, "stage1": 2, "stage2": 2, "stage3": 6, "stage4": 5}),
    "regnet_y_400mf": (16, 16, {"stage1": 1, "stage2": 3, "stage3": 6, "stage4": 6}),
    "convnext_tiny": (18, 18, {"stage1": 3, "stage2": 3, "stage3": 9, "stage4": 3}),
    "mnasnet0_5": (16, 10, {"stage1": 3, "stage2": 3, "stage3": 5, "stage4": 5}),
}
HEAVY = {"convnext_tiny"}  # 28M parameters: its per-kind cases run under the heavy marker
# ConvNeXt's per-kind cases use its first two stages: at mid, stage 4 has 3072 channels,
# and AFP's DConv there alone takes 40 s (blocks, not channel counts, are what is tested)
KIND_LAYERS = {"convnext_tiny": ("stage1:stage2", 6)}


def family_params(names=FAMILIES):
    return [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in names]


def calibrated(name: str, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for info, block in find_blocks(model):
            last = [c.norm for c in info.convs if c.norm and not c.conv.startswith(("downsample.", "proj."))]
            if last:
                gamma = block.get_submodule(last[-1]).weight
                gamma.copy_(0.15 + 0.3 * torch.rand(gamma.shape, generator=gen))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIZE, SIZE, generator=gen))
    return model.eval()


_BASES: dict[str, nn.Module] = {}


def base(name: str) -> nn.Module:
    """A fresh copy of the calibrated model (built once per session)."""
    if name not in _BASES:
        _BASES[name] = calibrated(name)
    return copy.deepcopy(_BASES[name])


def probe() -> torch.Tensor:
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


CASES = [(k, spec.default_position) for k, spec in KINDS.items() if spec.mode == "insert"] + \
        [(k, "mid") for k, spec in KINDS.items() if spec.mode == "insert" and spec.default_position != "mid"] + \
        [(k, None) for k, spec in KINDS.items() if spec.mode == "replace"]


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_per_stage_match_the_architecture(name):
    found = find_blocks(build_model(name, structure_only=True))  # meta where the builder allows
    total, residual, per_stage = FAMILIES[name]
    assert len(found) == total
    assert sum(info.shortcut for info, _ in found) == residual
    assert dict(Counter(info.alias for info, _ in found)) == per_stage
    for info, _ in found:  # slots are the positions each block really has
        assert ("identity" in info.slots) == info.shortcut
        assert {"standard", "pre", "mid", "post"} <= set(info.slots)


PARAMETER_FREE = {"simam"}  # kinds with no parameters under --init paper


@pytest.mark.parametrize("name", family_params())
@pytest.mark.parametrize("kind,position", CASES, ids=lambda v: str(v))
def test_every_kind_trains_and_preserves(name, kind, position):
    """Shape, preserve error; gradients reach every new parameter, and every new module
    moves within two Adam steps (not every parameter: an SE at r=16 on 16 channels has
    one hidden ReLU unit, which can be dead for every input, as in any SE network)."""
    model = base(name)
    x = probe()
    with torch.no_grad():
        reference = model(x)
    layers, blocks = KIND_LAYERS.get(name, ("all", FAMILIES[name][0]))
    changes = apply(model, kind, position=position, layers=layers, init="preserve", seed=0)
    assert len(changes) + len(changes.skipped) == blocks
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == reference.shape
    error = rel_error(reference, out)
    assert error <= TOLERANCE, f"{name} {kind} at {position}: preserve error {error:.2e}"

    model = base(name)
    changes = apply(model, kind, position=position, layers=layers, init="paper", seed=0)
    new = {n: p for n, p in model.named_parameters() if any(n.startswith(c.path + ".") for c in changes)}
    if kind in PARAMETER_FREE:  # nothing to train under --init paper (simam)
        assert not new
        return
    assert new, "no new parameters"
    before = {n: p.detach().clone() for n, p in new.items()}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        optimiser.zero_grad()
        model(torch.randn(4, 3, SIZE, SIZE, generator=gen)).logsumexp(1).mean().backward()
        unreached = [n for n, p in new.items() if p.grad is None or not p.grad.isfinite().all()]
        assert not unreached, f"no gradient reaches {unreached[:5]}"
        optimiser.step()
    still = [c.path for c in changes
             if all(torch.equal(p, before[n]) for n, p in new.items() if n.startswith(c.path + "."))]
    assert not still, f"new modules that never moved: {still[:5]}"


@pytest.mark.parametrize("name", family_params())
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
    """Several kinds at several positions in one model; save, load, same outputs."""
    kinds = [k for k, s in KINDS.items() if s.mode == "insert"]
    positions = ["pre", "mid", "standard", "post"]
    rules = tuple(make_rule(k, position=positions[i % 4], layers="stage2:", where="t")
                  for i, k in enumerate(kinds[:4]))
    rules += (make_rule("sk", layers="stage1", where="t"),)
    recipe = Recipe(model=name, rules=rules, init="paper", seed=3)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name)
    apply_recipe(model, recipe)
    path = tmp_path / "m.pt"
    checkpoint.save(path, model, model_name=name, recipe=recipe)
    loaded = attnsurgeon.load(path).eval()
    x = probe()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_positions_land_where_the_diagram_says():
    """On MobileNetV2's features.3 (a shortcut block), each slot sees the right tensor."""
    model = torchvision.models.mobilenet_v2().eval()
    block = model.features[3]
    seen: dict[str, torch.Size] = {}

    class Spy(nn.Module):
        def __init__(self, position: str) -> None:
            super().__init__()
            self.position = position

        def forward(self, x):
            seen[self.position] = x.shape
            return x

    from attnsurgeon.blocks import make_slotted
    make_slotted(block)
    for position in ("pre", "mid", "standard", "post", "identity"):
        setattr(block, f"attn_{position}", Spy(position))
    model(torch.randn(1, 3, SIZE, SIZE))
    assert seen["pre"][1] == seen["identity"][1] == 24  # block input
    assert seen["mid"][1] == 144  # expanded, after the depthwise conv
    assert seen["standard"][1] == seen["post"][1] == 24
    assert seen["pre"][2:] == seen["mid"][2:] == seen["post"][2:]


def test_convnext_mid_is_on_the_expanded_channels_in_nchw():
    model = torchvision.models.convnext_tiny().eval()
    changes = apply(model, "cbam", position="mid", layers="features.1.0")
    assert changes[0].path == "features.1.0.attn_mid"
    assert model.features[1][0].attn_mid.channel.fc1.in_channels == 384  # 4 x 96
    assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 1000)


def test_missing_position_is_skipped_and_listed(cli):
    result = cli("summarize", "mobilenet_v2", "--attn", "se", "--position", "identity",
                 "--input-size", "64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["changes"]) == 10
    assert [s["block"] for s in data["skipped"]] == [
        "features.1", "features.2", "features.4", "features.7", "features.11", "features.14", "features.17"]
    text = cli("summarize", "mobilenet_v2", "--attn", "se", "--position", "identity", "--input-size", "64")
    assert ("rule 1: skipped 7 selected blocks without an 'identity' position: features.1-2, features.4, "
            "features.7, features.11, features.14, features.17\n") in text.stdout  # all named, none hidden


def test_a_position_no_selected_block_has_is_an_error(cli):
    result = cli("insert", "mobilenet_v2", "--attn", "se", "--position", "identity",
                 "--layers", "features.1:features.2", "-o", "x.pt")
    assert result.exit_code == 2
    assert "no selected block has an 'identity' position (they have: standard, pre, mid, post)" in result.stderr
    result = cli("insert", "resnet18", "--attn", "se", "--position", "builtin", "-o", "x.pt")
    assert result.exit_code == 2 and "they have: standard, pre, mid, post, identity" in result.stderr


def test_builtin_replaces_the_se_and_preserve_says_it_cannot_keep_it(cli, tmp_path):
    out = tmp_path / "e0.pt"
    result = cli("insert", "efficientnet_b0", "--attn", "cbam", "--position", "builtin", "--init", "preserve",
                 "--input-size", "64", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert "warning: 16 built-in SqueezeExcitation modules were replaced" in result.stderr
    data = json.loads(result.stdout)
    assert {c["where"] for c in data["changes"]} == {"builtin"} and len(data["changes"]) == 16
    saved = torch.load(out, weights_only=True)
    assert saved["preservation"]["function_kept"] is False
    model = attnsurgeon.load(out)
    assert not any(isinstance(m, SqueezeExcitation) for m in model.modules())
    assert type(model.features[1][0].block[1]).__name__ == "CBAM"


@pytest.mark.parametrize("kind, module", [("eca", "ECA"), ("coord", "CoordAttention"), ("gc", "GlobalContext")])
def test_newer_kinds_replace_the_builtin_se(kind, module):
    model = torchvision.models.mobilenet_v3_small().eval()
    builtin = sum(isinstance(m, SqueezeExcitation) for m in model.modules())
    changes = apply(model, kind, position="builtin")
    assert len(changes) == builtin > 0 and {c.where for c in changes} == {"builtin"}
    assert not any(isinstance(m, SqueezeExcitation) for m in model.modules())
    assert sum(type(m).__name__ == module for m in model.modules()) == builtin
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_se_builtin_takes_its_params_and_other_positions_note_the_builtin():
    model = torchvision.models.regnet_y_400mf()
    changes = apply(model, "se", position="builtin", params={"reduction": 8}, layers="stage1")
    se = model.trunk_output.block1[0].f.se
    assert type(se).__name__ == "SqueezeExcite" and se.fc1.out_channels == 48 // 8
    assert changes[0].note == "replaces the built-in SqueezeExcitation"
    model = torchvision.models.mobilenet_v3_small()
    changes = apply(model, "se", position="standard")
    noted = [c.block for c in changes if c.note == "beside the block's built-in SqueezeExcitation"]
    assert len(noted) == sum(isinstance(m, SqueezeExcitation) for m in model.modules())
    with pytest.warns(UserWarning, match="cannot keep the function"):
        apply(torchvision.models.mobilenet_v3_small(), "se", position="builtin", init="preserve")


@pytest.mark.heavy
def test_stage_aliases_mean_the_same_depth_in_every_family(cli):
    for name, native in (("resnet18", "layer3:"), ("convnext_tiny", "features.5:"),
                         ("regnet_y_400mf", "trunk_output.block3:")):
        model = torchvision.models.get_model(name)
        a = apply(copy.deepcopy(model), "se", layers="stage3:")
        b = apply(model, "se", layers=native)
        assert [c.block for c in a] == [c.block for c in b], name
    result = cli("summarize", "convnext_tiny", "--attn", "se", "--layers", "stage3:", "--input-size", "64", "--json")
    data = json.loads(result.stdout)
    assert [g["name"] for g in data["groups"] if g["params_added"]] == ["features.5", "features.7"]


@pytest.mark.parametrize("name", ["mobilenet_v2", "mnasnet0_5", "resnet18"])
@pytest.mark.heavy
def test_stage_aliases_survive_surgery(name):
    """A model that already carries attention (every kind, in turn) keeps its aliases:
    stage4 still means output stride 1/32. Before, a dynamic conv could not run on the
    meta device, the stride trace failed silently and aliases were numbered by block."""
    fresh = {info.name: info.alias for info, _ in find_blocks(build_model(name, structure_only=True))}
    for kind, spec in KINDS.items():
        model = torchvision.models.get_model(name)
        apply(model, kind, position="mid" if spec.mode == "insert" else None)
        got = {info.name: info.alias for info, _ in find_blocks(model)}
        assert got == fresh, kind


def test_summary_rows_per_stage_for_a_flat_family(cli):
    result = cli("summarize", "mobilenet_v2", "--attn", "cbam", "--position", "mid", "--input-size", "64", "--json")
    data = json.loads(result.stdout)
    assert [g["name"] for g in data["groups"]] == ["stem", "stage0", "stage1", "stage2", "stage3", "stage4", "head"]
    assert sum(g["params_added"] for g in data["groups"]) == data["total"]["params_added"] > 0
    assert all(g["macs_added"] > 0 for g in data["groups"] if g["name"].startswith("stage"))


@pytest.mark.parametrize("name,kind,position", [
    ("mobilenet_v3_small", "se", "builtin"), ("efficientnet_b0", "cbam", "mid"), ("mnasnet0_5", "afp", "post"),
    pytest.param("regnet_y_400mf", "sk", None, marks=pytest.mark.heavy),
    pytest.param("convnext_tiny", "dynconv", None, marks=pytest.mark.heavy),
    pytest.param("mobilenet_v2", "se", "mid", marks=pytest.mark.heavy),
])
@pytest.mark.heavy
def test_onnx_export_per_family(name, kind, position, tmp_path):
    model = base(name)
    apply(model, kind, position=position, layers="stage3:", seed=0)
    summary = attnsurgeon.export_onnx(model.eval(), tmp_path / "m.onnx", input_size=SIZE)
    assert summary["verification"]["passed"], summary["verification"]


@pytest.mark.heavy
def test_frozen_batchnorm_and_dilated_stages_preserve():
    """Detection/segmentation backbones: FrozenBatchNorm2d (a pretrained detector's) and
    dilated convs (a segmentation backbone's); sk, dynconv and preserve work with both."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d,
                                        replace_stride_with_dilation=[False, True, True])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():  # trained-looking frozen statistics
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.2, 0.6, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    model.eval()
    x = probe()
    with torch.no_grad():
        reference = model(x)
    for kind in ("sk", "dynconv", "se"):
        modified = copy.deepcopy(model)
        apply(modified, kind, layers="stage3:", init="preserve")
        with torch.no_grad():
            assert rel_error(reference, modified(x)) <= TOLERANCE, kind
    sk = copy.deepcopy(model)
    apply(sk, "sk", layers="layer4.1")
    conv = sk.layer4[1].conv2
    assert isinstance(conv.paths[0].bn, FrozenBatchNorm2d)
    assert conv.paths[0].conv.dilation == (4, 4) and conv.paths[1].conv.dilation == (8, 8)


def test_sk_on_depthwise_convs_stays_depthwise_and_takes_over_the_activation():
    model = torchvision.models.mobilenet_v3_small()
    apply(model, "sk", layers="features.4")
    block = model.features[4].block
    sk = block[1][0]
    assert all(p.conv.groups == 96 for p in sk.paths)  # depthwise, every path
    assert isinstance(sk.paths[1].act, nn.Hardswish) and isinstance(block[1][2], nn.Identity)
    assert sk.paths[1].conv.kernel_size == (5, 5) and sk.paths[1].conv.dilation == (2, 2)


@pytest.mark.heavy
def test_detection_model_end_to_end(cli, tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    result = cli("blocks", name, "--json")
    assert result.exit_code == 0
    blocks = json.loads(result.stdout)["blocks"]
    assert len(blocks) == 15 and blocks[0]["name"] == "backbone.body.1"
    out = tmp_path / "det.pt"
    result = cli("insert", name, "--attn", "se", "--layers", "stage4:", "--init", "preserve",
                 "--input-size", "64", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["changes"]) == 3 and data["total"]["params_added"] > 0 and data["total"]["macs_added"] > 0
    assert data["resized_to"] == [320, 320]  # the detector resizes to its min_size: MACs are at 320
    pres = data["preservation"]  # a detector has no logits: its backbone's features are compared
    assert pres["compared"] == "backbone features" and pres["top1_agreement"] is None
    assert 0 < pres["relative"] <= 1e-4
    shown = cli("summarize", str(out), "--input-size", "64")
    text = " ".join(shown.stdout.split())  # the table's title wraps
    assert "MACs at 1x3x64x64, which the model resizes to 1x3x320x320" in text and "max |Δbackbone features|" in text
    refused = cli("export-onnx", str(out), "-o", str(tmp_path / "det.onnx"), "--input-size", "64")
    assert refused.exit_code == 2 and "FasterRCNN returns a list, not a tensor" in refused.stderr
    assert not (tmp_path / "det.onnx").exists()
    model = attnsurgeon.load(out).eval()
    images = [torch.rand(3, 200, 240), torch.rand(3, 160, 160)]
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "labels", "scores"} <= set(detections[0])
    reloaded = attnsurgeon.load(out).eval()
    with torch.no_grad():
        again = reloaded(images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(detections, again, strict=True))


@pytest.mark.heavy
def test_segmentation_model_end_to_end(tmp_path):
    model = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights_backbone=None)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, SIZE, SIZE, generator=gen))
    model.eval()
    x = probe()
    with torch.no_grad():
        reference = model(x)["out"]
    apply(model, "cbam", position="mid", layers="stage3:", init="preserve")
    with torch.no_grad():
        assert rel_error(reference, model(x)["out"]) <= TOLERANCE
    summary = attnsurgeon.export_onnx(model, tmp_path / "seg.onnx", input_size=SIZE)
    assert summary["verification"]["passed"]
    assert summary["outputs"][0]["shape"] == ["batch", 21, SIZE, SIZE]


@pytest.mark.parametrize("name,found", [
    ("densenet121", "_DenseLayer"), ("shufflenet_v2_x0_5", "InvertedResidual"),
    ("vit_b_16", "EncoderBlock"), ("swin_t", "SwinTransformerBlock"),
    ("quantized_mobilenet_v2", "QuantizableInvertedResidual"), ("r3d_18", "BasicBlock"),
])
def test_unsupported_models_get_one_line(cli, name, found):
    result = cli("blocks", name)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and found in lines[0] and "supported families: ResNet" in lines[0]
    assert "Traceback" not in result.output


def test_a_second_surgery_on_a_family_block_is_refused():
    model = torchvision.models.mobilenet_v2()
    apply(model, "se", position="mid", layers="features.3")
    with pytest.raises(UsageError, match="mid position of features.3 already holds a SqueezeExcite"):
        apply(model, "cbam", position="mid", layers="features.3")


@pytest.mark.parametrize("name", family_params())
@pytest.mark.parametrize("position", ["pre", "post", "identity"])
def test_every_other_position_preserves(name, position):
    """CBAM (two gates, the largest preserve error of the gate kinds) at the positions the
    main case list does not cover; blocks without the position are skipped."""
    model = base(name)
    x = probe()
    with torch.no_grad():
        reference = model(x)
    changes = apply(model, "cbam", position=position, init="preserve")
    total, residual, _ = FAMILIES[name]
    assert len(changes) == (residual if position == "identity" else total)
    with torch.no_grad():
        assert rel_error(reference, model.eval()(x)) <= TOLERANCE


LARGER = {  # blocks, with a shortcut (torchvision's configurations)
    "efficientnet_v2_s": (40, 35),  # FusedMBConv in stages 1-3, MBConv after
    "mobilenet_v3_large": (15, 10),  # Table 1 of the MobileNetV3 paper: 1+1+2+3+1+2 residual bnecks
    "regnet_x_400mf": (22, 22),  # no SE: no builtin position
    "resnext50_32x4d": (16, 16),
    "mnasnet1_0": (16, 10),
}


@pytest.mark.heavy
@pytest.mark.parametrize("name", LARGER)
def test_larger_variants(name):
    """The larger variants: block counts, and SE at mid plus SK, preserved."""
    model = calibrated(name)
    found = find_blocks(model)
    assert (len(found), sum(i.shortcut for i, _ in found)) == LARGER[name]
    assert any(i.builtin for i, _ in found) == (name in ("efficientnet_v2_s", "mobilenet_v3_large"))
    if name == "efficientnet_v2_s":
        assert {i.type for i, _ in found} == {"FusedMBConv", "MBConv"}
    x = probe()
    with torch.no_grad():
        reference = model(x)
    apply(model, "se", position="mid", init="preserve")
    apply(model, "sk", layers="stage3:", init="preserve")
    with torch.no_grad():
        assert rel_error(reference, model.eval()(x)) <= TOLERANCE


@pytest.mark.parametrize("rules", [("sk", "se"), ("se", "sk")])
def test_replace_and_insert_on_one_block_in_either_order(rules):
    """SK on a block's depthwise conv and SE at its mid, in either rule order: the mid
    slot still follows the (replaced) main conv, and both run."""
    model = torchvision.models.mobilenet_v2().eval()
    recipe = Recipe(rules=tuple(make_rule(k, position="mid" if k == "se" else None, layers="features.3",
                                          where="t") for k in rules), seed=0)
    apply_recipe(model, recipe)
    block = model.features[3]
    assert type(block.conv[1][0]).__name__ == "SelectiveKernelConv" and block._mid == 1
    ran = []
    block.attn_mid.register_forward_hook(lambda m, args, out: ran.append(args[0].shape[1]))
    model(torch.randn(1, 3, SIZE, SIZE))
    assert ran == [144]


@pytest.mark.parametrize("builtin_first", [True, False])
def test_the_builtin_note_follows_what_the_block_holds_in_the_end(builtin_first):
    model = torchvision.models.efficientnet_b0()
    rules = (make_rule("se", position="builtin", layers="features.2", where="t"),
             make_rule("cbam", position="mid", layers="features.2:features.3", where="t"))
    changes = apply_recipe(model, Recipe(rules=rules if builtin_first else rules[::-1]))
    notes = {(c.block, c.where): c.note for c in changes}
    assert notes[("features.2.0", "mid")] == ""  # its SE is replaced, by an earlier or a later rule
    assert notes[("features.3.0", "mid")] == "beside the block's built-in SqueezeExcitation"


@pytest.mark.parametrize("kind", ["eca", "coord", "gc"])
@pytest.mark.parametrize("position", ["pre", "post", "identity"])
def test_newer_kinds_preserve_at_every_position_on_a_mobilenet(kind, position):
    """ECA, coordinate attention and GC at the positions the per-kind cases above leave out."""
    model = base("mobilenet_v2")
    x = probe()
    with torch.no_grad():
        reference = model(x)
    apply(model, kind, position=position, init="preserve")
    with torch.no_grad():
        assert rel_error(reference, model.eval()(x)) <= TOLERANCE
