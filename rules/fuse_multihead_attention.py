"""fuse-multihead-attention: a scaled-dot-product attention subgraph -> com.microsoft.MultiHeadAttention.

The subgraph is what exporters emit for `softmax(Q K^T * scale + mask) V` over heads:

    Q = Transpose(Reshape(q [B,S,N*H] -> [B,S,N,H]), (0,2,1,3))        (K: composed perm (0,2,3,1), V: as Q)
    scores = MatMul(Q, K) [* or / scalar]       (or the scalar split over Q and K: torch's SDPA decomposition)
    [+ mask]  -> Softmax(axis=-1) [-> Where(IsNaN(p), 0, p)]  -> MatMul(p, V)
    -> Transpose (0,2,1,3) -> Reshape [B,S,N*Hv] (or any reshape of that)

K^T may also be written as Reshape [B*N,L,H] -> Transpose (0,2,1) -> Reshape [B,N,H,L] (torch's SDPA export).
onnxruntime fuses none of this on torch dynamo exports; the fused op removes ~10 kernels per layer and lets
the CUDA EP pick its flash / memory-efficient kernels. A constant causal mask becomes `unidirectional=1`,
any other mask the additive `attention_bias` input (broadcast [B or 1, N or 1, S, L]).

MultiHeadAttention semantics relied on (onnxruntime 1.32 contrib schema, since_version 1): query [B,S,N*H],
key [B,L,N*H], value [B,L,N*Hv], attention_bias added to the scaled scores, `scale` multiplies Q K^T
(default 1/sqrt(H), so it is always written explicitly), a row whose bias is -inf everywhere gives NaN like
the unfused Softmax does; output [B,S,N*Hv].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType, make_attributes
from xrlflow.rules.common import INT64, broadcast_shape, constant_ints, ints_constant, normalize_axis, rewritable, sole_reader

CONTRIB_DOMAIN = "com.microsoft"
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})
Q_PERM = (0, 2, 1, 3)  # [B,S,N,H] -> [B,N,S,H]
K_T_PERM = (0, 2, 3, 1)  # [B,L,N,H] -> [B,N,H,L]
# A causal mask's masked entries must underflow exp() whatever the scores are, as onnxruntime's own causal
# masking does; -inf and float32's lowest value (what torch and transformers emit) qualify.
CAUSAL_MASKED_AT_MOST = -1e30


@dataclass(frozen=True)
class HeadLayout:
    """A 4-D attention operand traced back to the 3-D activation it was split into heads from."""

    source: str  # [B, S, N*H]
    heads: int
    head_size: int
    factor: float  # product of the scalar Mul/Div steps on the way
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class AttentionPattern:
    softmax: str
    query: HeadLayout
    key: HeadLayout
    value: HeadLayout
    scale: float
    mask: str | None  # the additive mask value (None: no mask)
    mask_shape: tuple[int, ...] | None  # None with a mask: unknown, broadcast into the scores' shape
    causal: bool  # the mask is a constant causal mask
    nan_guard: bool  # Softmax is followed by Where(IsNaN(p), 0, p)
    output: str  # the value the fused op's result replaces
    output_shape: tuple[int, ...]
    output_reshape: str | None  # shape input to re-apply when the output is not [B, S, N*Hv]
    nodes: tuple[str, ...]  # every node of the score path (Softmax first)
    batch: int
    seq: int
    kv_seq: int


def scalar_constant(g: Graph, value: str) -> float | None:
    """The value of a one-element float constant, else None."""
    arr = g.constant_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    v = float(arr.reshape(-1)[0])
    return v if math.isfinite(v) else None


def scalar_step(g: Graph, node: Node, operand: str) -> float | None:
    """For Mul/Div of `operand` by a one-element constant that does not change its shape: the factor."""
    if not rewritable(node) or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    if node.op_type == "Div" and node.inputs[0] != operand:
        return None
    other = node.inputs[1] if node.inputs[0] == operand else node.inputs[0]
    if other == operand or g.static_shape(node.outputs[0]) != g.static_shape(operand):
        return None
    if g.dtype(other) != g.dtype(operand):
        return None
    c = scalar_constant(g, other)
    if c is None or c == 0.0:
        return None
    return c if node.op_type == "Mul" else 1.0 / c


def scalar_operand(g: Graph, node: Node) -> str | None:
    """The non-constant operand of a Mul/Div by a one-element constant."""
    if len(node.inputs) != 2:
        return None
    if node.op_type == "Div" or scalar_constant(g, node.inputs[1]) is not None:
        return node.inputs[0]
    return node.inputs[1] if scalar_constant(g, node.inputs[0]) is not None else None


def _merged_batch_transpose(g: Graph, last: Node) -> tuple[tuple[str, ...], str] | None:
    """Reshape [a*b,c,d] -> [a,b,d,c] of Transpose (0,2,1) of Reshape [a,b,c,d] -> [a*b,c,d]: the same as
    Transpose (0,1,3,2) of the first Reshape's input. Returns (nodes, that input)."""
    out_shape, in_shape = g.static_shape(last.outputs[0]), g.static_shape(last.inputs[0])
    if out_shape is None or in_shape is None or len(out_shape) != 4 or len(in_shape) != 3:
        return None
    t = g.producer_of(last.inputs[0])
    if t is None or not rewritable(t) or t.op_type != "Transpose" or tuple(t.attr("perm", ())) != (0, 2, 1):
        return None
    first = g.producer_of(t.inputs[0])
    if first is None or not rewritable(first) or first.op_type != "Reshape":
        return None
    src_shape, merged = g.static_shape(first.inputs[0]), g.static_shape(first.outputs[0])
    if src_shape is None or merged is None or len(src_shape) != 4:
        return None
    a, b, c, d = src_shape
    if merged != (a * b, c, d) or out_shape != (a, b, d, c):
        return None
    return (last.name, t.name, first.name), first.inputs[0]


def head_layout(g: Graph, value: str, perm: tuple[int, ...]) -> HeadLayout | None:
    """Trace a 4-D operand back through Transposes, scalar Mul/Div and one head-splitting Reshape
    [B,S,N*H] -> [B,S,N,H]; it must equal Transpose(that split, perm) times a scalar."""
    transposes: list[tuple[int, ...]] = []  # nearest to `value` first
    factor = 1.0
    nodes: list[str] = []
    cur = value
    for _ in range(12):
        node = g.producer_of(cur)
        if node is None or not rewritable(node):
            return None
        if node.op_type == "Transpose":
            p = tuple(node.attr("perm", ()))
            if len(p) != 4:
                return None
            transposes.append(p)
            nodes.append(node.name)
            cur = node.inputs[0]
            continue
        if node.op_type in ("Mul", "Div"):
            operand = scalar_operand(g, node)
            step = scalar_step(g, node, operand) if operand is not None else None
            if step is None:
                return None
            factor *= step
            nodes.append(node.name)
            cur = operand
            continue
        if node.op_type != "Reshape":
            return None
        merged = _merged_batch_transpose(g, node)
        if merged is not None:
            transposes.append((0, 1, 3, 2))
            nodes.extend(merged[0])
            cur = merged[1]
            continue
        in_shape, out_shape = g.static_shape(node.inputs[0]), g.static_shape(node.outputs[0])
        if in_shape is None or out_shape is None or len(in_shape) != 3 or len(out_shape) != 4:
            return None
        b, s, d = in_shape
        if out_shape[:2] != (b, s) or out_shape[2] * out_shape[3] != d:
            return None
        if g.dim_is_bound(node.outputs[0], 2) or g.dim_is_bound(node.outputs[0], 3):
            return None  # the head count would then follow an --input-shape binding
        composed = (0, 1, 2, 3)
        for t in reversed(transposes):  # the Transpose next to the split is applied first
            composed = tuple(composed[t[i]] for i in range(4))
        if composed != perm:
            return None
        nodes.append(node.name)
        return HeadLayout(node.inputs[0], out_shape[2], out_shape[3], factor, tuple(nodes))
    return None


def _mask_is_causal(mask: np.ndarray, seq: int) -> bool:
    if mask.shape[-2:] != (seq, seq):
        return False
    allowed = np.tril(np.ones((seq, seq), dtype=bool))
    m = mask.astype(np.float64)
    return bool(np.all(m[..., allowed] == 0.0) and np.all(m[..., ~allowed] <= CAUSAL_MASKED_AT_MOST))


def _scores_and_mask(g: Graph, softmax_input: str) -> tuple[list[str], str, str | None, float] | None:
    """(nodes, raw score MatMul output, mask or None, scalar on the scores) walking up from Softmax's input."""
    nodes: list[str] = []
    cur = softmax_input
    mask = None
    factor = 1.0
    node = g.producer_of(cur)
    if node is not None and rewritable(node) and node.op_type == "Add":
        for scores, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            score_shape = g.static_shape(scores)
            if score_shape is not None and g.static_shape(cur) in (score_shape, None) and scores != other \
                    and _reaches_matmul(g, scores):
                nodes.append(node.name)
                mask, cur = other, scores
                break
        else:
            return None
        if sole_reader(g, cur) is None:
            return None
    node = g.producer_of(cur)
    if node is not None and node.op_type in ("Mul", "Div"):
        operand = scalar_operand(g, node)
        step = scalar_step(g, node, operand) if operand is not None else None
        if step is None:
            return None
        factor = step
        nodes.append(node.name)
        cur = operand
        if sole_reader(g, cur) is None:
            return None
    node = g.producer_of(cur)
    if node is None or not rewritable(node) or node.op_type != "MatMul":
        return None
    nodes.append(node.name)
    return nodes, cur, mask, factor


def _reaches_matmul(g: Graph, value: str, depth: int = 1) -> bool:
    node = g.producer_of(value)
    if node is None or not rewritable(node):
        return False
    if node.op_type == "MatMul":
        return True
    return depth > 0 and node.op_type in ("Mul", "Div") and any(_reaches_matmul(g, v, 0) for v in node.inputs)


def _nan_guard(g: Graph, probs: str) -> tuple[str, tuple[str, ...]] | None:
    """Where(IsNaN(p), 0, p) reading Softmax's output p and nothing else reading p: (guarded value, nodes)."""
    readers = g.consumer_nodes(probs)
    if len(readers) != 2 or probs in g.pinned_values():
        return None
    isnan = next((n for n in readers if n.op_type == "IsNaN"), None)
    where = next((n for n in readers if n.op_type == "Where"), None)
    if isnan is None or where is None or not rewritable(isnan) or not rewritable(where):
        return None
    if sole_reader(g, isnan.outputs[0]) is not where or where.inputs[0] != isnan.outputs[0] or where.inputs[2] != probs:
        return None
    zero = g.constant_array(where.inputs[1])
    if zero is None or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
        return None
    if g.static_shape(where.outputs[0]) != g.static_shape(probs):
        return None
    return where.outputs[0], (isnan.name, where.name)


def match_attention(g: Graph, softmax: Node) -> AttentionPattern | None:
    """The attention subgraph around one Softmax, when every precondition of the fusion holds."""
    if softmax.op_type != "Softmax" or not rewritable(softmax) or g.context.opset < 13:
        return None
    x = softmax.inputs[0]
    shape = g.static_shape(x)
    shape_from_scores = False
    if shape is None:
        # onnx's inference gives up on `scores + mask` when the mask's shape is unknown and a dim is 1; the
        # scores' own shape stands in, and the head merge's element count below proves the mask did not
        # broadcast them up.
        add = g.producer_of(x)
        if add is not None and add.op_type == "Add" and rewritable(add):
            known = [g.static_shape(v) for v in add.inputs if g.static_shape(v) is not None]
            shape, shape_from_scores = (known[0], True) if len(known) == 1 else (None, False)
    if shape is None or len(shape) != 4 or g.dtype(x) not in FLOAT_TYPES:
        return None
    if normalize_axis(softmax.attr("axis", -1), 4) != 3:
        return None
    batch, heads, seq, kv_seq = shape
    if sole_reader(g, x) is None:
        return None
    path = [softmax.name]
    probs = softmax.outputs[0]
    guard = _nan_guard(g, probs)
    nan_guard = guard is not None
    if guard is not None:
        probs = guard[0]
        path.extend(guard[1])
    context_mm = sole_reader(g, probs)
    while context_mm is not None and context_mm.op_type == "Cast" and rewritable(context_mm) and \
            context_mm.attr("to") == g.dtype(probs):  # the legacy exporter's no-op Casts
        path.append(context_mm.name)
        probs = context_mm.outputs[0]
        context_mm = sole_reader(g, probs)
    if context_mm is None or context_mm.op_type != "MatMul" or not rewritable(context_mm) or context_mm.inputs[0] != probs:
        return None
    path.append(context_mm.name)
    transpose = sole_reader(g, context_mm.outputs[0])
    if transpose is not None and transpose.op_type == "Reshape" and rewritable(transpose) and \
            g.static_shape(transpose.outputs[0]) == g.static_shape(context_mm.outputs[0]):
        path.append(transpose.name)  # a Reshape to the same shape (the legacy exporter's SDPA) is no step
        transpose = sole_reader(g, transpose.outputs[0])
    if transpose is None or transpose.op_type != "Transpose" or not rewritable(transpose):
        return None
    if tuple(transpose.attr("perm", ())) != Q_PERM:
        return None
    reshape = sole_reader(g, transpose.outputs[0])
    if reshape is None or reshape.op_type != "Reshape" or not rewritable(reshape):
        return None
    path.extend((transpose.name, reshape.name))

    scored = _scores_and_mask(g, x)
    if scored is None:
        return None
    score_nodes, _, mask, score_factor = scored
    scores_mm = g.nodes[score_nodes[-1]]
    query = head_layout(g, scores_mm.inputs[0], Q_PERM)
    key = head_layout(g, scores_mm.inputs[1], K_T_PERM)
    value = head_layout(g, context_mm.inputs[1], Q_PERM)
    if query is None or key is None or value is None or value.factor != 1.0:
        return None
    if not (query.heads == key.heads == value.heads == heads) or query.head_size != key.head_size:
        return None
    q_shape, k_shape, v_shape = (g.static_shape(v) for v in (query.source, key.source, value.source))
    if q_shape[:2] != (batch, seq) or k_shape[:2] != (batch, kv_seq) or v_shape[:2] != (batch, kv_seq):
        return None
    if len({g.dtype(v) for v in (x, query.source, key.source, value.source)}) != 1:
        return None
    scale = query.factor * key.factor * score_factor
    if not math.isfinite(scale) or scale == 0.0 or not math.isfinite(float(np.float32(scale))):
        return None

    mask_shape = None
    causal = False
    if mask is not None and g.static_shape(mask) is None:
        # Shape inference lost the mask's shape (the legacy exporter's Expand of a computed shape). It
        # broadcasts into the scores' shape (the Add says so), so expanding it to that shape is exact.
        if g.dtype(mask) not in (None, g.dtype(x)):
            return None
        mask_shape = None
    elif mask is not None:
        mask_shape = g.static_shape(mask)
        if len(mask_shape) > 4 or g.dtype(mask) != g.dtype(x):
            return None
        full = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
        if broadcast_shape(full, shape) != tuple(shape) or full[0] not in (1, batch) or full[1] not in (1, heads):
            return None
        arr = g.constant_array(mask)
        if arr is not None:
            causal = seq == kv_seq and _mask_is_causal(np.reshape(arr, full), seq)
            if np.all(np.isfinite(arr)):
                # No row can be masked out entirely, so the Softmax has no NaN for the guard to clear
                # (finite inputs assumed, as everywhere in verification).
                nan_guard = False
            if not np.any(arr):
                mask, mask_shape = None, None  # a constant zero mask adds nothing
    elif nan_guard:
        nan_guard = False  # no mask: Softmax of finite scores has no NaN

    out_shape = g.static_shape(reshape.outputs[0])
    v_hidden = value.heads * value.head_size
    if out_shape is None or (shape_from_scores and int(np.prod(out_shape)) != batch * seq * v_hidden):
        return None
    output_reshape = None
    if tuple(out_shape) != (batch, seq, v_hidden):
        target = constant_ints(g, reshape.inputs[1])
        if target is not None and (reshape.attr("allowzero", 0) == 1 or 0 not in target):
            output_reshape = reshape.inputs[1]
        elif any(g.dim_is_bound(reshape.outputs[0], i) for i in range(len(out_shape))):
            return None
        else:
            output_reshape = ""  # a new constant of the static output shape
    return AttentionPattern(
        softmax.name, query, key, value, scale, mask, tuple(mask_shape) if mask_shape is not None else None,
        causal, nan_guard, reshape.outputs[0], tuple(out_shape), output_reshape,
        tuple(path + score_nodes), batch, seq, kv_seq,
    )


def attention_bias(e, g: Graph, p: AttentionPattern) -> str:
    """The mask as MultiHeadAttention's attention_bias: rank 4, last two dims full ("" when there is none).
    Where the model's batch or sequence dims are symbolic (bound only by --input-shape), the expansion
    reads them from the inputs at run time instead of baking the bound sizes in."""
    if p.mask is None or p.causal:
        return ""
    dtype = g.dtype(p.output)
    bias = p.mask
    if p.mask_shape is None:
        full: tuple[int, ...] | None = None
        target = (p.batch, p.query.heads, p.seq, p.kv_seq)
    else:
        full = (1,) * (4 - len(p.mask_shape)) + tuple(p.mask_shape)
        if len(p.mask_shape) != 4:
            axes = ints_constant(e, range(4 - len(p.mask_shape)))
            bias = e.add1("Unsqueeze", [bias, axes], TensorType(dtype, full))
        target = (full[0], full[1], p.seq, p.kv_seq)
        if target == full:
            return bias
    scores = g.nodes[p.softmax].inputs[0]
    if not any(g.dim_is_bound(scores, i) for i in range(4)):
        return e.add1("Expand", [bias, ints_constant(e, target)], TensorType(dtype, target))
    int_shape = lambda n: TensorType(INT64, (n,))  # noqa: E731
    q_shape = e.add1("Shape", [p.query.source], int_shape(3))
    k_shape = e.add1("Shape", [p.key.source], int_shape(3))

    def dim(shape: str, index: int) -> str:
        start, end = ints_constant(e, (index,)), ints_constant(e, (index + 1,))
        return e.add1("Slice", [shape, start, end], int_shape(1))

    # a batch of 1 that is the binding of a symbolic batch follows the input; the op accepts [B, ...] anyway
    batch = dim(q_shape, 0) if target[0] != 1 or g.dim_is_bound(scores, 0) else ints_constant(e, (1,))
    pieces = [batch, ints_constant(e, (target[1],)), dim(q_shape, 1), dim(k_shape, 1)]
    runtime_target = e.add1("Concat", pieces, int_shape(4), axis=0)
    return e.add1("Expand", [bias, runtime_target], TensorType(dtype, target))


def finish_output(e, g: Graph, p: AttentionPattern, fused: str) -> None:
    """Apply the NaN guard and the output's reshape to the fused op's [B,S,N*Hv] result, then rewire."""
    dtype = g.dtype(p.output)
    fused_type = TensorType(dtype, (p.batch, p.seq, p.value.heads * p.value.head_size))
    if p.nan_guard:
        is_nan = e.add1("IsNaN", [fused], TensorType(onnx.TensorProto.BOOL, fused_type.shape))
        zero = e.add1("Constant", [], TensorType(onnx.TensorProto.FLOAT, ()), value_float=0.0)
        if dtype != onnx.TensorProto.FLOAT:
            zero = e.add1("Cast", [zero], TensorType(dtype, ()), to=dtype)
        fused = e.add1("Where", [is_nan, zero, fused], fused_type)
    if p.output_reshape is not None:
        shape = p.output_reshape or ints_constant(e, p.output_shape)
        fused = e.add1("Reshape", [fused, shape], TensorType(dtype, p.output_shape))
    e.replace_value(p.output, fused)


class FuseMultiHeadAttention(Rule):
    name = "fuse-multihead-attention"
    description = (
        "Scaled-dot-product attention (head split Reshape/Transpose of Q, K, V; scale on the scores or on Q and "
        "K; additive mask; Softmax; context MatMul; head merge) -> com.microsoft.MultiHeadAttention, a causal "
        "constant mask as unidirectional. onnxruntime does not fuse dynamo exports; ~10 kernels per layer go."
    )

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for softmax in g.by_op("Softmax"):
            p = match_attention(g, softmax)
            if p is not None:
                yield p.nodes, ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        p = match_attention(g, g.nodes[nodes[0]])
        assert p is not None, "fuse-multihead-attention: the match no longer holds"
        e = GraphEdit(g, self.name)
        bias = attention_bias(e, g, p)
        inputs = [p.query.source, p.key.source, p.value.source, "", "", bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        out_type = TensorType(g.dtype(p.output), (p.batch, p.seq, p.value.heads * p.value.head_size))
        attrs = make_attributes(num_heads=p.query.heads, scale=float(np.float32(p.scale)),
                                unidirectional=1 if p.causal else None)
        (fused,) = e.add("MultiHeadAttention", inputs, [out_type], attrs, domain=CONTRIB_DOMAIN)
        finish_output(e, g, p, fused)
        return e.commit()
