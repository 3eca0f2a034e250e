"""Small attention blocks in the layouts exporters emit, for the attention-fusion rule tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from tests.rulecheck import ModelBuilder


@dataclass(frozen=True)
class AttentionSpec:
    batch: int = 2
    seq: int = 5
    kv_seq: int | None = None  # None: self-attention (kv_seq == seq)
    hidden: int = 8
    heads: int = 2
    v_head_size: int | None = None
    scale: str = "scores-mul"  # scores-mul | scores-div | qk-sqrt | none
    key: str = "direct"  # direct: perm (0,2,3,1) | two: (0,2,1,3) then (0,1,3,2) | sdpa: Reshape/Transpose/Reshape
    mask: str = "none"  # none | input-b1sl | input-bnsl | const-ss | const-11sl | padding-b11l | bool-inf | causal
    nan_guard: bool = False
    packed: str = "no"  # no | matmul (MatMul+Add+Split) | gemm (GPT-2: Reshape, Gemm, Reshape, Split) | kqv
    output: str = "3d"  # 3d | 2d (Reshape to [B*S, D])
    seed: int = 0


def attention_model(spec: AttentionSpec, opset: int = 17, **overrides):
    """softmax(Q K^T * scale + mask) V over heads, exported-graph style. `overrides` break one precondition
    (near misses): q_perm, k_perm, softmax_axis, scale_value, v_scale, scale_shape, mask_after_scale."""
    b = ModelBuilder(spec.seed, opset=opset)
    bsz, s, d, n = spec.batch, spec.seq, spec.hidden, spec.heads
    l = spec.kv_seq or s
    h = d // n
    hv = spec.v_head_size or h
    dv = n * hv
    x = b.input("x", [bsz, s, d])
    kv_in = x if spec.kv_seq is None else b.input("memory", [bsz, l, d])
    if spec.packed != "no":
        assert spec.kv_seq is None
        w = b.const((d, 2 * d + dv), 0.5)
        bias = b.const((2 * d + dv,), 0.5)
        if spec.packed == "gemm":
            flat = b.op("Reshape", [x, b.const(None, value=[bsz * s, d], dtype=np.int64)])
            y = b.op("Gemm", [flat, w, bias])
            y = b.op("Reshape", [y, b.const(None, value=[bsz, s, 2 * d + dv], dtype=np.int64)])
        else:
            y = b.op("Add", [b.op("MatMul", [x, w]), bias])
        sizes = b.const(None, value=[d, d, dv], dtype=np.int64)
        pieces = b.op("Split", [y, sizes], n_out=3, axis=2)
        q, k, v = (pieces[1], pieces[0], pieces[2]) if spec.packed == "kqv" else pieces
    else:
        q = b.op("Add", [b.op("MatMul", [x, b.const((d, d), 0.5)]), b.const((d,), 0.5)])
        k = b.op("Add", [b.op("MatMul", [kv_in, b.const((d, d), 0.5)]), b.const((d,), 0.5)])
        v = b.op("MatMul", [kv_in, b.const((d, dv), 0.5)])

    def heads_of(value, length, size, perm):
        shaped = b.op("Reshape", [value, b.const(None, value=[bsz, length, n, size], dtype=np.int64)])
        return b.op("Transpose", [shaped], perm=list(perm))

    qh = heads_of(q, s, h, overrides.get("q_perm", (0, 2, 1, 3)))
    if "k_perm" in overrides:
        kt = heads_of(k, l, h, overrides["k_perm"])
    elif spec.key == "direct":
        kt = heads_of(k, l, h, (0, 2, 3, 1))
    elif spec.key == "two":
        kt = b.op("Transpose", [heads_of(k, l, h, (0, 2, 1, 3))], perm=[0, 1, 3, 2])
    else:  # sdpa: [B,N,L,H] -> [B*N,L,H] -> (0,2,1) -> [B,N,H,L]
        kh = heads_of(k, l, h, (0, 2, 1, 3))
        merged = b.op("Reshape", [kh, b.const(None, value=[bsz * n, l, h], dtype=np.int64)])
        kt = b.op("Reshape", [b.op("Transpose", [merged], perm=[0, 2, 1]),
                              b.const(None, value=[bsz, n, h, l], dtype=np.int64)])
    vh = heads_of(v, l, hv, (0, 2, 1, 3))
    if overrides.get("v_scale"):
        vh = b.op("Mul", [vh, b.const(None, value=2.0)])

    scale = overrides.get("scale_value", 1.0 / np.sqrt(h))
    scale_const = (lambda value: b.const(None, value=np.full(overrides["scale_shape"], value, np.float32))) \
        if "scale_shape" in overrides else (lambda value: b.const(None, value=np.float32(value)))
    if spec.scale == "qk-sqrt":
        root = float(np.sqrt(scale))
        qh = b.op("Mul", [qh, scale_const(root)])
        kt = b.op("Mul", [kt, scale_const(root)])
    scores = b.op("MatMul", [qh, kt])
    if spec.scale == "scores-mul" and not overrides.get("mask_after_scale"):
        scores = b.op("Mul", [scores, scale_const(scale)])
    elif spec.scale == "scores-div":
        scores = b.op("Div", [scores, scale_const(1.0 / scale)])

    mask = None
    if spec.mask == "input-b1sl":
        mask = b.input("mask", [bsz, 1, s, l])
    elif spec.mask == "input-bnsl":
        mask = b.input("mask", [bsz, n, s, l])
    elif spec.mask == "padding-b11l":
        mask = b.input("mask", [bsz, 1, 1, l])
    elif spec.mask == "const-ss":
        mask = b.const((s, l))
    elif spec.mask == "const-11sl":
        mask = b.const((1, 1, s, l))
    elif spec.mask == "bool-inf":
        keep = b.input("keep", [bsz, 1, s, l], TensorProto.BOOL)
        mask = b.op("Where", [keep, b.const(None, value=np.float32(0)), b.const(None, value=np.float32(-np.inf))])
    elif spec.mask == "causal":
        causal = np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)
        mask = b.const(None, value=causal[None, None])
    if mask is not None:
        scores = b.op("Add", [scores, mask])
    if overrides.get("mask_after_scale"):
        scores = b.op("Mul", [scores, scale_const(scale)])
    probs = b.op("Softmax", [scores], axis=overrides.get("softmax_axis", -1))
    if spec.nan_guard:
        probs = b.op("Where", [b.op("IsNaN", [probs]), b.const(None, value=np.float32(0)), probs])
    context = b.op("Transpose", [b.op("MatMul", [probs, vh])], perm=[0, 2, 1, 3])
    out_shape = [bsz, s, dv] if spec.output == "3d" else [bsz * s, dv]
    context = b.op("Reshape", [context, b.const(None, value=out_shape, dtype=np.int64)])
    out = b.op("MatMul", [context, b.const((dv, d), 0.5)])
    b.output(out)
    return b.model()
