"""SE: parameter counts against the SENet tables, and where each position acts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from attnsurgeon.layers.squeeze_excite import SqueezeExcite
from attnsurgeon.surgery import apply


def _count_se_resnet50(**kwargs) -> float:
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    apply(model, "se", **kwargs)
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_se_resnet50_matches_senet_and_cbam_tables():
    n = _count_se_resnet50()
    assert round(n, 1) == 28.1  # SENet Tables 10 and 13
    assert round(n, 2) == 28.09  # CBAM Table 4 prints two decimals


# SENet Table 10 (reduction ratio r, all blocks). Eq. 5 gives 2/r * sum_s N_s C_s^2 added
# parameters (+ biases here); the paper's rows for r = 4, 8, 32 sit 0.06-0.1M above
# what Eq. 5 gives (35.64M, 30.60M, 26.83M), so they are checked within 0.1M.
@pytest.mark.parametrize("reduction, paper", [(2, 45.7), (4, 35.7), (8, 30.7), (16, 28.1), (32, 26.9)])
def test_reduction_ablation_table10(reduction, paper):
    assert abs(_count_se_resnet50(params={"reduction": reduction}) - paper) <= 0.1


# SENet Table 13: SE in one stage only. The paper's stage 2/3/4 are torchvision's
# layer1/2/3. layer3 alone gives 26.35M where the table prints 26.4M: within 0.1M.
@pytest.mark.parametrize("layers, paper", [("layer1", 25.6), ("layer2", 25.7), ("layer3", 26.4), ("all", 28.1)])
def test_stage_ablation_table13(layers, paper):
    assert abs(_count_se_resnet50(layers=layers) - paper) <= 0.1


def test_se_module_follows_eq_2_to_4():
    se = SqueezeExcite(64, reduction=16)
    assert se.fc1.out_channels == 4 and se.fc2.in_channels == 4
    x = torch.randn(2, 64, 5, 5)
    z = x.mean((2, 3))
    s = torch.sigmoid(se.fc2.weight[:, :, 0, 0] @ torch.relu(se.fc1.weight[:, :, 0, 0] @ z.T + se.fc1.bias[:, None]) + se.fc2.bias[:, None]).T
    torch.testing.assert_close(se(x), x * s[:, :, None, None])


def test_se_rejects_bad_sizes():
    with pytest.raises(ValueError, match="reduction"):
        SqueezeExcite(64, reduction=0)


class _Recorder:
    """Forward hooks that keep clones of what modules see and produce."""

    def __init__(self):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def watch(self, name: str, module: nn.Module) -> None:
        def hook(_m, args, out):
            self.inputs[name] = args[0].detach().clone()
            self.outputs[name] = out.detach().clone()

        module.register_forward_hook(hook)


@pytest.fixture
def block_and_input():
    """layer2.0 of resnet18: BasicBlock 64 -> 128, stride 2, with a downsample."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return model, torch.randn(2, 64, 16, 16)


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
def test_position_semantics(block_and_input, position):
    model, x = block_and_input
    apply(model, "se", position=position, layers="layer2.0", params={"reduction": 4})
    block = model.layer2[0]
    se = getattr(block, f"attn_{position}")
    assert isinstance(se, SqueezeExcite)
    # pre and identity act on the block's input channels, standard and post on its output
    assert se.fc1.in_channels == (64 if position in ("pre", "identity") else 128)
    rec = _Recorder()
    for name in ("conv1", "bn2", "downsample", "relu"):
        rec.watch(name, block.get_submodule(name))
    rec.watch("se", se)
    with torch.no_grad():
        out = block(x)
    seen, fed = rec.inputs["se"], rec.outputs["se"]
    if position == "pre":  # branch input; the shortcut sees the raw input
        torch.testing.assert_close(seen, x)
        torch.testing.assert_close(rec.inputs["conv1"], fed)
        torch.testing.assert_close(rec.inputs["downsample"], x)
    elif position == "identity":  # shortcut, before the downsample; branch sees raw input
        torch.testing.assert_close(seen, x)
        torch.testing.assert_close(rec.inputs["downsample"], fed)
        torch.testing.assert_close(rec.inputs["conv1"], x)
    elif position == "standard":  # end of the branch, before the add
        torch.testing.assert_close(seen, rec.outputs["bn2"])
        torch.testing.assert_close(out, torch.relu(fed + rec.outputs["downsample"]))
    else:  # post: after the add and the final ReLU
        branch = rec.outputs["bn2"] + rec.outputs["downsample"]
        torch.testing.assert_close(seen, torch.relu(branch))
        torch.testing.assert_close(out, fed)
    # the SE changed what flows: the block output differs from the plain block's
    plain = torchvision.models.resnet18().eval().layer2[0]
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if "attn_" not in k})
    with torch.no_grad():
        assert not torch.allclose(plain(x), out)


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
def test_bottleneck_positions_channels(position):
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    apply(model, "se", position=position, layers="layer3.0")
    se = getattr(model.layer3[0], f"attn_{position}")
    assert se.fc1.in_channels == (512 if position in ("pre", "identity") else 1024)


def test_gradients_reach_every_se_parameter(x64):
    model = torchvision.models.resnet18()
    changes = apply(model, "se", layers="layer3:")
    model(x64).sum().backward()
    for change in changes:
        for name, p in model.get_submodule(change.path).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (change.path, name)


def test_state_dict_keys_of_the_original_survive():
    model = torchvision.models.resnet18()
    before = model.state_dict()
    apply(model, "se")
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert any(k.startswith("layer1.0.attn_standard.") for k in after)


def test_seed_makes_new_modules_reproducible():
    def new_se(seed):
        model = torchvision.models.resnet18()
        apply(model, "se", layers="layer4.1", seed=seed)
        return model.layer4[1].attn_standard.fc1.weight

    assert torch.equal(new_se(3), new_se(3))
    assert not torch.equal(new_se(3), new_se(4))


def test_fx_and_export_trace(x64):
    model = torchvision.models.resnet18().eval()
    apply(model, "se", position="identity")
    traced = torch.fx.symbolic_trace(model)
    exported = torch.export.export(model, (x64,))
    with torch.no_grad():
        ref = model(x64)
        torch.testing.assert_close(traced(x64), ref)
        torch.testing.assert_close(exported.module()(x64), ref)


def test_a_second_surgery_does_not_silently_overwrite():
    from attnsurgeon.errors import UsageError

    model = torchvision.models.resnet18()
    apply(model, "se", layers="layer4")
    with pytest.raises(UsageError, match="standard position of layer4.0 already holds a SqueezeExcite"):
        apply(model, "cbam", layers="layer4")
    apply(model, "cbam", position="post", layers="layer4")  # another slot is fine
    apply(model, "dynconv", layers="layer4.1")
    with pytest.raises(UsageError, match="layer4.1.conv1 is already a DynamicConv2d"):
        apply(model, "dynconv", layers="layer4.1")


def test_a_conflict_leaves_the_model_untouched():
    from attnsurgeon.errors import UsageError
    from attnsurgeon.recipe import Recipe, make_rule
    from attnsurgeon.surgery import apply_recipe

    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rules = (make_rule("se", layers="layer3", where="t"), make_rule("sk", layers="all", where="t"),
             make_rule("cbam", layers="layer3.1", where="t"))
    with pytest.raises(UsageError, match="rule 3: layers 'layer3.1': the standard position of layer3.1 is already taken by rule 1"):
        apply_recipe(model, Recipe(rules=rules, source="r.toml"))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert type(model.layer3[1]) is torchvision.models.resnet.BasicBlock


@pytest.mark.parametrize("name, layers", [("resnet18", "layer3:"), ("mobilenet_v2", "features.8:features.10"),
                                          ("regnet_y_400mf", "stage4")])
@pytest.mark.parametrize("kind", ["se", "eca", "cbam"])
def test_gate_fuses_with_the_residual_add_and_hooks_still_fire(kind, name, layers, monkeypatch):
    """At ``standard`` a gate's last multiply folds into the residual add (gate_add),
    without the module's forward, in every family's residual blocks: the same function as
    gate-then-add; a module with a hook runs unfused, so the hook fires."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    apply(model, kind, layers=layers)
    gates = [m for n, m in model.named_modules() if n.endswith("attn_standard")]
    forward = type(gates[0]).forward
    entered = []
    monkeypatch.setattr(type(gates[0]), "forward", lambda self, x: entered.append(1) or forward(self, x))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
    assert entered == []  # fused: the gate's forward never ran
    calls = []
    for gate in gates:
        gate.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        plain = model(x)
    assert len(calls) == len(entered) == len(gates) > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
