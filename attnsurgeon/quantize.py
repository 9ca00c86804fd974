"""Quantized ONNX export (INT8, FP16), verified by agreement with the float PyTorch model.

INT8 is onnxruntime's static post-training quantization (``quantize_static``): QDQ format,
per-channel symmetric int8 weights, per-tensor uint8 activations whose ranges come from
calibration images (MinMax). uint8 activations with int8 weights ("U8S8") are what
onnxruntime's x86 kernels are fastest at; int8 activations ran several times slower than
float there. Before quantizing, :mod:`attnsurgeon.onnx_rewrites` writes the attention
modules' means, GC's attention pooling and narrow grouped convs with ops onnxruntime runs on
uint8 (the same functions); the model's outputs are not rounded to uint8. FP16 is onnxruntime's
own converter (``onnxruntime.transformers.float16``, the code ``onnxconverter-common``
ships, maintained in the onnxruntime tree) with ``keep_io_types``, so the file still takes
and returns float32: no new dependency, and the converter is tested against the same
runtime that verifies the file.

Attention-aware quantization. Gates are where post-training quantization breaks: a
sigmoid's output crowded near 1, a softmax's small weights, and the multiply of two
activations that applies them. :func:`attention_nodes` walks the exported graph and finds,
for every attention module the surgery added and every torchvision ``SqueezeExcitation`` the
model has of its own (by the exporter's name scopes), its nodes in three roles:

* ``gate``: the Sigmoid / HardSigmoid / Softmax that makes the attention weights, and the
  reshapes and constant affines that carry them to the apply (quantized, they would hand
  the apply a dequantized input, and onnxruntime fuses a multiply of two dequantized inputs
  whose output is quantized into a QLinearMul: the apply would not stay float);
* ``branch``: the gate and what computes its input back to the pooling (the squeeze's
  ReduceMean/ReduceMax, the MLP or 1-D conv, CBAM's 7x7 spatial conv, dynamic
  convolution's kernel-attention MLP, SK's select MLP), including a pooling the block's
  fused ``addcmul`` moved out of the module's scope;
* ``apply``: the Mul (or MatMul, for GC's attention pooling) that applies the weights to
  the feature map, wherever the exporter put it.

A Mul, Add, Sub or Div with a constant operand (a norm's affine, a blend ``1 + alpha (s - 1)``)
is an ordinary op of the branch, not an apply; a Sigmoid that feeds a Mul with its own input
is a SiLU activation, not a gate; a MatMul of two activations that makes a gate's input
(non-local's query-key product) belongs to the branch, and the walk back stops there.

A *policy* names the roles kept in float (:data:`POLICIES`); :data:`DEFAULT_POLICY` holds
each kind's default, chosen by measurement on trained models (``benchmarks/bench_quantize.py``,
README), and ``quantize_all`` quantizes everything.

Without calibration images INT8 is refused: static quantization fits activation ranges to
its inputs, and random inputs give ranges real images do not have (a file verified on them
says nothing about accuracy). FP16 needs no calibration; its agreement check uses the
held-out images when given, else seeded random inputs (and says so).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .onnx_rewrites import (
    attention_pools_channels_last,
    axis_means_as_convs,
    grouped_convs_as_dense,
    hard_gates_as_clips,
    links,
    outputs_in_float,
    own_biases,
    pools_out_of_range_as_means,
    sort_nodes,
    spatial_means_as_pools,
    tensor_dims,
)

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from torch import nn

__all__ = ["DEFAULT_MIN_AGREEMENT", "DEFAULT_POLICY", "POLICIES", "PRECISIONS", "ROLES", "attention_nodes",
           "check_module_paths", "check_policy_kinds", "check_quantize_args", "compare_outputs", "convert_fp16",
           "export_quantized", "kind_policies", "module_nodes", "nodes_to_keep_float", "onnxruntime_graph",
           "ort_latency", "parse_module_paths", "parse_policies", "policy_keeps", "print_quantized_summary",
           "quantize_int8", "run_as_integer"]

PRECISIONS = ("fp32", "fp16", "int8")
ROLES = ("gate", "branch", "apply")
POLICIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "gate": ("gate",),
    "gate+apply": ("gate", "apply"),
    "branch": ("branch",),
    "branch+apply": ("branch", "apply"),
}
# Each kind's default, as measured on trained models (benchmarks/bench_quantize.py, README,
# "Measured on trained models"): per kind, the most images agreeing with the float model
# (mean over three calibration draws, summed over the kind's rows of every seed whose float
# model reached 90% accuracy: the line `bench_quantize.py --table` prints), preferring the
# policy with fewer float nodes while it is within 0.25% of the images of the best, unless
# another such policy's INT8 file runs in under 3/4 of its time at 224x224, or agrees at least
# as well and runs in under 95% of it (EMA: its nodes run faster in float than through
# onnxruntime's quantize-dequantize pairs). "none" where keeping nodes in float measured no better.
DEFAULT_POLICY: dict[str, str] = {
    "se": "none",
    "eca": "none",
    "coord": "gate+apply",
    "cbam": "none",
    "gc": "none",
    "sk": "gate+apply",
    "dynconv": "gate+apply",
    "afp": "none",
    "ema": "branch+apply",
    "simam": "none",
    "triplet": "none",
    "nl": "branch+apply",
    "ela": "none",
    "odconv": "gate+apply",
}
DEFAULT_MIN_AGREEMENT = 0.9
LATENCY_THREADS = 2
LATENCY_ROUNDS = 15
CALIBRATION_BATCH = 8
CHECK_BATCH = 16  # held-out images a run in the agreement check
RANDOM_CHECK_IMAGES = 16

_GATE_OPS = {"Sigmoid", "HardSigmoid", "Softmax"}
_POOL_OPS = {"ReduceMean", "ReduceMax", "ReduceSum", "GlobalAveragePool", "GlobalMaxPool"}
_SHAPE_OPS = {"Transpose", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Slice", "Split",
              "Gather", "Identity", "Cast"}  # Gather: one path's weights of SK's softmax (a[:, m])
_APPLY_OPS = {"Mul", "MatMul"}
_AFFINE_OPS = {"Mul", "Add", "Sub", "Div"}


def check_quantize_args(*, precision: str, calibration: Path | None, quantize_all: bool,
                        min_agreement: float, count: int, keep_float: str | None = None,
                        policy: str | None = None) -> None:
    """Raise UsageError for options that do not fit together (before torch is imported)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" and calibration is not None:
        raise UsageError("--calibration is for --precision int8 or fp16 (fp32 is verified against PyTorch "
                         "on random inputs)")
    if quantize_all and precision != "int8":
        raise UsageError("--quantize-all is for --precision int8")
    if keep_float is not None and precision != "int8":
        raise UsageError("--keep-float is for --precision int8")
    if policy is not None and precision != "int8":
        raise UsageError("--policy is for --precision int8")
    if policy is not None and quantize_all:
        raise UsageError("--policy and --quantize-all do not go together (--quantize-all quantizes every node)")
    if precision == "int8" and calibration is None:
        raise UsageError("--precision int8 needs --calibration DIR: static quantization fits its activation "
                         "ranges to real images (random inputs give ranges real images do not have)")
    if not 0.0 <= min_agreement <= 1.0:  # also rejects NaN
        raise UsageError(f"--min-agreement must be between 0 and 1, got {min_agreement}")
    if calibration is not None:
        from .calibration import MAX_COUNT

        if not 2 <= count <= MAX_COUNT:
            raise UsageError(f"--calibration-count must be between 2 and {MAX_COUNT}, got {count}")
    parse_module_paths(keep_float)  # the paths' syntax; whether the model has them is checked once it is built
    parse_policies(policy)


def parse_policies(text: str | None) -> dict[str, str]:
    """``--policy``'s comma list of ``KIND=POLICY`` (``se=branch,sk=none``): each named kind's
    policy instead of its measured default, for a model that measures otherwise (EfficientNet-B0
    on digits agreed on 1,279 of 1,440 images with its SE's branch in float, 1,240 under SE's
    default ``none``; README)."""
    if text is None:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        kind, eq, policy = (t.strip() for t in item.partition("="))
        if not eq or not kind or not policy:
            raise UsageError(f"--policy takes KIND=POLICY pairs separated by commas (e.g. se=branch), got {text!r}")
        if kind not in DEFAULT_POLICY:
            raise UsageError(f"--policy: unknown kind {kind!r} (kinds: {', '.join(DEFAULT_POLICY)})")
        if policy not in POLICIES:
            raise UsageError(f"--policy: unknown policy {policy!r} for {kind} (policies: {', '.join(POLICIES)})")
        out[kind] = policy
    return out


def parse_module_paths(text: str | None) -> tuple[str, ...]:
    """``--keep-float``'s comma list of dotted module paths (``features.0,layer4.1``)."""
    if text is None:
        return ()
    paths = tuple(p.strip() for p in text.split(","))
    for p in paths:
        if not p or not all(part.isidentifier() or part.isdigit() for part in p.split(".")):
            raise UsageError(f"--keep-float takes dotted module paths separated by commas (as 'attnsurgeon blocks' "
                             f"names them, e.g. features.0,layer4.1), got {text!r}")
    return tuple(dict.fromkeys(paths))


# ---------------------------------------------------------------- graph walk


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(prop.value)
                if isinstance(value, list):
                    return [str(v) for v in value]
    return []


def _owners(nodes: list[onnx.NodeProto], paths: Iterable[str]) -> dict[str, str]:
    """Node name -> the innermost of ``paths`` (dotted module paths) whose scope traced it."""
    paths = list(paths)
    owner: dict[str, str] = {}
    for n in nodes:
        for scope in reversed(_scopes(n)):
            path = next((p for p in paths if scope == p or scope.startswith(p + ".")), None)
            if path is not None:
                owner[n.name] = path
                break
    return owner


def check_module_paths(model: nn.Module, paths: tuple[str, ...]) -> None:
    """Raise UsageError for a ``--keep-float`` path that names no module of ``model``."""
    for p in paths:
        try:
            model.get_submodule(p)
        except AttributeError:
            children = ", ".join(name for name, _ in model.named_children())
            raise UsageError(f"--keep-float: {type(model).__name__} has no module {p!r} (its top-level modules: "
                             f"{children}; 'attnsurgeon blocks MODEL' lists the blocks)") from None


def check_policy_kinds(model: nn.Module, policies: dict[str, str]) -> None:
    """Raise UsageError for a ``--policy`` kind that ``model`` has no module of: it would
    change nothing, where the user asked for a change."""
    have = sorted(set(_module_kinds(model).values()))
    for kind in policies:
        if kind not in have:
            raise UsageError(f"--policy: {type(model).__name__} has no {kind} module (its attention kinds: "
                             f"{', '.join(have) or 'none'})")


def module_nodes(proto: onnx.ModelProto, model: nn.Module, paths: tuple[str, ...], *, prefix: str = "",
                 attention: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Every node traced inside the modules of ``model`` at ``paths`` (``--keep-float``), as
    :func:`attention_nodes` gives them, with role ``keep-float`` and the kind of the attention
    module it belongs to (by ``attention``, the graph's :func:`attention_nodes`, or by scope;
    "-" for the model's own nodes). ``prefix`` is what the exported graph's scopes put before
    ``model``'s paths (a wrapper's attribute name).

    Raises:
        UsageError: a path names no module of ``model``, or a module with no node in the graph.
    """
    check_module_paths(model, paths)
    nodes = list(proto.graph.node)
    owner = _owners(nodes, [prefix + p for p in paths])
    for p in paths:
        if prefix + p not in owner.values():
            raise UsageError(f"--keep-float: module {p!r} has no node in the exported graph (it does not run, "
                             "or the exporter folded it into a neighbour, as a conv into the batch norm after it: "
                             "name the norm or the block)")
    kinds = {prefix + path: kind for path, kind in _module_kinds(model).items()}
    kind = {name: kinds[path] for name, path in _owners(nodes, kinds).items()}
    kind.update({a["node"]: a["kind"] for a in attention or []})  # a fused squeeze or multiply, out of scope
    return [{"node": n.name, "op": n.op_type, "module": owner[n.name][len(prefix):],
             "kind": kind.get(n.name, "-"), "role": "keep-float"} for n in nodes if n.name in owner]


def _module_kinds(model: nn.Module) -> dict[str, str]:
    """Dotted path of each attention module -> its kind: the modules the surgery added (by the
    registry's builders), and the model's own torchvision ``SqueezeExcitation`` (MobileNetV3,
    EfficientNet, RegNetY: the SE the issue's users ship), which is SE's pooling, MLP, gate and
    multiply and is quantized by SE's policy."""
    from torchvision.ops import SqueezeExcitation

    from .kinds import KINDS
    from .training import new_modules

    by_module = {spec.builder.partition(":")[0]: name for name, spec in KINDS.items()}
    kinds = {path: by_module[type(m).__module__] for path, m in new_modules(model)
             if type(m).__module__ in by_module}
    kinds.update({path: "se" for path, m in model.named_modules() if isinstance(m, SqueezeExcitation)})
    return kinds


def attention_nodes(proto: onnx.ModelProto, model: nn.Module) -> list[dict[str, str]]:
    """Every node of an attention module's gate, as ``{"node", "op", "module", "kind", "role"}``.

    ``model`` is the PyTorch module that was exported (its module paths are the exporter's
    name scopes). Roles are described in the module docstring; a node has one role, the
    first of gate, apply, branch that fits.
    """
    kinds = _module_kinds(model)
    if not kinds:
        return []
    nodes = list(proto.graph.node)
    producer, consumers = links(nodes)
    constants = {t.name for t in proto.graph.initializer} | {t for n in nodes if n.op_type == "Constant"
                                                              for t in n.output}

    def by_constant(n: onnx.NodeProto) -> bool:
        """An elementwise op on one activation and constants (an affine, a blend): not an apply."""
        return n.op_type in _AFFINE_OPS and sum(t not in constants for t in n.input) == 1

    def silu(n: onnx.NodeProto) -> bool:
        """A Sigmoid whose output multiplies its own input: the x * sigmoid(x) activation."""
        return n.op_type == "Sigmoid" and any(c.op_type == "Mul" and n.input[0] in c.input
                                              for c in consumers.get(n.output[0], []))

    def silu_product(n: onnx.NodeProto) -> bool:
        """The Mul of x * sigmoid(x)."""
        return n.op_type == "Mul" and any(t in producer and silu(producer[t]) for t in n.input)
    owner = _owners(nodes, kinds)
    found: dict[str, dict[str, str]] = {}

    def add(n: onnx.NodeProto, path: str, role: str) -> None:
        found.setdefault(n.name, {"node": n.name, "op": n.op_type, "module": path, "kind": kinds[path],
                                  "role": role})

    for path in kinds:
        region = [n for n in nodes if owner.get(n.name) == path]
        gates = [n for n in region if n.op_type in _GATE_OPS and not silu(n)]
        for g in gates:
            add(g, path, "gate")
        # apply: from each gate's output through shape ops to the multiply (in the module or in
        # the block, where a fused addcmul put it)
        stack = [t for g in gates for t in g.output]
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            for c in consumers.get(t, []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in _SHAPE_OPS or by_constant(c):
                    add(c, path, "gate")  # carries the weights to the apply: kept with the gate
                    stack.extend(c.output)
                elif c.op_type in _APPLY_OPS:
                    add(c, path, "apply")
        # branch: the gate's ancestors inside the module, back to (and including) the pooling,
        # which may lie outside the module's scope
        stack = [t for g in gates for t in g.input]
        seen = set()
        while stack:
            t = stack.pop()
            p = producer.get(t)
            if p is None or p.name in seen:
                continue
            seen.add(p.name)
            inside = owner.get(p.name) == path
            if p.op_type in _POOL_OPS and (inside or owner.get(p.name) is None):
                add(p, path, "branch")  # the squeeze: stop here
            elif inside and p.op_type == "MatMul" and not by_constant(p):
                add(p, path, "branch")  # a product of two activations making a gate's logits: stop
                # here, with the reshapes and constant scales that make its operands: kept with it,
                # they give it a float operand (quantized, or with dequantized inputs only, which
                # onnxruntime moves past reshapes, it is fused into a slower MatMulIntegerToFloat)
                operands = list(p.input)
                while operands:
                    q = producer.get(operands.pop())
                    if q is not None and owner.get(q.name) == path and (q.op_type in _SHAPE_OPS or by_constant(q)):
                        add(q, path, "branch")
                        operands.extend(q.input)
            elif inside and (p.op_type not in _APPLY_OPS or by_constant(p) or silu_product(p)):
                add(p, path, "branch")
                stack.extend(p.input)
            elif owner.get(p.name) is None and p.op_type in _SHAPE_OPS:
                stack.extend(p.input)  # a reshape of the fused pooling, outside the scope
    return [found[n.name] for n in nodes if n.name in found]


def policy_keeps(policy: str, role: str) -> bool:
    """Whether ``policy`` keeps a node of ``role`` in float (a branch holds its gate)."""
    roles = POLICIES[policy]
    return role in roles or (role == "gate" and "branch" in roles)


def kind_policies(kinds: Iterable[str], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The policy of each of ``kinds``: ``overrides`` (``--policy``) where given, else its default."""
    overrides = overrides or {}
    return {k: overrides.get(k, DEFAULT_POLICY.get(k, "none")) for k in sorted(set(kinds))}


def nodes_to_keep_float(attn: list[dict[str, str]], *, quantize_all: bool,
                        policies: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The attention nodes their kinds' policies keep in float (:func:`kind_policies`; none
    with ``quantize_all``)."""
    if quantize_all:
        return []
    chosen = kind_policies((a["kind"] for a in attn), policies)
    return [a for a in attn if policy_keeps(chosen[a["kind"]], a["role"])]


# ---------------------------------------------------------------- converters


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger at WARNING; mute it meanwhile."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_int8(float_path: Path, out_path: Path, images: np.ndarray, *, exclude: list[str],
                  show_progress: bool = True, batch: int = CALIBRATION_BATCH) -> dict[str, Any]:
    """Static INT8 quantization of ``float_path`` into ``out_path``, calibrated on ``images``.

    The graph quantized is ``float_path``'s with its spatial means as pools
    (:func:`~attnsurgeon.onnx_rewrites.spatial_means_as_pools`; a mean in ``exclude`` stays in
    float with its Squeeze), its one-axis means as depthwise convs (``axis_means_as_convs``), its
    attention poolings on the map's channels-last rows (``attention_pools_channels_last``), its
    HardSigmoids and HardSwishes as Clips of an affine conv (``hard_gates_as_clips``) and its
    narrow grouped convs dense (``grouped_convs_as_dense``), the last four not for nodes in
    ``exclude``; the quantized file's outputs are left in float (``outputs_in_float``). ``batch``
    images calibrate at a time: 1 for a file with a static batch."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from .calibration import progress_bar
    from .onnx_export import INPUT_NAME

    batches = [images[i:i + batch] for i in range(0, len(images), batch)]

    start = time.perf_counter()
    proto = onnx.load(str(float_path))
    dims = tensor_dims(proto)  # the rewrites below leave the tensors they read as they were
    pools = spatial_means_as_pools(proto, dims=dims)
    axis_means = axis_means_as_convs(proto, skip=exclude, dims=dims)
    channels_last = attention_pools_channels_last(proto, skip=exclude, dims=dims)
    hard = hard_gates_as_clips(proto, skip=exclude, dims=dims)
    dense = grouped_convs_as_dense(proto, skip=exclude)
    own_biases(proto)
    exclude = [*exclude, *(squeeze for n in exclude if (squeeze := pools.get(n)))]
    with (tempfile.TemporaryDirectory(prefix="attnsurgeon-") as tmp,
          progress_bar("calibrating", total=len(batches), enabled=show_progress) as advance, _quiet_logs()):
        source = Path(tmp) / "pooled.onnx"
        onnx.save(proto, str(source))
        del proto
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(batches)

            def get_next(self) -> dict[str, Any] | None:
                batch = next(self._it, None)
                if batch is None:
                    return None
                advance()
                return {INPUT_NAME: batch}

        quantize_static(str(source), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
        # no CalibMaxIntermediateOutputs: onnxruntime's MinMax calibrater (1.32) drops, not merges,
        # the ranges it has collected each time it reaches that many batches (onnxruntime#18893), so
        # it calibrated on the last few batches only and failed on a multiple of it. Every batch's
        # outputs here are per-tensor minima and maxima, a few numbers each: keeping them is cheap.
    quantized = onnx.load(str(out_path))
    reverted = pools_out_of_range_as_means(quantized)
    freed = outputs_in_float(quantized)
    if reverted or freed:
        onnx.save(quantized, str(out_path))
    return {"method": "onnxruntime quantize_static", "format": "QDQ", "weights": "int8, per-channel, symmetric",
            "activations": "uint8, per-tensor", "calibrate_method": "MinMax", "means_as_pools": len(pools) - reverted,
            "axis_means_as_convs": len(axis_means), "pools_channels_last": len(channels_last),
            "hard_gates_as_clips": len(hard),
            "grouped_as_dense": len(dense), "float_outputs": freed,
            "seconds": round(time.perf_counter() - start, 3)}


def convert_fp16(float_path: Path, out_path: Path) -> dict[str, Any]:
    """FP16 weights and compute, float32 input and output (``keep_io_types``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    start = time.perf_counter()
    with _quiet_logs():
        proto = convert_float_to_float16(onnx.load(str(float_path)), keep_io_types=True)
    sort_nodes(proto.graph)  # the converter appends the input casts after their consumers
    onnx.save(proto, str(out_path))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------- checks


def _session(path: Path, *, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:  # a timing session: see ort_latency
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_graph(path: Path) -> onnx.GraphProto:
    """The graph onnxruntime's CPU provider runs for ``path``: after its extended
    optimizations, which include the QDQ fusions (fused nodes keep the node's name)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="attnsurgeon-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath).graph


def run_as_integer(path: Path, nodes: list[dict[str, str]]) -> list[dict[str, str]]:
    """Those of ``nodes`` (kept in float in the QDQ file ``path``) that onnxruntime's CPU
    provider fuses into an integer op all the same, each with ``ran_as``.

    In a QDQ file, ``DequantizeLinear -> op -> QuantizeLinear`` is a quantized op to a runtime:
    onnxruntime runs a "float" Sigmoid between them as a QLinearSigmoid, and moves dequantize
    nodes past reshapes to get there. Read from :func:`onnxruntime_graph`, so that the summary
    does not call such a node float."""
    integer = {n.name: n.op_type for n in onnxruntime_graph(path).node
               if n.op_type.startswith("QLinear") or "Integer" in n.op_type or n.op_type == "QGemm"}
    return [{**a, "ran_as": integer[a["node"]]} for a in nodes if a["node"] in integer]


def compare_outputs(model: nn.Module, path: Path, images: np.ndarray, *,
                    batch: int = CHECK_BATCH) -> dict[str, Any]:
    """Top-1 agreement and cosine similarity of ``path`` (onnxruntime) with ``model`` (eval).

    Top-1 is the argmax over dim 1 (the class; per pixel for segmentation outputs); the
    cosine is between one image's whole outputs, flattened.
    """
    import numpy as np
    import torch

    from .onnx_export import INPUT_NAME, OUTPUT_NAME

    session = _session(path)
    agree = total = 0
    cosines: list[float] = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).float().numpy()
        have = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32)
        agree += int((want.argmax(1) == have.argmax(1)).sum())
        total += want.argmax(1).size
        a, b = want.reshape(len(x), -1).astype(np.float64), have.reshape(len(x), -1).astype(np.float64)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.extend((np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)).tolist())
    return {"images": len(images), "top1_agreement": agree / max(total, 1), "agreeing": agree, "compared": total,
            "cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines))}


def ort_latency(paths: list[Path], *, input_size: int, batch: int = 1, threads: int = LATENCY_THREADS,
                rounds: int = LATENCY_ROUNDS) -> list[float]:
    """Median onnxruntime CPU latency (ms) of each file, rounds interleaved (ABAB...).

    The sessions' intra-op threads do not spin-wait between ops (onnxruntime's default is to
    spin): where the threads fill the cores, spinning threads compete with the caller's. On
    this project's 2-core VM, with 2 threads, ResNet-18 + SK at 224x224 took 40-56 ms in
    float with spinning and 21-24 ms without; its INT8 speed-up read x1.04 to x1.77 over
    repeats with spinning and x1.44 to x1.53 without."""
    import numpy as np

    from .onnx_export import INPUT_NAME

    x = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)
    sessions = [_session(p, threads=threads) for p in paths]
    for s in sessions:
        for _ in range(3):
            s.run(None, {INPUT_NAME: x})
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter()
            sessions[i].run(None, {INPUT_NAME: x})
            times[i].append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


# ---------------------------------------------------------------- the export


def export_quantized(
    model: nn.Module,
    path: Path,
    *,
    precision: str,
    input_size: int,
    opset: int,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    atol: float = 1e-4,
    calibration: dict[str, Any] | None = None,
    images: np.ndarray | None = None,
    quantize_all: bool = False,
    keep_float: tuple[str, ...] = (),
    policies: dict[str, str] | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    keep_failed: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Export ``model`` to float ONNX (verified as always), convert it to ``precision``, and
    verify the converted file by agreement with ``model`` on held-out images.

    ``images`` are the preprocessed calibration images (the first part calibrates, the rest
    is held out; see :func:`attnsurgeon.calibration.split`); ``calibration`` describes them
    for the report. ``keep_float`` names modules of ``model`` whose every node stays in float
    (int8), beside the attention defaults; ``policies`` replaces some kinds' defaults
    (``--policy``). The float file is a temp file; only ``path`` is
    written, atomically.

    Raises:
        UsageError: as :func:`attnsurgeon.onnx_export.export_onnx`.
        VerificationError: the float graph fails its check, or the converted file fails the
            checker, onnxruntime, or agreement below ``min_agreement`` (the file is removed
            unless ``keep_failed``).
    """
    import numpy as np
    import onnx
    import torch

    from .calibration import split
    from .checkpoint import atomic_write
    from .layers.odconv import has_unfolded_form, quantizable_export
    from .onnx_export import VerificationError, _one_output, describe_onnx, export_onnx
    from .torch_state import evaluating

    if precision not in ("fp16", "int8"):
        raise ValueError(f"precision must be fp16 or int8, got {precision!r}")
    if precision == "int8" and images is None:
        raise UsageError("--precision int8 needs --calibration DIR")
    path = Path(path)
    original = model
    check_module_paths(original, keep_float)
    check_policy_kinds(original, policies or {})
    model = _one_output(model, input_size=input_size)
    prefix = "" if model is original else "model."  # _SegmentationOutput's attribute
    if images is not None:
        n_cal, _ = split(len(images))
        calibrate, held_out = images[:n_cal], images[n_cal:]
        check_source = "held-out calibration images"
    else:
        calibrate = None
        held_out = torch.randn(RANDOM_CHECK_IMAGES, 3, input_size, input_size,
                               generator=torch.Generator().manual_seed(2)).numpy()
        check_source = f"{RANDOM_CHECK_IMAGES} random N(0,1) inputs (no --calibration given)"
    # a --static-batch file takes one image a run
    calibration_batch, check_batch = (CALIBRATION_BATCH, CHECK_BATCH) if dynamic_batch else (1, 1)

    with tempfile.TemporaryDirectory(prefix="attnsurgeon-") as tmp_dir, evaluating(model):
        float_path = Path(tmp_dir) / f"{path.stem}.fp32.onnx"
        # INT8: the forms whose weights a quantizer can see (ODConv's kernel bank as a conv weight)
        forms = quantizable_export() if precision == "int8" else contextlib.nullcontext()
        try:
            with forms:
                summary = export_onnx(model, float_path, input_size=input_size, opset=opset,
                                      dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, verify=True, atol=atol,
                                      keep_failed=False)
        except VerificationError as e:
            e.summary["output"] = str(path)
            raise VerificationError(f"{path.name}: the fp32 graph before conversion failed its check ({e}); "
                                    "no file written", e.summary, kept=False) from None
        float_ref = float_path  # the float file the converted one is timed against
        if precision == "int8" and has_unfolded_form(model):
            # the float file export-onnx writes (the positions form, K times fewer multiply-adds)
            float_ref = Path(tmp_dir) / f"{path.stem}.fp32-positions.onnx"
            export_onnx(model, float_ref, input_size=input_size, opset=opset, dynamic_batch=dynamic_batch,
                        dynamic_hw=dynamic_hw, verify=False)
        summary["output"] = str(path)
        summary["precision"] = precision
        float_info = {"file_size": summary["file_size"], "nodes": summary["nodes"]}
        q: dict[str, Any] = {"precision": precision, "calibration": calibration, "float_nodes": [],
                             "check_images": check_source, "min_agreement": min_agreement}
        summary["quantized"] = q

        def write(tmp: Path) -> None:
            if precision == "int8":
                if calibrate is None:
                    raise UsageError("--precision int8 needs --calibration DIR")
                proto = onnx.load(str(float_path), load_external_data=False)
                attn = attention_nodes(proto, model)
                keep = nodes_to_keep_float(attn, quantize_all=quantize_all, policies=policies)
                kept = {a["node"] for a in keep}
                keep += [a for a in module_nodes(proto, original, keep_float, prefix=prefix, attention=attn)
                         if a["node"] not in kept]
                q["attention_nodes"] = len(attn)
                q["quantize_all"] = quantize_all
                q["keep_float"] = list(keep_float)
                q["policies"] = {} if quantize_all else kind_policies((a["kind"] for a in attn), policies)
                q["policy_overrides"] = dict(policies or {})
                q["float_nodes"] = keep
                q.update(quantize_int8(float_path, tmp, calibrate, exclude=[a["node"] for a in keep],
                                       show_progress=show_progress, batch=calibration_batch))
                try:
                    q["run_as_integer"] = run_as_integer(tmp, keep)
                except Exception:  # onnxruntime cannot load the file: the agreement check below reports why
                    q["run_as_integer"] = None
            else:
                q.update(convert_fp16(float_path, tmp))
            q.update(describe_onnx(tmp))
            q["error"] = None
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
                q["agreement"] = compare_outputs(model, tmp, held_out, batch=check_batch)
            except Exception as e:  # onnx.checker's ValidationError, onnxruntime's Fail, ...
                from .onnx_export import _first_sentence

                q["agreement"] = None
                q["error"] = f"{type(e).__name__}: {_first_sentence(str(e))}"
            if q["agreement"] is not None:
                float_ms, quant_ms = ort_latency([float_ref, tmp], input_size=input_size)
                q["latency"] = {"float_ms": float_ms, "quantized_ms": quant_ms, "speedup": float_ms / quant_ms,
                                "threads": LATENCY_THREADS, "spin_wait": False, "batch": 1, "rounds": LATENCY_ROUNDS,
                                "provider": "CPUExecutionProvider"}
            else:
                q["latency"] = None
            q["float_file_size"] = float_info["file_size"]
            q["size_ratio"] = q["file_size"] / float_info["file_size"]
            agreement = q["agreement"]["top1_agreement"] if q["agreement"] else float("nan")
            q["passed"] = q["error"] is None and bool(np.isfinite(agreement)) and agreement >= min_agreement
            summary["file_size"], summary["nodes"] = q["file_size"], q["nodes"]
            summary["inputs"], summary["outputs"] = q["inputs"], q["outputs"]
            if not q["passed"] and not keep_failed:
                raise VerificationError(_failure(path, q, kept=False), summary, kept=False)

        atomic_write(path, write)
    if not q["passed"]:
        raise VerificationError(_failure(path, q, kept=True), summary, kept=True)
    return summary


def _failure(path: Path, q: dict[str, Any], *, kept: bool) -> str:
    fate = f"kept {path} anyway (--keep-failed)" if kept else "no file written"
    if q["error"]:
        return f"{path.name} ({q['precision']}) FAILED verification: {q['error']}; {fate}"
    a = q["agreement"]
    return (f"{path.name} ({q['precision']}) FAILED verification: top-1 agreement with the float model "
            f"{a['top1_agreement']:.1%} ({a['agreeing']}/{a['compared']}) < --min-agreement "
            f"{q['min_agreement']:.1%}; {fate}")


def _fmt_size(n: int) -> str:
    from .render import si

    return si(n, "B")


# how the summary names each graph rewrite's count (its --json key): one, several, what became of them
_REWRITE_WORDS = (
    ("means_as_pools", "mean", "means", "over H, W as uint8 GlobalAveragePool"),
    ("axis_means_as_convs", "mean", "means", "over H or W as uint8 depthwise conv"),
    ("pools_channels_last", "attention pooling", "attention poolings", "on channels-last rows"),
    ("hard_gates_as_clips", "hard sigmoid or swish", "hard sigmoids or swishes", "as Clip of a uint8 conv"),
    ("grouped_as_dense", "narrow grouped conv", "narrow grouped convs", "as dense"),
)


def print_quantized_summary(console: Any, data: dict[str, Any]) -> None:
    """Print the float graph's check (as for fp32) and then the converted file's figures."""
    from rich.markup import escape

    from .onnx_export import print_export_summary

    q = data["quantized"]
    float_view = {**data, "output": f"{data['output']} (fp32 graph, before conversion)",
                  "file_size": q.get("float_file_size", data["file_size"])}
    print_export_summary(console, float_view)

    def line(text: str, style: str | None = None) -> None:
        console.print(text, style=style, highlight=False, soft_wrap=True)

    if q["precision"] == "int8":
        rewrites = "".join(f"; {n} {one if n == 1 else many} {how}" for key, one, many, how in _REWRITE_WORDS
                           if (n := q.get(key)))
        line(f"[bold]int8[/]: {q['method']}, {q['format']}, weights {q['weights']}, activations "
             f"{q['activations']} ({q['calibrate_method']}){rewrites}"
             + ("; outputs in float (the last op's result not rounded to uint8)" if q.get("float_outputs") else ""))
    else:
        line(f"[bold]fp16[/]: {q['method']} (keep_io_types: float32 input and output)")
    c = q.get("calibration")
    if c:
        p = c["preprocessing"]
        line(f"  calibration: {escape(c['folder'])}: {c['calibrate']} images calibrate, {c['held_out']} held out "
             f"(of {c['images']} used); resize {p['resize']} -> crop {p['crop']}, mean "
             f"{escape(str(p['mean']))}, std {escape(str(p['std']))} ({escape(p['source'])})")
    if q["precision"] == "int8":
        from collections import Counter

        def nodes(found: list[dict[str, str]], what: str) -> str:
            ops = ", ".join(f"{op} {n}" for op, n in Counter(a["op"] for a in found).most_common())
            modules = len({a["module"] for a in found})
            return f"{len(found)} nodes of {modules} {what}{'s' if modules != 1 else ''} ({ops})"

        def mine(kind: str) -> str:
            return " (--policy)" if kind in q.get("policy_overrides", {}) else ""

        attn = [a for a in q["float_nodes"] if a["role"] != "keep-float"]
        user = [a for a in q["float_nodes"] if a["role"] == "keep-float"]
        none = "no attention node" if user else "nothing"
        if q.get("quantize_all"):
            line(f"  kept in float: {none} (--quantize-all)")
        elif attn:
            why = "; ".join(f"{k}: {v} ({'+'.join(POLICIES[v]) or 'nothing'}){mine(k)}"
                            for k, v in q["policies"].items())
            source = ("policies (--policy, else the measured defaults)" if q.get("policy_overrides") else
                      "defaults, measured on trained models")
            line(f"  kept in float: {nodes(attn, 'attention module')}; attention-aware {source}: {why}")
        elif q.get("attention_nodes"):
            why = "; ".join(f"{k}: {v}{mine(k)}" for k, v in q["policies"].items())
            line(f"  kept in float: {none} (the measured defaults quantize these kinds whole: {why})")
        else:
            line(f"  kept in float: {none} (no attention module in the model)")
        if user:
            line(f"  kept in float (--keep-float {escape(','.join(q['keep_float']))}): "
                 f"{nodes(user, 'module')}")
        fused = q.get("run_as_integer")
        if fused:
            ops = ", ".join(f"{op} {n}" for op, n in Counter(a["ran_as"] for a in fused).most_common())
            line(f"  of those, onnxruntime's CPU provider fuses {len(fused)} into integer ops ({ops}): float in "
                 "the file, INT8 when onnxruntime runs it", style="yellow")
    a = q.get("agreement")
    if a is not None:
        verdict = "[bold green]PASSED[/]" if q["passed"] else "[bold red]FAILED[/]"
        on = "random N(0,1) inputs" if q.get("calibration") is None else "held-out images"
        line(f"  vs PyTorch float on {a['images']} {on}: "
             f"top-1 agreement {a['top1_agreement']:.1%} ({a['agreeing']}/{a['compared']}), cosine mean "
             f"{a['cosine_mean']:.4f}, min {a['cosine_min']:.4f}; --min-agreement {q['min_agreement']:.0%}: {verdict}")
    if q.get("error"):
        line(f"  {escape(q['error'])}", style="red")
    line(f"  size: {_fmt_size(q['float_file_size'])} (fp32) -> {_fmt_size(q['file_size'])} ({q['precision']}), "
         f"x{q['size_ratio']:.2f}")
    lat = q.get("latency")
    if lat:
        line(f"  CPU latency (onnxruntime, {lat['threads']} threads not spin-waiting, batch {lat['batch']}, "
             f"median of {lat['rounds']} interleaved rounds): fp32 {lat['float_ms']:.2f} ms, "
             f"{q['precision']} {lat['quantized_ms']:.2f} ms (x{lat['speedup']:.2f})")
