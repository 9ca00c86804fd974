"""Training-step cost of dynamic convolution: attnsurgeon vs the seed's grouped conv vs timm.

The requirement: the dynamic conv's training step (forward + backward) must be neither
slower nor hungrier for memory than the seed's grouped-conv approach at batch 32.

Variants, side by side at batch 32, float32, CPU:

* ``ours``: :class:`attnsurgeon.layers.dynamic_conv.DynamicConv2d` (eager picks the
  per-sample or stacked form per layer; the table says which);
* ``ours:per-sample`` / ``ours:stacked``: the same module forced to one form;
* ``seed``: the grouped-conv ``Dynamic_conv2d`` of seed 004 (kaijieshi7's
  Dynamic-convolution-Pytorch), re-implemented below with its typos fixed;
* ``timm-condconv``: ``timm.layers.CondConv2d`` with a GAP -> Linear -> sigmoid router
  as in timm's EfficientNet. Its routing differs (sigmoid, no temperature): a reference.

Cases: one 3x3 conv at ResNet-18's layer shapes (64ch@56, 128@28, 256@14, 512@7), and
the whole DY-ResNet-18 (dynamic conv on every conv but the stem, K=4, as in the paper)
with cross-entropy, plus the static ResNet-18 for scale.

Time: all variants of a case are built in one process, warmed up, then timed round by
round (A B C ... A B C ...), ``--reps`` rounds; each gets the median. Interleaving
spreads background load evenly over the variants. Memory: each (case, variant) runs in a
fresh subprocess, one warm-up step then one measured step: the peak resident set size
during that step minus the resident size just before it (Linux: the peak is reset with
``/proc/self/clear_refs`` and read as ``VmHWM``; ``ru_maxrss`` would carry the parent's
peak across fork + exec): what the step needs on top of the model and its input. The children run with
glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so every tensor over 64 KiB is its own mapping,
returned to the OS when freed, and the resident set follows the live tensors (to within
malloc's small-block heap, a few MB).

CUDA section (runs when a CUDA device is present, or alone with ``--cuda-only``): the same
cases and variants at batch 256 (``--cuda-batch``), bf16 autocast, channels_last model and
input, inference (eval, ``torch.inference_mode``) and training step (forward + backward);
the device is synchronised around each timed call; peak memory is
``torch.cuda.max_memory_allocated`` during one call of the variant alone, minus what was
allocated before it (the model, its input and, for training, its gradients). ``ours`` there
runs the stacked form (the CUDA choice of ``DynamicConv2d.uses_stacked``).

    python benchmarks/bench_dynconv.py                # layers + DY-ResNet-18 at 224 (~8 min on 2 cores)
    python benchmarks/bench_dynconv.py --size 112     # quicker whole-model case
    python benchmarks/bench_dynconv.py --skip-model   # layers only
    python benchmarks/bench_dynconv.py --cuda-only    # only the CUDA section
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnsurgeon.latency import time_interleaved

BATCH = 32
LAYERS = {"64@56": (64, 56), "128@28": (128, 28), "256@14": (256, 14), "512@7": (512, 7)}
LAYER_VARIANTS = ("ours", "ours:per-sample", "ours:stacked", "seed", "timm-condconv")
MODEL_VARIANTS = ("resnet18-static", "ours", "seed", "timm-condconv")


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


class Forced(nn.Module):
    """Our DynamicConv2d, forced to one of its two forms."""

    def __init__(self, dyn: nn.Module, form: str) -> None:
        super().__init__()
        self.dyn, self.form = dyn, form

    def forward(self, x: Tensor) -> Tensor:
        pi = self.dyn.kernel_attention(x)
        return (self.dyn.forward_stacked if self.form == "stacked" else self.dyn.forward_per_sample)(x, pi)


def _wrap(conv: nn.Conv2d, variant: str) -> nn.Module:
    from attnsurgeon.layers.dynamic_conv import from_conv

    if variant == "seed":
        return SeedDynamicConv2d(conv)
    if variant == "timm-condconv":
        return RoutedCondConv(conv)
    dyn, _ = from_conv(conv, None)
    return Forced(dyn, variant.split(":")[1]) if ":" in variant else dyn


def build(case: str, variant: str, size: int, batch: int = BATCH) -> tuple[nn.Module, Tensor, Tensor | None]:
    torch.manual_seed(0)
    if case in LAYERS:
        channels, hw = LAYERS[case]
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        return _wrap(conv, variant), torch.randn(batch, channels, hw, hw), None
    import torchvision

    from attnsurgeon.blocks import find_blocks
    from attnsurgeon.surgery import replace_module

    model = torchvision.models.resnet18()
    if variant != "resnet18-static":
        for info, block in find_blocks(model):
            for site in info.convs:  # every conv of every block: the paper's DY-ResNet (target=all)
                replace_module(block, site.conv, _wrap(block.get_submodule(site.conv), variant), expect=nn.Conv2d)
    return model, torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _stepper(model: nn.Module, x: Tensor, target: Tensor | None) -> Callable[[], None]:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = out.square().mean() if target is None else F.cross_entropy(out, target)
        loss.backward()

    return step


def child_memory(case: str, variant: str, size: int) -> float:
    """Peak RSS growth (MB) of one training step after a warm-up step."""
    step = _stepper(*build(case, variant, size))
    step()  # warm-up; gradients then exist, as in every step after the first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - before) / 1024


def memory(case: str, variant: str, size: int) -> float:
    cmd = [sys.executable, __file__, "--child", case, variant, "--size", str(size)]
    # a fixed mmap threshold makes glibc return every freed block over 64 KiB to the OS at
    # once, so the resident set follows the live tensors instead of malloc's caching
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def times(case: str, variants: tuple[str, ...], size: int, reps: int) -> dict[str, float]:
    """Median step time of each variant, the variants interleaved round by round."""
    steps = {v: _stepper(*build(case, v, size)) for v in variants}
    samples = time_interleaved(steps, rounds=reps, warmup=1)
    return {v: statistics.median(t) for v, t in samples.items()}


def table(title: str, cases: dict[str, str], variants: tuple[str, ...], size: int, reps: int) -> None:
    """Print one row per (case, variant); ``cases`` maps labels to build keys."""
    print(f"\n{title}\n{'case':<11} {'variant':<22} {'median s':>9} {'x seed':>7} {'peak MB':>8} {'x seed':>7}")
    for label, key in cases.items():
        median = times(key, variants, size, reps)
        peak = {v: memory(key, v, size) for v in variants}
        for v in variants:
            name = v
            if v == "ours" and key in LAYERS:
                model, x, _ = build(key, v, size)
                name += " (stacked)" if model.uses_stacked(x) else " (per-sample)"
            print(f"{label:<11} {name:<22} {median[v]:>9.3f} {median[v] / median['seed']:>7.2f} "
                  f"{peak[v]:>8.0f} {peak[v] / max(peak['seed'], 1e-9):>7.2f}", flush=True)


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


def _device_stepper(case: str, variant: str, size: int, batch: int, train: bool,
                    device: torch.device) -> Callable[[], None]:
    model, x, target = build(case, variant, size, batch)
    model = _to_channels_last(model.to(device))
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    target = None if target is None else target.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return infer
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=False)
        with autocast:
            out = model(x)
            loss = out.float().square().mean() if target is None else F.cross_entropy(out, target)
        loss.backward()

    return step


def device_table(title: str, cases: dict[str, str], variants: tuple[str, ...], size: int, batch: int,
                 reps: int, train: bool, device: torch.device) -> None:
    """Median time and peak memory (CUDA) per (case, variant), variants interleaved."""
    print(f"\n{title}\n{'case':<11} {'variant':<22} {'median ms':>10} {'x seed':>7} {'peak MB':>8} {'x seed':>7}")
    for label, key in cases.items():
        steps = {v: _device_stepper(key, v, size, batch, train, device) for v in variants}
        # two warm-up rounds: cuDNN autotuning, the allocator
        samples = time_interleaved(steps, rounds=reps, warmup=2, sync=lambda: _sync(device))
        peak = dict.fromkeys(variants, float("nan"))
        if device.type == "cuda":
            for v, step in steps.items():  # one call alone: what it allocates on top of what it holds
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak[v] = (torch.cuda.max_memory_allocated() - before) / 2**20
        median = {v: statistics.median(t) for v, t in samples.items()}
        for v in variants:
            print(f"{label:<11} {v:<22} {1e3 * median[v]:>10.2f} {median[v] / median['seed']:>7.2f} "
                  f"{peak[v]:>8.0f} {peak[v] / max(peak['seed'], 1e-9):>7.2f}", flush=True)
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_section(args: argparse.Namespace) -> None:
    device = torch.device(args.cuda_device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (smoke test)"
    print(f"\n{name}: batch {args.cuda_batch}, bf16 autocast, channels_last")
    for train in (False, True):
        mode = "training step (forward + backward)" if train else "inference"
        device_table(f"One 3x3 conv, {mode} (C_in = C_out, stride 1, K = 4)", {c: c for c in LAYERS},
                     LAYER_VARIANTS, args.size, args.cuda_batch, args.reps, train, device)
        if not args.skip_model:
            device_table(f"DY-ResNet-18 {mode}, input {args.size}", {f"DY-R18@{args.size}": "model"},
                         MODEL_VARIANTS, args.size, args.cuda_batch, args.model_reps, train, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="DY-ResNet-18 input size")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per variant, layer cases")
    parser.add_argument("--model-reps", type=int, default=3, help="timed steps per variant, DY-ResNet-18")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA section")
    parser.add_argument("--cuda-batch", type=int, default=256, help="batch of the CUDA section")
    parser.add_argument("--cuda-device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke-test the section
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child_memory(*args.child, args.size))
        return
    if args.cuda_only:
        if args.cuda_device == "cuda" and not torch.cuda.is_available():
            sys.exit("--cuda-only: no CUDA device here")
        cuda_section(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, float32, CPU; "
          f"load average {os.getloadavg()[0]:.1f}")
    table("One 3x3 conv, forward + backward (C_in = C_out, stride 1, K = 4)",
          {case: case for case in LAYERS}, LAYER_VARIANTS, args.size, args.reps)
    if not args.skip_model:
        table(f"DY-ResNet-18 training step (forward + cross-entropy + backward), input {args.size}",
              {f"DY-R18@{args.size}": "model"}, MODEL_VARIANTS, args.size, args.model_reps)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if torch.cuda.is_available():
        cuda_section(args)
    else:
        print("no CUDA device: CUDA section skipped")


if __name__ == "__main__":
    main()
