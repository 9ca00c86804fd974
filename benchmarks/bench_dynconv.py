"""Training-step cost of dynamic convolution: attnsurgeon vs the seed's grouped conv vs timm.

The requirement: the dynamic conv's training step (forward + backward) must be neither
slower nor hungrier for memory than the seed's grouped-conv approach or timm's
``CondConv2d``, per layer at batch 32 and 256.

Variants, side by side, float32, CPU (``--batch 32,256`` for the layer tables):

* ``ours``: :class:`attnsurgeon.layers.dynamic_conv.DynamicConv2d` (eager picks the
  per-sample or stacked form per layer; the table says which);
* ``ours:per-sample`` / ``ours:stacked``: the same module forced to one form;
* ``seed``: the grouped-conv ``Dynamic_conv2d`` of a blog post's code (kaijieshi7's
  Dynamic-convolution-Pytorch), re-implemented below with its typos fixed;
* ``timm-condconv``: ``timm.layers.CondConv2d`` with a GAP -> Linear -> sigmoid router
  as in timm's EfficientNet. Its routing differs (sigmoid, no temperature): a reference.

Every row has its time and memory over both references ("x seed", "x timm").

ODConv rows (``--odconv-only`` runs just them): ``odconv``, the
:class:`attnsurgeon.layers.odconv.ODConv2d` that replaces the same conv (K = 4, r = 16; eager
picks its form as ``ours`` does; ``odconv:positions``, its traced form, is built but not in
the default rows; ``odconv:triton`` etc. force a form), against ``ours``; and
ODConv-ResNet-18 (4x: both 3x3 convs of every block, the authors' model) against
DY-ResNet-18 and the static ResNet-18. The ratio column is then "x ours" (DY).

Cases: one 3x3 conv at ResNet-18's layer shapes (64ch@56, 128@28, 256@14, 512@7), whose
input asks for its gradient as every layer's but a network's first does
(``--no-input-grad``: not), and the whole DY-ResNet-18 (dynamic conv on every conv but the
stem, K=4, as in the paper) with cross-entropy, plus the static ResNet-18 for scale.

Time: all variants of a case are built in one process, warmed up, then timed round by
round (A B C ... A B C ...), ``--reps`` rounds; each gets the median. Interleaving
spreads background load evenly over the variants. On a shared machine ``--cpu-time``
with ``OMP_NUM_THREADS=1`` times the CPU seconds the process spends (``time.process_time``)
rather than the wall clock, which also counts the time it waits for a core.

Memory: each (case, variant) runs in a fresh subprocess: one warm-up step, then one step
for each of two measures, gradients set to None before it:

* ``alloc MB``: the peak of the bytes held by PyTorch's CPU allocator during the step over
  what it held before: the profiler's allocation and free events (``profile_memory=True``)
  summed in time order. Exact for every tensor and every workspace an op takes from
  PyTorch's allocator;
* ``RSS MB``: the peak resident set size during the step minus the resident size just
  before it (Linux: the peak is reset with ``/proc/self/clear_refs`` and read as
  ``VmHWM``), which also sees memory outside PyTorch's allocator. The children run with
  glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so every block over 64 KiB is its own mapping,
  returned to the OS when freed, and the resident set follows the live tensors (to within
  malloc's small-block heap, a few MB).

With a CUDA device the GPU protocol below runs after the CPU tables.

    python benchmarks/bench_dynconv.py                # layers + DY-ResNet-18 at 224 (~8 min on 2 cores)
    python benchmarks/bench_dynconv.py --size 112     # quicker whole-model case
    python benchmarks/bench_dynconv.py --skip-model --batch 32,256  # layers only, both batches
    python benchmarks/bench_dynconv.py --odconv-only --size 112  # only the ODConv rows
    OMP_NUM_THREADS=1 python benchmarks/bench_dynconv.py --cpu-time  # a busy machine

GPU protocol (``--gpu-protocol``, about 5 minutes on one H100/H200 is the target): bf16
autocast, channels_last model and input, the device synchronised around each timed call,
peak memory ``torch.cuda.max_memory_allocated`` during one call of a variant alone minus
what was allocated before it; one 3x3 conv at batch 32 and 256, inference and
training step, with ``ours`` (the measured choice, labelled with what it chose: a form, or
the Triton form's tile set such as ``triton:m128``),
``ours:triton`` / ``ours:stacked`` / ``ours:per-sample`` (forced; in training steps also
``ours:triton-wide-dw``, the Triton form with its dW kernel at 64 rows and 8 warps, the
tile Hopper's warp-group MMA takes), the seed and timm's
CondConv2d, time and peak memory against the seed; DY-ResNet-18 against resnet18 (and the
seed's), inference at batch 256 and training step at batch 128, eager, and under
``torch.compile`` (where ``ours`` runs the Triton op); ODConv-ResNet-18 (4x) against
DY-ResNet-18 at the same settings, eager, its measured choice and forced to the Triton form
(the layer tables have both ODConv rows too).

    python benchmarks/bench_dynconv.py --gpu-protocol                     # needs CUDA
    python benchmarks/bench_dynconv.py --gpu-protocol --device cpu --reps 1 --model-reps 1 \
        --compile-backend aot_eager                                       # smoke test on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnsurgeon.latency import time_interleaved

BATCH = 32
INPUT_GRAD = True  # --no-input-grad: the layer cases skip the gradient of their input
LAYERS = {"64@56": (64, 56), "128@28": (128, 28), "256@14": (256, 14), "512@7": (512, 7)}
LAYER_VARIANTS = ("ours", "ours:per-sample", "ours:stacked", "seed", "timm-condconv")
MODEL_VARIANTS = ("resnet18-static", "ours", "seed", "timm-condconv")
ODCONV_LAYER_VARIANTS = ("ours", "odconv")  # add "odconv:positions" to time the traced form (slow on CPU)
ODCONV_MODEL_VARIANTS = ("resnet18-static", "ours", "odconv")
GPU_ODCONV_VARIANTS = ("odconv", "odconv:triton")  # the GPU protocol's ODConv rows: measured choice, forced Triton
WIDE_DW = ("ours:triton-wide-dw",)  # training rows: the Triton form with dW on Hopper's warp-group MMA tile


class SeedDynamicConv2d(nn.Module):
    """Seed 004's Dynamic_conv2d (grouped conv with groups = batch * groups), fixed."""

    def __init__(self, conv: nn.Conv2d, kernels: int = 4, ratio: float = 0.25, temperature: float = 34.0) -> None:
        super().__init__()
        self.out_channels, self.kernels = conv.out_channels, kernels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        hidden = int(conv.in_channels * ratio) if conv.in_channels != 3 else kernels
        self.fc1 = nn.Conv2d(conv.in_channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, kernels, 1, bias=False)
        self.temperature = temperature
        self.weight = nn.Parameter(torch.randn(kernels, *conv.weight.shape) * 0.05)
        self.bias = nn.Parameter(torch.zeros(kernels, conv.out_channels)) if conv.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        pi = F.softmax(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))).flatten(1) / self.temperature, 1)
        b, c, h, w = x.shape
        weight = torch.mm(pi, self.weight.view(self.kernels, -1)).view(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else torch.mm(pi, self.bias).view(-1)
        # the seed has x.view(...), which fails on a channels_last input (CUDA section): reshape
        out = F.conv2d(x.reshape(1, -1, h, w), weight, bias, self.stride, self.padding, self.dilation, self.groups * b)
        return out.view(b, self.out_channels, out.size(-2), out.size(-1))


class RoutedCondConv(nn.Module):
    """timm's CondConv2d with the router of timm's CondConv EfficientNet blocks."""

    def __init__(self, conv: nn.Conv2d, kernels: int = 4) -> None:
        super().__init__()
        from timm.layers import CondConv2d

        self.router = nn.Linear(conv.in_channels, kernels)
        self.conv = CondConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.groups, conv.bias is not None, kernels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, torch.sigmoid(self.router(x.mean((2, 3)))))


class ODPositions(nn.Module):
    """Our ODConv2d, run in the form tracers get (kh * kw per-sample matrix products)."""

    def __init__(self, od: nn.Module) -> None:
        super().__init__()
        self.od = od

    def forward(self, x: Tensor) -> Tensor:
        od = self.od
        a_c, a_f, a_s, a_w = od.attention(x, od.temperature)
        y = od.forward_positions(x * a_c[:, :, None, None], od.kernels_per_sample(a_s, a_w, x.dtype))
        return y * a_f[:, :, None, None]


class Forced(nn.Module):
    """Our DynamicConv2d, forced to one of its forms (``set_dynconv_form``; "triton" falls
    back to the automatic choice where the kernel does not apply, e.g. on CPU)."""

    def __init__(self, dyn: nn.Module, form: str) -> None:
        super().__init__()
        self.dyn, self.form = dyn, form.replace("-", "_")
        self.dyn.form = self.form

    def forward(self, x: Tensor) -> Tensor:
        return self.dyn(x)

    def uses_stacked(self, x: Tensor) -> bool:
        return self.dyn.uses_stacked(x)


def _wrap(conv: nn.Conv2d, variant: str) -> nn.Module:
    from attnsurgeon.layers.dynamic_conv import from_conv

    if variant == "seed":
        return SeedDynamicConv2d(conv)
    if variant == "timm-condconv":
        return RoutedCondConv(conv)
    if variant.startswith("odconv"):
        from attnsurgeon.layers.odconv import from_conv as od_from_conv

        od, _ = od_from_conv(conv, None)
        form = variant.partition(":")[2]
        if form == "positions":
            return ODPositions(od)
        od.form = form.replace("-", "_") or "auto"  # a forced form ("triton" falls back off CUDA)
        return od
    dyn, _ = from_conv(conv, None)
    if variant == "ours:triton-wide-dw":  # dW at the tile Hopper's warp-group MMA takes
        from attnsurgeon.layers._dynconv_triton import TILES

        dyn.triton_blocks = TILES["triton:wide-dw"]
        return Forced(dyn, "triton")
    return Forced(dyn, variant.split(":")[1]) if ":" in variant else dyn


def build(case: str, variant: str, size: int, batch: int = BATCH) -> tuple[nn.Module, Tensor, Tensor | None]:
    torch.manual_seed(0)
    if case in LAYERS or case in SMOKE_LAYERS:
        channels, hw = {**LAYERS, **SMOKE_LAYERS}[case]
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        # the input asks for its gradient, as that of every layer but the first in a network does
        return _wrap(conv, variant), torch.randn(batch, channels, hw, hw, requires_grad=INPUT_GRAD), None
    import torchvision

    from attnsurgeon.blocks import find_blocks
    from attnsurgeon.surgery import replace_module

    model = torchvision.models.resnet18()
    if variant != "resnet18-static":
        for info, block in find_blocks(model):
            for site in info.convs:  # every conv of every block: the paper's DY-ResNet (target=all)
                if variant == "odconv" and not site.spatial:  # ODConv-ResNet-18: the 3x3 convs
                    continue
                replace_module(block, site.conv, _wrap(block.get_submodule(site.conv), variant), expect=nn.Conv2d)
    return model, torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _stepper(model: nn.Module, x: Tensor, target: Tensor | None, *, zero_grad: bool = True) -> Callable[[], None]:
    model.train()

    def step() -> None:
        if zero_grad:
            model.zero_grad(set_to_none=True)
        x.grad = None
        out = model(x)
        loss = out.square().mean() if target is None else F.cross_entropy(out, target)
        loss.backward()

    return step


def _allocator_peak(step: Callable[[], None]) -> float:
    """Peak bytes (MB) held by PyTorch's CPU allocator during ``step`` over what it held
    before: the running sum of the allocation and free events of the profiler
    (``profile_memory=True``), in time order. Blocks that existed before are not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def child_memory(case: str, variant: str, size: int, batch: int) -> tuple[float, float]:
    """Peak memory (MB) of one training step after a warm-up step, gradients set to None
    before it: (PyTorch CPU allocator peak, resident-set growth)."""
    model, x, target = build(case, variant, size, batch)
    step = _stepper(model, x, target, zero_grad=False)
    step()  # warm-up
    model.zero_grad(set_to_none=True)
    x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _status_kb("VmRSS")
    step()
    rss = (_status_kb("VmHWM") - before) / 1024
    model.zero_grad(set_to_none=True)
    x.grad = None
    return _allocator_peak(step), rss


def memory(case: str, variant: str, size: int, batch: int) -> tuple[float, float]:
    """:func:`child_memory` in a fresh process."""
    cmd = [sys.executable, __file__, "--child", case, variant, "--size", str(size), "--batch", str(batch),
           *([] if INPUT_GRAD else ["--no-input-grad"])]
    # a fixed mmap threshold makes glibc return every freed block over 64 KiB to the OS at
    # once, so the resident set follows the live tensors instead of malloc's caching
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    alloc, rss = out.strip().splitlines()[-1].split()
    return float(alloc), float(rss)


TIMER: Callable[[], float] = time.perf_counter  # --cpu-time: time.process_time


def times(case: str, variants: tuple[str, ...], size: int, reps: int, batch: int) -> dict[str, float]:
    """Median step time of each variant, the variants interleaved round by round."""
    steps = {v: _stepper(*build(case, v, size, batch)) for v in variants}
    samples = time_interleaved(steps, rounds=reps, warmup=1, timer=TIMER)
    return {v: statistics.median(t) for v, t in samples.items()}


def table(title: str, cases: dict[str, str], variants: tuple[str, ...], size: int, reps: int, batch: int,
          references: tuple[str, ...] = ("seed", "timm-condconv")) -> None:
    """Print one row per (case, variant); ``cases`` maps labels to build keys; time and
    memory ratios are to each of the ``references`` variants."""
    refs = "".join(f" {'x ' + r.split('-')[0]:>6}" for r in references)
    print(f"\n{title}, batch {batch}\n{'case':<10} {'variant':<22} {'median s':>8}{refs} {'alloc MB':>8}{refs}"
          f" {'RSS MB':>7}{refs}")
    for label, key in cases.items():
        median = times(key, variants, size, reps, batch)
        alloc, rss = {}, {}
        for v in variants:
            alloc[v], rss[v] = memory(key, v, size, batch)
        for v in variants:
            name = v
            if v == "ours" and key in LAYERS:
                model, x, _ = build(key, v, size, batch)
                name += " (stacked)" if model.uses_stacked(x) else " (per-sample)"
            t = "".join(f" {median[v] / median[r]:>6.2f}" for r in references)
            a = "".join(f" {alloc[v] / max(alloc[r], 1e-9):>6.2f}" for r in references)
            m = "".join(f" {rss[v] / max(rss[r], 1e-9):>6.2f}" for r in references)
            print(f"{label:<10} {name:<22} {median[v]:>8.3f}{t} {alloc[v]:>8.0f}{a} {rss[v]:>7.0f}{m}", flush=True)


def _layer_cases(args: argparse.Namespace) -> dict[str, str]:
    return {case: case for case in LAYERS if args.only is None or case in args.only}


def odconv_section(args: argparse.Namespace) -> None:
    """ODConv against dynamic convolution: per layer, and the two ResNet-18s (CPU)."""
    for batch in [] if args.skip_layers else args.batch:
        table("ODConv: one 3x3 conv, forward + backward (C_in = C_out, stride 1, K = 4)",
              _layer_cases(args), ODCONV_LAYER_VARIANTS, args.size, args.reps, batch, ("ours",))
    if not args.skip_model:
        table(f"ODConv-ResNet-18 (4x) vs DY-ResNet-18 training step, input {args.size}",
              {f"R18@{args.size}": "model"}, ODCONV_MODEL_VARIANTS, args.size, args.model_reps, args.model_batch,
              ("ours",))


# --- CUDA section ------------------------------------------------------------------------

def _to_channels_last(model: nn.Module) -> nn.Module:
    """channels_last for every 4-D parameter and buffer. ``model.to(memory_format=...)``
    fails on a model with a 5-D parameter (the seed's kernel bank), which stays as it is."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- GPU protocol: the Triton form against the others --------------------------------------

SMOKE_LAYERS = {"8@8": (8, 8), "16@4": (16, 4)}  # --gpu-protocol off CUDA: a smoke test


def _gpu_variants(variants: tuple[str, ...]) -> tuple[str, ...]:
    """``variants`` with the forced Triton (and stacked) forms after ``ours``."""
    at = variants.index("ours") + 1
    extra = tuple(v for v in ("ours:triton", "ours:stacked") if v not in variants)
    return variants[:at] + extra + variants[at:]


def _protocol_step(case: str, variant: str, size: int, batch: int, train: bool, device: torch.device,
                   backend: str | None) -> Callable[[], None]:
    """One call of ``variant`` under the GPU settings: bf16 autocast, channels_last, eval +
    inference_mode or a training step (forward, loss, backward); compiled with ``backend``."""
    model, x, target = build(case, variant, size, batch)
    model = _to_channels_last(model.to(device)).train(train)
    x = x.detach().to(device).contiguous(memory_format=torch.channels_last)  # the protocol: no input gradient
    target = None if target is None else target.to(device)
    run = torch.compile(model, backend=backend) if backend else model

    def call() -> None:
        if not train:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                run(x)
            return
        model.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = run(x)
            loss = out.float().square().mean() if target is None else F.cross_entropy(out, target)
        loss.backward()

    return call


def protocol_table(title: str, case: str, variants: tuple[str, ...], references: tuple[str, ...], size: int,
                   batch: int, reps: int, train: bool, device: torch.device, backend: str | None = None) -> None:
    """Median time and peak memory per variant (interleaved, order rotated each round), with
    ratios to each reference variant; "ours" is labelled with the forms it measured and chose."""
    from attnsurgeon.layers.dynamic_conv import _MEASURED

    cols = "".join(f" {'x ' + r.split('-')[0]:>11}" for r in references)
    print(f"\n{title}\n{'variant':<32} {'median ms':>10}{cols} {'peak MB':>9}{cols}")
    steps, labels = {}, {}
    for v in variants:
        steps[v] = _protocol_step(case, v, size, batch, train, device, backend)
        seen = dict(_MEASURED)
        steps[v]()
        steps[v]()  # warm-up: compilation, cuDNN autotuning, the form measurement, the allocator
        chosen = [form for key, form in _MEASURED.items() if key not in seen]
        labels[v] = v + (f" ({', '.join(f'{f} {chosen.count(f)}' for f in sorted(set(chosen)))})" if chosen else "")
    samples = time_interleaved(steps, rounds=reps, sync=lambda: _sync(device))
    peak = dict.fromkeys(variants, float("nan"))
    if device.type == "cuda":
        for v, step in steps.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak[v] = (torch.cuda.max_memory_allocated() - before) / 2**20
    median = {v: statistics.median(t) for v, t in samples.items()}
    for v in variants:
        t_ratio = "".join(f" {median[v] / median[r]:>11.2f}" for r in references)
        m_ratio = "".join(f" {peak[v] / max(peak[r], 1e-9):>11.2f}" for r in references)
        print(f"{labels[v]:<32} {1e3 * median[v]:>10.2f}{t_ratio} {peak[v]:>9.0f}{m_ratio}", flush=True)
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_protocol(args: argparse.Namespace) -> None:
    """DY-ResNet-18 over resnet18, inference at batch 256 and training step at batch 128,
    eager and compiled, and ODConv-ResNet-18 over DY-ResNet-18 there, eager; then layers at
    batch 32 and 256, inference and training step. Off CUDA a
    smoke test at tiny sizes (the Triton rows fall back to the automatic form there)."""
    device = torch.device(args.device)
    smoke = device.type != "cuda"
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if not smoke else f"{device} (smoke test, tiny sizes)"
    print(f"\n{name}, torch {torch.__version__}: bf16 autocast, channels_last, K = 4")
    layers = SMOKE_LAYERS if smoke else LAYERS
    layer_batches = (2, 3) if smoke else (32, 256)
    size = 32 if smoke else args.size
    # the whole models first: the goals' rows, which a time limit must not cut off
    if not args.skip_model:
        for train, batch in ((False, 2 if smoke else 256), (True, 2 if smoke else 128)):
            mode = "training step" if train else "inference"
            wide = WIDE_DW if train else ()
            protocol_table(f"DY-ResNet-18 {mode}, batch {batch}, {size}x{size}, eager", "model",
                           _gpu_variants(MODEL_VARIANTS) + wide, ("resnet18-static", "seed"), size, batch,
                           args.model_reps, train, device)
            if args.compile_backend != "none":
                protocol_table(f"DY-ResNet-18 {mode}, batch {batch}, {size}x{size}, torch.compile "
                               f"({args.compile_backend})", "model", ("resnet18-static", "ours"),
                               ("resnet18-static",), size, batch, args.model_reps, train, device, args.compile_backend)
            protocol_table(f"ODConv-ResNet-18 (4x) vs DY-ResNet-18 {mode}, batch {batch}, {size}x{size}, eager",
                           "model", ODCONV_MODEL_VARIANTS + GPU_ODCONV_VARIANTS[1:], ("ours",), size, batch,
                           args.model_reps, train, device)
    for train in (False, True):
        mode = "training step (forward + backward)" if train else "inference"
        wide = WIDE_DW if train else ()
        for batch in layer_batches:
            for case in layers:
                protocol_table(f"3x3 conv {case}, batch {batch}, {mode}", case,
                               _gpu_variants(LAYER_VARIANTS) + wide + GPU_ODCONV_VARIANTS, ("seed",), size, batch,
                               args.reps, train, device)
    print(f"\nGPU protocol took {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="DY-ResNet-18 input size")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per variant, layer cases")
    parser.add_argument("--model-reps", type=int, default=3, help="timed steps per variant, DY-ResNet-18")
    parser.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[BATCH],
                        help="CPU layer tables: comma-separated batch sizes (e.g. 32,256)")
    parser.add_argument("--model-batch", type=int, default=BATCH, help="CPU whole-model tables: batch size")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="CPU layer tables: comma-separated cases (e.g. 64@56,512@7)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU tables: time the process's CPU seconds instead of wall-clock seconds (on a "
                             "loaded machine, with OMP_NUM_THREADS=1, what the step costs rather than how "
                             "long it waited for a core)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-layers", action="store_true", help="CPU: only the whole-model tables")
    parser.add_argument("--no-input-grad", action="store_true",
                        help="CPU layer tables: the input does not ask for its gradient (a network's first layer)")
    parser.add_argument("--odconv-only", action="store_true", help="only the ODConv rows (CPU)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--gpu-protocol", action="store_true",
                        help="only the GPU protocol (Triton form included); off CUDA a smoke test at tiny sizes")
    parser.add_argument("--device", default="cuda", help="device of --gpu-protocol (cpu: the smoke test)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of --gpu-protocol ('none' skips the compiled rows)")
    args = parser.parse_args()
    global INPUT_GRAD, TIMER
    INPUT_GRAD = not args.no_input_grad
    if args.child:
        print(*child_memory(*args.child, args.size, args.batch[0]))
        return
    if args.gpu_protocol:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit("--gpu-protocol: no CUDA device here (--device cpu runs the smoke test)")
        gpu_protocol(args)
        return
    TIMER = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{'CPU' if args.cpu_time else 'wall-clock'} seconds; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.odconv_only:
        odconv_section(args)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
        return
    for batch in [] if args.skip_layers else args.batch:
        table("One 3x3 conv, forward + backward (C_in = C_out, stride 1, K = 4)",
              _layer_cases(args), LAYER_VARIANTS, args.size, args.reps, batch)
    if not args.skip_model:
        table(f"DY-ResNet-18 training step (forward + cross-entropy + backward), input {args.size}",
              {f"DY-R18@{args.size}": "model"}, MODEL_VARIANTS, args.size, args.model_reps, args.model_batch)
    odconv_section(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if torch.cuda.is_available():
        gpu_protocol(args)
    else:
        print("no CUDA device: GPU protocol skipped")


if __name__ == "__main__":
    main()
