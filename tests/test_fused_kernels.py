"""The fused gate kernels (attnsurgeon.kernels): proven on the CPU in Triton's interpreter,
each check in a child process (``TRITON_INTERPRET=1`` must precede Triton's import; see
``tests/_fused_interpret.py``), and the dispatch rules that keep the plain form everywhere
else: CPU tensors, tracing, the off switch."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from attnsurgeon import kernels
from attnsurgeon.layers.cbam import CBAM
from attnsurgeon.layers.coord import CoordAttention
from attnsurgeon.layers.eca import ECA
from attnsurgeon.layers.global_context import GlobalContext
from attnsurgeon.layers.squeeze_excite import SqueezeExcite
from attnsurgeon.surgery import apply

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_fused_interpret.py"


def _run_script(group: str, *extra: str, env: dict[str, str] | None = None) -> str:
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    child_env.pop("ATTNSURGEON_FUSED", None)
    result = subprocess.run([sys.executable, str(SCRIPT), group, *extra], capture_output=True, text=True,
                            env=child_env, timeout=600)
    assert result.returncode == 0, f"{group}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


@pytest.mark.parametrize("group", ["ops", "model", "mid", pytest.param("opcheck", marks=pytest.mark.heavy),
                                   pytest.param("compile", marks=pytest.mark.heavy)])
def test_kernels_in_the_interpreter_match_the_plain_form(group):
    """Every kernel, forward and backward, through the models' dispatch, against the plain
    form: both layouts, odd sizes, batch 1, fp32 and bf16 (ops); a ResNet-18 carrying SE,
    ECA, CBAM, coordinate attention and GC at standard, mid, post and pre (model); the
    gates at ``mid`` with the block's eval-mode norm and activation fused in, inference
    only, alone and in a model of each family (mid); the custom ops' schema, fake and
    autograd registrations, as torch.compile uses them (opcheck), and the ops inside
    compiled models, training and at ``mid`` (compile)."""
    out = _run_script(group)
    assert out.startswith("ok ") and "\nlaunches: {" in out  # the checks ran and the kernels launched


@pytest.mark.cuda
@pytest.mark.parametrize("group", ["ops", "ops-fp16", "model", "mid", "opcheck", "compile"])
def test_kernels_on_cuda_match_the_plain_form(group):
    """The same checks, compiled for the GPU (and float16)."""
    _run_script(group, "--cuda")


def _cpu_map() -> torch.Tensor:
    return torch.randn(2, 8, 5, 5)


def test_cpu_tensors_take_the_plain_form():
    x = _cpu_map()
    assert not kernels.active(x)
    s = torch.rand(2, 8, 1, 1)
    assert torch.equal(kernels.scale(x, s, x, relu=True), torch.relu(torch.addcmul(x, x, s)))
    mean, peak = kernels.mean_max_hw(x)
    assert torch.equal(mean, x.mean((2, 3), keepdim=True)) and torch.equal(peak, x.amax((2, 3), keepdim=True))


def test_modes_switch_and_come_back():
    before = kernels.enabled()
    with kernels.use_fused(False):
        assert kernels.enabled() == "off"
        with kernels.use_fused("compile"):
            assert kernels.enabled() == "compile"
        assert kernels.enabled() == "off"
    assert kernels.enabled() == before
    with pytest.raises(ValueError, match="fused-kernel mode"):
        kernels.set_enabled("sometimes")


def test_cpu_kernel_hook_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels._interpret_on_cpu(True)


def test_off_switch_from_the_environment(monkeypatch):
    try:
        for value, mode in (("0", "off"), ("compile", "compile"), ("1", "eager")):
            monkeypatch.setenv("ATTNSURGEON_FUSED", value)
            importlib.reload(kernels)  # the same module object: layers and blocks see the change
            assert kernels.enabled() == mode
    finally:
        monkeypatch.delenv("ATTNSURGEON_FUSED")
        importlib.reload(kernels)


def test_tracers_get_the_plain_form(monkeypatch):
    """With the kernels allowed on this CPU, jit tracing and fx still see no kernel: exported
    graphs keep the plain form."""
    monkeypatch.setattr(kernels, "_interpret", True)
    monkeypatch.setattr(kernels, "_load", lambda: True)  # as if Triton were there; nothing runs
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(kernels.active(x))
        return x

    probe(_cpu_map())
    assert seen == [True]  # the hook alone would take CPU tensors
    seen.clear()
    torch.jit.trace(probe, (_cpu_map(),), check_trace=False)
    assert seen == [False]
    seen.clear()
    torch.fx.symbolic_trace(nn.Sequential(nn.Identity()))  # a Proxy is no tensor
    assert not kernels.active(torch.fx.Proxy(torch.fx.Graph().placeholder("x")))


def test_exporting_is_true_under_torch_export_only():
    """torch.compile is not an export (Dynamo in torch 2.10 and 2.11 said it was, through
    torch.compiler.is_exporting(), and compiled models then took their export forms)."""

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1 if kernels.exporting() else x

    x = torch.zeros(2)
    assert not kernels.exporting()
    assert torch.equal(torch.compile(Probe(), backend="eager", fullgraph=True)(x), x)
    assert torch.equal(torch.export.export(Probe(), (x,)).module()(x), x + 1)


def test_what_the_kernels_do_not_take_runs_plain(monkeypatch):
    """A gate broadcast over the batch, float64, a shortcut of another shape: the plain form
    (the kernel path, allowed on this CPU here, would raise)."""

    class NoKernels:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"the kernel path ran: {name}")

    monkeypatch.setattr(kernels, "_interpret", True)
    monkeypatch.setattr(kernels, "_load", lambda: True)
    monkeypatch.setattr(kernels, "_impl", NoKernels())
    x = _cpu_map()
    assert kernels.active(x)  # the hook on: only the operands decide below
    shared = torch.rand(1, 8, 1, 1)
    assert torch.equal(kernels.scale(x, shared), x * shared)
    x64 = x.double()
    assert torch.equal(kernels.scale(x64, x64.mean((2, 3), keepdim=True)), x64 * x64.mean((2, 3), keepdim=True))
    wide = torch.randn(2, 8, 5, 6)
    assert not kernels.active(x, wide)
    g_h, g_w = torch.rand(2, 8, 5, 1), torch.rand(1, 8, 1, 5)
    assert torch.equal(kernels.scale_hw(x, g_h, g_w), x * g_h * g_w)


def test_gc_context_pool_dispatch(monkeypatch):
    """GC's pooling: on the CPU the plain form, bit for bit the layer's own; where the kernels
    run, the kernel path, except with a hook on the logits' conv (its forward must run)."""

    class NoKernels:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"the kernel path ran: {name}")

    torch.manual_seed(0)
    gc = GlobalContext(8, reduction=4)
    x = _cpu_map()
    plain = kernels.context_pool(x, gc.conv_mask.weight, gc.conv_mask.bias)
    assert torch.equal(plain, gc._context(x))
    monkeypatch.setattr(kernels, "_interpret", True)
    monkeypatch.setattr(kernels, "_load", NoKernels)
    with pytest.raises(AssertionError, match="kernel path ran: context_pool"):
        gc._context(x)
    weights = torch.nn.functional.conv2d(x, gc.conv_mask.weight).flatten(2).softmax(-1)
    unbiased = kernels.context_pool(x, gc.conv_mask.weight, None)  # no bias: the plain form
    assert torch.equal(unbiased, (x.flatten(2) @ weights.transpose(1, 2)).unsqueeze(-1))
    wide = torch.randn(1, kernels._MAX_CONTEXT_C + 1, 1, 2)  # more channels than a tile holds: plain
    assert kernels.context_pool(wide, torch.ones(1, wide.shape[1], 1, 1), torch.zeros(1)).shape == (1, wide.shape[1], 1, 1)
    seen = []
    gc.conv_mask.register_forward_hook(lambda *args: seen.append(1))
    assert torch.equal(gc._context(x), plain) and seen == [1]


def test_norm_act_takes_eval_batchnorm_and_the_families_activations():
    """The norm and activation a gate at ``mid`` may fuse: an eval-mode BatchNorm with running
    statistics (or a frozen one) and ReLU, ReLU6, SiLU, Hardswish or none; its plain form is
    ``act(bn(y))``. Anything else (training mode, batch statistics, GELU) is not taken."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    y = torch.randn(2, 6, 3, 4)
    assert kernels.NormAct.of(bn, nn.ReLU()) is None  # training mode: batch statistics
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict(), strict=False)
    for act in (nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Hardswish(), None):
        for norm in (bn, frozen):
            pre = kernels.NormAct.of(norm, act)
            assert pre is not None
            ref = norm(y) if act is None else act(norm(y))
            torch.testing.assert_close(pre(y), ref, rtol=1e-6, atol=1e-6)
    assert kernels.NormAct.of(bn, nn.GELU()) is None
    assert kernels.NormAct.of(nn.BatchNorm2d(6, track_running_stats=False).eval(), nn.ReLU()) is None
    assert kernels.NormAct.of(nn.GroupNorm(2, 6), nn.ReLU()) is None


def test_mid_split_keeps_the_cpu_function():
    """With a gate at ``mid`` the block runs its (conv, norm, activation) one child at a time
    (where the GPU kernels may fuse the last two with the gate); on the CPU that is still
    the Sequential's forward, bit for bit, in eval mode without autograd."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    apply(model, "se", position="mid", layers="features.2:features.4")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        split = model(x)
        for i in (2, 3, 4):  # a hook on the Sequential: it runs as itself
            model.features[i].conv[1].register_forward_hook(lambda *args: None)
        whole = model(x)
    assert torch.equal(split, whole)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may load the kernels")
def test_cpu_models_never_load_the_kernels():
    code = ("import sys, torch, torchvision, attnsurgeon\n"
            "m = torchvision.models.resnet18()\n"
            "attnsurgeon.apply(m, 'cbam')\n"
            "m.eval()(torch.randn(1, 3, 32, 32))\n"
            "print('attnsurgeon.kernels._ops' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_every_gate_whose_gate_add_takes_relu_says_so():
    """The block fuses its ReLU into a gate's pass where the class sets FUSES_RELU (a class
    attribute: torch.compile traces it without the signature lookup it would warn about)."""
    import inspect

    from attnsurgeon.layers.squeeze_excite import EffectiveSqueezeExcite

    for cls in (SqueezeExcite, ECA, CBAM, CoordAttention, GlobalContext, EffectiveSqueezeExcite):
        takes = "relu" in inspect.signature(cls.gate_add).parameters
        assert getattr(cls, "FUSES_RELU", False) == takes, cls
    assert not hasattr(EffectiveSqueezeExcite, "FUSES_RELU")


@pytest.mark.parametrize("kind", ["coord", "gc"])
def test_new_gate_adds_keep_the_cpu_function(kind):
    """coord and GC gained ``gate_add``; on the CPU it is still gate, then add: bit for bit."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    apply(model, kind, layers="layer2", params={"fusion": "scale"} if kind == "gc" else None)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for block in model.layer2:
            block.attn_standard.register_forward_hook(lambda *args: None)  # hooks: unfused
        plain = model(x)
    assert torch.equal(fused, plain)
