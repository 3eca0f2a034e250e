"""The kernels onnxruntime would run for a graph, and the work (FLOPs, bytes) and text key of each.

The graph is grouped into the kernels onnxruntime would run (after its own rewrites): constant-only nodes are
folded away at session creation, Identity/Dropout vanish, Reshape-like nodes only re-label memory, MatMul +
bias Add becomes one Gemm, MatMul absorbs a following scalar Mul/Div (FusedMatMul), the exported exact GELU
(Div, Erf, Add, Mul, Mul) is one Gelu kernel, Conv absorbs a constant Add (bias) and a following Relu, on the
CPU also a residual Add + Relu, and Add + LayerNormalization becomes SkipLayerNormalization (checked against
the optimised model onnxruntime writes at ORT_ENABLE_EXTENDED; bench/kernel_grouping.py, results in
bench/results/kernel_grouping_*.md).

Transposes follow onnxruntime's transpose optimiser and its MatMul/Gemm transpose fusions (`_transpose_plan`):
a Transpose read only by another Transpose composes into it, one that meets its inverse across element-wise ops
with constant operands cancels, an identity permutation vanishes; a Transpose whose readers are all MatMuls and
whose permutation FusedMatMul expresses (the last two axes swapped: transA/transB; the first axis moved
before the last: transBatchA/transBatchB) vanishes into them, as does a 2-D one into a Gemm (transA/transB) or
after a Gemm without bias (C^T = B^T A^T); a scalar Mul/Div feeding a MatMul becomes its alpha. Contrib ops
(com.microsoft: MultiHeadAttention, Attention, FusedMatMul, SkipLayerNormalization, Gelu, FastGelu,
BiasGelu, ...) are one kernel each, with their attention or GEMM FLOPs.
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
    "Erf": 8.0, "Gelu": 10.0, "FastGelu": 10.0, "BiasGelu": 11.0, "QuickGelu": 6.0, "BiasAdd": 2.0,
    "SkipSimplifiedLayerNormalization": 7.0, "SimplifiedLayerNormalization": 6.0, "Exp": 4.0, "Tanh": 4.0, "Sigmoid": 4.0, "Pow": 4.0, "Sqrt": 2.0, "Div": 2.0,
}

CONTRIB_DOMAIN = "com.microsoft"
SHAPE_KEEPING_CONTRIB_OPS = frozenset({
    "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
})


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


def _identity(perm: tuple[int, ...]) -> bool:
    return all(i == p for i, p in enumerate(perm))


def _matmul_foldable(perm: tuple[int, ...]) -> bool:
    """FusedMatMul reads its operand through this permutation: the last two axes swapped (transA/transB), or
    the first axis moved before the last (transBatchA/transBatchB, rank >= 3), or both (checked against
    onnxruntime's MatMulTransposeFusion)."""
    r = len(perm)
    if r < 2:
        return False
    swap = tuple(range(r - 2)) + (r - 1, r - 2)
    if perm == swap:
        return True
    if r < 3:
        return False
    batch = tuple(range(1, r - 1))
    return perm in (batch + (0, r - 1), batch + (r - 1, 0))


def _takes_bias(graph: Graph, node: Node, const, vanished: set[str]) -> bool:
    """The MatMul/Gemm and its constant bias Add become one Gemm (MatMulAddFusion, before the scale and
    transpose fusions); a MatMul of rank > 2 that reads a folded Transpose becomes FusedMatMul, which takes no
    bias."""
    nxt = _sole_reader(graph, node.outputs[0])
    if nxt is None or nxt.op_type != "Add" or nxt.is_opaque or not const(_other_input(nxt, node.outputs[0])):
        return False
    if node.op_type == "MatMul" and any(len(graph.static_shape(v) or ()) != 2 for v in node.inputs[:2]):
        return not any(p is not None and p.op_type == "Transpose" and p.name in vanished
                       for p in map(graph.producer_of, node.inputs[:2]))
    return True


@dataclass
class _TransposePlan:
    vanished: set[str]  # Transposes (and scales) that launch nothing of their own
    members: dict[str, list[str]]  # MatMul/Gemm -> the Transposes and scales its kernel takes in


def _transpose_plan(graph: Graph, profile: DeviceProfile, const, gelu_nodes: set[str]) -> _TransposePlan:
    """Which Transposes onnxruntime's transpose optimiser and transpose fusions remove, and where they go."""
    nodes = graph.nodes
    order = graph.topological_order()
    position = {n: i for i, n in enumerate(order)}
    perm_of: dict[str, tuple[int, ...]] = {}
    vanished: set[str] = set()
    members: dict[str, list[str]] = {}

    def perm(node: Node) -> tuple[int, ...]:
        p = node.attr("perm")
        if p is None:
            t = graph.types.get(node.inputs[0])
            rank = len(t.shape) if t is not None and t.shape is not None else 0
            return tuple(reversed(range(rank)))
        return tuple(int(i) for i in p)

    def transparent(node: Node, value: str) -> bool:
        """An element-wise op the transpose optimiser moves a Transpose through (unary, or binary with a
        constant other operand)."""
        if node.op_type in ACTIVATIONS or node.op_type in ("Erf", "Exp", "Sqrt", "Neg", "Abs", "Cast"):
            return len(node.inputs) == 1 or all(const(v) for v in node.inputs[1:])
        if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            return const(_other_input(node, value))
        return False

    for name in order:
        node = nodes[name]
        if node.op_type != "Transpose" or const(node.inputs[0]) or node.is_opaque:
            continue
        p = perm(node)
        producer = graph.producer_of(node.inputs[0])
        if producer is not None and producer.op_type == "Transpose" and producer.name in perm_of \
                and _sole_reader(graph, producer.outputs[0]) is node:
            before = perm_of[producer.name]
            p = tuple(before[i] for i in p)
            vanished.add(producer.name)
        elif producer is not None and _sole_reader(graph, producer.outputs[0]) is node and producer.inputs:
            source = next((v for v in producer.inputs if not const(v)), "")
            upstream = graph.producer_of(source) if source else None
            if upstream is not None and upstream.op_type == "Transpose" and upstream.name in perm_of \
                    and _sole_reader(graph, upstream.outputs[0]) is producer and transparent(producer, source):
                before = perm_of[upstream.name]
                p = tuple(before[i] for i in p)
                vanished.add(upstream.name)
        perm_of[name] = p
        if _identity(p):
            vanished.add(name)
    for name, p in perm_of.items():
        if name in vanished:
            continue
        node = nodes[name]
        out = node.outputs[0]
        readers = [nodes[r] for r in graph.consumers.get(out, ())]
        if not readers or graph.is_graph_output(out):
            continue
        into_matmul = all(r.op_type == "MatMul" and r.domain in ("", "ai.onnx") for r in readers) and _matmul_foldable(p)
        into_gemm = len(p) == 2 and all(r.op_type == "Gemm" and out in r.inputs[:2] for r in readers)
        if not (into_matmul or into_gemm):
            continue
        vanished.add(name)
        if len(readers) == 1 and p == perm(node):
            members.setdefault(readers[0].name, []).append(name)
    for name in order:  # C^T = B^T A^T: a 2-D Transpose after a Gemm without bias
        node = nodes[name]
        if node.op_type == "Gemm" and (len(node.inputs) < 3 or not node.inputs[2]):
            after = _sole_reader(graph, node.outputs[0])
            if after is not None and after.op_type == "Transpose" and after.name not in vanished \
                    and perm_of.get(after.name) == (1, 0) and perm(after) == (1, 0):
                vanished.add(after.name)
                members.setdefault(name, []).append(after.name)
    into_matmul: dict[str, list[str]] = {}  # folded Transpose -> the MatMuls reading it
    for name, p in perm_of.items():
        readers = graph.consumers.get(nodes[name].outputs[0], ())
        if name in vanished and readers and all(nodes[r].op_type == "MatMul" for r in readers):
            into_matmul[name] = list(readers)
    for name in order:  # a scalar scale read only by MatMuls (MatMulScaleFusion), also through folded Transposes
        node = nodes[name]
        if node.op_type not in ("Mul", "Div") or name in gelu_nodes or name in vanished or node.is_opaque:
            continue
        x = node.inputs[0] if node.op_type == "Div" else next((v for v in node.inputs if not const(v)), "")
        if not x or const(x) or not _scales_by_scalar(graph, node, x, const) or graph.is_graph_output(node.outputs[0]):
            continue
        readers = [nodes[r] for r in graph.consumers.get(node.outputs[0], ())]
        matmuls: list[str] = []
        for r in readers:
            if r.op_type == "MatMul" and r.domain in ("", "ai.onnx"):
                matmuls.append(r.name)
            elif r.name in into_matmul:
                matmuls.extend(into_matmul[r.name])
            else:
                matmuls = []
                break
        if "matmul_add" in profile.fusions and any(_takes_bias(graph, nodes[m], const, vanished) for m in matmuls):
            continue  # a Gemm by then: onnxruntime's MatMulScaleFusion does not take Gemms
        if not matmuls:
            continue
        vanished.add(name)
        if len(readers) == 1 and len(matmuls) == 1:
            members.setdefault(matmuls[0], []).append(name)
    for name, extra in members.items():
        extra.sort(key=position.__getitem__)
    return _TransposePlan(vanished, members)


def group_kernels(graph: Graph, profile: DeviceProfile) -> list[Kernel]:
    """The kernels onnxruntime would run for this graph on the profile's execution provider."""
    fusions = profile.fusions
    constants = graph.constants
    folded: set[str] = set()  # values onnxruntime computes at session creation beyond graph.constants

    def const(v: str) -> bool:
        return (not v) or v in constants or v in folded

    absorbed: set[str] = set()
    kernels: list[Kernel] = []
    gelu_nodes: set[str] = set()
    if "gelu" in fusions:
        for node in graph.nodes.values():
            if node.op_type in ("Div", "Mul"):
                gelu_nodes.update(m.name for m in _gelu_nodes(graph, node, const) or ())
    plan = _transpose_plan(graph, profile, const, gelu_nodes)
    for name in graph.topological_order():
        if name in absorbed or name in plan.vanished:
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
            if "matmul_add" in fusions and _takes_bias(graph, node, const, plan.vanished):
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
        for m in list(members):
            members.extend(graph.nodes[extra] for extra in plan.members.get(m.name, ()))
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
    op = node.op_type
    if out_n is None and node.domain == CONTRIB_DOMAIN and node.inputs:
        # onnx's shape inference knows no contrib op: these keep their input's shape
        if op in SHAPE_KEEPING_CONTRIB_OPS:  # (the residual or the input: the largest known operand)
            sizes = [t.numel() for t in map(graph.types.get, node.inputs) if t is not None and t.numel() is not None]
            out_n = max(sizes) if sizes else None
        if op in ("MultiHeadAttention", "Attention"):
            return _attention_flops(graph, node, out_n or 0)
    if op == "FusedMatMul" and node.domain == CONTRIB_DOMAIN:
        return _fused_matmul_flops(graph, node)
    if out_n is None:
        return 0.0
    if op == "MatMul":
        a = graph.static_shape(node.inputs[0])
        return 2.0 * out_n * (a[-1] if a else 1)
    if op in ("MultiHeadAttention", "Attention"):
        return _attention_flops(graph, node, out_n)
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


def _fused_matmul_flops(graph: Graph, node: Node) -> float:
    """2 x batch x M x N x K of FusedMatMul, its operands read through transA/transB/transBatchA/transBatchB."""
    def operand(value: str, trans: int, trans_batch: int) -> tuple[list[int], int, int] | None:
        shape = graph.static_shape(value)
        if not shape or len(shape) < 2:
            return None
        dims = list(shape)
        if trans_batch and len(dims) >= 3:
            dims = dims[1:-1] + [dims[0], dims[-1]]
        if trans:
            dims[-2], dims[-1] = dims[-1], dims[-2]
        return dims[:-2], dims[-2], dims[-1]

    a = operand(node.inputs[0], node.attr("transA", 0), node.attr("transBatchA", 0))
    b = operand(node.inputs[1], node.attr("transB", 0), node.attr("transBatchB", 0))
    if a is None or b is None:
        return 0.0
    batch_a, m, k = a
    batch_b, _, n_cols = b
    rank = max(len(batch_a), len(batch_b))
    batch_a, batch_b = [1] * (rank - len(batch_a)) + batch_a, [1] * (rank - len(batch_b)) + batch_b
    batch = float(np.prod([max(x, y) for x, y in zip(batch_a, batch_b)])) if rank else 1.0
    return 2.0 * batch * m * n_cols * k


def _attention_flops(graph: Graph, node: Node, out_n: int) -> float:
    """Scores and context (4 B N S Skv H, for Q.K^T and P.V) plus softmax (5 per score); for Attention also
    its packed QKV projection (2 B S in 3D)."""
    q = graph.static_shape(node.inputs[0])
    if not q:
        return float(out_n)
    heads = int(node.attr("num_heads", 1))
    if node.op_type == "Attention":
        w = graph.static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        if not w or len(q) != 3:
            return float(out_n)
        batch, seq = q[0], q[1]
        sizes = node.attr("qkv_hidden_sizes")
        hidden_qk = int(sizes[0]) if sizes else w[1] // 3
        hidden_v = int(sizes[2]) if sizes else w[1] // 3
        projection = 2.0 * batch * seq * q[2] * w[1]
        keys = seq
    else:
        k = graph.static_shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        v = graph.static_shape(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        if len(q) != 3:
            return float(out_n)
        batch, seq, hidden_qk = q
        hidden_v = v[-1] * (v[1] if len(v) == 4 else 1) if v else hidden_qk
        keys = (k[2] if len(k) == 4 else k[1]) if k else seq
        projection = 0.0
    return projection + 2.0 * batch * seq * keys * (hidden_qk + hidden_v) + 5.0 * batch * heads * seq * keys


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

