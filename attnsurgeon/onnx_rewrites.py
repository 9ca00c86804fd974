"""Rewrites of an ONNX graph, in place, that keep its function and let onnxruntime's CPU
provider run more of a quantized model on integer kernels (or let the quantizer handle it).

onnxruntime runs a quantized op on uint8 only where it has a kernel for it (QLinearConv,
QLinearGlobalAveragePool, QLinearMatMul, ...); any other op between a DequantizeLinear and a
QuantizeLinear runs in float and pays for both. Each rewrite here turns a pattern of the
exported graph (mostly its attention modules') into the same function written with ops that do
have such a kernel, or in the memory order the quantized convs already use: spatial and
one-axis means as pools and depthwise convs, GC's attention pooling on channels-last rows,
hard sigmoids and hard swishes as Clips of a conv, narrow grouped convs as dense ones. The
others prepare or finish the quantizer's file (biases of their own, outputs in float, pools
its kernel would refuse back as means). Each one's docstring holds what it measured;
:func:`attnsurgeon.quantize.quantize_int8` applies them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

__all__ = ["DENSE_GROUP_WIDTH", "attention_pools_channels_last", "axis_means_as_convs", "grouped_convs_as_dense",
           "hard_gates_as_clips", "links", "outputs_in_float", "own_biases", "pools_out_of_range_as_means",
           "sort_nodes", "spatial_means_as_pools", "tensor_dims"]


def links(nodes: Iterable[onnx.NodeProto]) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Each tensor's producing node, and its consuming nodes."""
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        producer.update((t, n) for t in n.output)
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    return producer, consumers


def _hw_axes(graph: onnx.GraphProto, name: str) -> str:
    """Add an int64 initializer ``[2, 3]`` (height and width) named ``name``; return the name."""
    import numpy as np
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), name))
    return name


def tensor_dims(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Each tensor's dims by ONNX shape inference, 0 where a dim is symbolic or unknown; a tensor
    whose rank inference cannot tell is missing. (The exporter's own value_info where inference
    fails: a model over protobuf's 2 GiB, an op it does not know.)"""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:
        inferred = proto.graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.value_info, *inferred.input) if v.type.tensor_type.HasField("shape")}


def _constant_mean(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> tuple[set[int], dict[str, Any]] | None:
    """The axes (of a 4-D input, made non-negative) and the attributes of a ReduceMean over
    constant axes; None for any other node, and for a mean that is a no-op on empty axes."""
    from onnx import helper, numpy_helper

    if (node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or len(node.input) != 2
            or node.input[1] not in consts):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("noop_with_empty_axes", 0):
        return None
    return {int(a) % 4 for a in numpy_helper.to_array(consts[node.input[1]]).reshape(-1)}, attrs


def _set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], detached: set[str]) -> None:
    """Replace ``graph``'s nodes with ``nodes`` and drop the ``detached`` initializers no node
    reads any more (onnxruntime warns of unused initializers)."""
    del graph.node[:]
    graph.node.extend(nodes)
    unused = detached - {t for n in nodes for t in n.input}
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def spatial_means_as_pools(proto: onnx.ModelProto, *,
                           dims: dict[str, list[int]] | None = None) -> dict[str, str | None]:
    """Rewrite, in place, each ReduceMean over the height and width of a 4-D tensor as a
    GlobalAveragePool (followed by a Squeeze of both where the mean drops them): the same
    function, which onnxruntime runs on uint8 (QLinearGlobalAveragePool) where a quantized
    ReduceMean runs in float between a DequantizeLinear and a QuantizeLinear. It is how a
    squeeze pools (SE, ECA, CBAM's channel gate, SK, AFP, the classifier's pool): MobileNetV2 +
    SE @mid at 224x224, batch 1, INT8 went from x1.16 to x1.70 over float, with the same
    outputs to 1e-13. Returns the pools made, by name, each with its added Squeeze's name
    (None where the mean kept its dims). A mean whose input's rank shape inference cannot tell
    is left alone. ``dims``: :func:`tensor_dims` of ``proto``, where the caller has them."""
    from onnx import helper

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    dims = tensor_dims(proto) if dims is None else dims
    pools: dict[str, str | None] = {}
    nodes = []
    detached = set()
    axes_name = None  # the [2, 3] the added Squeezes share
    for node in graph.node:
        nodes.append(node)
        mean = _constant_mean(node, consts)
        if mean is None or mean[0] != {2, 3} or len(dims.get(node.input[0], [])) != 4:
            continue
        attrs = mean[1]
        node.op_type = "GlobalAveragePool"
        detached.add(node.input[1])
        del node.input[1:]
        del node.attribute[:]
        pools[node.name] = None
        if attrs.get("keepdims", 1) == 0:
            pooled, out = f"{node.output[0]}_pooled", node.output[0]
            node.output[0] = pooled
            axes_name = axes_name or _hw_axes(graph, f"{node.name}_squeeze_axes")
            squeeze = helper.make_node("Squeeze", [pooled, axes_name], [out], name=f"{node.name}_squeeze")
            nodes.append(squeeze)
            pools[node.name] = squeeze.name
    _set_nodes(graph, nodes, detached)
    return pools


def axis_means_as_convs(proto: onnx.ModelProto, *, skip: Iterable[str] = (),
                        dims: dict[str, list[int]] | None = None) -> list[str]:
    """Rewrite, in place, each ReduceMean over the height alone or the width alone of a 4-D
    tensor whose channels and that axis have a static size (a file without ``--dynamic-hw``) as
    a depthwise Conv whose kernel spans the axis with weights 1/L (followed by a Squeeze of the
    axis where the mean drops it): the same function, which per-channel int8 keeps exact (each
    channel's weights are its own scale times 127) and onnxruntime runs on uint8 (QLinearConv),
    where a quantized ReduceMean runs in float between a DequantizeLinear and a
    QuantizeLinear. Coordinate attention's and ELA's directional pooling is such a pair of
    means. MobileNetV2 + coordinate attention @mid at 224x224, batch 1 (random weights, side by
    side): INT8 went from x1.22 and x1.24 to x1.71 and x1.58 over float. Nodes in ``skip``
    (kept in float) stay means. Returns the names of the means rewritten. ``dims``: as
    :func:`spatial_means_as_pools`."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    dims = tensor_dims(proto) if dims is None else dims
    skip = set(skip)
    done: list[str] = []
    nodes = []
    detached = set()
    for node in graph.node:
        nodes.append(node)
        mean = _constant_mean(node, consts)
        shape = dims.get(node.input[0], []) if mean else []
        if mean is None or node.name in skip or len(shape) != 4 or len(mean[0]) != 1 or not mean[0] <= {2, 3}:
            continue
        (axis,), attrs = mean
        channels, length = shape[1], shape[axis]
        if not channels or not length:
            continue
        kernel = [1, length] if axis == 3 else [length, 1]
        weight = f"{node.name}_averaging_kernel"
        graph.initializer.append(numpy_helper.from_array(
            np.full((channels, 1, *kernel), 1.0 / length, dtype=np.float32), weight))
        detached.add(node.input[1])
        node.op_type = "Conv"
        node.input[1] = weight
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("group", channels), helper.make_attribute("kernel_shape", kernel)])
        if not attrs.get("keepdims", 1):
            out = node.output[0]
            node.output[0] = f"{out}_pooled"
            axis_name = f"{node.name}_squeeze_axis"
            graph.initializer.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axis_name))
            nodes.append(helper.make_node("Squeeze", [node.output[0], axis_name], [out], name=f"{node.name}_squeeze"))
        done.append(node.name)
    _set_nodes(graph, nodes, detached)
    return done


def attention_pools_channels_last(proto: onnx.ModelProto, *, skip: Iterable[str] = (),
                                  dims: dict[str, list[int]] | None = None) -> list[str]:
    """Rewrite, in place, each attention pooling written as a MatMul of a map flattened to
    ``(N, C, H*W)`` by a column of ``H*W`` weights (GC's context modelling,
    ``x.flatten(2) @ softmax(...).transpose(1, 2)``) as the weights' row times the map's rows
    in channels-last order, ``(N, 1, HW) @ (N, HW, C)``, reshaped to ``(N, C, 1)``: the same
    function, and in int8 the same products and sums. onnxruntime runs quantized convs
    channels-last, so flattening the map channels-first cost a full transpose of it; the
    ``Transpose(0, 2, 3, 1)`` written here cancels against onnxruntime's own. MobileNetV2 + GC
    @mid at 224x224, batch 1 (random weights, side by side): INT8 3.74 -> 3.15 ms, x1.47 ->
    x1.74 over float. Not for the float file: onnxruntime's float convs run channels-first
    (blocked), where the transpose would be real. A flattening or MatMul in ``skip`` (kept in
    float) stays. Returns the names of the MatMuls rewritten. ``dims``: as
    :func:`spatial_means_as_pools`."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    dims = tensor_dims(proto) if dims is None else dims
    producer, consumers = links(graph.node)
    skip = set(skip)

    def known_equal(a: int, b: int) -> bool:  # 0: symbolic or unknown
        return not a or not b or a == b

    done: list[str] = []
    dropped: set[str] = set()
    nodes = []
    for node in graph.node:
        flat = producer.get(node.input[0]) if node.op_type == "MatMul" else None
        if flat is None or flat.op_type != "Reshape" or {node.name, flat.name} & skip:
            nodes.append(node)
            continue
        x, column = flat.input[0], node.input[1]
        shape, flat_shape, column_shape = dims.get(x, []), dims.get(flat.output[0], []), dims.get(column, [])
        if (len(shape) != 4 or not shape[1] or len(flat_shape) != 3 or flat_shape[1] != shape[1]
                or not known_equal(flat_shape[0], shape[0])
                or not known_equal(flat_shape[2], shape[2] * shape[3])
                or len(column_shape) != 3 or column_shape[2] != 1 or len(consumers[flat.output[0]]) != 1):
            nodes.append(node)
            continue
        channels, name = shape[1], node.name
        rows_shape, out_shape = f"{name}_rows_shape", f"{name}_out_shape"
        graph.initializer.extend([numpy_helper.from_array(np.array([0, -1, channels], dtype=np.int64), rows_shape),
                                  numpy_helper.from_array(np.array([0, channels, 1], dtype=np.int64), out_shape)])
        turn = producer.get(column)  # the column is usually a transposed row: take the row back
        perm = [a.ints for a in turn.attribute if a.name == "perm"] if turn is not None else []
        if (turn is not None and turn.op_type == "Transpose" and turn.name not in skip and perm
                and list(perm[0]) == [0, 2, 1] and len(consumers[column]) == 1):
            row = turn.input[0]
            dropped.add(turn.name)
        else:
            row = f"{name}_row"
            row_shape = f"{name}_row_shape"
            graph.initializer.append(numpy_helper.from_array(np.array([0, 1, -1], dtype=np.int64), row_shape))
            nodes.append(helper.make_node("Reshape", [column, row_shape], [row], name=row))
        nodes += [
            helper.make_node("Transpose", [x], [f"{name}_nhwc"], name=f"{name}_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"{name}_nhwc", rows_shape], [f"{name}_rows"], name=f"{name}_rows"),
            helper.make_node("MatMul", [row, f"{name}_rows"], [f"{name}_pooled"], name=name),
            helper.make_node("Reshape", [f"{name}_pooled", out_shape], list(node.output), name=f"{name}_pooled"),
        ]
        dropped.add(flat.name)
        done.append(name)
    if not done:
        return done
    # drop the replaced nodes, then every node nothing reads any more (what computed a dynamic
    # H and W's flattening shape: Shape, Concat)
    outputs = {o.name for o in graph.output}
    nodes = [n for n in nodes if n.name not in dropped]
    while True:
        used = outputs | {t for n in nodes for t in n.input}
        live = [n for n in nodes if used & set(n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    names = {n.name for n in nodes}
    _set_nodes(graph, nodes, {t for n in graph.node if n.name not in names for t in n.input})
    return done


# the ops a hard gate's input passes through unchanged on its way from the conv that makes it
_CARRY_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def hard_gates_as_clips(proto: onnx.ModelProto, *, skip: Iterable[str] = (),
                        dims: dict[str, list[int]] | None = None) -> list[str]:
    """Rewrite, in place, each HardSigmoid as a Clip to [0, 1] of ``alpha x + beta``, and each
    HardSwish of a 4-D tensor as ``x`` times that: the same functions. onnxruntime has no uint8
    kernel for either op, so quantized they ran in float between a DequantizeLinear and a
    QuantizeLinear; its quantizer drops a Clip whose input it quantizes (the input takes the
    Clip's range), so the hard gate now comes out of a QLinearConv and HardSwish's product is a
    QLinearMul. The affine goes into the Conv that makes ``x`` (through reshapes) where ``x``
    feeds nothing else (SE's, ECA's, coordinate attention's and MobileNetV3's gate convs);
    elsewhere (HardSwish, whose ``x`` is also its product's other factor) into a depthwise 1x1
    Conv of its own, which needs the channels' static size. Side by side at 224x224, random
    weights: MobileNetV3-large x0.9 -> x1.1 over float, MobileNetV2 + coordinate attention
    with the hard sigmoid @mid x1.75 -> x1.9 (the README). Nodes in ``skip`` (kept in float)
    stay, and so does a gate whose conv is. Returns the names of the nodes rewritten.
    ``dims``: as :func:`spatial_means_as_pools`."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    producer, consumers = links(graph.node)
    dims = tensor_dims(proto) if dims is None else dims
    skip = set(skip)
    outputs = {o.name for o in graph.output}  # a graph output is never folded through
    clip_range: list[str] = []
    done: list[str] = []
    nodes = []
    detached: set[str] = set()

    def add(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def gate_conv(x: str) -> onnx.NodeProto | None:
        """The Conv that makes ``x``, through single-use reshapes, if nothing else reads its output."""
        while (src := producer.get(x)) is not None and src.op_type in _CARRY_OPS:
            if src.name in skip or len(consumers.get(x, [])) != 1 or x in outputs:
                return None
            x = src.input[0]
        ok = (src is not None and src.op_type == "Conv" and src.name not in skip and x not in outputs
              and len(consumers.get(x, [])) == 1 and src.input[1] in consts
              and (len(src.input) < 3 or not src.input[2] or src.input[2] in consts))
        return src if ok else None

    for node in graph.node:
        if node.op_type not in ("HardSigmoid", "HardSwish") or node.domain not in ("", "ai.onnx") or node.name in skip:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        hard_sigmoid = node.op_type == "HardSigmoid"  # HardSwish: x HardSigmoid(x) with 1/6, 1/2
        alpha, beta = (attrs.get("alpha", 0.2), attrs.get("beta", 0.5)) if hard_sigmoid else (1 / 6, 0.5)
        x, shape = node.input[0], dims.get(node.input[0], [])
        conv = gate_conv(x) if hard_sigmoid else None
        if conv is None and (len(shape) != 4 or not shape[1]):
            nodes.append(node)
            continue
        clip_range = clip_range or [add("hard_gate_clip_min", np.array(0.0)), add("hard_gate_clip_max", np.array(1.0))]
        affine = x
        if conv is not None:  # alpha (W x + b) + beta
            w = numpy_helper.to_array(consts[conv.input[1]])
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            b = numpy_helper.to_array(consts[conv.input[2]]) if has_bias else np.zeros(w.shape[0], w.dtype)
            detached.update(conv.input[1:3])
            weight = add(f"{conv.output[0]}_hard_gate_weight", alpha * w)  # tensor names are unique
            bias = add(f"{conv.output[0]}_hard_gate_bias", alpha * b + beta)
            del conv.input[1:]
            conv.input.extend([weight, bias])
        else:  # a depthwise 1x1 conv: alpha x + beta, channel by channel
            affine = f"{node.output[0]}_affine"
            c = shape[1]
            nodes.append(helper.make_node("Conv", [x, add(f"{affine}_weight", np.full((c, 1, 1, 1), alpha)),
                                                   add(f"{affine}_bias", np.full(c, beta))], [affine],
                                          name=affine, group=c))
        if hard_sigmoid:
            nodes.append(helper.make_node("Clip", [affine, *clip_range], list(node.output), name=node.name))
        else:
            gate = f"{node.output[0]}_gate"
            nodes += [helper.make_node("Clip", [affine, *clip_range], [gate], name=gate),
                      helper.make_node("Mul", [x, gate], list(node.output), name=node.name)]
        done.append(node.name)
    _set_nodes(graph, nodes, detached)
    return done


# a grouped conv with at most this many input channels per group is quantized as a dense one
DENSE_GROUP_WIDTH = 4


def grouped_convs_as_dense(proto: onnx.ModelProto, *, skip: Iterable[str] = ()) -> list[str]:
    """Rewrite, in place, each grouped Conv with 2 to :data:`DENSE_GROUP_WIDTH` input and output
    channels per group (and a constant weight) as a dense Conv whose weight is block-diagonal:
    the same function, which per-channel int8 quantizes the same (a zero is exact and leaves
    each channel's scale alone). onnxruntime runs such a grouped QLinearConv by a slow
    per-group path: EMA's 3x3 conv on ResNet-18's 64 channels (32 groups of 2, 56x56) took
    7.8 ms in INT8 against 0.35 in float, and 2.4 as a dense INT8 conv with 32 times the
    multiply-adds; from 8 channels a group on the grouped path was as fast or faster (side by
    side, this machine; the README). Nodes in ``skip`` (kept in float, where grouped is fast)
    stay. Returns the names of the convs rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    consts = {t.name: t for t in proto.graph.initializer}
    _, consumers = links(proto.graph.node)
    skip = set(skip)
    done: list[str] = []
    reshaped: set[str] = set()
    for node in proto.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.name in skip:
            continue
        attrs = {a.name: a for a in node.attribute}
        groups = helper.get_attribute_value(attrs["group"]) if "group" in attrs else 1
        weight = consts.get(node.input[1])
        if groups == 1 or weight is None or len(consumers[weight.name]) != 1:
            continue
        w = numpy_helper.to_array(weight)
        per_in, per_out = w.shape[1], w.shape[0] // groups
        if not (2 <= per_in <= DENSE_GROUP_WIDTH and 2 <= per_out <= DENSE_GROUP_WIDTH):
            continue
        dense = np.zeros((w.shape[0], per_in * groups, *w.shape[2:]), dtype=w.dtype)
        for g in range(groups):
            dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = w[g * per_out:(g + 1) * per_out]
        weight.CopyFrom(numpy_helper.from_array(dense, weight.name))
        attrs["group"].i = 1
        reshaped.add(weight.name)
        done.append(node.name)
    kept = [v for v in proto.graph.value_info if v.name not in reshaped]  # their old shapes
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return done


def pools_out_of_range_as_means(proto: onnx.ModelProto) -> int:
    """Turn back, in place, each quantized GlobalAveragePool (dequantize -> pool -> quantize)
    that onnxruntime's uint8 kernel would refuse into a ReduceMean over height and width, which
    runs in float between the two. The kernel scales by ``in_scale / (out_scale * H * W)`` and
    raises "parameter out of computation range" unless that lies in [2^-32, 256), with H * W
    under 2^24; ``in_scale / out_scale`` in [2^-8, 256) keeps it there at every input size (a
    file with a dynamic height and width). A mean whose calibrated range is tiny against its
    input's (EMA's pooling of a group-normalised map) falls outside. Returns how many."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer, consumers = links(graph.node)
    axes = None
    reverted = 0
    for node in graph.node:
        if node.op_type != "GlobalAveragePool":
            continue
        dq, users = producer.get(node.input[0]), consumers.get(node.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or not users or any(
                u.op_type != "QuantizeLinear" for u in users):
            continue
        ratios = [float(consts[dq.input[1]]) / float(consts[q.input[1]]) for q in users
                  if dq.input[1] in consts and q.input[1] in consts]
        if all(2.0 ** -8 <= r < 256.0 for r in ratios):
            continue
        if axes is None:
            axes = _hw_axes(graph, f"{node.name}_axes")
        node.op_type = "ReduceMean"
        node.input.append(axes)
        node.attribute.append(helper.make_attribute("keepdims", 1))
        reverted += 1
    return reverted


def outputs_in_float(proto: onnx.ModelProto) -> int:
    """Remove, in place, the QuantizeLinear -> DequantizeLinear pair before each graph output,
    so the last op (a classifier's Gemm, a head's conv) hands out its float result. Quantized,
    the outputs lie on a uint8 grid of 1/255 of their calibrated range: for logits spanning 60
    (EfficientNet-B0 trained on digits) a step of about 0.25, where an image whose top two
    logits lie within one step of each other may flip. onnxruntime still runs the op in
    integer arithmetic with a float output (a QGemm), so the file is no slower. A pair whose
    tensors have other users stays. (onnxruntime's ``OpTypesToExcludeOutputQuantization``
    works by op type: it would leave every Gemm's output float, the kernel-attention MLPs'
    too, not only the model's.) Returns how many outputs were freed."""
    graph = proto.graph
    producer, consumers = links(graph.node)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for name in outputs:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or consumers.get(name):
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or len(consumers.get(q.input[0], [])) != 1 or q.input[0] in outputs:
            continue
        source.output[list(source.output).index(q.input[0])] = name
        drop += [q, dq]
    for n in drop:
        graph.node.remove(n)
    used = {t for n in graph.node for t in n.input}
    params = {t for n in drop for t in n.input[1:]} - used  # the pairs' scales and zero points
    kept = [t for t in graph.initializer if t.name not in params]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(drop) // 2


# the ops whose input 2 onnxruntime's quantizer quantizes as a bias (to int32 at the scale of
# input 0 times input 1's)
_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm", "InstanceNormalization", "LayerNormalization")


def own_biases(proto: onnx.ModelProto) -> int:
    """Give, in place, each node of :data:`_BIAS_OPS` whose bias initializer another such node
    also reads a copy of its own under a name no tensor has. onnxruntime's quantizer (1.32)
    copies a shared bias itself, named the bias's name and a number ("val_45" -> "val_452"),
    unique among the initializers only: where an activation already had that name (the
    exporter's GroupNorm shares its zero bias between InstanceNormalizations, and names tensors
    val_N), the file failed ("Quantization parameter shared mode is not supported for weight
    yet": MobileNetV2 + ELA at 224x224). Returns how many copies were made."""
    from onnx import numpy_helper

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    names = {*consts, *(t for n in graph.node for t in n.output), *(i.name for i in graph.input)}
    seen: set[str] = set()
    copies = 0
    for node in graph.node:
        if node.op_type not in _BIAS_OPS or len(node.input) < 3 or node.input[2] not in consts:
            continue
        bias = node.input[2]
        if bias not in seen:
            seen.add(bias)
            continue
        name, k = f"{bias}_{node.name}", 0
        while name in names:
            k += 1
            name = f"{bias}_{node.name}_{k}"
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(consts[bias]), name))
        names.add(name)
        node.input[2] = name
        copies += 1
    return copies


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Put ``graph``'s nodes in topological order (onnx.checker requires it), stable otherwise."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(t in ready for t in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or an input from nowhere: leave the rest as it was
            ordered.extend(rest)
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
