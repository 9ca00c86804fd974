"""Export a model to ONNX with a dynamic batch axis, and verify the file against PyTorch.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter
(the default since torch 2.9). It exports every attention kind here with a symbolic batch
(and, on request, height and width), names those dims in the file, refuses at export
time a model whose code fixes a dim declared dynamic, and optimises the graph. The
TorchScript exporter (``dynamo=False``) also exports every kind, about ten times faster,
but it is deprecated ("will be removed"), leaves the graph unoptimised (dynconv on
resnet18: 1350 nodes against 321) and takes dynamic axes on trust; it is not used, and
there is no silent fallback to it.

The opset defaults to the exporter's own default (20). Opsets below 18 are refused: the
exporter's operator library is written for opset 18 and would have to down-convert, which
it may silently fail to do.

Verification loads the file with ``onnx.checker.check_model(full_check=True)``, runs it in
onnxruntime (CPUExecutionProvider) on seeded random inputs at batch 1 and 3 (the exported
batch only, with a static batch; one more height/width with dynamic height/width), and
compares with the PyTorch model in eval mode. The relative error is
``max|onnx - torch| / max|torch|``; a run passes when the absolute error is
``<= atol + VERIFY_RTOL * max|torch|`` (float32 rounds large outputs by more than ``atol``:
a trained ODConv-MobileNetV2, every conv per sample, differed by 1.08e-4 on its logits),
and, where PyTorch's outputs are below ``SMALL_OUTPUT`` (random weights of some families
give logits of 1e-9), when the relative error is ``<= SMALL_OUTPUT_RTOL`` too.

A run outside that tolerance is judged again against the model run in float64: it passes
when onnxruntime's error there is ``<= atol + FLOAT64_FACTOR x`` PyTorch's own float32
error. Some trained models round so much that the two float32 runs differ by more than any
fixed tolerance while both are as close to the exact result (an undertrained
SK-MobileNetV2 at 96x80: 4.8e-4 apart, 2.7e-4 allowed; 1.8e-4 and 3.3e-4 from float64);
an export bug is off by far more than float32 rounding.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError, VerificationError
from .files import atomic_write
from .options import (
    DEFAULT_OPSET,
    FLOAT64_FACTOR,
    MAX_OPSET,
    MIN_OPSET,
    SMALL_OUTPUT,
    SMALL_OUTPUT_RTOL,
    check_export_args,
)
from .render import print_export_summary  # re-exported: its old home
from .torch_state import evaluating, out_of_place
from .zoo import is_detector

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "VerificationError", "check_export_args",
           "describe_onnx", "export_onnx", "print_export_summary", "verify_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
VERIFY_BATCHES = (1, 3)
VERIFY_RTOL = 1e-5  # of the largest |output|; numpy.allclose's default rtol


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: int = 224,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    keep_failed: bool = False,
) -> dict[str, Any]:
    """Export ``model`` (in eval mode) to the ONNX file ``path``, then verify it.

    The file is written atomically: exported to a temp file beside ``path``, verified, then
    renamed, so a failure leaves no ``path`` behind (an existing one is overwritten only
    on success). The model's train/eval mode is restored afterwards.

    Args:
        model: takes one ``(N, 3, H, W)`` float tensor and returns one tensor.
        path: the ``.onnx`` file to write; weights are stored inside it.
        input_size: H = W of the example input.
        opset: ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET``.
        dynamic_batch: a symbolic ``batch`` dim (else the batch is fixed to 1).
        dynamic_hw: symbolic ``height`` and ``width`` dims.
        verify: run the checker and the onnxruntime-vs-PyTorch comparison.
        atol: largest max-absolute error that passes.
        keep_failed: keep the file when verification fails (the error still raises).

    Returns:
        The summary: file, size, opset, inputs/outputs with shapes, node count, export
        time and (with ``verify``) the verification figures.

    Raises:
        UsageError: bad arguments, or the exporter cannot export the model (the message
            names the module and the operator when they can be found).
        VerificationError: ``onnx.checker`` or onnxruntime rejects the file, or its outputs
            differ from PyTorch's by more than ``atol``.
    """
    check_export_args(input_size=input_size, opset=opset, atol=atol)
    path = Path(path)
    summary: dict[str, Any] = {"output": str(path)}
    model = _one_output(model, input_size=input_size)

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        _export(model, tmp, input_size=input_size, opset=opset,
                dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw)
        summary["export_seconds"] = round(time.perf_counter() - start, 3)
        summary.update(describe_onnx(tmp))
        summary["verification"] = None
        if verify:
            result = verify_onnx(model, tmp, input_size=input_size, atol=atol,
                                 dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw)
            summary["verification"] = result
            if not result["passed"] and not keep_failed:
                raise VerificationError(_failure(path, result, kept=False), summary, kept=False)

    with evaluating(model):
        atomic_write(path, write)
    if summary["verification"] is not None and not summary["verification"]["passed"]:
        raise VerificationError(_failure(path, summary["verification"], kept=True), summary, kept=True)
    return summary


class _SegmentationOutput(nn.Module):
    """A segmentation model whose ``{"out": ...}`` dict becomes its one output tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _one_output(model: nn.Module, *, input_size: int) -> nn.Module:
    """``model``, or a wrapper returning its ``"out"`` tensor (torchvision segmentation
    models return ``{"out": ..., "aux": ...}``; the file's one output is ``out``).

    Raises:
        UsageError: the output is not one tensor or such a dict (a detector's list of
            boxes per image, whose number depends on the image).
    """
    if is_detector(model):  # refused before any work: a detector's forward is seconds
        raise UsageError(
            f"{type(model).__name__} returns a list, not a tensor: export-onnx writes models with one "
            "tensor output (classifiers, segmentation models' 'out'); a detector's boxes per image "
            "are not supported")
    with evaluating(model), torch.no_grad():
        out = model(torch.zeros(1, 3, input_size, input_size))
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
        return _SegmentationOutput(model)
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"{type(model).__name__} returns a {type(out).__name__}, not a tensor: export-onnx "
                         "writes models with one tensor output (classifiers, segmentation models' 'out')")
    return model


def _float64_referee(exact_model: nn.Module | None, x: torch.Tensor, want: Any, have: Any, *,
                     atol: float) -> dict[str, Any]:
    """``torch_vs_float64`` and ``onnx_vs_float64`` (max abs errors against ``exact_model``,
    the model in float64, on ``x``) and ``passed`` by them (module docstring; ``atol`` 0 for
    outputs below ``SMALL_OUTPUT``, which atol would pass whatever they are); nothing where
    the model does not run in float64."""
    import numpy as np

    if exact_model is None:
        return {}
    try:
        with torch.no_grad():
            exact = exact_model(x.double()).numpy()
    except Exception:  # a module that cannot run in float64: the float32 tolerance decides
        return {}
    torch_error, onnx_error = float(np.max(np.abs(want - exact))), float(np.max(np.abs(have - exact)))
    return {"torch_vs_float64": torch_error, "onnx_vs_float64": onnx_error,
            "passed": onnx_error <= atol + FLOAT64_FACTOR * torch_error}


def _in_float64(model: nn.Module) -> nn.Module | None:
    """A float64 copy of ``model`` (None where it cannot be copied)."""
    import copy

    try:
        return copy.deepcopy(model).double()
    except Exception:
        return None


def _failure(path: Path, result: dict[str, Any], *, kept: bool) -> str:
    fate = f"kept {path} anyway (--keep-failed)" if kept else "no file written"
    if result["error"]:
        return f"{path.name} FAILED verification: {result['error']}; {fate}"
    worst = max((r for r in result["runs"] if not r["passed"]), key=lambda r: r["max_abs"])
    exact = (f", and {worst['onnx_vs_float64']:.3g} from float64 where PyTorch's float32 is "
             f"{worst['torch_vs_float64']:.3g}" if "onnx_vs_float64" in worst else "")
    return (f"{path.name} FAILED verification: max abs error {worst['max_abs']:.3g} at input "
            f"{worst['shape']} > atol {result['atol']:g} + rtol {result['rtol']:g} x max |output| "
            f"{worst['max_output']:.3g}{exact}; {fate}")


def _dynamic_shapes(dynamic_batch: bool, dynamic_hw: bool) -> tuple[dict[int, str]] | None:
    dims = {0: "batch"} if dynamic_batch else {}
    if dynamic_hw:
        dims |= {2: "height", 3: "width"}
    return (dims,) if dims else None


def _export(model: nn.Module, path: Path, *, input_size: int, opset: int,
            dynamic_batch: bool, dynamic_hw: bool) -> None:
    # batch 2: torch.export specialises dims whose example size is 0 or 1
    batch = 2 if dynamic_batch else 1
    example = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    try:
        with _quiet(), out_of_place(model):
            program = torch.onnx.export(
                model, (example,), dynamo=True, verbose=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=_dynamic_shapes(dynamic_batch, dynamic_hw),
            )
    except Exception as e:  # the exporter raises many types; all mean "cannot export"
        raise UsageError(_explain(e, model, dynamic=dynamic_batch or dynamic_hw)) from e
    if program is None:  # dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    _fold_weight_layouts(program.model)
    program.save(path, external_data=False)


_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice"})


def _fold_weight_layouts(model: Any) -> None:
    """Fold reshapes, transposes and slices of weights into the weights, whatever their size.

    The exporter folds constants only up to a size limit, so a large weight that a layer
    reshapes (ODConv's kernel bank) or slices (a depthwise dynamic convolution's K kernels)
    reaches its Conv or MatMul through ops, and a quantizer, which quantizes
    initializers only, leaves it in float. These ops move data without adding any; a
    large weight that other nodes also use is not copied (the folder's own output limit)."""
    from onnxscript.optimizer import fold_constants

    fold_constants(model, should_fold=lambda node: True if node.domain == "" and node.op_type in _LAYOUT_OPS
                   else None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute stderr and log records up to WARNING meanwhile: torch.export prints guard
    warnings and partial graphs there. A failure is reported through its exception."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _frames(chain: list[BaseException]) -> Iterator[Any]:
    """Every traceback frame of the chain, innermost exception and frame first."""
    for exc in reversed(chain):
        tb, frames = exc.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        yield from reversed(frames)


def _explain(exc: BaseException, model: nn.Module, *, dynamic: bool) -> str:
    """One line for an exporter failure: the module and operator where they can be found.

    A failed translation has the FX node being translated in a frame (its target is the
    operator, its ``nn_module_stack`` the module); a failed capture has the module whose
    ``forward`` raised in a frame.
    """
    chain = _chain(exc)
    names = {id(m): name for name, m in model.named_modules()}
    where = ""
    for frame in _frames(chain):
        node = frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            module = f"module {_clean_path(stack[-1][0])!r} ({_type_name(stack[-1][1])}), " if stack else ""
            where = f"{module}operator {node.target}"
            break
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and id(owner) in names:
            where = f"module {names[id(owner)] or '(root)'!r} ({type(owner).__name__})"
            break
    reason = _first_sentence(_strip_ansi(str(chain[-1]))) or type(chain[-1]).__name__
    if len(reason) > 300:
        reason = reason[:297] + "..."
    hint = ""
    if dynamic and "static shape" in reason:
        hint = " (the model fixes this dimension: try --static-batch, or drop --dynamic-hw)"
    elif dynamic and "Unsupported attribute type" in reason:
        hint = (" (an operator attribute depends on a dynamic dim, e.g. conv groups = batch x "
                "channels; ONNX attributes must be constants: try --static-batch)")
    return f"ONNX export failed{' in ' + where if where else ''}: {reason}{hint}"


def _first_sentence(message: str) -> str:
    """The first non-empty line, and the next one when the first ends with a colon."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


def _clean_path(path: str) -> str:
    """``"L['self'].layer4.0.conv2"`` or ``"layer4.0.conv2"`` -> ``"layer4.0.conv2"``."""
    return re.sub(r"^L\['self'\]\.?", "", path) or "(root)"


def _type_name(t: object) -> str:
    return getattr(t, "__name__", str(t).rsplit(".", 1)[-1].rstrip("'>"))


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """Size, opset, inputs/outputs (symbolic dims by name) and node count of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def values(items: Any) -> list[dict[str, Any]]:
        out = []
        for v in items:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    return {
        "file_size": os.path.getsize(path),
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": values(proto.graph.input),
        "outputs": values(proto.graph.output),
        "nodes": len(proto.graph.node),
    }


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: int,
    atol: float,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
) -> dict[str, Any]:
    """Check ``path`` and compare onnxruntime with ``model`` (already in eval mode).

    Returns:
        ``{"checker": "passed" | "failed", "error": None | str, "provider", "atol", "rtol",
        "passed", "seconds", "runs": [{"batch", "shape", "max_abs", "max_rel", "max_output", "passed"}]}``
        (a run outside the tolerance also has ``torch_vs_float64`` and ``onnx_vs_float64``);
        ``error`` says why the checker or onnxruntime rejected the file; ``small_outputs``
        (the largest |output|) is there when PyTorch's outputs are below ``SMALL_OUTPUT``
        and the relative error decided too.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    shapes = [(b, 3, input_size, input_size) for b in (VERIFY_BATCHES if dynamic_batch else (1,))]
    if dynamic_hw:
        shapes.append((shapes[-1][0], 3, input_size + 32, input_size + 16))
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(shape, generator=generator) for shape in shapes]
    with torch.no_grad():
        expected = [model(x).numpy() for x in inputs]
    result: dict[str, Any] = {"checker": "passed", "error": None, "provider": "CPUExecutionProvider",
                              "atol": atol, "rtol": VERIFY_RTOL, "passed": False, "runs": []}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no optimizer chatter on stderr
        session = ort.InferenceSession(str(path), options, providers=[result["provider"]])
        got = [session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] for x in inputs]
    except onnx.checker.ValidationError as e:
        result.update(checker="failed", error=f"onnx.checker: {_first_sentence(str(e))}")
    except Exception as e:  # onnxruntime's Fail, InvalidGraph, InvalidArgument, ...
        result["error"] = f"onnxruntime: {_first_sentence(str(e))}"
    else:
        in_float64 = functools.cache(lambda: _in_float64(model))  # copied once, if a run needs it
        for shape, x, want, have in zip(shapes, inputs, expected, got, strict=True):  # one output per input
            if have.shape != want.shape:
                result["error"] = (f"onnxruntime returns shape {list(have.shape)} for input {list(shape)}, "
                                   f"PyTorch {list(want.shape)}")
                break
            max_abs = float(np.max(np.abs(have - want)))
            scale = float(np.max(np.abs(want)))
            max_rel = max_abs / max(scale, float(np.finfo(np.float32).tiny))
            passed = max_abs <= atol + VERIFY_RTOL * scale  # NaN fails
            if scale < SMALL_OUTPUT:  # atol alone would pass anything: the relative error decides too
                result["small_outputs"] = max(result.get("small_outputs", 0.0), scale)
                passed = passed and max_rel <= SMALL_OUTPUT_RTOL
            run = {"batch": shape[0], "shape": list(shape), "max_abs": max_abs, "max_rel": max_rel,
                   "max_output": scale, "passed": passed}
            if not passed and not math.isnan(max_abs):  # ask float64 which side rounds
                run.update(_float64_referee(in_float64(), x, want, have, atol=atol if scale >= SMALL_OUTPUT else 0.0))
            result["runs"].append(run)
        result["passed"] = result["error"] is None and all(r["passed"] for r in result["runs"])
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
