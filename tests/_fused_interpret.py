"""Checks of the fused gate kernels, run on the CPU in Triton's interpreter (or on a GPU).

Run as a script in its own process (``tests/test_fused_kernels.py`` does), because
``TRITON_INTERPRET=1`` must be set before Triton is imported::

    python tests/_fused_interpret.py ops|ops-fp16|model|mid|opcheck|compile [--cuda]

``--cuda`` runs the same checks on a CUDA device, compiled, without the interpreter.

Every check goes through the same dispatch the models use (:mod:`attnsurgeon.kernels`,
with its test hook that lets CPU tensors take the kernel path) and compares the fused
form, forward and gradients, with the plain form (the kernels switched off). Tiles are
shrunk for the op checks so that every kernel runs several blocks along every axis, with
partly masked edges. Each kernel counts its launches; the script fails if one that the
group needs never ran. Prints one line per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable

CUDA = "--cuda" in sys.argv
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, by anything

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import Tensor  # noqa: E402

import attnsurgeon.kernels._ops as ops  # noqa: E402
import attnsurgeon.kernels._triton as tk  # noqa: E402
from attnsurgeon import kernels  # noqa: E402
from attnsurgeon.recipe import Recipe, make_rule  # noqa: E402
from attnsurgeon.surgery import apply_recipe  # noqa: E402

LAUNCHES: Counter[str] = Counter()
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class _Counted:
    """Wraps a Triton kernel: ``kernel[grid](...)`` launches it and counts the launch."""

    def __init__(self, name: str, kernel: object) -> None:
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
        launch = self.kernel[grid]

        def run(*args: object, **kwargs: object) -> object:
            LAUNCHES[self.name] += 1
            if kwargs.get("PRE"):  # with a norm and activation applied as the map is read
                LAUNCHES[f"{self.name}+pre"] += 1
            return launch(*args, **kwargs)

        return run


for _name in tk.__all__:
    setattr(tk, _name, _Counted(_name, getattr(tk, _name)))
kernels._interpret_on_cpu(not CUDA)
torch.set_num_threads(1)
DEVICE = torch.device("cuda" if CUDA else "cpu")
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # the model check compares



def _leaves(inputs: list[Tensor | None]) -> list[Tensor | None]:
    return [None if t is None else t.detach().to(DEVICE).requires_grad_() for t in inputs]


def _run(fn: Callable[..., object], inputs: list[Tensor | None], fused: bool, seed: int = 1):
    leaves = _leaves(inputs)
    with kernels.use_fused(fused):
        out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return outs, [None if t is None else t.grad for t in leaves]


def compare(name: str, fn: Callable[..., object], inputs: list[Tensor | None], *, tol: float,
            needs: tuple[str, ...], layout: bool = True) -> None:
    """``fn`` fused against plain, outputs and input gradients; ``needs``: kernels that must
    run; ``layout``: the outputs' strides must match too."""
    start = time.perf_counter()
    before = LAUNCHES.copy()
    got, got_grads = _run(fn, inputs, True)
    missing = [k for k in needs if LAUNCHES[k] == before[k]]
    if missing:
        raise AssertionError(f"{name}: the fused path did not launch {missing}")
    runs = sum(LAUNCHES.values()) - sum(before.values())
    ref, ref_grads = _run(fn, inputs, False)
    if sum(LAUNCHES.values()) - sum(before.values()) != runs:
        raise AssertionError(f"{name}: the plain path launched a kernel")
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        if a.dtype != b.dtype or a.shape != b.shape or layout and a.stride() != b.stride():
            raise AssertionError(f"{name}: output {i} is {a.dtype} {a.shape} {a.stride()}, "
                                 f"plain {b.dtype} {b.shape} {b.stride()}")
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"{name} output {i}: {m}")
    for i, (a, b) in enumerate(zip(got_grads, ref_grads, strict=True)):
        if a is None and b is None:
            continue
        if a is None or b is None:
            raise AssertionError(f"{name}: gradient {i} is {a} against {b}")
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"{name} grad {i}: {m}")
    print(f"ok {name} ({runs} launches, {time.perf_counter() - start:.1f} s)", flush=True)


def check_ops(dtype: torch.dtype) -> None:
    """Every dispatch function, both layouts, odd sizes, batch 1 and 2, with and without
    the shortcut and the ReLU, against the plain form; ties at the max (a channel of
    zeros, a zero gate) split the gradient as ``amax`` does."""
    ops.TILE, ops.BLOCK_MAX, ops.PROGRAMS, ops.CONTEXT_TILE = 64, 8, 6, 64  # several blocks on every axis
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, fmt: torch.memory_format = torch.contiguous_format, low: float = -1.0) -> Tensor:
        t = torch.rand(*shape, generator=gen) * (1 - low) + low
        return t.contiguous(memory_format=fmt).to(dtype)

    for fmt_name, fmt in FORMATS.items():
        for n, c, h, w in ((2, 19, 5, 7), (1, 13, 3, 11)):
            tag = f"{dtype} {fmt_name} {n}x{c}x{h}x{w}"
            x = rand(n, c, h, w, fmt=fmt)
            relu_x = x.relu()
            relu_x[:, 2] = 0  # a dead channel: every position ties at the max
            s = rand(n, c, 1, 1, low=0.0)
            s[:, 3] = 0  # a closed gate: ties in the spatial max
            t = rand(n, c, 1, 1)
            g = rand(n, 1, h, w, low=0.0)
            g_h, g_w = rand(n, c, h, 1, low=0.0), rand(n, c, 1, w, low=0.0)
            offset = (torch.rand(n, c, h, w, generator=gen) * 0.9 + 0.1) * torch.randn(n, c, h, w, generator=gen).sign()

            def away(product: Tensor, fmt: torch.memory_format = fmt, offset: Tensor = offset) -> Tensor:
                """A shortcut that keeps ``product + identity`` 0.1 or more away from ReLU's kink,
                where float32 (fused) and bfloat16 (plain) rounding could pick different sides."""
                return (offset - product.float()).contiguous(memory_format=fmt).to(dtype)

            apply = ("apply_fwd", "apply_bwd")
            compare(f"scale {tag}", kernels.scale, [x, s], tol=tol, needs=apply)
            compare(f"scale+identity+relu {tag}", lambda x, s, i: kernels.scale(x, s, i, relu=True),
                    [x, s, away(x * s)], tol=tol, needs=apply)
            compare(f"shift {tag}", kernels.shift, [x, t], tol=tol, needs=apply)
            compare(f"shift+identity+relu {tag}", lambda x, t, i: kernels.shift(x, t, i, relu=True),
                    [x, t, away(x + t)], tol=tol, needs=apply)
            compare(f"scale_spatial {tag}", kernels.scale_spatial, [x, s, g], tol=tol, needs=apply)
            compare(f"scale_spatial+identity+relu {tag}",
                    lambda x, s, g, i: kernels.scale_spatial(x, s, g, i, relu=True),
                    [x, s, g, away(x * s * g)], tol=tol, needs=apply)
            compare(f"scale_hw {tag}", kernels.scale_hw, [x, g_h, g_w], tol=tol, needs=("apply_fwd", "coord_bwd"))
            compare(f"scale_hw+identity+relu {tag}", lambda x, a, b, i: kernels.scale_hw(x, a, b, i, relu=True),
                    [x, g_h, g_w, away(x * g_h * g_w)], tol=tol, needs=("apply_fwd", "coord_bwd"))
            compare(f"mean_max_hw {tag}", kernels.mean_max_hw, [relu_x], tol=tol,
                    needs=("mean_max_hw", "mean_max_bwd"))
            compare(f"spatial_pool {tag}", kernels.spatial_pool, [relu_x, s], tol=tol,
                    needs=("spatial_pool", "spatial_pool_bwd"))
            compare(f"coord_pool {tag}", kernels.coord_pool, [x], tol=tol, needs=("coord_pool", "coord_pool_bwd"))
            compare(f"context_pool {tag}", kernels.context_pool, [x, rand(1, c, 1, 1), rand(1)], tol=tol,
                    needs=("context_fwd", "context_bwd"))
    # the shortcut in the other layout, and a gradient that arrives broadcast (stride 0)
    x = rand(2, 9, 4, 6, fmt=torch.channels_last)
    s = rand(2, 9, 1, 1, low=0.0)
    offset = (torch.rand(2, 9, 4, 6, generator=gen) * 0.9 + 0.1) * torch.randn(2, 9, 4, 6, generator=gen).sign()
    identity = (offset - (x * s).float()).to(dtype)  # contiguous, kept off ReLU's kink as above
    compare(f"scale, mixed layouts {dtype}", lambda x, s, i: kernels.scale(x, s, i, relu=True),
            [x, s, identity], tol=tol, needs=("apply_fwd", "apply_bwd"), layout=False)
    compare(f"scale, broadcast gradient {dtype}",
            lambda x, s, i: kernels.scale(x, s, i, relu=True).mean((2, 3)), [x, s, identity], tol=tol,
            needs=("apply_fwd", "apply_bwd"))


def _model(fmt: torch.memory_format) -> torch.nn.Module:
    """ResNet-18 (10 classes) with SE, ECA, CBAM, coordinate attention and GC (add and
    scale) at ``standard``, and SE, CBAM and coordinate attention at ``mid``/``post``/``pre``."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    rules = [
        make_rule("se", layers="layer1.0", position="standard", where="test"),
        make_rule("eca", layers="layer1.1", position="standard", where="test"),
        make_rule("cbam", layers="layer2.0", position="standard", where="test"),
        make_rule("coord", layers="layer2.1", position="standard", where="test"),
        make_rule("gc", layers="layer3.0", position="standard", where="test"),
        make_rule("gc", layers="layer3.1", position="standard", params={"fusion": "scale"}, where="test"),
        make_rule("se", layers="layer4.0", position="mid", where="test"),
        make_rule("cbam", layers="layer4.0", position="post", where="test"),
        make_rule("coord", layers="layer4.1", position="pre", where="test"),
        make_rule("eca", layers="layer4.1", position="standard", where="test"),
    ]
    apply_recipe(model, Recipe(rules=tuple(rules), init="paper", seed=0))
    for m in model.modules():  # GC's last conv starts at 0 (its paper init): give it weights
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.1)
    return model.to(memory_format=fmt)


def _compiled(model: torch.nn.Module, backend: str | None) -> Callable[..., Tensor]:
    """``model``, or ``torch.compile(model, backend=backend)`` where a backend is given."""
    return model if backend is None else torch.compile(model, backend=backend)


def check_model(backend: str | None = None, formats: dict[str, torch.memory_format] = FORMATS) -> None:
    """The whole model fused against plain: logits, the input's gradient and every
    parameter's gradient, in both layouts. Eval mode: BatchNorm's batch statistics over
    2 samples of a 1x1 map (layer4 at 32 px) would amplify float rounding a hundredfold,
    and the gates' kernels are the same in both modes. With ``backend``, both models run
    under ``torch.compile`` (the fused one with ``ATTNSURGEON_FUSED=compile``)."""
    for fmt_name, fmt in formats.items():
        start = time.perf_counter()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=fmt)
        results = []
        for fused in (True, False):
            model = _model(fmt).eval().to(DEVICE)
            xi = x.to(DEVICE).requires_grad_()
            before = sum(LAUNCHES.values())
            with kernels.use_fused(("compile" if backend else True) if fused else False):
                out = _compiled(model, backend)(xi)
                out.square().sum().backward()
            results.append((out, xi.grad, {n: p.grad for n, p in model.named_parameters()},
                            sum(LAUNCHES.values()) - before))
        (out, gx, grads, runs), (ref, ref_gx, ref_grads, plain_runs) = results
        # one launch per kernel each way: SE, ECA, SE at mid, ECA: 2 each (the apply); GC x2:
        # 4 each (the context pool and the apply); CBAM x2: 6 each (two pools and the apply);
        # coordinate attention x2: 4 each (pool, apply)
        if plain_runs or runs != 4 * 2 + 2 * 4 + 2 * 6 + 2 * 4:
            raise AssertionError(f"model {fmt_name}: {runs} fused and {plain_runs} plain launches")
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-4)
        if missing := [n for n, g in {**grads, **ref_grads}.items() if g is None]:
            raise AssertionError(f"model {fmt_name}: no gradient for {missing}")
        largest = max(g.abs().max().item() for g in ref_grads.values())
        for name, grad in grads.items():  # each to 1e-4 of its own scale (or 1% of the largest:
            ref_grad = ref_grads[name]    # GC's conv_mask.bias has a gradient of 0 plus rounding)
            atol = 1e-4 * max(ref_grad.abs().max().item(), 1e-2 * largest)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=atol,
                                       msg=lambda m, where=f"{fmt_name} {name}": f"{where}: {m}")
        print(f"ok model {fmt_name} ({runs} launches, {backend or 'eager'}, {time.perf_counter() - start:.1f} s)",
              flush=True)
    expected = {"apply_fwd", "apply_bwd", "coord_bwd", "mean_max_hw", "mean_max_bwd", "spatial_pool",
                "spatial_pool_bwd", "coord_pool", "coord_pool_bwd", "context_fwd", "context_bwd"}
    if missing := expected - set(LAUNCHES):
        raise AssertionError(f"model: never launched {sorted(missing)}")


def check_opcheck() -> None:
    """``torch.library.opcheck`` on every op: schema, fake (meta) implementation, autograd
    registration and AOT dispatch, as ``torch.compile`` uses them."""
    ops.TILE, ops.BLOCK_MAX, ops.PROGRAMS, ops.CONTEXT_TILE = 64, 8, 6, 16
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 5, 3, 4

    def leaf(*shape: int, fmt: torch.memory_format = torch.contiguous_format) -> Tensor:
        t = torch.rand(*shape, generator=gen).contiguous(memory_format=fmt)
        return t.to(DEVICE).requires_grad_()

    x = leaf(n, c, h, w, fmt=torch.channels_last)
    identity, s, sp, ah, aw = leaf(n, c, h, w), leaf(n, c), leaf(n, h * w), leaf(n, c, h), leaf(n, c, w)
    cases = {
        "gate_apply se": (ops.gate_apply, (x, s, None, None, None, None, identity, True)),
        "gate_apply gc-add": (ops.gate_apply, (x, None, s, None, None, None, identity, False)),
        "gate_apply cbam": (ops.gate_apply, (x, s, None, sp, None, None, None, False)),
        "gate_apply coord": (ops.gate_apply, (x, None, None, None, ah, aw, identity, True)),
        "mean_max_hw": (ops.mean_max_hw, (x,)),
        "spatial_pool": (ops.spatial_pool, (x, s)),
        "coord_pool": (ops.coord_pool, (x,)),
        "context_pool": (ops.context_pool, (x, leaf(c), leaf(1))),
    }
    scale, shift = torch.rand(c, generator=gen).to(DEVICE), torch.rand(c, generator=gen).to(DEVICE)
    y, s_, ah_, aw_ = (t.detach() for t in (x, s, ah, aw))
    inference = {  # no autograd: the blocks call these only without it
        "norm_act_mean_max": (ops.norm_act_mean_max, (y, scale, shift, 5)),
        "norm_act_coord_pool": (ops.norm_act_coord_pool, (y, scale, shift, 4)),
        "norm_act_spatial_pool": (ops.norm_act_spatial_pool, (y, scale, shift, 2, s_)),
        "norm_act_apply se": (ops.norm_act_apply, (y, scale, shift, 3, s_, None, None, None)),
        "norm_act_apply cbam": (ops.norm_act_apply, (y, scale, shift, 3, s_, sp.detach(), None, None)),
        "norm_act_apply coord": (ops.norm_act_apply, (y, scale, shift, 2, None, None, ah_, aw_)),
    }
    for name, (op, args) in cases.items():
        start = time.perf_counter()
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                    "test_aot_dispatch_dynamic"))
        print(f"ok opcheck {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    for name, (op, args) in inference.items():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        print(f"ok opcheck {name}", flush=True)


def _eval_norm(c: int, gen: torch.Generator) -> torch.nn.BatchNorm2d:
    """An eval-mode BatchNorm with running statistics and an affine away from the defaults."""
    bn = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        for t, low, high in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0), (bn.weight, 0.5, 1.5),
                             (bn.bias, -0.5, 0.5)):
            t.copy_(torch.rand(c, generator=gen) * (high - low) + low)
    return bn


_PASSES = {"SqueezeExcite": 2, "ECA": 2, "CoordAttention": 2, "CBAM": 3}  # launches with the norm per gate


def _pre_launches() -> int:
    return sum(v for k, v in LAUNCHES.items() if k.endswith("+pre"))


def check_mid_ops(dtype: torch.dtype) -> None:
    """Each gate with ``gate_norm_act`` (SE, ECA, coordinate attention, CBAM) on
    ``act(bn(y))``, bn in eval mode, every activation the families use (and none): the
    fused passes over y (two; CBAM three) against the modules one after the other.
    Inference only, as the blocks use it."""
    from attnsurgeon.layers.cbam import CBAM
    from attnsurgeon.layers.coord import CoordAttention
    from attnsurgeon.layers.eca import ECA
    from attnsurgeon.layers.squeeze_excite import SqueezeExcite

    ops.TILE, ops.BLOCK_MAX, ops.PROGRAMS = 64, 8, 6
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gates = {"se": lambda c: SqueezeExcite(c, reduction=4), "eca": lambda c: ECA(c, kernel_size=3),
             "coord": lambda c: CoordAttention(c, reduction=4, min_dim=4), "cbam": lambda c: CBAM(c, reduction=4)}
    acts = [torch.nn.ReLU(), torch.nn.ReLU6(), torch.nn.SiLU(), torch.nn.Hardswish(), None]
    i = 0
    for fmt_name, fmt in FORMATS.items():
        for n, c, h, w in ((2, 19, 5, 7), (1, 13, 3, 11)):
            for kind, make in gates.items():
                act = acts[i % len(acts)]
                i += 1
                bn, gate = _eval_norm(c, gen).to(DEVICE, dtype), make(c).eval().to(DEVICE, dtype)
                y = (torch.randn(n, c, h, w, generator=gen) * 2).contiguous(memory_format=fmt).to(DEVICE, dtype)
                pre = kernels.NormAct.of(bn, act)
                assert pre is not None
                name = f"{kind} after bn+{type(act).__name__} {dtype} {fmt_name} {n}x{c}x{h}x{w}"
                before = _pre_launches()
                with torch.no_grad(), kernels.use_fused(True):
                    got = gate.gate_norm_act(y, pre)
                with torch.no_grad(), kernels.use_fused(False):
                    ref = gate(bn(y) if act is None else act(bn(y)))
                if _pre_launches() - before != _PASSES[type(gate).__name__]:
                    raise AssertionError(f"{name}: {_pre_launches() - before} launches with the norm")
                if got.dtype != ref.dtype or got.stride() != ref.stride():
                    raise AssertionError(f"{name}: {got.dtype} {got.stride()}, plain {ref.dtype} {ref.stride()}")
                torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
                print(f"ok {name}", flush=True)


def _mid_models(names: tuple[str, ...] | None = None) -> dict[str, torch.nn.Module]:
    """A model of each family whose ``mid`` follows a BatchNorm and an activation: ResNet
    (BasicBlock, Bottleneck: ReLU), MobileNetV2 (ReLU6), MobileNetV3 (ReLU, Hardswish),
    EfficientNet (SiLU), RegNet (ReLU); SE, ECA, coordinate attention and CBAM at ``mid``.
    Only those in ``names``, where given."""
    def build(name: str, rules: list[tuple[str, str]]) -> torch.nn.Module:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10)
        recipe = Recipe(rules=tuple(make_rule(kind, layers=layers, position="mid", where="test")
                                    for kind, layers in rules), init="paper", seed=0)
        apply_recipe(model, recipe)
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():  # running statistics away from 0 and 1
            if isinstance(m, torch.nn.BatchNorm2d):
                m.load_state_dict(_eval_norm(m.num_features, gen).state_dict())
        return model.eval()

    rules = {
        "resnet18": [("se", "layer1.0"), ("coord", "layer2.0"), ("eca", "layer3.1")],
        "resnet50": [("se", "layer1.0"), ("coord", "layer2.0")],
        "mobilenet_v2": [("coord", "features.2"), ("se", "features.5")],
        "mobilenet_v3_small": [("eca", "features.1"), ("cbam", "features.4")],
        "efficientnet_b0": [("se", "features.2.0")],
        "regnet_y_400mf": [("eca", "trunk_output.block1.block1-0")],
    }
    return {name: build(name, r) for name, r in rules.items() if names is None or name in names}


def check_mid_models(backend: str | None = None, names: tuple[str, ...] | None = None) -> None:
    """Whole models in eval mode without autograd, fused against plain, the layouts taking
    turns: two launches with the norm per gate at ``mid``; training mode, or autograd on,
    launch none. With ``backend``, the fused model runs under ``torch.compile``."""
    for i, (name, model) in enumerate(_mid_models(names).items()):
        mids = [type(getattr(m, "attn_mid", None)).__name__ for m in model.modules()]
        gates = sum(kind in _PASSES for kind in mids)
        passes = sum(_PASSES.get(kind, 0) for kind in mids)
        for fmt_name, fmt in list(FORMATS.items())[i % 2:][:1]:
            start = time.perf_counter()
            model = model.to(DEVICE, memory_format=fmt)
            x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=fmt)
            x = x.to(DEVICE)
            before = _pre_launches()
            with torch.no_grad(), kernels.use_fused("compile" if backend else True):
                got = _compiled(model, backend)(x)
            launched = _pre_launches() - before
            with torch.no_grad(), kernels.use_fused(False):
                ref = model(x)
            if not gates or launched != passes:
                raise AssertionError(f"{name} {fmt_name}: {launched} launches with the norm for {gates} gates")
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
            print(f"ok mid {name} {fmt_name} ({gates} gates, {backend or 'eager'}, "
                  f"{time.perf_counter() - start:.1f} s)", flush=True)
    if backend is not None:
        return
    before = _pre_launches()
    with kernels.use_fused(True):
        model(x)  # eval, autograd on
        with torch.no_grad():
            model.train()(x)
    if _pre_launches() != before:
        raise AssertionError("the norm was fused with autograd on or in training mode")
    print("ok mid: none fused in training mode or with autograd", flush=True)


def check_compile() -> None:
    """``ATTNSURGEON_FUSED=compile``: the custom ops inside ``torch.compile``'d models, traced
    through their fake and autograd registrations: :func:`check_model` (channels_last) and
    :func:`check_mid_models` compiled. On the CPU the backend is ``aot_eager`` (Dynamo and
    AOTAutograd without Inductor's C++ code) and the mid models are ResNet-18 and
    MobileNetV3, which carry all four such gates; on a GPU, Inductor and every family."""
    backend = "inductor" if CUDA else "aot_eager"
    check_model(backend, {"channels_last": torch.channels_last})
    check_mid_models(backend, None if CUDA else ("resnet18", "mobilenet_v3_small"))


GROUPS = {
    "ops": lambda: (check_ops(torch.float32), check_ops(torch.bfloat16)),
    "ops-fp16": lambda: check_ops(torch.float16),
    "model": check_model,
    "mid": lambda: (check_mid_ops(torch.float32), check_mid_ops(torch.bfloat16), check_mid_models()),
    "opcheck": check_opcheck,
    "compile": check_compile,
}

if __name__ == "__main__":
    GROUPS[sys.argv[1]]()
    print("launches:", dict(sorted(LAUNCHES.items())))
