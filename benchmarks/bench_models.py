"""Whole-model cost of attention: attnsurgeon's models against timm's equivalents.

Each row is an attention family; it times, side by side in one loop, our base model and
our model after surgery, and timm's base model and timm's own attention model, and
reports each side's ratio model / base (the cost the attention adds), so the two ratios
are comparable even though the bases differ a little:

===========  =====================================  =====================================
row          ours (attnsurgeon)                     timm
===========  =====================================  =====================================
SE           se on torchvision resnet50             seresnet50 / resnet50
CBAM         cbam on torchvision resnet50           resnet50 + block_args attn_layer=cbam
SK           sk on torchvision resnext50_32x4d      skresnext50_32x4d / resnext50_32x4d
ECA          eca on torchvision resnet50            ecaresnet50d / resnet50d
DY-R18       dynconv target=all on resnet18 (K=4)   (none)
===========  =====================================  =====================================

The ECA row runs only if the ``eca`` kind is registered. ``--init paper`` everywhere,
random weights.

Protocol. CPU (default): float32, eager, eval mode under ``torch.inference_mode``,
``--threads`` (2) intra-op threads, batch ``--batch`` (8), input ``--size`` (224);
``--train`` adds a training step (forward, cross-entropy, backward). CUDA (``--device
cuda``, when present): bf16 autocast, channels_last model and input, inference at batch
256 and a training step (with an SGD update) at batch 128, eager and ``torch.compile``;
CUDA times synchronise before and after each call, and peak memory is
``torch.cuda.max_memory_allocated`` over one call of each model alone. In both: every
model warms up (compiled ones compile there), then ``--reps`` rounds each time one call of
every model of the row, in an order rotated each round; medians per model; the ratio
is the median over rounds of model / base within the round.

    python benchmarks/bench_models.py                         # CPU, 224, batch 8
    python benchmarks/bench_models.py --size 160 --reps 5     # quicker
    python benchmarks/bench_models.py --device cuda           # GPU protocol (needs CUDA)
    python benchmarks/bench_models.py --device cpu --gpu-protocol --batch 2 --size 64 --reps 1
                                                              # smoke-test the GPU code path on CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnsurgeon.latency import time_interleaved


@dataclass(frozen=True)
class Row:
    name: str
    ours_base: str  # torchvision model name
    attn: str | None  # our kind (None: no "ours" side)
    params: dict
    timm_base: tuple[str, dict] | None
    timm_model: tuple[str, dict] | None


ROWS = (
    Row("SE", "resnet50", "se", {}, ("resnet50", {}), ("seresnet50", {})),
    Row("CBAM", "resnet50", "cbam", {}, ("resnet50", {}), ("resnet50", {"block_args": {"attn_layer": "cbam"}})),
    Row("SK", "resnext50_32x4d", "sk", {}, ("resnext50_32x4d", {}), ("skresnext50_32x4d", {})),
    Row("ECA", "resnet50", "eca", {}, ("resnet50d", {}), ("ecaresnet50d", {})),
    Row("DY-R18", "resnet18", "dynconv", {"target": "all"}, None, None),
)


def build_row(row: Row) -> dict[str, nn.Module]:
    """The row's models: ``ours:base``, ``ours:<attn>``, ``timm:base``, ``timm:<model>``."""
    import torchvision

    import attnsurgeon

    torch.manual_seed(0)
    models: dict[str, nn.Module] = {}
    base = getattr(torchvision.models, row.ours_base)()
    models[f"ours:{row.ours_base}"] = base
    if row.attn is not None:
        model = getattr(torchvision.models, row.ours_base)()
        attnsurgeon.apply(model, row.attn, params=row.params)
        models[f"ours:{row.attn}"] = model
    if row.timm_base is not None and row.timm_model is not None:
        import timm

        for (name, kwargs), label in ((row.timm_base, "base"), (row.timm_model, "model")):
            suffix = name + ("+" + ",".join(f"{v}" for v in kwargs.get("block_args", {}).values()) if kwargs else "")
            models[f"timm:{suffix}" if label == "model" else f"timm:{name}"] = timm.create_model(name, **kwargs)
    return models


def available(row: Row) -> bool:
    from attnsurgeon.kinds import KINDS

    return row.attn is None or row.attn in KINDS


@dataclass(frozen=True)
class Setting:
    label: str
    device: torch.device
    batch: int
    train: bool
    compiled: bool
    bf16: bool
    channels_last: bool


def _stepper(model: nn.Module, s: Setting, size: int) -> Callable[[], None]:
    """One call of ``model`` under setting ``s`` (a fixed batch, made once)."""
    model = model.to(s.device)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(s.batch, 3, size, size, device=s.device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (s.batch,), device=s.device)
    run = torch.compile(model) if s.compiled else model
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16)
    if not s.train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast:
                run(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_row(models: dict[str, nn.Module], s: Setting, size: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each model, ``reps`` rounds, order rotated each round."""
    steps = {name: _stepper(m, s, size) for name, m in models.items()}
    samples = time_interleaved(steps, rounds=reps, warmup=warmup, sync=lambda: _sync(s.device))
    if s.device.type == "cuda":
        for name, step in steps.items():  # peak memory of one call alone, after the rounds
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            samples[f"{name}#peak_mb"] = [torch.cuda.max_memory_allocated() / 2**20]
    for m in models.values():  # free the device for the next row
        m.to("cpu")
    return samples


def _ratio(samples: dict[str, list[float]], model: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[model], samples[base]))


def report(row: Row, samples: dict[str, list[float]], s: Setting) -> list[str]:
    """Markdown lines: per side, base ms, model ms, model / base (and peak MB on CUDA)."""
    lines = []
    names = [n for n in samples if "#" not in n]
    sides = {}
    for n in names:
        sides.setdefault(n.split(":")[0], []).append(n)
    for side, (base, *rest) in sides.items():
        for model in rest:
            mem = ""
            if f"{model}#peak_mb" in samples:
                mb, bmb = samples[f"{model}#peak_mb"][0], samples[f"{base}#peak_mb"][0]
                mem = f" | {mb:.0f} | {mb / bmb:.2f}"
            lines.append(f"| {row.name} | {s.label} | {side} | {model.split(':', 1)[1]} / {base.split(':', 1)[1]} | "
                         f"{1e3 * statistics.median(samples[base]):.1f} | {1e3 * statistics.median(samples[model]):.1f} | "
                         f"{_ratio(samples, model, base):.2f}{mem} |")
    return lines


def settings(args: argparse.Namespace) -> list[Setting]:
    device = torch.device(args.device)
    if device.type == "cuda" or args.gpu_protocol:
        infer_b, train_b = (args.batch, args.batch) if args.batch else (256, 128)
        out = []
        for compiled in (False, True):
            tag = "compile" if compiled else "eager"
            out.append(Setting(f"infer b{infer_b} bf16 CL {tag}", device, infer_b, False, compiled, True, True))
            out.append(Setting(f"train b{train_b} bf16 CL {tag}", device, train_b, True, compiled, True, True))
        return out
    batch = args.batch or 8
    out = [Setting(f"infer b{batch} fp32 eager", device, batch, False, False, False, False)]
    if args.train:
        out.append(Setting(f"train b{batch} fp32 eager", device, batch, True, False, False, False))
    return out


def _cpu_name() -> str:
    try:  # Linux; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        return f"{model}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--gpu-protocol", action="store_true", help="the CUDA settings on any device (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU; 256 inference / 128 training on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="CPU: also a training step")
    parser.add_argument("--only", default="", help="comma list of rows (SE,CBAM,SK,ECA,DY-R18)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"torch {torch.__version__}, {name}, {args.threads} threads, input {args.size}, {args.reps} rounds; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    mem = device.type == "cuda"
    print("\n| row | setting | side | model / base | base ms | model ms | model / base |"
          + (" peak MB | peak / base |" if mem else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if mem else ""), flush=True)
    only = {o.strip().upper() for o in args.only.split(",") if o.strip()}
    for row in ROWS:
        if only and row.name.upper() not in only:
            continue
        if not available(row):
            print(f"| {row.name} | - | - | kind {row.attn!r} is not registered: row skipped | | | |", flush=True)
            continue
        for s in settings(args):
            models = build_row(row)
            samples = time_row(models, s, args.size, args.reps, args.warmup)
            for line in report(row, samples, s):
                print(line, flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
