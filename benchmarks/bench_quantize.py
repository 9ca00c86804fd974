"""INT8 ONNX of trained attention models: accuracy, agreement, size, CPU latency.

Trains small torchvision models (ResNet-18, MobileNetV2; 10 classes) on scikit-learn's
digits (1,797 8x8 images, upsampled to 32x32, 3 channels): the base model from scratch, then
each attention kind inserted into the trained base with ``init="preserve"`` and fine-tuned
for one epoch (the way surgery is meant to be used). Each model is exported to ONNX and
quantized to INT8 with onnxruntime (QDQ, per-channel weights, uint8 activations, MinMax on
200 training images) under each float-keeping policy of :mod:`attnsurgeon.quantize`. Reported on the 360 test
images: float and INT8 accuracy, INT8 top-1 agreement with the float PyTorch model, file
sizes, and onnxruntime CPU latency (2 threads) of the float and the INT8 file, interleaved.

    pip install -e '.[test]'   # scikit-learn
    python benchmarks/bench_quantize.py --out results.json             # train, measure (~20 min)
    python benchmarks/bench_quantize.py --table results.json           # README tables, current defaults

Rows are appended to ``--out`` as they finish (a rerun skips rows already there), so the
tables can be re-printed with the current :data:`attnsurgeon.quantize.DEFAULT_POLICY`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import attnsurgeon
from attnsurgeon.onnx_export import export_onnx
from attnsurgeon.quantize import DEFAULT_POLICY, POLICIES, attention_nodes, ort_latency, quantize_int8

SIZE = 32
CALIBRATION = 200
MEASURED_POLICIES = ("none", "gate+apply", "branch", "branch+apply")
# (model, kind or None, position, params): the rows
ROWS: list[tuple[str, str | None, str | None, dict[str, Any]]] = [
    ("mobilenet_v2", None, None, {}),
    ("mobilenet_v2", "se", "mid", {}),
    ("mobilenet_v2", "eca", "mid", {}),
    ("mobilenet_v2", "coord", "mid", {}),
    ("mobilenet_v2", "cbam", "mid", {}),
    ("mobilenet_v2", "gc", "mid", {}),
    ("mobilenet_v2", "sk", None, {}),
    ("mobilenet_v2", "dynconv", None, {}),
    ("mobilenet_v2", "afp", None, {}),
    ("mobilenet_v2", "se", "mid", {"gate": "hard_sigmoid"}),
    ("mobilenet_v2", "eca", "mid", {"gate": "hard_sigmoid"}),
    ("mobilenet_v2", "coord", "mid", {"gate": "hard_sigmoid"}),
    ("resnet18", None, None, {}),
    ("resnet18", "se", None, {}),
    ("resnet18", "coord", None, {}),
    ("resnet18", "cbam", None, {}),
]


def row_name(model: str, kind: str | None, position: str | None, params: dict[str, Any]) -> str:
    name = f"{model} + {kind}" if kind else f"{model} (base)"
    if position:
        name += f" @{position}"
    if params:
        name += " (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
    return name


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y): 32x32x3 float32, normalised; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.25).repeat(1, 3, 1, 1).numpy()
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n_test = 360
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


_BASES: dict[str, tuple[dict[str, torch.Tensor], float]] = {}


def build(model: str, kind: str | None, position: str | None, params: dict[str, Any], *,
          data: tuple[np.ndarray, ...], epochs: int, cache: Path) -> tuple[nn.Module, float]:
    """The trained base (from scratch; kept in ``cache``), or the kind inserted into it
    (preserve) and fine-tuned."""
    if model not in _BASES:
        saved = cache / f"{model}_digits_{epochs}ep.pt"
        if saved.exists():
            blob = torch.load(saved, weights_only=True)
            _BASES[model] = (blob["state_dict"], blob["seconds"])
        else:
            torch.manual_seed(0)
            base = torchvision.models.get_model(model, num_classes=10)
            seconds = train(base, data[0], data[1], epochs=epochs, lr=2e-3)
            _BASES[model] = ({k: v.clone() for k, v in base.state_dict().items()}, seconds)
            torch.save({"state_dict": _BASES[model][0], "seconds": seconds}, saved)
    state, seconds = _BASES[model]
    m = torchvision.models.get_model(model, num_classes=10)
    m.load_state_dict(state)
    if kind:
        attnsurgeon.apply(m, kind, position=position, params=params or None, init="preserve", seed=0)
        seconds = train(m, data[0], data[1], epochs=1, lr=1e-3)
    return m.eval(), seconds


def train(m: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch: int = 64) -> float:
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    m.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(m(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    m.eval()
    return time.perf_counter() - start


def logits_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def scores(got: np.ndarray, want: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy of ``got``, its top-1 agreement and mean cosine with ``want`` (the float model)."""
    cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return {"acc": float((got.argmax(1) == y).mean()), "agreement": float((got.argmax(1) == want.argmax(1)).mean()),
            "cosine_mean": float(cos.mean())}


def measure(spec: tuple[str, str | None, str | None, dict[str, Any]], data: tuple[np.ndarray, ...], *,
            epochs: int, cache: Path) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    model, kind, position, params = spec
    m, seconds = build(model, kind, position, params, data=data, epochs=epochs, cache=cache)
    with torch.no_grad():
        want = m(torch.from_numpy(x_test)).numpy()
    row: dict[str, Any] = {"row": row_name(*spec), "model": model, "kind": kind, "position": position,
                           "params": params, "train_seconds": round(seconds, 1),
                           "epochs": 1 if kind else epochs, "from": "trained base, preserve" if kind else "scratch",
                           "float_acc": float((want.argmax(1) == y_test).mean()), "policies": {}}
    calib = x_train[:CALIBRATION]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(m, fp32, input_size=SIZE)
        row["fp32_size"] = fp32.stat().st_size
        row["fp32_onnx_acc"] = scores(logits_onnx(fp32, x_test), want, y_test)["acc"]
        import onnx

        attn = attention_nodes(onnx.load(str(fp32)), m)
        row["attention_nodes"] = {r: sum(a["role"] == r for a in attn) for r in ("gate", "branch", "apply")}
        policies = MEASURED_POLICIES if kind else ("none",)
        default = DEFAULT_POLICY.get(kind, "none") if kind else "none"
        for policy in dict.fromkeys((*policies, default)):
            roles = POLICIES[policy]
            keep = [a["node"] for a in attn if a["role"] in roles or (a["role"] == "gate" and "branch" in roles)]
            q = Path(tmp) / f"int8_{policy}.onnx"
            quantize_int8(fp32, q, calib, exclude=keep, show_progress=False)
            s = scores(logits_onnx(q, x_test), want, y_test)
            row["policies"][policy] = {"float_nodes": len(keep), "int8_acc": s["acc"], "agreement": s["agreement"],
                                       "cosine_mean": s["cosine_mean"], "size": q.stat().st_size}
        # latency: the float file against the default INT8 file, interleaved
        files = [fp32, Path(tmp) / f"int8_{default}.onnx"]
        for batch, rounds in ((1, 21), (32, 7)):
            ms = ort_latency(files, input_size=SIZE, batch=batch, threads=2, rounds=rounds)
            row[f"latency_b{batch}"] = {"fp32_ms": ms[0], "int8_default_ms": ms[1], "default_policy": default}
    return row


def choose(row: dict[str, Any]) -> str:
    """The measured choice of a kind's default: the highest top-1 agreement on the test images,
    ties broken by the higher mean cosine similarity with the float model."""
    measured = {k: v for k, v in row["policies"].items() if k in MEASURED_POLICIES}
    return max(measured, key=lambda k: (measured[k]["agreement"], measured[k]["cosine_mean"]))


def choose_per_kind(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each kind's measured default over all its rows (models, gates): the highest summed
    agreement, then the highest summed cosine; on a tie the policy keeping fewer nodes in float."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"]):
        mine = [r for r in rows if r["kind"] == kind]
        score = {p: (sum(r["policies"][p]["agreement"] for r in mine),
                     sum(r["policies"][p]["cosine_mean"] for r in mine))
                 for p in MEASURED_POLICIES if all(p in r["policies"] for r in mine)}
        out[kind] = max(score, key=lambda p: score[p])  # first in MEASURED_POLICIES (fewest float nodes) on a tie
    return out


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def tables(rows: list[dict[str, Any]]) -> str:
    out = ["| model | float acc | INT8 acc (default / all) | agreement (default / all) | float kept (default) "
           "| size fp32 -> int8 | CPU ms fp32 / int8, batch 1 | batch 32 | speed-up b1 / b32 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = DEFAULT_POLICY.get(r["kind"], "none") if r["kind"] else "none"
        pd, pa = r["policies"].get(d, r["policies"]["none"]), r["policies"]["none"]
        l1, l32 = r["latency_b1"], r["latency_b32"]
        q1, q32 = l1["int8_default_ms"], l32["int8_default_ms"]  # measured with the run's default
        out.append(
            f"| {r['row']} | {pct(r['float_acc'])} | {pct(pd['int8_acc'])} / {pct(pa['int8_acc'])} "
            f"| {pct(pd['agreement'])} / {pct(pa['agreement'])} | {d}: {pd['float_nodes']} nodes "
            f"| {r['fp32_size'] / 2**20:.1f} -> {pd['size'] / 2**20:.1f} MiB "
            f"| {l1['fp32_ms']:.2f} / {q1:.2f} | {l32['fp32_ms']:.1f} / {q32:.1f} "
            f"| x{l1['fp32_ms'] / q1:.2f} / x{l32['fp32_ms'] / q32:.2f} |")
    out += ["", "| model | " + " | ".join(MEASURED_POLICIES) + " | measured choice |",
            "|---|" + "---|" * (len(MEASURED_POLICIES) + 1)]
    for r in rows:
        if not r["kind"]:
            continue
        cells = [f"{pct(p['agreement'])}, {p['cosine_mean']:.4f} ({p['float_nodes']})"
                 if (p := r["policies"].get(name)) else "-" for name in MEASURED_POLICIES]
        out.append(f"| {r['row']} | " + " | ".join(cells) + f" | {choose(r)} |")
    out += ["", "measured default per kind: " + ", ".join(f"{k}: {v}" for k, v in choose_per_kind(rows).items())]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_quantize.json"))
    ap.add_argument("--table", type=Path, help="print the README tables from this results file and exit")
    ap.add_argument("--only", default="", help="comma list of row names' substrings (default: all rows)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each base model (from scratch)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.table:
        print(tables(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(args.threads)
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    names = {r["row"] for r in done}
    data = digits()
    for spec in ROWS:
        name = row_name(*spec)
        if name in names or (args.only and not any(s in name for s in args.only.split(","))):
            continue
        start = time.perf_counter()
        done.append(measure(spec, data, epochs=args.epochs, cache=args.out.parent))
        args.out.write_text(json.dumps(done, indent=1))
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(tables(done))


if __name__ == "__main__":
    main()
