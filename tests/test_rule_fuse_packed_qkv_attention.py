"""fuse-packed-qkv-attention: numeric equality on onnxruntime's CPU EP, near misses, and real exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.attentionexports import hf_exports, zoo_exports  # noqa: F401  (pytest fixtures)
from tests.attentiongen import AttentionSpec, attention_model
from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves
from tests.test_rule_fuse_multihead_attention import ATTENTION_FP32, check_export_fuses_every_layer, fuse_everywhere
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.verify import Tolerance, verify_models

RULE = "fuse-packed-qkv-attention"


def fused_node(graph):
    (node,) = [n for n in graph.nodes.values() if n.op_type == "Attention"]
    assert node.domain == "com.microsoft"
    return node


@pytest.mark.parametrize("spec", [
    AttentionSpec(packed="matmul"),  # batch 2, seq 5, hidden 8
    AttentionSpec(packed="matmul", batch=1, seq=8, hidden=8, mask="input-b1sl", seed=1),  # square
    AttentionSpec(packed="gemm", batch=1, seq=6, mask="causal", seed=2),  # GPT-2's c_attn, causal
    AttentionSpec(packed="gemm", scale="qk-sqrt", key="sdpa", mask="bool-inf", nan_guard=True, seed=3),
    AttentionSpec(packed="kqv", mask="const-ss", output="2d", seed=4),  # columns in K|Q|V order
    AttentionSpec(packed="matmul", v_head_size=3, mask="padding-b11l", seed=5),  # Dv != Dq
])
def test_fusion_preserves_function(spec):
    model = attention_model(spec)
    (fused,) = assert_rule_preserves(model, RULE, ATTENTION_FP32)
    node = fused_node(fused)
    assert node.attr("num_heads") == spec.heads
    assert node.attr("scale") == pytest.approx(1.0 / np.sqrt(spec.hidden // spec.heads), rel=1e-6)
    assert "Softmax" not in fused.op_counts()
    assert all(fused.is_constant(n.inputs[0]) for n in fused.by_op("Split"))  # only weights are re-sliced
    if spec.mask == "causal":
        assert node.attr("unidirectional") == 1
    if spec.v_head_size:
        assert node.attr("qkv_hidden_sizes") == (spec.hidden, spec.hidden, spec.heads * spec.v_head_size)
    exported = to_model(fused, fold_constants=True)
    for seed in range(3):
        report = verify_models(model, exported, tolerance=ATTENTION_FP32, seed=seed + 20)
        assert report.ok, report.to_dict()


def test_separate_projections_do_not_match():
    assert_no_match(attention_model(AttentionSpec(mask="input-b1sl")), RULE)


def _split_model(order_breaker: str):
    """A packed projection whose Split does not hand Q, K, V to one attention."""
    b = ModelBuilder(31)
    x = b.input("x", [1, 4, 8])
    y = b.op("Add", [b.op("MatMul", [x, b.const((8, 24))]), b.const((24,))])
    axis = 1 if order_breaker == "wrong-axis" else 2
    if order_breaker == "wrong-axis":
        y = b.op("Reshape", [y, b.const(None, value=[1, 12, 8], dtype=np.int64)])
        q, k, v = b.op("Split", [y, b.const(None, value=[4, 4, 4], dtype=np.int64)], n_out=3, axis=axis)
    else:
        q, k, v = b.op("Split", [y, b.const(None, value=[8, 8, 8], dtype=np.int64)], n_out=3, axis=axis)

    def heads(value, perm):
        r = b.op("Reshape", [value, b.const(None, value=[1, 4, 2, 4], dtype=np.int64)])
        return b.op("Transpose", [r], perm=list(perm))

    scores = b.op("Mul", [b.op("MatMul", [heads(q, (0, 2, 1, 3)), heads(k, (0, 2, 3, 1))]),
                          b.const(None, value=np.float32(0.5))])
    context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), heads(v, (0, 2, 1, 3))])
    context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]),
                               b.const(None, value=[1, 4, 8], dtype=np.int64)])
    outputs = [context]
    if order_breaker == "k-read-elsewhere":
        outputs.append(b.op("Relu", [k]))
    b.output(*outputs)
    return b.model()


def test_packed_block_itself_matches():
    assert_rule_preserves(_split_model("none"), RULE, ATTENTION_FP32)


@pytest.mark.parametrize("breaker", ["wrong-axis", "k-read-elsewhere"])
def test_near_misses(breaker):
    model = _split_model(breaker)
    assert_no_match(model, RULE)


def test_gemm_with_alpha_does_not_match():
    model = attention_model(AttentionSpec(packed="gemm", seed=32))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.attribute.append(onnx.helper.make_attribute("alpha", 2.0))
    assert_no_match(model, RULE)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_gpt2_dynamo_export_fuses_on_every_layer(hf_exports, attn):
    fused = check_export_fuses_every_layer(hf_exports("gpt2", attn), RULE, 2, "Attention")
    assert all(n.attr("unidirectional") == 1 for n in fused.by_op("Attention"))
    assert fused.op_counts()["Gemm"] == 6  # c_proj, c_fc, mlp c_proj per layer; c_attn went into Attention


@pytest.mark.parametrize("source", [("bert", "eager"), ("bert", "sdpa"), ("vit", "sdpa")])
def test_after_merge_parallel_matmul_on_hf_exports(hf_exports, source):
    model = onnx.load(str(hf_exports(*source)))
    merged, count = fuse_everywhere(load_graph(model), "merge-parallel-matmul")
    assert count == 2
    fused, layers = fuse_everywhere(merged, RULE)
    assert layers == 2 and fused.op_counts()["Attention"] == 2
    report = verify_models(model, to_model(fused, fold_constants=True), tolerance=Tolerance(1e-4, 1e-4))
    assert report.ok, report.to_dict()


@pytest.mark.parametrize("name,layers", [("bert-base", 2), ("gpt2", 2), ("transformer-transducer", 4)])
def test_zoo_transformers_after_merge(zoo_exports, name, layers):
    model = onnx.load(str(zoo_exports(name)))
    merged, _ = fuse_everywhere(load_graph(model), "merge-parallel-matmul")
    fused, count = fuse_everywhere(merged, RULE)
    assert count == layers
    report = verify_models(model, to_model(fused, fold_constants=True), tolerance=Tolerance(1e-4, 1e-4))
    assert report.ok, report.to_dict()


# The same fusion when fuse-multihead-attention ran first: MultiHeadAttention fed by the Split of a packed
# projection becomes Attention (so the order in which a search merges and fuses does not matter).

def _mha_first(model):
    """fuse-multihead-attention everywhere, then merge-parallel-matmul everywhere: MHA fed by a Split."""
    fused, _ = fuse_everywhere(load_graph(model), "fuse-multihead-attention")
    merged, _ = fuse_everywhere(fused, "merge-parallel-matmul")
    return to_model(merged, fold_constants=False)


@pytest.mark.parametrize("spec", [
    AttentionSpec(packed="matmul", mask="input-b1sl", seed=40),  # input padding mask -> attention_bias
    AttentionSpec(packed="gemm", scale="qk-sqrt", key="sdpa", mask="bool-inf", nan_guard=True, seed=41),
    AttentionSpec(packed="gemm", batch=1, seq=6, mask="causal", seed=42),  # unidirectional carries over
    AttentionSpec(packed="kqv", mask="const-ss", seed=43),  # columns re-sliced into Q|K|V order
    AttentionSpec(packed="matmul", v_head_size=3, seed=44),  # Dv != Dq: qkv_hidden_sizes
])
def test_multihead_attention_fed_by_packed_split_preserves_function(spec):
    model = attention_model(spec)
    fused_first, _ = fuse_everywhere(load_graph(model), "fuse-multihead-attention")
    assert fused_first.op_counts().get("MultiHeadAttention") == 1
    staged = to_model(fused_first, fold_constants=False)
    (packed,) = assert_rule_preserves(staged, RULE, ATTENTION_FP32)
    assert "MultiHeadAttention" not in packed.op_counts()
    node = fused_node(packed)
    mha = fused_first.by_op("MultiHeadAttention")[0]
    assert node.attr("num_heads") == mha.attr("num_heads")
    assert node.attr("unidirectional", 0) == mha.attr("unidirectional", 0)
    if len(mha.inputs) > 5 and mha.inputs[5]:
        assert len(node.inputs) == 6 and node.inputs[5]
    exported = to_model(packed, fold_constants=True)
    for seed in range(3):  # against the original model, not only the staged one
        report = verify_models(model, exported, tolerance=ATTENTION_FP32, seed=seed + 30)
        assert report.ok, report.to_dict()


def test_multihead_attention_on_separate_projections_does_not_match():
    fused, _ = fuse_everywhere(load_graph(attention_model(AttentionSpec(mask="input-b1sl", seed=45))),
                               "fuse-multihead-attention")
    assert fused.op_counts().get("MultiHeadAttention") == 1
    assert_no_match(to_model(fused, fold_constants=False), RULE)


def test_multihead_attention_with_key_padding_mask_does_not_match():
    fused, _ = fuse_everywhere(load_graph(attention_model(AttentionSpec(packed="matmul", seed=46))),
                               "fuse-multihead-attention")
    model = to_model(fused, fold_constants=False)
    mha = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    q = mha.input[0]
    padding = onnx.helper.make_tensor_value_info("key_padding_mask", onnx.TensorProto.INT32, None)
    model.graph.input.append(padding)
    del mha.input[3:]
    mha.input.extend(["", "key_padding_mask"])
    assert q == mha.input[0]
    assert_no_match(model, RULE)


@pytest.mark.parametrize("source", [("bert", "eager"), ("bert", "sdpa"), ("vit", "sdpa")])
def test_hf_exports_pack_after_multihead_attention(hf_exports, source):
    model = onnx.load(str(hf_exports(*source)))
    staged = _mha_first(model)
    fused, layers = fuse_everywhere(load_graph(staged), RULE)
    assert layers == 2 and fused.op_counts()["Attention"] == 2 and "MultiHeadAttention" not in fused.op_counts()
    report = verify_models(model, to_model(fused, fold_constants=True), tolerance=Tolerance(1e-4, 1e-4))
    assert report.ok, report.to_dict()
