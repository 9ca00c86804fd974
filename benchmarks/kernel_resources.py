"""Every Triton kernel of the package compiled for a GPU on this CPU: registers, spills, shared memory.

No GPU has been lent to the sessions that wrote the kernels, and Triton's interpreter (the
tests' CPU check) runs them as numpy, which says nothing of how they compile. ptxas ships in
the triton wheel, so the kernels can be compiled for a GPU here. This script runs small
models and layers through every fused path on the CPU with Triton's driver replaced by one
that names a GPU target (default sm_90: H100/H200) and every launch turned into a compile
only (``JITFunction.run(..., warmup=True)``: the arguments are specialised as a launch on
that GPU would specialise them: dtypes, 16-byte alignment, constexprs). Nothing runs, so
the outputs are garbage; what it prints is each distinct compiled kernel's resource usage
from ``ptxas -v`` on its PTX: registers per thread (255 is the most), stack frame and spill
stores (registers that did not fit), the shared memory its launch asks for, and how its
``tl.dot`` compiled (Hopper's ``wgmma`` or the per-warp ``mma``).

    python benchmarks/kernel_resources.py              # sm_90
    python benchmarks/kernel_resources.py --arch 80    # A100

A kernel that fails to compile raises here, as it would on the GPU (``tests/test_kernels_compile.py``
runs this script, so CI catches that without a GPU).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from contextlib import nullcontext

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# the kernels are defined (jit-decorated) before TRITON_INTERPRET is set below, so they are
# compiled kernels, not the interpreter's
import attnsurgeon.kernels._triton  # noqa: F401
import attnsurgeon.layers._dynconv_triton as dynconv_triton

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


class _TargetOnly:
    """A driver that names a GPU and has none: enough for ``JITFunction.run`` to compile."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


COMPILED: dict[tuple[str, str], tuple[object, dict[str, object]]] = {}
_RUN = JITFunction.run


def _compile_only(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> object:
    kernel = _RUN(self, *args, grid=grid, warmup=True, **kwargs)
    consts = {k: v for k, v in kwargs.items() if k.isupper()} | {"num_warps": kwargs.get("num_warps", 4)}
    COMPILED[(self.fn.__name__, kernel.hash)] = (kernel, consts)
    return kernel


def resources(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill stores of a kernel, from ``ptxas -v`` on its PTX
    (the assembler Triton itself calls, for the architecture Triton compiled for)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([PTXAS, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    number = {key: re.search(rf"(\d+) {key}", log) for key in ("bytes stack frame", "bytes spill stores",
                                                                  "registers")}
    return {key: int(m.group(1)) if m else 0 for key, m in number.items()}


def _dot(kernel: object) -> str:
    """How the kernel's tl.dot compiled: ``wgmma`` (Hopper's warp-group MMA), ``mma`` (the
    per-warp MMA of Ampere), or ``-`` (no dot)."""
    ttgir = kernel.asm["ttgir"]
    if "warp_group_dot" in ttgir:
        return "wgmma"
    return "mma" if "nvidia_mma" in ttgir else "-"


def _model(name: str, rules: list[tuple[str, str, str | None, dict[str, str]]]) -> torch.nn.Module:
    """torchvision's ``name`` (10 classes) after surgery: (kind, layers, position, params) rules."""
    import torchvision

    from attnsurgeon.recipe import Recipe, make_rule
    from attnsurgeon.surgery import apply_recipe

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    made = tuple(make_rule(kind, layers=layers, position=position, params=params, where="kernel_resources")
                 for kind, layers, position, params in rules)
    apply_recipe(model, Recipe(rules=made, init="paper", seed=0))
    return model


def _step(model: torch.nn.Module, x: torch.Tensor, *, train: bool, bf16: bool) -> None:
    """One forward (and backward) of ``model`` on ``x``, channels_last, optionally bf16 autocast."""
    model = model.to(memory_format=torch.channels_last).train(train)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(train)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.set_grad_enabled(train), autocast:
        out = model(x)
    if train:
        out.float().sum().backward()


def drive() -> None:
    """Every fused path, in bf16 and float32, forward and backward; the dynamic convs of
    DY-ResNet-18, ODConv-ResNet-18 and ODConv-MobileNetV2 (strides 1 and 2, 1x1, 3x3,
    depthwise) in bf16; and every tile set of ``TILES`` in bf16."""
    from attnsurgeon import kernels
    from attnsurgeon.layers.dynamic_conv import DynamicConv2d, set_dynconv_form
    from attnsurgeon.layers.odconv import ODConv2d

    kernels._interpret_on_cpu(True)  # the dispatch's CPU hook (the kernels themselves compile)
    standard = _model("resnet18", [("se", "layer1.0", "standard", {}), ("eca", "layer1.1", "standard", {}),
                                   ("cbam", "layer2.0", "standard", {}), ("coord", "layer2.1", "standard", {}),
                                   ("gc", "layer3.0", "standard", {}), ("se", "layer4.0", "mid", {})])
    mid = _model("mobilenet_v2", [("coord", "features.2", "mid", {}), ("se", "features.5", "mid", {})])
    # every conv shape of the GPU protocol's models (bench_dynconv.py), in its dtype
    for name, kind, params in (("resnet18", "dynconv", {"target": "all"}), ("resnet18", "odconv", {}),
                               ("mobilenet_v2", "odconv", {})):
        model = _model(name, [(kind, "all", None, params)])
        set_dynconv_form(model, "triton")
        _step(model, torch.randn(2, 3, 64, 64), train=True, bf16=True)
    # the tile sets the automatic form times on CUDA, on convs they fill (dense and depthwise)
    for blocks in dynconv_triton.TILES.values():
        for cls in (DynamicConv2d, ODConv2d):
            for groups in (1, 128):
                layer = cls(128, 128, 3, padding=1, groups=groups)
                set_dynconv_form(layer, "triton")
                layer.triton_blocks = blocks
                _step(layer, torch.randn(4, 128, 14, 14), train=True, bf16=True)
    for bf16 in (True, False):
        with kernels.use_fused(True):
            _step(standard, torch.randn(2, 3, 64, 64), train=True, bf16=bf16)
            _step(mid, torch.randn(2, 3, 64, 64), train=False, bf16=bf16)  # the norm fused in eval
        for cls in (DynamicConv2d, ODConv2d):
            for groups in (1, 64):  # a dense 3x3 conv and a depthwise one
                layer = cls(64, 64, 3, padding=1, groups=groups)
                set_dynconv_form(layer, "triton")
                _step(layer, torch.randn(4, 64, 14, 14), train=True, bf16=bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    args = parser.parse_args()
    driver.set_active(_TargetOnly(GPUTarget("cuda", args.arch, 32)))
    JITFunction.run = _compile_only
    os.environ["TRITON_INTERPRET"] = "1"  # lets the dispatch send CPU tensors to the kernels
    # the dynamic conv asks whether its kernel takes the device; here every device compiles
    dynconv_triton.supports = lambda device, dtype, *numels, positions=0: dtype in dynconv_triton._DTYPES
    drive()
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(COMPILED)} kernels compiled")
    print(f"{'kernel':<30} {'dtype':<6} {'warps':>5} {'regs':>5} {'stack B':>7} {'spill B':>7} {'shared B':>8} "
          f"{'dot':<6} constexprs")
    rows = []
    for (name, _), (kernel, consts) in COMPILED.items():
        usage = resources(kernel.asm["ptx"], args.arch)
        dtype = next((t for t in kernel.src.signature.values() if t.startswith("*")), "-").lstrip("*")
        shown = " ".join(f"{k}={v}" for k, v in consts.items() if k != "num_warps" and v not in (False, None))
        rows.append((name, dtype, consts["num_warps"], usage["registers"], usage["bytes stack frame"],
                     usage["bytes spill stores"], kernel.metadata.shared, _dot(kernel), shown))
    for name, dtype, warps, reg, stack, spill, shared, dot, shown in sorted(rows, key=lambda r: (r[0], r[1], r[8])):
        print(f"{name:<30} {dtype:<6} {warps:>5} {reg:>5} {stack:>7} {spill:>7} {shared:>8} {dot:<6} {shown}")
    expected = {"apply_fwd", "apply_bwd", "mean_max_hw", "mean_max_bwd", "spatial_pool", "spatial_pool_bwd",
                "coord_pool", "coord_pool_bwd", "coord_bwd", "context_fwd", "context_bwd", "_forward_kernel",
                "_grad_input_kernel", "_grad_weight_kernel", "_depthwise_forward_kernel",
                "_depthwise_grad_input_kernel", "_depthwise_grad_weight_kernel"}
    if missing := expected - {name for name, _ in COMPILED}:
        sys.exit(f"never compiled: {sorted(missing)}")

if __name__ == "__main__":
    main()
