"""SK and dynamic convolution: shapes, gradients, tracing, paper counts, init modes."""

from __future__ import annotations

import copy
from unittest import mock

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon.layers.dynamic_conv import DynamicConv2d, set_temperature, temperature_schedule
from attnsurgeon.layers.dynamic_conv import from_conv as dyn_from_conv
from attnsurgeon.layers.selective_kernel import SelectiveKernelConv, fit_groups
from attnsurgeon.layers.selective_kernel import from_conv as sk_from_conv
from attnsurgeon.surgery import apply

KINDS = ["sk", "dynconv"]


def _resnet18() -> nn.Module:
    """resnet18 with non-trivial BN statistics, so that preserve is actually tested."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_count(name: str, attn: str | None = None, **kwargs) -> int:
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
        if attn is not None:
            apply(model, attn, **kwargs)
    return _count(model)


# --- surgery on whole models ---------------------------------------------------------

@pytest.mark.parametrize("attn, name, params", [
    ("sk", "resnet18", {}),
    ("sk", "resnet34", {}),
    ("sk", "resnet50", {}),  # groups=1 bottleneck: path 1 is the dense 3x3
    ("sk", "resnext50_32x4d", {}),  # the paper's SKNet-50
    ("sk", "resnet18", {"groups": 48}),  # 48 divides no channel count: fitted to 32
    ("dynconv", "resnet18", {}),
    ("dynconv", "resnext50_32x4d", {}),  # grouped 3x3 convs (groups=32)
])
def test_shapes_strides_and_sites(attn, name, params, x64):
    """One forward of the modified model; each new module's output shape is the old conv's."""
    model = getattr(torchvision.models, name)().eval()
    convs = {n: copy.deepcopy(m).to("meta") for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    changes = apply(model, attn, params=params)
    assert changes
    cls = SelectiveKernelConv if attn == "sk" else DynamicConv2d
    seen: dict[str, tuple[torch.Size, torch.Size]] = {}
    for change in changes:
        new, old = model.get_submodule(change.path), convs[change.path]
        assert isinstance(new, cls)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride"):
            assert getattr(new, attr) == getattr(old, attr), (change.path, attr)
        new.register_forward_hook(
            lambda _m, args, out, path=change.path: seen.__setitem__(path, (args[0].shape, out.shape)))
    with torch.no_grad():
        assert model(x64).shape == (2, 1000)
    assert seen.keys() == {c.path for c in changes}
    for path, (in_shape, out_shape) in seen.items():
        assert convs[path](torch.empty(in_shape, device="meta")).shape == out_shape, path
    if attn == "sk":  # the main conv only, and the norm after it goes
        main, norm = ("conv1", "bn1") if name in ("resnet18", "resnet34") else ("conv2", "bn2")
        assert {c.where for c in changes} == {main}
        assert all(isinstance(model.get_submodule(c.path.replace(main, norm)), nn.Identity) for c in changes)


def test_sk_structure_follows_the_paper():
    with torch.device("meta"):
        model = torchvision.models.resnext50_32x4d()
        apply(model, "sk")
    sk = model.layer4[0].conv2  # C = 1024, stride 2, groups 32
    first, second = sk.paths[0].conv, sk.paths[1].conv
    assert (first.kernel_size, first.dilation, first.groups, first.stride) == ((3, 3), (1, 1), 32, (2, 2))
    assert (second.kernel_size, second.dilation, second.padding, second.groups, second.stride) == (
        (3, 3), (2, 2), (2, 2), 32, (2, 2))
    assert sk.fuse.fc.out_channels == 1024 // 16  # d = max(C / r, L)
    assert model.layer1[0].conv2.fuse.fc.out_channels == 32  # 128 / 16 < L = 32
    assert sk.select.out_channels == 2 * 1024


def test_fit_groups():
    assert fit_groups(32, 64, 128) == 32
    assert fit_groups(48, 64, 64) == 32
    assert fit_groups(32, 48, 48) == 24
    assert fit_groups(5, 64, 64) == 4
    with pytest.raises(ValueError, match="got 0"):
        fit_groups(0, 64, 64)


def test_sk_forward_is_eq_1_to_6():
    torch.manual_seed(0)
    sk = SelectiveKernelConv(16, 16, branches=3, path_groups=4, min_dim=8).train()
    x = torch.randn(4, 16, 9, 9)
    u = [path(x) for path in sk.paths]
    s = sum(u).mean((2, 3), keepdim=True)
    z = sk.fuse(s)
    logits = sk.select(z).view(4, 3, 16, 1, 1)
    a = logits.softmax(1)
    torch.testing.assert_close(sk(x), sum(a[:, m] * u[m] for m in range(3)))
    assert [p.conv.dilation for p in sk.paths] == [(1, 1), (2, 2), (3, 3)]


@pytest.mark.parametrize("attn", KINDS)
def test_gradients_reach_every_new_parameter_and_both_modes_work(attn):
    model = _resnet18()
    changes = apply(model, attn, params={"target": "all"} if attn == "dynconv" else {}, init="paper")
    model.train()
    x = torch.randn(2, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    for change in changes:
        for pname, p in model.get_submodule(change.path).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (change.path, pname)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("attn", KINDS)
def test_fx_and_export_match_eager(attn, x64):
    model = _resnet18().eval()
    apply(model, attn)
    with torch.no_grad():
        eager = model(x64)
        traced = torch.fx.symbolic_trace(model)(x64)
        exported = torch.export.export(model, (x64,)).module()(x64)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5)


# --- init modes ----------------------------------------------------------------------

# preserve: SK leaves a softmax weight of exp(-16) = 1.1e-7 on the new path and dynconv
# sums K identical kernels with weights that add up to 1 (up to rounding), so both
# match the original to float32 noise; 1e-5 leaves room for summation order.
@pytest.mark.parametrize("attn, params", [("sk", {}), ("dynconv", {}), ("dynconv", {"target": "all"})])
def test_preserve_keeps_the_function(attn, params, x64):
    original = _resnet18().eval()
    model = copy.deepcopy(original)
    apply(model, attn, params=params, init="preserve")
    with torch.no_grad():
        torch.testing.assert_close(model(x64), original(x64), rtol=1e-5, atol=1e-5)
    if attn == "sk":  # also in train mode: path 1's BN and the original BN see the same batch
        original.train()
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(model(x64), original(x64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", KINDS)
def test_paper_init_changes_the_function(attn, x64):
    original = _resnet18().eval()
    model = copy.deepcopy(original)
    apply(model, attn, init="paper")
    with torch.no_grad():
        assert not torch.allclose(model(x64), original(x64), atol=1e-3)


def test_sk_preserve_gates_and_trainability():
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
    sk, new_norm = sk_from_conv(conv, norm, init="preserve")
    assert isinstance(new_norm, nn.Identity)
    x = torch.randn(4, 32, 8, 8)
    for train in (True, False):
        sk.train(train)
        u = sum(path(x) for path in sk.paths)
        z = sk.fuse(u.mean((2, 3), keepdim=True))
        torch.testing.assert_close(z, torch.ones_like(z), rtol=0, atol=0)  # z == 1 exactly
        a = sk._attention(u)
        assert torch.all(1 - a[:, 0] < 1e-6) and torch.all(1 - a[:, 0] > 0)
    sk.train()
    sk(x).square().mean().backward()
    assert sk.fuse.bn.weight.grad.abs().sum() > 0 and sk.select.weight.grad.abs().sum() > 0


def test_sk_rejects_what_it_cannot_replace():
    with pytest.raises(ValueError, match="same"):
        sk_from_conv(nn.Conv2d(8, 8, 3, padding=0, bias=False), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="BatchNorm2d or FrozenBatchNorm2d"):
        sk_from_conv(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8))
    with pytest.raises(ValueError, match="numeric padding"):
        sk_from_conv(nn.Conv2d(8, 8, 3, padding="same", bias=False), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="init"):
        sk_from_conv(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), init="pretrained")


def test_dynconv_preserve_is_trainable():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    dyn, norm = dyn_from_conv(conv, nn.BatchNorm2d(8), init="preserve", kernels=3)
    assert norm is None
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(dyn(x), conv(x), rtol=1e-5, atol=1e-6)
    dyn(x).square().mean().backward()
    g = dyn.weight.grad.unflatten(0, (3, -1))  # sum_n pi_nk g_n: different per kernel, so the kernels diverge
    assert not torch.allclose(g[0], g[1]) and not torch.allclose(g[1], g[2])


# --- parameter counts ----------------------------------------------------------------

def test_sknet50_matches_table_2():
    n = _meta_count("resnext50_32x4d", "sk")
    assert round(n / 1e6, 1) == 27.5  # SKNet Table 2: SKNet-50, 27.5M


@pytest.mark.parametrize("kernels", [2, 4])
def test_dynconv_weights_grow_k_times(kernels):
    with torch.device("meta"):
        original = torchvision.models.resnet18()
    model = copy.deepcopy(original)
    changes = apply(model, "dynconv", params={"kernels": kernels, "target": "all"})
    assert len(changes) == 19  # 16 spatial + 3 downsample convs
    for change in changes:
        new, old = model.get_submodule(change.path), original.get_submodule(change.path)
        assert new.weight.numel() == kernels * old.weight.numel()
        assert new.bias is None and old.bias is None


def test_dy_resnet18_parameter_count():
    """DY-ResNet-18 (K=4): dynamic conv on every conv but the stem, as the paper does.

    With ``target="all"`` this gives 45.47M, the count reported for DyConv (4x) on
    ResNet-18 in the ODConv paper (Li, Zhou, Yao; ICLR 2022, Table 1). The dynamic-conv
    paper itself prints 42.7M next to ResNet-18's 11.1M; torchvision's ResNet-18 has
    11,689,512 parameters, which is 11.1 only in units of 2^20, so the paper seems to count
    in 2^20. In those units neither target is exact: ``"all"`` is 43.4 and ``"spatial"``
    42.9 (0.4% above 42.7).
    """
    base = _meta_count("resnet18")
    spatial = _meta_count("resnet18", "dynconv")
    every = _meta_count("resnet18", "dynconv", params={"target": "all"})
    assert round(every / 1e6, 2) == 45.47
    assert round(base / 2**20, 1) == 11.1
    assert abs(spatial / 2**20 - 42.7) < 0.2
    assert abs(every / 2**20 - 42.7) < 0.7


# --- dynamic conv: the two forms, tracing, temperature ---------------------------------

def _loop_reference(dyn: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1-2 one sample at a time, with an explicitly aggregated kernel."""
    pi = dyn.kernel_attention(x)
    bank = dyn.bank()  # (K, C_out, C_in / groups, kh, kw)
    biases = None if dyn.bias is None else dyn.bias.unflatten(0, (dyn.groups, dyn.kernels, -1)).transpose(0, 1).flatten(1)
    outs = []
    for n in range(x.shape[0]):
        weight = (pi[n].view(-1, 1, 1, 1, 1) * bank).sum(0)
        bias = None if biases is None else pi[n] @ biases
        outs.append(F.conv2d(x[n:n + 1], weight, bias, dyn.stride, dyn.padding, dyn.dilation, dyn.groups))
    return torch.cat(outs)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("groups, bias, stride", [(1, False, 1), (2, True, 2), (4, True, 1)])
def test_dynconv_forms_agree(batch, groups, bias, stride):
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 12, 3, stride=stride, padding=1, groups=groups, bias=bias, temperature=1.0)
    x = torch.randn(batch, 8, 9, 9)
    ref = _loop_reference(dyn, x)
    pi = dyn.kernel_attention(x)
    torch.testing.assert_close(dyn.forward_per_sample(x, pi), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dyn.forward_stacked(x, pi), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dyn(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bias", "channels_last"), [(False, False), (True, False), (True, True)])
def test_depthwise_dynconv_stacked_form_runs_one_output_per_group(bias, channels_last):
    """A depthwise conv's stacked form is K depthwise convs (onnxruntime's and PyTorch's CPU
    depthwise kernels), not one conv with K outputs per group: same function, same layout."""
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=bias, temperature=1.0)
    x = torch.randn(3, 8, 9, 9)
    ref = _loop_reference(dyn, x)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    dyn, x = dyn.to(memory_format=layout), x.contiguous(memory_format=layout)
    pi = dyn.kernel_attention(x)
    with mock.patch.object(F, "conv2d", wraps=F.conv2d) as conv:
        y = dyn.forward_stacked(x, pi)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=layout)
    assert [c.args[1].shape[0] for c in conv.call_args_list] == [8] * dyn.kernels


def test_dynconv_eager_choice():
    with torch.device("meta"):
        late, early = DynamicConv2d(512, 512, 3, padding=1), DynamicConv2d(64, 64, 3, padding=1)
        assert late.prefers_stacked(torch.empty(32, 512, 7, 7))  # K H'W' small vs fan_in
        assert not early.prefers_stacked(torch.empty(32, 64, 56, 56))
        assert not late.prefers_stacked(torch.empty(1, 512, 7, 7))  # batch 1: a plain conv


def test_dynconv_exports_with_a_dynamic_batch():
    model = _resnet18().eval()
    apply(model, "dynconv", layers="layer3:", params={"target": "all"})  # fewer ops to trace
    batch = torch.export.Dim("batch", min=1, max=64)
    example = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_dynconv_onnx_dynamic_batch():
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 16, 3, stride=2, padding=1, groups=2).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(dyn, (torch.randn(2, 8, 10, 10),), dynamo=True,
                                dynamic_shapes=({0: batch},), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    x = torch.randn(5, 8, 10, 10)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), dyn(x).detach(), rtol=1e-5, atol=1e-5)


def test_temperature_schedule():
    assert temperature_schedule(0) == 30.0
    assert temperature_schedule(5) == pytest.approx(15.5)
    assert temperature_schedule(10) == 1.0
    assert temperature_schedule(25) == 1.0
    assert temperature_schedule(2.5) == pytest.approx(30 - 29 * 0.25)
    # the seed's 34, 31, ..., 1: minus 3 per epoch over 11 epochs
    assert [temperature_schedule(e, start=34, end=1, epochs=11) for e in range(13)] == pytest.approx(
        [34 - 3 * e for e in range(12)] + [1])
    for bad in ({"epoch": -1}, {"epoch": float("nan")}, {"epoch": 1, "epochs": 0},
                {"epoch": 1, "start": 0.0}, {"epoch": 1, "end": -1.0}):
        with pytest.raises(ValueError, match="got"):
            temperature_schedule(**bad)


def test_set_temperature_and_checkpoint():
    model = _resnet18()
    apply(model, "dynconv", params={"target": "all"})
    assert attnsurgeon.set_temperature(model, 4.0) == 19
    dyns = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert all(float(m.temperature) == 4.0 for m in dyns)
    x = torch.randn(2, 64, 8, 8)  # what layer1.0.conv1 sees
    torch.testing.assert_close(dyns[0].kernel_attention(x), (dyns[0].attention(x) / 4.0).softmax(1))
    state = model.state_dict()
    assert float(state["layer1.0.conv1.temperature"]) == 4.0
    fresh = _resnet18()
    apply(fresh, "dynconv", params={"target": "all"})
    fresh.load_state_dict(state)
    assert float(fresh.layer1[0].conv1.temperature) == 4.0
    assert set_temperature(nn.Sequential(nn.Conv2d(3, 3, 1)), 2.0) == 0
    with pytest.raises(ValueError, match="got 0"):
        set_temperature(model, 0)


# --- dynamic conv: 4-D kernel bank, old checkpoints, form choice -------------------------

def _old_layout_state(dyn: DynamicConv2d) -> dict[str, torch.Tensor]:
    """``dyn``'s state_dict as the 5-D layout wrote it: weight (K, C_out, ...), bias (K, C_out)."""
    state = dict(dyn.state_dict())
    state["weight"] = dyn.bank().clone()
    assert state["weight"].dim() == 5
    if dyn.bias is not None:
        state["bias"] = dyn.bias.unflatten(0, (dyn.groups, dyn.kernels, -1)).transpose(0, 1).flatten(1).clone()
    return state


def test_dynconv_bank_is_4d_in_kernel_major_order():
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 12, 3, padding=1, kernels=3)
    assert dyn.weight.shape == (3 * 12, 8, 3, 3) and dyn.bias.shape == (36,)
    torch.testing.assert_close(dyn.bank()[2, 5], dyn.weight[2 * 12 + 5], rtol=0, atol=0)
    grouped = DynamicConv2d(8, 12, 3, padding=1, kernels=3, groups=2)  # (group, kernel, channel)
    torch.testing.assert_close(grouped.bank()[2, 6 + 1], grouped.weight[1 * 18 + 2 * 6 + 1], rtol=0, atol=0)


@pytest.mark.parametrize("groups, bias", [(1, False), (2, True)])
def test_dynconv_loads_old_5d_checkpoints(groups, bias):
    torch.manual_seed(0)
    source = DynamicConv2d(8, 12, 3, padding=1, groups=groups, bias=bias, temperature=2.0)
    old = _old_layout_state(source)
    fresh = DynamicConv2d(8, 12, 3, padding=1, groups=groups, bias=bias)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.weight, source.weight, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(fresh.bias, source.bias, rtol=0, atol=0)
    x = torch.randn(3, 8, 7, 7)
    torch.testing.assert_close(fresh(x), source(x), rtol=0, atol=0)
    wrong = dict(old, weight=torch.zeros(4, 12, 8, 3, 2))  # wrong numel: a clear size error
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(wrong)


def test_old_5d_checkpoint_loads_through_attnsurgeon_load(tmp_path):
    from attnsurgeon.checkpoint import save
    from attnsurgeon.recipe import Recipe, make_rule
    from attnsurgeon.surgery import apply_recipe

    model = torchvision.models.resnet18()
    recipe = Recipe(rules=(make_rule("dynconv", layers="layer4", where="test"),), seed=0)
    apply_recipe(model, recipe)
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, DynamicConv2d):
            state[f"{name}.weight"] = module.bank().clone()
    path = tmp_path / "old.pt"
    save(path, model, model_name="resnet18", recipe=recipe)
    data = torch.load(path, weights_only=True)
    data["state_dict"] = state  # as a checkpoint from before the 4-D bank holds it
    torch.save(data, path)
    loaded = attnsurgeon.load(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_channels_last_converts_a_model_with_dynamic_convs(x64):
    model = _resnet18().eval()
    apply(model, "dynconv", params={"target": "all"})
    with torch.no_grad():
        ref = model(x64)
        model = model.to(memory_format=torch.channels_last)  # failed on the 5-D bank
        assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        got = model(x64.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_dynconv_forms_agree_channels_last_and_keep_the_layout(groups, channels_last):
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 12, 3, padding=1, groups=groups, temperature=1.0)
    x = torch.randn(3, 8, 9, 9)
    ref = _loop_reference(dyn, x)
    if channels_last:
        dyn, x = dyn.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    pi = dyn.kernel_attention(x)
    for y in (dyn.forward_per_sample(x, pi), dyn.forward_stacked(x, pi)):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_set_dynconv_form_overrides_the_choice():
    from types import SimpleNamespace

    from attnsurgeon.layers.dynamic_conv import set_dynconv_form

    model = nn.Sequential(DynamicConv2d(64, 64, 3, padding=1), DynamicConv2d(512, 512, 3, padding=1))
    early, late = model
    x_early, x_late = torch.empty(32, 64, 56, 56), torch.empty(32, 512, 7, 7)
    assert not early.uses_stacked(x_early) and late.uses_stacked(x_late)  # the CPU rule
    # CUDA (a stand-in input: no GPU here): batch 1 stays a plain conv; other batches are
    # measured (tests/test_dynconv_triton.py), unless a form is forced
    on_cuda = SimpleNamespace(shape=(32, 64, 56, 56), device=torch.device("cuda"))
    assert early.form_for(SimpleNamespace(shape=(1, 64, 56, 56), device=torch.device("cuda"))) == "per_sample"
    assert set_dynconv_form(model, "per_sample") == 2
    assert not late.uses_stacked(x_late) and not early.uses_stacked(on_cuda)
    assert set_dynconv_form(model, "stacked") == 2
    assert early.uses_stacked(x_early) and "form=stacked" in repr(early)
    set_dynconv_form(model, "auto")
    assert not early.uses_stacked(x_early)
    with pytest.raises(ValueError, match="got 'fast'"):
        set_dynconv_form(model, "fast")
    assert attnsurgeon.set_dynconv_form(nn.Conv2d(3, 3, 1), "auto") == 0


@pytest.mark.parametrize("form", ["stacked", "per_sample"])
def test_forced_forms_give_the_same_model_output(form, x64):
    from attnsurgeon.layers.dynamic_conv import set_dynconv_form

    model = _resnet18().eval()
    apply(model, "dynconv", params={"target": "all"})
    with torch.no_grad():
        ref = model(x64)
        set_dynconv_form(model, form)
        torch.testing.assert_close(model(x64), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_dynconv_on_cuda_matches_cpu(monkeypatch):
    # full float32 products: cuDNN's default TF32 differs from the CPU by ~4e-4 here
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    dyn = DynamicConv2d(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 14, 14)
    ref = dyn(x)
    gpu, xg = copy.deepcopy(dyn).cuda(), x.cuda()
    torch.testing.assert_close(gpu(xg).cpu(), ref, rtol=1e-4, atol=1e-4)  # the measured form
    for form in ("stacked", "per_sample", "triton"):
        attnsurgeon.set_dynconv_form(gpu, form)
        torch.testing.assert_close(gpu(xg).cpu(), ref, rtol=1e-4, atol=1e-4)
    attnsurgeon.set_dynconv_form(gpu, "auto")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu.to(memory_format=torch.channels_last)(xg.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=5e-2, atol=5e-2)


def test_depthwise_dynconv_onnx_keeps_every_kernel_an_initializer(tmp_path):
    """In ONNX a depthwise dynamic conv is K depthwise Convs whose weights, sliced from the
    bank, are initializers (folded past the exporter's size limit), so a quantizer stores
    them in int8 per channel and onnxruntime runs its depthwise kernel; the file agrees."""
    import onnx
    from onnx import helper, numpy_helper

    from attnsurgeon.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 512, 1), DynamicConv2d(512, 512, 3, padding=1, groups=512, temperature=1.0),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)).eval()
    # the bank, 4 x 512 x 9 = 18,432 elements, is over the exporter's folding limit
    export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=True)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if helper.get_attribute_value(next(a for a in n.attribute if a.name == "group")) > 1]
    assert all(n.input[1] in weights for n in convs)
    assert len(depthwise) == 4 and all(weights[n.input[1]].shape == (512, 1, 3, 3) for n in depthwise)
