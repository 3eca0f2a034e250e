"""The kernels onnxruntime would run for a graph, and the work (FLOPs, bytes) and text key of each.

The graph is grouped into the kernels onnxruntime would run (after its own rewrites): constant-only nodes are
folded away at session creation, Identity/Dropout vanish, Reshape-like nodes only re-label memory, MatMul +
bias Add becomes one Gemm, MatMul absorbs a following scalar Mul/Div (FusedMatMul), the exported exact GELU
(Div, Erf, Add, Mul, Mul) is one Gelu kernel, Conv absorbs a constant Add (bias) and a following Relu, on the
CPU also a residual Add + Relu, and Add + LayerNormalization becomes SkipLayerNormalization (checked against
the optimised model onnxruntime writes at ORT_ENABLE_EXTENDED; bench/kernel_grouping.py, results in
bench/results/kernel_grouping_*.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from xrlflow.costmodel.profiles import DeviceProfile
from xrlflow.ir import PURE_OPS, Graph, Node, OpaqueAttribute, TensorType

FREE_OPS = frozenset({"Identity", "Dropout", "Constant"})
ALIAS_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size"})
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid"})
# FLOPs per output element of ops that do more than one operation per element
ELEMENT_FLOPS = {
    "Softmax": 5.0, "LogSoftmax": 5.0, "LayerNormalization": 8.0, "SkipLayerNormalization": 9.0,
    "Erf": 8.0, "Gelu": 10.0, "Exp": 4.0, "Tanh": 4.0, "Sigmoid": 4.0, "Pow": 4.0, "Sqrt": 2.0, "Div": 2.0,
}



@dataclass(frozen=True, slots=True)
class Kernel:
    """One onnxruntime kernel: the IR nodes it covers (anchor first), the values it reads and writes."""

    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    inputs: tuple[str, ...]  # read from outside the kernel
    outputs: tuple[str, ...]  # read outside the kernel or graph outputs
    alias: bool  # only re-labels memory (no launch, no traffic)
    signature: Any  # process-local hashable key of (ops, attributes, input types, constness, output types)



# ---- kernel grouping --------------------------------------------------------------------------------------
def _sole_reader(graph: Graph, value: str) -> Node | None:
    readers = graph.consumers.get(value, ())
    if len(readers) != 1 or graph.is_graph_output(value):
        return None
    return graph.nodes[readers[0]]


def _other_input(node: Node, value: str) -> str:
    return node.inputs[1] if node.inputs[0] == value else node.inputs[0]


def _scalar(graph: Graph, value: str, const) -> float | None:
    """The value of a one-element float constant, else None."""
    t = graph.types.get(value)
    if not value or not const(value) or t is None or t.numel() != 1:
        return None
    arr = graph.constant_array(value)
    if arr is None or arr.dtype.kind != "f":
        return None
    return float(arr.reshape(-1)[0])


def _scales_by_scalar(graph: Graph, node: Node, value: str, const) -> bool:
    """`node` multiplies `value` by a scalar constant, or divides it by one (what MatMulScaleFusion absorbs)."""
    if node.op_type == "Mul":
        return _scalar(graph, _other_input(node, value), const) is not None
    return node.op_type == "Div" and node.inputs[0] == value and _scalar(graph, node.inputs[1], const) is not None


def _gelu_nodes(graph: Graph, first: Node, const) -> list[Node] | None:
    """x / sqrt(2) (or x * 1/sqrt(2)) -> Erf -> + 1 -> * x -> * 0.5: the exact GELU onnxruntime's GeluFusion
    turns into one kernel (the exported form of torch.nn.functional.gelu)."""
    x = first.inputs[0]
    if first.op_type == "Div":
        scale = _scalar(graph, first.inputs[1], const)
        if scale is None or abs(scale - 2 ** 0.5) > 1e-3:
            return None
    else:
        x = next((v for v in first.inputs if _scalar(graph, v, const) is None), "")
        scale = _scalar(graph, _other_input(first, x), const) if x else None
        if scale is None or abs(scale - 2 ** -0.5) > 1e-3:
            return None
    erf = _sole_reader(graph, first.outputs[0])
    if erf is None or erf.op_type != "Erf":
        return None
    one = _sole_reader(graph, erf.outputs[0])
    if one is None or one.op_type != "Add" or _scalar(graph, _other_input(one, erf.outputs[0]), const) != 1.0:
        return None
    times_x = _sole_reader(graph, one.outputs[0])
    if times_x is None or times_x.op_type != "Mul" or _other_input(times_x, one.outputs[0]) != x:
        return None
    half = _sole_reader(graph, times_x.outputs[0])
    if half is None or half.op_type != "Mul" or _scalar(graph, _other_input(half, times_x.outputs[0]), const) != 0.5:
        return None
    return [first, erf, one, times_x, half]


def group_kernels(graph: Graph, profile: DeviceProfile) -> list[Kernel]:
    """The kernels onnxruntime would run for this graph on the profile's execution provider."""
    fusions = profile.fusions
    constants = graph.constants
    folded: set[str] = set()  # values onnxruntime computes at session creation beyond graph.constants

    def const(v: str) -> bool:
        return (not v) or v in constants or v in folded

    absorbed: set[str] = set()
    kernels: list[Kernel] = []
    for name in graph.topological_order():
        if name in absorbed:
            continue
        node = graph.nodes[name]
        op = node.op_type
        if op in FREE_OPS:
            if op != "Constant" and all(const(v) for v in node.inputs):
                folded.update(node.outputs)
            continue
        if node.outputs and all((not v) or v in constants for v in node.outputs):
            continue  # constant-folded at session creation
        if op == "Shape" and graph.static_shape(node.inputs[0]) is not None:
            folded.update(node.outputs)
            continue
        if op in PURE_OPS and not node.is_opaque and all(const(v) for v in node.inputs):
            folded.update(v for v in node.outputs if v)
            continue
        members = [node]
        out = node.outputs[0] if node.outputs else ""
        gelu = _gelu_nodes(graph, node, const) if "gelu" in fusions and op in ("Div", "Mul") else None
        if gelu is not None:
            members = gelu
        elif op in ("MatMul", "Gemm"):
            nxt = _sole_reader(graph, out)
            if nxt is not None and nxt.op_type == "Add" and "matmul_add" in fusions and const(_other_input(nxt, out)):
                members.append(nxt)  # Gemm (onnxruntime's MatMulAddFusion runs first, at the basic level)
            elif op == "MatMul" and nxt is not None and "matmul_scale" in fusions and _scales_by_scalar(graph, nxt, out, const):
                members.append(nxt)  # FusedMatMul with alpha
        elif op == "Conv":
            nxt = _sole_reader(graph, out)
            if nxt is not None and nxt.op_type in ("Add", "Mul") and "conv_bias" in fusions and const(_other_input(nxt, out)):
                members.append(nxt)
                out = nxt.outputs[0]
                nxt = _sole_reader(graph, out)
            if nxt is not None and nxt.op_type in ACTIVATIONS and "conv_activation" in fusions:
                members.append(nxt)
            elif nxt is not None and nxt.op_type == "Add" and "conv_add_activation" in fusions:
                act = _sole_reader(graph, nxt.outputs[0])
                if act is not None and act.op_type == "Relu":
                    members.extend((nxt, act))
        elif op == "Add" and "skip_layernorm" in fusions and not any(const(v) for v in node.inputs):
            # a residual Add; onnxruntime leaves Add(x, constant) + LayerNormalization (BERT's position
            # embedding) as two kernels
            ln = _sole_reader(graph, out)
            if ln is not None and ln.op_type == "LayerNormalization" and ln.inputs[0] == out:
                members.append(ln)
        absorbed.update(m.name for m in members[1:])
        kernels.append(_kernel(graph, members, const))
    return kernels


def tensor_bytes(t: TensorType | None) -> float:
    """Bytes of a tensor of type `t` (0 when its shape is unknown)."""
    if t is None:
        return 0.0
    n = t.numel()
    if n is None:
        return 0.0
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(t.dtype).itemsize
    except (KeyError, TypeError, ValueError):
        size = 4
    return float(n * size)


def _kernel(graph: Graph, members: list[Node], const) -> Kernel:
    types = graph.types
    consumers = graph.consumers
    anchor = members[0]
    if len(members) == 1:
        ext_inputs = tuple(dict.fromkeys(v for v in anchor.inputs if v))
        outputs = tuple(v for v in anchor.outputs if v and (v in consumers or graph.is_graph_output(v)))
    else:
        names = {m.name for m in members}
        produced = {v for m in members for v in m.outputs}
        ext_inputs = tuple(dict.fromkeys(v for m in members for v in m.inputs if v and v not in produced))
        outputs = tuple(
            v for m in members for v in m.outputs
            if v and (graph.is_graph_output(v) or any(r not in names for r in consumers.get(v, ())))
        )
    signature = (
        tuple(m.signature for m in members),
        tuple(types.get(v) for v in ext_inputs),
        tuple(const(v) for v in ext_inputs),
        tuple(types.get(v) for v in outputs),
    )
    alias = len(members) == 1 and anchor.op_type in ALIAS_OPS
    return Kernel(tuple(m.name for m in members), tuple(m.op_type for m in members), ext_inputs, outputs, alias, signature)


def kernel_work(graph: Graph, kernel: Kernel) -> tuple[float, float]:
    """(FLOPs, bytes moved) of a kernel: its external inputs and outputs are read or written once."""
    if kernel.alias:
        return 0.0, 0.0
    types = graph.types
    nbytes = sum(tensor_bytes(types.get(v)) for v in kernel.inputs) + sum(tensor_bytes(types.get(v)) for v in kernel.outputs)
    flops = sum(node_flops(graph, graph.nodes[n]) for n in kernel.nodes)
    return flops, nbytes


def node_flops(graph: Graph, node: Node) -> float:
    """FLOPs of one node: 2 x multiply-adds for MatMul/Gemm/Conv, `ELEMENT_FLOPS` per output element for ops
    that do more than one operation per element, one otherwise (0 when the output shape is unknown)."""
    out_type = graph.types.get(node.outputs[0]) if node.outputs else None
    out_n = out_type.numel() if out_type is not None else None
    if out_n is None:
        return 0.0
    op = node.op_type
    if op == "MatMul":
        a = graph.static_shape(node.inputs[0])
        return 2.0 * out_n * (a[-1] if a else 1)
    if op == "Gemm":
        a = graph.static_shape(node.inputs[0])
        k = (a[0] if node.attr("transA", 0) else a[-1]) if a else 1
        return 2.0 * out_n * k
    if op in ("Conv", "ConvTranspose"):
        w = graph.static_shape(node.inputs[1])
        if not w:
            return 2.0 * out_n
        per_output = float(np.prod(w[1:]))
        if op == "ConvTranspose":
            x = graph.types[node.inputs[0]].numel() or out_n
            return 2.0 * x * w[1] * float(np.prod(w[2:]))
        return 2.0 * out_n * per_output
    if op.startswith("Reduce") or op in ("GlobalAveragePool", "GlobalMaxPool"):
        t = graph.types.get(node.inputs[0])
        return float((t.numel() if t else None) or out_n)
    if op in ("MaxPool", "AveragePool"):
        kernel = node.attr("kernel_shape", (1,))
        return float(out_n * np.prod(kernel))
    return ELEMENT_FLOPS.get(op, 1.0) * out_n


# ---- per-kernel tables ----------------------------------------------------------------------------------------
def _type_text(t: TensorType | None) -> str:
    if t is None or t.shape is None:
        return "?"
    return f"{t.dtype}:" + "x".join(str(d) for d in t.shape)


def _attr_text(value: Any) -> str:
    if isinstance(value, OpaqueAttribute):
        return value.digest
    return repr(value)


SMALL_INT_CONSTANT = 64


def kernel_key(graph: Graph, kernel: Kernel) -> str:
    """A process-independent text key for a kernel: ops, attributes, input and output types, which inputs are
    constant, and the values of small integer constants (shapes, axes, split sizes) which change the work."""
    memo = graph.memo().setdefault("costmodel:kernel_keys", {})
    cached = memo.get(kernel.signature)
    if cached is not None:
        return cached
    members = [graph.nodes[n] for n in kernel.nodes]
    produced = {v for m in members for v in m.outputs}
    parts = []
    for m in members:
        attrs = ",".join(f"{k}={_attr_text(v)}" for k, v in m.attributes)
        ins = []
        for v in m.inputs:
            if not v:
                ins.append("-")
            elif v in produced:
                ins.append("@")
            else:
                t = graph.types.get(v)
                text = _type_text(t)
                if graph.is_constant(v):
                    arr = _small_int_constant(graph, v)
                    text += ":c" if arr is None else ":c" + ",".join(str(int(x)) for x in arr.reshape(-1))
                ins.append(text)
        parts.append(f"{m.domain}:{m.op_type}[{attrs}]({';'.join(ins)})")
    key = " + ".join(parts)
    memo[kernel.signature] = key
    return key


def _small_int_constant(graph: Graph, value: str) -> np.ndarray | None:
    t = graph.types.get(value)
    if t is None or (t.numel() or 0) > SMALL_INT_CONSTANT:
        return None
    arr = graph.constant_array(value)
    if arr is None or arr.dtype.kind not in "iub":
        return None
    return arr

