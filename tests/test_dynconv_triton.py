"""The Triton dynamic-conv kernel (dynamic convolution and ODConv) against the plain forms.

On the CPU the kernel runs in Triton's interpreter, which ``TRITON_INTERPRET=1`` turns on
only if it is set before triton is first imported: ``test_interpreter_suite`` therefore
runs this file again in a child process with it set, where the ``interp`` tests run (they
skip in the parent). On CUDA the ``cuda`` tests run the compiled kernel.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from attnsurgeon.layers.dynamic_conv import _MEASURED, FORMS, DynamicConv2d, set_dynconv_form

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
interp = pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_suite's child (TRITON_INTERPRET=1)")

# (C_in, C_out, kernel, stride, padding, dilation, groups, bias, K, batch, H=W, channels_last, dtype)
CASES = {
    "1x1": (5, 7, 1, 1, 0, 1, 1, False, 4, 3, 6, False, torch.float32),
    "3x3": (6, 10, 3, 1, 1, 1, 1, True, 4, 2, 7, True, torch.float32),
    "3x3-stride2-groups2": (6, 10, 3, 2, 1, 1, 2, False, 4, 2, 9, False, torch.float32),
    "3x3-dilation2-K3": (4, 6, 3, 1, 2, 2, 1, False, 3, 1, 8, True, torch.float32),
    # dx by stride phase: a 1x1 stride-2 conv (3 of 4 phases reached by no tap), and stride 3
    # with a dilation and a size that leaves the phases unequal (10 = 4 + 3 + 3)
    "1x1-stride2": (6, 8, 1, 2, 0, 1, 1, False, 4, 2, 8, True, torch.float32),
    "3x3-stride3-dilation2": (4, 6, 3, 3, 2, 2, 1, True, 4, 2, 10, False, torch.float32),
    "depthwise": (4, 4, 3, 1, 1, 1, 4, True, 4, 2, 6, True, torch.float32),
    "depthwise-stride2": (3, 3, 3, 2, 1, 1, 3, False, 4, 1, 7, False, torch.float32),
    "bf16-3x3-groups2": (6, 10, 3, 1, 1, 1, 2, True, 4, 2, 7, True, torch.bfloat16),
    "bf16-1x1": (12, 5, 1, 1, 0, 1, 1, False, 4, 3, 5, False, torch.bfloat16),
}


def _blocks():  # noqa: ANN202
    from attnsurgeon.layers._dynconv_triton import Blocks

    # small tiles: few interpreted programs; a dW grid of 2 programs, so that the batch of 3
    # of a one-tile case splits in 2 (2 samples, then 1), and one program covers the batch else
    return Blocks(m=64, n=16, k=16, warps=4, programs=2)


def _pair(case: tuple, device: str = "cpu", *, odconv: bool = False) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A dynamic conv (or ODConv) forced to the Triton form, its float64 copy on a plain form
    (the stacked one; ODConv's per-sample one), and an input."""
    from attnsurgeon.layers.odconv import ODConv2d

    c_in, c_out, k, stride, padding, dilation, groups, bias, kernels, batch, hw, last, dtype = case
    torch.manual_seed(0)
    module = (ODConv2d if odconv else DynamicConv2d)(c_in, c_out, k, stride=stride, padding=padding,
                                                     dilation=dilation, groups=groups, bias=bias, kernels=kernels,
                                                     temperature=1.0)
    x = torch.randn(batch, c_in, hw, hw)
    module, x = module.to(device, dtype), x.to(device, dtype)
    if last:
        module, x = module.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if dtype == torch.bfloat16:
        # ODConv's attention has a BatchNorm: over a batch of 2 in bf16 it makes every form's
        # gradients ill-conditioned (the per-sample form's too: up to 0.31 off the float64
        # one); with its running statistics they are within 2e-2
        module.eval()
    ref = copy.deepcopy(module).double()
    set_dynconv_form(ref, "per_sample" if odconv else "stacked")
    set_dynconv_form(module, "triton")
    return module, ref, x


def _check_against_reference(dyn: DynamicConv2d, ref: DynamicConv2d, x: torch.Tensor, tol: float) -> None:
    """``dyn``'s Triton form against ``ref``'s float64 stacked form: the output and the
    gradients of the input, the kernel bank, the biases and the attention weights pi."""
    x = x.detach().requires_grad_()
    pi = dyn.kernel_attention(x).detach().requires_grad_()
    xr, pir = x.detach().double().requires_grad_(), pi.detach().double().requires_grad_()
    y = dyn.forward_triton(x, pi)
    yr = ref.forward_stacked(xr, pir)
    _check_outputs(y, yr, [x, pi, *dyn.parameters()], [xr, pir, *ref.parameters()], tol)


def _check_module(dyn: nn.Module, ref: nn.Module, x: torch.Tensor, tol: float) -> None:
    """Whole modules: output, input gradient and every parameter's (attention FCs included)."""
    x = x.detach().requires_grad_()
    xr = x.detach().double().requires_grad_()
    _check_outputs(dyn(x), ref(xr), [x, *dyn.parameters()], [xr, *ref.parameters()], tol)


def _check_outputs(y: torch.Tensor, yr: torch.Tensor, inputs: list, ref_inputs: list, tol: float) -> None:
    x = inputs[0]
    assert y.dtype == x.dtype and y.shape == yr.shape
    last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)
    grad = torch.randn(yr.shape, dtype=torch.float64, device=yr.device)
    got = torch.autograd.grad(y, inputs, grad.to(y.dtype), allow_unused=True)
    want = torch.autograd.grad(yr, ref_inputs, grad, allow_unused=True)
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if b is None:  # the attention FCs, when pi is given
            continue
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=tol, atol=tol, msg=f"gradient {i}")


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="the parent process (needs triton)")
def test_interpreter_suite():
    test_file = Path(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(test_file.parents[1])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=test_file.parents[1])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    expected = len(CASES) + len(TILED) + 7  # the interp tests below and the two plain tests
    expected += len(OD_CASES) + 3  # ODConv's
    assert passed and int(passed.group(1)) == expected, result.stdout[-2000:]


@interp
def test_interpreter_is_on():
    import triton.runtime.interpreter

    from attnsurgeon.layers import _dynconv_triton

    assert isinstance(_dynconv_triton._forward_kernel, triton.runtime.interpreter.InterpretedFunction)
    assert _dynconv_triton.interpreting()


@interp
@pytest.mark.parametrize("name", list(CASES))
def test_triton_form_matches_the_stacked_form(name):
    from attnsurgeon.layers._dynconv_triton import calls

    case = CASES[name]
    dyn, ref, x = _pair(case)
    dyn.triton_blocks = _blocks()
    before = calls()
    _check_against_reference(dyn, ref, x, 5e-2 if case[-1] == torch.bfloat16 else 1e-5)
    after = calls()
    assert all(after[kernel] == before[kernel] + 1 for kernel in after), (before, after)  # the kernels ran


@interp
def test_wide_grad_weight_tiles_match():
    """The dW kernel at 64 out-channel rows and 8 warps (``Blocks.dw_rows``, ``dw_warps``),
    the tile Hopper's warp-group MMA takes, against the stacked form."""
    from attnsurgeon.layers._dynconv_triton import Blocks

    dyn, ref, x = _pair(CASES["3x3-stride2-groups2"])
    dyn.triton_blocks = Blocks(m=64, n=64, k=16, warps=4, programs=2, dw_rows=64, dw_warps=8)
    _check_against_reference(dyn, ref, x, 1e-5)


@interp
def test_triton_form_under_autocast_and_compile():
    from attnsurgeon.layers._dynconv_triton import calls

    dyn, ref, x = _pair(CASES["3x3"])
    dyn.triton_blocks = _blocks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dyn(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=5e-2, atol=5e-2)
    # forward() dispatches to the kernel; torch.compile sees one op (fullgraph: no graph
    # break), whose backward is the kernels too
    before = calls()
    compiled = torch.compile(dyn, backend="aot_eager", fullgraph=True)
    _check_module(compiled, ref, x, 1e-5)
    assert calls()["grad_weight"] == before["grad_weight"] + 1


@interp
def test_export_keeps_the_stacked_form_with_a_dynamic_batch():
    dyn, _, x = _pair(CASES["3x3-stride2-groups2"])
    dyn.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(dyn, (x,), dynamic_shapes=({0: batch},))
    assert "attnsurgeon" not in str(program.graph)
    x5 = torch.randn(5, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x5), dyn.forward_stacked(x5, dyn.kernel_attention(x5)))


@interp
def test_measure_forms_times_every_form():
    dyn, _, x = _pair(CASES["1x1"])
    dyn.triton_blocks = _blocks()
    with torch.no_grad():
        timings = dyn.measure_forms(x, reps=1)
    assert set(timings) == {"stacked", "per_sample", "triton"} and all(t > 0 for t, _ in timings.values())
    assert dyn.weight.grad is None


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_tile_forms_time_a_larger_tile_only_where_the_conv_fills_it():
    from attnsurgeon.layers._dynconv_triton import TILES, tile_forms

    wide = ["triton", "triton:m128", "triton:n128", "triton:wide-dw", "triton:premixed"]
    assert tile_forms((8, 128, 28, 28), (8, 128, 28, 28), 1, 9, train=True) == wide
    assert tile_forms((8, 128, 28, 28), (8, 128, 28, 28), 1, 9, train=False) == [*wide[:3], wide[4]]
    assert tile_forms((8, 512, 14, 14), (8, 512, 7, 7), 1, 9, train=True) == wide  # 196 input positions
    assert tile_forms((8, 512, 7, 7), (8, 512, 7, 7), 1, 9, train=True) == ["triton", *wide[2:4]]  # 49 positions
    assert tile_forms((8, 64, 8, 8), (8, 64, 8, 8), 1, 9, train=True) == ["triton", "triton:wide-dw"]
    assert tile_forms((8, 128, 9, 9), (8, 128, 9, 9), 128, 9, train=True) == wide[:3]  # depthwise: no premix
    assert tile_forms((8, 256, 8, 8), (8, 256, 8, 8), 8, 9, train=True) == ["triton"]  # 32 channels a group
    # N premixed kernels past 32-bit indexing: 1024 x 1024 x 1024 x 9 elements
    assert "triton:premixed" not in tile_forms((1024, 1024, 16, 16), (1024, 1024, 16, 16), 1, 9, train=False)
    assert set(TILES) == set(wide) and TILES["triton"] == type(TILES["triton"])()
    for blocks in TILES.values():  # what the ops take, and rebuild the tiles from
        assert type(blocks)(*blocks.as_list()) == blocks


# convs that the larger tile sets fill: a dense one (81 positions: more than 64) as dynconv;
# a depthwise one (72 channels: more than 64) and a strided grouped one as ODConv (gated);
# the tiles are constexprs of the same kernels, whichever module calls them (the wide dW
# tile: test_wide_grad_weight_tiles_match)
TILED = {
    "dense-dynconv": ((16, 16, 3, 1, 1, 1, 1, True, 4, 2, 9, True, torch.float32), False,
                      ["triton:m128", "triton:premixed"]),
    "depthwise-odconv": ((72, 72, 3, 1, 1, 1, 72, True, 4, 2, 9, False, torch.float32), True,
                         ["triton:m128", "triton:n128"]),
    # premixed with ODConv's gates and per-tap mix folded in, its kernel-major bank, groups, stride
    "strided-grouped-odconv": ((6, 10, 3, 2, 1, 1, 2, False, 4, 2, 9, False, torch.float32), True,
                               ["triton:m128", "triton:premixed"]),
}


@interp
@pytest.mark.parametrize("name", list(TILED))
def test_every_timed_tile_set_is_measured_and_matches(name):
    """The automatic form times the Triton form at each tile set the conv fills (forward and
    backward), and each gives the plain form's output and gradients."""
    case, odconv, tiled = TILED[name]
    module, ref, x = _pair(case, odconv=odconv)
    assert module.triton_blocks is None
    timings = module.measure_forms(x, reps=1)
    assert set(timings) == {"stacked", "per_sample", "triton", *tiled}
    assert all(0 < t < float("inf") for t, _ in timings.values())
    for form in tiled:
        xf, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
        _check_outputs(module.run_form(xf, form), ref(xr), [xf, *module.parameters()], [xr, *ref.parameters()], 1e-5)


# --- ODConv on the same kernel, with a mix per kernel tap ----------------------------------

# (C_in, C_out, kernel, stride, padding, dilation, groups, bias, K, batch, H=W, channels_last, dtype);
# the attention's BatchNorm trains on batches of 2 or more
OD_CASES = {
    "3x3": (6, 10, 3, 1, 1, 1, 1, False, 4, 2, 7, True, torch.float32),
    "3x3-stride2-groups2": (6, 10, 3, 2, 1, 1, 2, False, 4, 3, 9, False, torch.float32),  # kernel-major bank
    "depthwise-bias": (4, 4, 3, 1, 1, 1, 4, True, 4, 2, 6, True, torch.float32),
    "1x1-K4": (5, 7, 1, 1, 0, 1, 1, False, 4, 2, 6, False, torch.float32),  # no spatial attention
    "3x3-K1-dilation2": (6, 8, 3, 1, 2, 2, 1, False, 1, 2, 8, False, torch.float32),  # no kernel attention
    "non-square-groups2": (6, 8, (1, 3), 1, (0, 1), 1, 2, False, 4, 2, 7, False, torch.float32),
    "depthwise-7x7-stride2-K2": (8, 8, 7, 2, 3, 1, 8, True, 2, 2, 9, False, torch.float32),  # ConvNeXt's
    "bf16-3x3": (6, 10, 3, 1, 1, 1, 1, False, 4, 2, 7, True, torch.bfloat16),
}


@interp
@pytest.mark.parametrize("name", list(OD_CASES))
def test_odconv_triton_form_matches_the_per_sample_form(name):
    """Output and every gradient (input, kernel bank, bias, the four attentions' FCs: the
    spatial attention's through the per-tap partial sums of dpi)."""
    from attnsurgeon.layers._dynconv_triton import calls

    case = OD_CASES[name]
    od, ref, x = _pair(case, odconv=True)
    od.triton_blocks = _blocks()
    assert od.form_for(x) == "triton"
    before = calls()
    _check_module(od, ref, x, 5e-2 if case[-1] == torch.bfloat16 else 1e-5)
    after = calls()
    assert all(after[kernel] == before[kernel] + 1 for kernel in after), (before, after)


@interp
def test_odconv_compiled_uses_the_op():
    from attnsurgeon.layers._dynconv_triton import calls

    od, ref, x = _pair(OD_CASES["3x3-stride2-groups2"], odconv=True)
    od.triton_blocks = _blocks()
    set_dynconv_form(od, "auto")  # auto: under compile the op where it applies
    before = calls()
    compiled = torch.compile(od, backend="aot_eager", fullgraph=True)
    _check_module(compiled, ref, x, 1e-5)
    assert calls()["forward"] == before["forward"] + 1 and calls()["grad_weight"] == before["grad_weight"] + 1


@interp
def test_odconv_measure_forms_times_every_form():
    od, _, x = _pair(OD_CASES["3x3"], odconv=True)
    od.triton_blocks = _blocks()
    timings = od.measure_forms(x, reps=1)  # a training step: forward and backward
    assert set(timings) == {"stacked", "per_sample", "triton"} and all(t > 0 for t, _ in timings.values())
    assert od.weight.grad is None


@interp
def test_the_op_rejects_a_mix_or_gates_that_do_not_fit():
    from attnsurgeon.layers._dynconv_triton import dynamic_conv2d

    x, bank = torch.randn(2, 4, 5, 5), torch.randn(3 * 6, 4, 3, 3)  # K = 3, C_out = 6, 9 taps
    conv = dict(kernels=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    assert dynamic_conv2d(x, bank, torch.rand(2, 9, 3), **conv).shape == (2, 6, 5, 5)
    with pytest.raises(ValueError, match="pi"):
        dynamic_conv2d(x, bank, torch.rand(2, 4, 3), **conv)  # 4 taps
    with pytest.raises(ValueError, match="gates"):
        dynamic_conv2d(x, bank, torch.rand(2, 3), gates=(torch.rand(2, 4), torch.rand(2, 4)), **conv)


def test_the_choice_never_takes_more_memory_than_per_sample_kernels():
    from attnsurgeon.layers.dynamic_conv import _fastest_within_memory

    assert _fastest_within_memory({"stacked": (1.0, 300), "per_sample": (2.0, 200), "triton": (1.5, 100)}) == "triton"
    assert _fastest_within_memory({"stacked": (1.0, 300), "per_sample": (2.0, 200)}) == "per_sample"
    assert _fastest_within_memory({"stacked": (1.0, 200), "per_sample": (2.0, 200), "triton": (3.0, 10)}) == "stacked"


# --- CUDA ---------------------------------------------------------------------------------

@pytest.fixture
def no_tf32():
    """Full float32 products in cuDNN and matmul, as the CPU computes, restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("kind, name", [("dynconv", n) for n in CASES] + [("odconv", n) for n in OD_CASES])
def test_cuda_triton_form_matches_the_plain_form(kind, name, no_tf32):
    """Dynamic convolution against its stacked form (pi given), ODConv against its
    per-sample form (whole module), both in float64."""
    case = (CASES if kind == "dynconv" else OD_CASES)[name]
    tol = 5e-2 if case[-1] == torch.bfloat16 else 1e-4
    if kind == "dynconv":
        _check_against_reference(*_pair(case, "cuda"), tol)
    else:
        _check_module(*_pair(case, "cuda", odconv=True), tol)


@pytest.mark.cuda
def test_cuda_resnet_shape_bf16_channels_last(no_tf32):
    """A ResNet layer's shape at the kernel's default tiles, bf16 autocast, channels_last."""
    torch.manual_seed(0)
    dyn = DynamicConv2d(64, 128, 3, stride=2, padding=1, temperature=1.0).cuda()
    x = torch.randn(8, 64, 28, 28, device="cuda")
    dyn, x = dyn.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    pi = dyn.kernel_attention(x)
    ref = dyn.forward_stacked(x, pi)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = dyn.forward_triton(x, pi)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dynconv", "odconv"])
def test_cuda_auto_measures_once_and_every_form_agrees(kind, no_tf32):
    from attnsurgeon.layers._dynconv_triton import TILES
    from attnsurgeon.layers.odconv import ODConv2d

    torch.manual_seed(0)
    module = (DynamicConv2d if kind == "dynconv" else ODConv2d)(16, 16, 3, padding=1, temperature=1.0)
    module = module.cuda().eval()
    x = torch.randn(4, 16, 14, 14, device="cuda")
    _MEASURED.clear()
    with torch.no_grad():
        out = module(x)
        assert module.form_for(x) in {*FORMS, *TILES} and len(_MEASURED) == 1
        for form in ("stacked", "per_sample", "triton"):
            set_dynconv_form(module, form)
            torch.testing.assert_close(module(x), out, rtol=1e-4, atol=1e-4)
        for form in TILES:  # each tile set the measurement may choose
            torch.testing.assert_close(module.run_form(x, form), out, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_compiled_model_uses_the_op(no_tf32):
    from attnsurgeon.layers.odconv import ODConv2d

    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(8, 16, 3, padding=1), nn.ReLU(), DynamicConv2d(16, 8, 1), nn.ReLU(),
                          ODConv2d(8, 8, 3, padding=1)).cuda()
    x = torch.randn(4, 8, 12, 12, device="cuda")
    set_dynconv_form(model, "stacked")
    ref = model(x)
    set_dynconv_form(model, "triton")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
