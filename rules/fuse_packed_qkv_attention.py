"""fuse-packed-qkv-attention: attention fed by one merged Q/K/V projection -> com.microsoft.Attention.

The projection is MatMul(X, W) [+ b] (what merge-parallel-matmul produces), or GPT-2's c_attn as exported
by torch: Reshape [B*S, in] -> Gemm(W, b) -> Reshape [B, S, 3D]. A Split along the last axis gives Q, K, V,
and the rest is either the attention subgraph fuse-multihead-attention matches, or a MultiHeadAttention that
rule already made (so the fusion does not depend on whether the projections were merged before or after the
attention was fused; the MultiHeadAttention must have no bias, key padding mask or past state, and its
attention_bias carries over unchanged). Attention takes X, the merged weight
[in, Dq+Dk+Dv] and bias in Q|K|V column order, so one op replaces the projection GEMM and the attention;
columns in another order are re-sliced (constant work, folded on export and by onnxruntime).

Attention semantics relied on (onnxruntime 1.32 contrib schema, since_version 1): input [B,S,in], weights
[in, Dq+Dk+Dv], bias [Dq+Dk+Dv] (optional), qkv_hidden_sizes when the sizes differ, attention_bias (input 5)
added to the scaled scores, unidirectional=1 for causal self-attention, output [B,S,Dv].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, TensorType, make_attributes
from xrlflow.rules.common import concat, ints_constant, normalize_axis, rewritable, sole_reader, split, split_sizes
from xrlflow.rules.fuse_multihead_attention import (
    CONTRIB_DOMAIN, AttentionPattern, HeadLayout, attention_bias, finish_output, match_attention,
)


@dataclass(frozen=True)
class PackedProjection:
    x: str  # [B, S, in], or [B*S, in] when `x_reshaped` is False
    x_is_3d: bool
    weight: str  # [in, total] (or [total, in] with transposed)
    transposed: bool
    bias: str | None  # [total] or [1, total]
    sizes: tuple[int, ...]  # Split sizes
    order: tuple[int, int, int]  # Split output index of Q, K, V
    nodes: tuple[str, ...]


def _bias_of(g: Graph, add, y: str, total: int) -> str | None:
    if add is None or add.op_type != "Add" or not rewritable(add):
        return None
    other = add.inputs[1] if add.inputs[0] == y else add.inputs[0]
    if other == y or g.static_shape(other) not in ((total,), (1, total)) or g.dtype(other) != g.dtype(y):
        return None
    return other


@dataclass(frozen=True)
class QkvOperands:
    """What `match_projection` needs to know of an attention: where Q, K, V come from, and their sizes."""

    query: HeadLayout
    key: HeadLayout
    value: HeadLayout
    batch: int
    seq: int
    kv_seq: int


@dataclass(frozen=True)
class FusedAttention:
    """A com.microsoft.MultiHeadAttention that fuse-multihead-attention made, read back."""

    node: str
    operands: QkvOperands
    attention_bias: str  # "" when there is none
    scale: float | None  # None: the op's default, 1/sqrt(head size)
    unidirectional: int
    output: str


def match_fused_attention(g: Graph, node) -> FusedAttention | None:
    if node.domain != CONTRIB_DOMAIN or len(node.inputs) < 3 or len(node.inputs) > 6:  # contrib ops are opaque
        return None
    padded = list(node.inputs) + [""] * (6 - len(node.inputs))
    if padded[3] or padded[4] or not all(padded[:3]):
        return None  # a packed bias or a key padding mask has no place in Attention's inputs as they are
    if any(g.use_count(out) for out in node.outputs[1:] if out):
        return None
    shapes = [g.static_shape(v) for v in padded[:3]]
    heads = int(node.attr("num_heads", 0))
    if heads <= 0 or any(s is None or len(s) != 3 for s in shapes):
        return None
    (batch, seq, dq), (kb, kv_seq, dk), (vb, vs, dv) = shapes  # type: ignore[misc]
    if batch != kb or batch != vb or kv_seq != vs or dq != dk or dq % heads or dv % heads:
        return None
    layouts = [HeadLayout(v, heads, d // heads, 1.0, ()) for v, d in zip(padded[:3], (dq, dk, dv))]
    scale = node.attr("scale", None)
    operands = QkvOperands(layouts[0], layouts[1], layouts[2], batch, seq, kv_seq)
    return FusedAttention(node.name, operands, padded[5], None if scale is None else float(scale),
                          int(node.attr("unidirectional", 0)), node.outputs[0])


def match_projection(g: Graph, p: AttentionPattern | QkvOperands) -> PackedProjection | None:
    sources = (p.query.source, p.key.source, p.value.source)
    split_node = g.producer_of(sources[0])
    if split_node is None or split_node.op_type != "Split" or not rewritable(split_node) or len(split_node.outputs) != 3:
        return None
    if any(g.producer_of(s) is not split_node for s in sources) or len(set(sources)) != 3:
        return None
    if any(g.use_count(s) != 1 for s in sources):
        return None  # Q, K or V is read elsewhere too (e.g. a present key/value output)
    packed = split_node.inputs[0]
    shape = g.static_shape(packed)
    if shape is None or len(shape) != 3 or normalize_axis(split_node.attr("axis", 0), 3) != 2:
        return None
    if p.seq != p.kv_seq or shape[:2] != (p.batch, p.seq):
        return None
    sizes = split_sizes(g, split_node)
    if sizes is None or len(sizes) != 3 or sum(sizes) != shape[2]:
        return None
    order = tuple(split_node.outputs.index(s) for s in sources)
    total = shape[2]
    nodes = [split_node.name]
    if sole_reader(g, packed) is not split_node:
        return None
    producer = g.producer_of(packed)
    if producer is None or not rewritable(producer):
        return None
    if producer.op_type == "Reshape":  # [B*S, total] -> [B, S, total] after a 2-D Gemm/MatMul
        flat = producer.inputs[0]
        if g.static_shape(flat) != (p.batch * p.seq, total) or sole_reader(g, flat) is not producer:
            return None
        nodes.append(producer.name)
        y = flat
    else:
        y = packed
    node = g.producer_of(y)
    if node is None or not rewritable(node):
        return None
    bias = None
    if node.op_type == "Add":
        for cand in node.inputs:
            mm = g.producer_of(cand)
            if mm is not None and rewritable(mm) and mm.op_type in ("MatMul", "Gemm") and sole_reader(g, cand) is node:
                bias = _bias_of(g, node, cand, total)
                if bias is not None:
                    nodes.append(node.name)
                    node, y = mm, cand
                    break
        else:
            return None
        if node.op_type == "Add":
            return None
    transposed = False
    if node.op_type == "Gemm":
        if node.attr("transA", 0) != 0 or float(node.attr("alpha", 1.0)) != 1.0:
            return None
        transposed = node.attr("transB", 0) == 1
        if len(node.inputs) > 2 and node.inputs[2]:
            if bias is not None or float(node.attr("beta", 1.0)) != 1.0:
                return None
            c = node.inputs[2]
            if g.static_shape(c) not in ((total,), (1, total)):
                return None
            bias = c
    elif node.op_type != "MatMul":
        return None
    x, w = node.inputs[0], node.inputs[1]
    w_shape, x_shape = g.static_shape(w), g.static_shape(x)
    if not g.is_constant(w) or w_shape is None or len(w_shape) != 2 or x_shape is None:
        return None
    width = w_shape[0] if transposed else w_shape[1]
    in_size = w_shape[1] if transposed else w_shape[0]
    if width != total or x_shape[-1] != in_size or g.dtype(w) != g.dtype(x):
        return None
    if bias is not None and (not g.is_constant(bias) or g.dtype(bias) != g.dtype(x)):
        return None
    if len(x_shape) == 3:
        if x_shape[:2] != (p.batch, p.seq):
            return None
        x_is_3d = True
    elif len(x_shape) == 2 and x_shape[0] == p.batch * p.seq:
        source = g.producer_of(x)
        x_is_3d = False
        if source is not None and rewritable(source) and source.op_type == "Reshape" and \
                g.static_shape(source.inputs[0]) == (p.batch, p.seq, in_size):
            x, x_is_3d = source.inputs[0], True
        elif g.dim_is_bound(y, 0):
            return None  # restoring [B, S, in] would bake a dim that only --input-shape fixed
    else:
        return None
    nodes.append(node.name)
    if (sizes[order[0]], sizes[order[1]]) != (p.query.heads * p.query.head_size,) * 2:
        return None
    if sizes[order[2]] != p.value.heads * p.value.head_size:
        return None
    return PackedProjection(x, x_is_3d, w, transposed, bias, sizes, order, tuple(nodes))  # type: ignore[arg-type]


class FusePackedQkvAttention(Rule):
    name = "fuse-packed-qkv-attention"
    description = (
        "Attention whose Q, K, V come from one merged projection (MatMul/Gemm + bias, then Split) -> "
        "com.microsoft.Attention on the merged weights (GPT-2's c_attn, merge-parallel-matmul's result); a "
        "causal constant mask becomes unidirectional. One op replaces the QKV GEMM and the whole attention; "
        "a MultiHeadAttention fed by such a Split becomes Attention too."
    )

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for softmax in g.by_op("Softmax"):
            p = match_attention(g, softmax)
            if p is None:
                continue
            proj = match_projection(g, p)
            if proj is not None:
                yield p.nodes + proj.nodes, ()
        for node in g.by_op("MultiHeadAttention"):
            fused = match_fused_attention(g, node)
            proj = match_projection(g, fused.operands) if fused is not None else None
            if proj is not None:
                yield (node.name,) + proj.nodes, ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        first = g.nodes[nodes[0]]
        if first.op_type == "MultiHeadAttention":
            return self._rewrite_fused(g, first)
        p = match_attention(g, first)
        proj = match_projection(g, p) if p is not None else None
        assert p is not None and proj is not None, "fuse-packed-qkv-attention: the match no longer holds"
        e = GraphEdit(g, self.name)
        x, w, b = self._packed_inputs(e, g, proj, p.batch, p.seq)
        bias_input = attention_bias(e, g, p)
        inputs = [x, w, b or "", "", "", bias_input]
        while inputs and not inputs[-1]:
            inputs.pop()
        q_hidden = p.query.heads * p.query.head_size
        v_hidden = p.value.heads * p.value.head_size
        attrs = make_attributes(
            num_heads=p.query.heads, scale=float(np.float32(p.scale)), unidirectional=1 if p.causal else None,
            qkv_hidden_sizes=None if v_hidden == q_hidden else (q_hidden, q_hidden, v_hidden),
        )
        out_type = TensorType(g.dtype(p.output), (p.batch, p.seq, v_hidden))
        (fused,) = e.add("Attention", inputs, [out_type], attrs, domain=CONTRIB_DOMAIN)
        finish_output(e, g, p, fused)
        return e.commit()

    def _rewrite_fused(self, g: Graph, node) -> Graph:
        fused = match_fused_attention(g, node)
        proj = match_projection(g, fused.operands) if fused is not None else None
        assert fused is not None and proj is not None, "fuse-packed-qkv-attention: the match no longer holds"
        e = GraphEdit(g, self.name)
        p = fused.operands
        x, w, b = self._packed_inputs(e, g, proj, p.batch, p.seq)
        inputs = [x, w, b or "", "", "", fused.attention_bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        q_hidden = p.query.heads * p.query.head_size
        v_hidden = p.value.heads * p.value.head_size
        attrs = make_attributes(
            num_heads=p.query.heads, scale=fused.scale, unidirectional=fused.unidirectional or None,
            qkv_hidden_sizes=None if v_hidden == q_hidden else (q_hidden, q_hidden, v_hidden),
        )
        out_type = TensorType(g.dtype(fused.output), (p.batch, p.seq, v_hidden))
        (packed,) = e.add("Attention", inputs, [out_type], attrs, domain=CONTRIB_DOMAIN)
        e.replace_value(fused.output, packed)
        return e.commit()

    @staticmethod
    def _packed_inputs(e, g: Graph, proj: PackedProjection, batch: int, seq: int) -> tuple[str, str, str | None]:
        """Attention's input [B, S, in], weights [in, Dq+Dk+Dv] and bias, in Q|K|V column order."""
        dtype = g.dtype(proj.x)
        w, b = proj.weight, proj.bias
        if proj.transposed:
            ws = g.static_shape(w)
            w = e.add1("Transpose", [w], TensorType(dtype, (ws[1], ws[0])), perm=(1, 0))
        total = sum(proj.sizes)
        if b is not None and g.static_shape(b) != (total,):
            b = e.add1("Reshape", [b, ints_constant(e, (total,))], TensorType(dtype, (total,)))
        if proj.order != (0, 1, 2):
            w_type = TensorType(dtype, (g.static_shape(proj.x)[-1], total))
            pieces = split(e, w, w_type, 1, proj.sizes)
            w = concat(e, g, [pieces[i] for i in proj.order], axis=1)
            if b is not None:
                b_pieces = split(e, b, TensorType(dtype, (total,)), 0, proj.sizes)
                b = concat(e, g, [b_pieces[i] for i in proj.order], axis=0)
        x = proj.x
        if not proj.x_is_3d:
            in_size = g.static_shape(x)[-1]
            x = e.add1("Reshape", [x, ints_constant(e, (batch, seq, in_size))], TensorType(dtype, (batch, seq, in_size)))
        return x, w, b
