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
EMA          ema on torchvision resnet50            (none)
SimAM        simam on torchvision resnet50          (none)
triplet      triplet on torchvision resnet50        (none)
NL-5         nl: the paper's 5 blocks on resnet50   (none: timm puts it in every block)
ELA          ela on torchvision resnet50            resnet50 + block_args attn_layer=ela
eSE          se variant=effective on resnet50       resnet50 + block_args attn_layer=ese
CECA         eca padding=circular on resnet50       resnet50 + block_args attn_layer=ceca
LCBAM        cbam variant=light on resnet50         resnet50 + block_args attn_layer=lcbam
===========  =====================================  =====================================

A row runs only if its kind is registered. ``--init paper`` everywhere,
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

``--quick`` prints another table, the one the fused GPU kernels (``attnsurgeon.kernels``)
are judged by, sized for a 5-minute run on one H100/H200 (not yet timed on one): per model, ours with the fused kernels,
the same model with them switched off (``kernels.use_fused(False)``), and timm's model
where timm has one, each over its own base, inference at batch 256 and an SGD training
step at batch 128, bf16 autocast, channels_last, eager; then one ``torch.compile`` row
(SE-ResNet-50 inference: the plain form under compile, which is the default, and the
custom ops under compile). ``--interpret`` runs the fused kernels on the CPU in Triton's
interpreter, so a tiny CPU run goes through every code path the GPU run takes:

    python benchmarks/bench_models.py --device cuda --quick
    python benchmarks/bench_models.py --device cpu --quick --gpu-protocol --interpret \
        --batch 2 --size 32 --reps 1 --warmup 1 --no-compile        # smoke test, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

if "--interpret" in sys.argv:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from torch import nn

from attnsurgeon.latency import time_interleaved


@dataclass(frozen=True)
class Row:
    name: str
    ours_base: str  # torchvision model name
    attn: str | None  # our kind (None: no "ours" side)
    params: dict
    timm_base: tuple[str, dict] | None
    timm_model: tuple[str, dict] | None
    layers: str = "all"


def _timm_attn(name: str) -> tuple[str, dict]:
    return ("resnet50", {"block_args": {"attn_layer": name}})


ROWS = (
    Row("SE", "resnet50", "se", {}, ("resnet50", {}), ("seresnet50", {})),
    Row("CBAM", "resnet50", "cbam", {}, ("resnet50", {}), ("resnet50", {"block_args": {"attn_layer": "cbam"}})),
    Row("SK", "resnext50_32x4d", "sk", {}, ("resnext50_32x4d", {}), ("skresnext50_32x4d", {})),
    Row("ECA", "resnet50", "eca", {}, ("resnet50d", {}), ("ecaresnet50d", {})),
    Row("DY-R18", "resnet18", "dynconv", {"target": "all"}, None, None),
    Row("EMA", "resnet50", "ema", {}, None, None),
    Row("SimAM", "resnet50", "simam", {}, None, None),
    Row("triplet", "resnet50", "triplet", {}, None, None),
    Row("NL-5", "resnet50", "nl", {}, None, None, layers="layer2.1,layer2.3,layer3.1,layer3.3,layer3.5"),
    Row("ELA", "resnet50", "ela", {}, ("resnet50", {}), _timm_attn("ela")),
    Row("eSE", "resnet50", "se", {"variant": "effective"}, ("resnet50", {}), _timm_attn("ese")),
    Row("CECA", "resnet50", "eca", {"padding": "circular"}, ("resnet50", {}), _timm_attn("ceca")),
    Row("LCBAM", "resnet50", "cbam", {"variant": "light"}, ("resnet50", {}), _timm_attn("lcbam")),
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
        attnsurgeon.apply(model, row.attn, params=row.params, layers=row.layers)
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


def _stepper(model: nn.Module, s: Setting, size: int, fused: bool | str | None = None) -> Callable[[], None]:
    """One call of ``model`` under setting ``s`` (a fixed batch, made once); ``fused``: the
    mode of the fused kernels during the call (``attnsurgeon.kernels.use_fused``), or as set."""
    model = model.to(s.device)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(s.batch, 3, size, size, device=s.device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (s.batch,), device=s.device)
    run = torch.compile(model) if s.compiled else model
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16)

    def mode() -> contextlib.AbstractContextManager[None]:
        from attnsurgeon import kernels

        return contextlib.nullcontext() if fused is None else kernels.use_fused(fused)

    if not s.train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast, mode():
                run(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with mode():
            with autocast:
                loss = F.cross_entropy(run(x), y)
            loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_row(models: dict[str, nn.Module], s: Setting, size: int, reps: int, warmup: int,
             modes: dict[str, bool | str] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each model, ``reps`` rounds, order rotated each round; ``modes``:
    the fused kernels' mode per model name (see :func:`_stepper`)."""
    steps = {name: _stepper(m, s, size, (modes or {}).get(name)) for name, m in models.items()}
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
    return statistics.median(a / b for a, b in zip(samples[model], samples[base], strict=True))


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
                         f"{1e3 * statistics.median(samples[base]):.1f} | "
                         f"{1e3 * statistics.median(samples[model]):.1f} | "
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


@dataclass(frozen=True)
class QuickRow:
    """A row of ``--quick``: ``attn`` at ``position`` on torchvision's ``base``, and timm's pair."""

    name: str
    base: str
    attn: str
    position: str | None = None
    params: dict = field(default_factory=dict)
    timm_base: tuple[str, dict] | None = None
    timm_model: tuple[str, dict] | None = None


QUICK_ROWS = (
    QuickRow("SE-ResNet-50", "resnet50", "se", timm_base=("resnet50", {}), timm_model=("seresnet50", {})),
    QuickRow("ECA-ResNet-50", "resnet50", "eca", timm_base=("resnet50d", {}), timm_model=("ecaresnet50d", {})),
    QuickRow("CBAM-ResNet-50", "resnet50", "cbam", timm_base=("resnet50", {}),
             timm_model=("resnet50", {"block_args": {"attn_layer": "cbam"}})),
    QuickRow("GC-ResNet-50", "resnet50", "gc", timm_base=("resnet50", {}),
             timm_model=("resnet50", {"block_args": {"attn_layer": "gc"}})),
    QuickRow("coordinate attention, ResNet-50", "resnet50", "coord"),
    QuickRow("MobileNetV2, coordinate attention at mid", "mobilenet_v2", "coord", position="mid"),
    QuickRow("MobileNetV2, SE at mid", "mobilenet_v2", "se", position="mid"),
    QuickRow("ConvNeXt-T, SE", "convnext_tiny", "se"),
    QuickRow("EfficientNet-B0, built-in SE replaced by our SE", "efficientnet_b0", "se", position="builtin"),
)


def _quick_models(row: QuickRow) -> tuple[dict[str, nn.Module], dict[str, bool | str]]:
    """``ours:base``, ``ours:fused`` and ``ours:unfused`` (one model, run in both modes),
    ``timm:base`` and ``timm:model``; and the kernels' mode of each."""
    import torchvision

    import attnsurgeon

    torch.manual_seed(0)
    model = getattr(torchvision.models, row.base)()
    attnsurgeon.apply(model, row.attn, position=row.position, params=row.params)
    models = {"ours:base": getattr(torchvision.models, row.base)(), "ours:fused": model, "ours:unfused": model}
    if row.timm_base is not None and row.timm_model is not None:
        import timm

        models["timm:base"] = timm.create_model(row.timm_base[0], **row.timm_base[1])
        models["timm:model"] = timm.create_model(row.timm_model[0], **row.timm_model[1])
    return models, {"ours:fused": True, "ours:unfused": False}


def quick(args: argparse.Namespace, device: torch.device) -> None:
    """The ``--quick`` tables (see the module docstring)."""
    infer_b, train_b = (args.batch, args.batch) if args.batch else (256, 128)
    infer = Setting(f"infer b{infer_b}", device, infer_b, False, False, True, True)
    train = Setting(f"train b{train_b}", device, train_b, True, False, True, True)
    only = [o.strip().lower() for o in args.only.split(",") if o.strip()]
    rows = [r for r in QUICK_ROWS if not only or any(o in r.name.lower() for o in only)]
    print(f"\nEach ratio: model / its own base, median over {args.reps} rounds; inference at batch {infer_b}, "
          f"SGD training step at batch {train_b}; bf16 autocast, channels_last, eager.\n")
    print("| model | base ms (infer / train) | ours fused, infer | ours unfused, infer | timm, infer "
          "| ours fused, train | ours unfused, train | timm, train |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for row in rows:
        cells: dict[str, str] = {}
        base_ms = []
        for s in (infer, train):
            models, modes = _quick_models(row)
            samples = time_row(models, s, args.size, args.reps, args.warmup, modes)
            base_ms.append(f"{1e3 * statistics.median(samples['ours:base']):.1f}")
            for side, base in (("ours:fused", "ours:base"), ("ours:unfused", "ours:base"), ("timm:model", "timm:base")):
                cells[f"{side}/{s.train}"] = f"{_ratio(samples, side, base):.2f}" if side in samples else "-"
            del models, samples
        timm_note = ""
        if row.timm_model is not None and row.timm_base is not None:
            extra = "".join(f" {k}={v}" for k, v in row.timm_model[1].get("block_args", {}).items())
            timm_note = f" (timm: {row.timm_model[0]}{extra} / {row.timm_base[0]})"
        print(f"| {row.name}{timm_note} | {' / '.join(base_ms)} | "
              + " | ".join(cells[f"{side}/{t}"] for t in (False, True)
                           for side in ("ours:fused", "ours:unfused", "timm:model")) + " |", flush=True)
    if args.no_compile or (only and "compile" not in only):
        return
    s = Setting(f"infer b{infer_b} compile", device, infer_b, False, True, True, True)
    models, _ = _quick_models(QUICK_ROWS[0])
    models = {k: m for k, m in models.items() if k.startswith("ours")}
    modes: dict[str, bool | str] = {"ours:fused": "compile", "ours:unfused": True}
    samples = time_row(models, s, args.size, args.reps, args.warmup, modes)
    print("\n| SE-ResNet-50, torch.compile, inference | base ms | plain form under compile (the default) "
          "| custom ops under compile |")
    print("|---|---|---|---|")
    print(f"| ratio to compiled resnet50 | {1e3 * statistics.median(samples['ours:base']):.1f} | "
          f"{_ratio(samples, 'ours:unfused', 'ours:base'):.2f} | {_ratio(samples, 'ours:fused', 'ours:base'):.2f} |",
          flush=True)


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
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 8 on CPU; 256 inference / 128 training on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="CPU: also a training step")
    parser.add_argument("--only", default="", help="comma list of rows (SE,CBAM,SK,ECA,DY-R18,EMA,SimAM,triplet,NL-5,"
                        "ELA,eSE,CECA,LCBAM); with --quick, words of row names (resnet-50, mobilenet, compile)")
    parser.add_argument("--quick", action="store_true", help="the fused-kernel table (see the docstring)")
    parser.add_argument("--no-compile", action="store_true", help="--quick without its torch.compile row")
    parser.add_argument("--interpret", action="store_true",
                        help="run the fused kernels on CPU tensors in Triton's interpreter (smoke test)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"torch {torch.__version__}, {name}, {args.threads} threads, input {args.size}, {args.reps} rounds; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.interpret:
        from attnsurgeon import kernels

        kernels._interpret_on_cpu(True)
    if args.quick:
        quick(args, device)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
        return
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
