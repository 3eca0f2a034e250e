"""fuse-multihead-attention: numeric equality on onnxruntime's CPU EP, near misses, and real exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.attentiongen import AttentionSpec, attention_model
from tests.attentionexports import hf_exports, zoo_exports  # noqa: F401  (pytest fixtures)
from tests.rulecheck import ENGINE, assert_no_match, assert_rule_preserves, matches_of
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.verify import Tolerance, random_inputs, verify_models

RULE = "fuse-multihead-attention"
ATTENTION_FP32 = Tolerance(rtol=1e-4, atol=1e-5)


def fused_node(graph):
    (node,) = [n for n in graph.nodes.values() if n.op_type == "MultiHeadAttention"]
    assert node.domain == "com.microsoft"
    return node


@pytest.mark.parametrize("spec", [
    AttentionSpec(),  # batch 2, seq 5 != hidden 8
    AttentionSpec(batch=1, seq=8, hidden=8, heads=2, seed=1),  # square seq x hidden
    AttentionSpec(batch=1, seq=3, kv_seq=6, hidden=12, heads=3, mask="input-bnsl", seed=2),  # cross-attention
    AttentionSpec(scale="scores-div", key="two", mask="input-b1sl", seed=3),
    AttentionSpec(batch=1, scale="qk-sqrt", key="sdpa", mask="bool-inf", nan_guard=True, seed=4),
    AttentionSpec(scale="qk-sqrt", key="sdpa", mask="const-11sl", nan_guard=True, seed=5),
    AttentionSpec(mask="const-ss", output="2d", seed=6),
    AttentionSpec(mask="padding-b11l", v_head_size=3, seed=7),
    AttentionSpec(batch=1, seq=6, mask="causal", seed=8),
    AttentionSpec(scale="none", seq=4, hidden=16, heads=4, seed=9),
])
def test_fusion_preserves_function(spec):
    model = attention_model(spec)
    (fused,) = assert_rule_preserves(model, RULE, ATTENTION_FP32)
    node = fused_node(fused)
    assert node.attr("num_heads") == spec.heads
    head_size = spec.hidden // spec.heads
    expected_scale = 1.0 if spec.scale == "none" else 1.0 / np.sqrt(head_size)
    assert node.attr("scale") == pytest.approx(expected_scale, rel=1e-6)
    assert fused.op_counts().get("Softmax", 0) == 0
    if spec.mask == "causal":
        assert node.attr("unidirectional") == 1 and len(node.inputs) == 3  # the mask became unidirectional
    exported = to_model(fused, fold_constants=True)
    assert ("com.microsoft", 1) in [(o.domain, o.version) for o in exported.opset_import]
    for seed in range(3):  # more random instances than assert_rule_preserves' one
        report = verify_models(model, exported, tolerance=ATTENTION_FP32, seed=seed + 10)
        assert report.ok, report.to_dict()


def test_fully_masked_rows_keep_the_nan_guard():
    spec = AttentionSpec(batch=2, seq=3, kv_seq=2, hidden=4, heads=2, key="sdpa", scale="qk-sqrt",
                         mask="bool-inf", nan_guard=True, seed=11)
    model = attention_model(spec)
    (fused,) = assert_rule_preserves(model, RULE, ATTENTION_FP32)
    exported = to_model(fused)
    feeds = random_inputs(model, seed=0)
    feeds["keep"][0, 0, 1, :] = False  # one query row sees no key at all: softmax gives NaN, the guard 0
    feeds["keep"][1] = True
    report = verify_models(model, exported, feeds=feeds, tolerance=ATTENTION_FP32)
    assert report.ok, report.to_dict()


def test_nan_guard_without_mask_is_dropped():
    model = attention_model(AttentionSpec(nan_guard=True, seed=12))
    (fused,) = assert_rule_preserves(model, RULE, ATTENTION_FP32)
    assert "IsNaN" not in fused.op_counts()


@pytest.mark.parametrize("overrides", [
    {"scale_shape": (1, 2, 1, 1)},  # a per-head scale, not a scalar
    {"scale_value": 0.0},  # MultiHeadAttention reads scale 0 as "default"
    {"mask_after_scale": True},  # (QK^T + mask) * c scales the mask too
    {"v_scale": True},  # a scalar on V is not an attention scale
    {"softmax_axis": 2},  # softmax over the query axis
])
def test_near_misses_on_scale_and_softmax(overrides):
    spec = AttentionSpec(mask="input-b1sl", seed=13)
    assert_no_match(attention_model(spec, **overrides), RULE)


def test_near_miss_perm_that_is_not_the_head_split():
    # batch == heads, so perm (2,0,1,3) gives the [B,N,S,H] shape with the wrong layout
    spec = AttentionSpec(batch=2, heads=2, seed=14)
    assert_no_match(attention_model(spec, q_perm=(2, 0, 1, 3)), RULE)
    assert_no_match(attention_model(spec, k_perm=(2, 0, 3, 1)), RULE)


def test_near_miss_key_not_transposed():
    # seq == head size, so Q @ K without K's transpose is still a valid MatMul
    spec = AttentionSpec(batch=1, seq=4, hidden=8, heads=2, seed=15)
    assert_no_match(attention_model(spec, k_perm=(0, 2, 1, 3)), RULE)


def test_near_miss_mask_that_broadcasts_the_batch():
    # scores of batch 1 plus a [2,1,S,L] mask: the attention output has batch 2, which the op cannot express
    from tests.rulecheck import ModelBuilder

    b = ModelBuilder(16)
    x = b.input("x", [1, 4, 8])
    mask = b.input("mask", [2, 1, 4, 4])

    def heads(value, perm):
        r = b.op("Reshape", [value, b.const(None, value=[1, 4, 2, 4], dtype=np.int64)])
        return b.op("Transpose", [r], perm=list(perm))

    q, k, v = (b.op("MatMul", [x, b.const((8, 8))]) for _ in range(3))
    scores = b.op("Add", [b.op("MatMul", [heads(q, (0, 2, 1, 3)), heads(k, (0, 2, 3, 1))]), mask])
    context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), heads(v, (0, 2, 1, 3))])
    context = b.op("Transpose", [context], perm=[0, 2, 1, 3])
    b.output(b.op("Reshape", [context, b.const(None, value=[2, 4, 8], dtype=np.int64)]))
    assert_no_match(b.model(), RULE)


def test_near_miss_non_causal_constant_mask_keeps_the_bias():
    spec = AttentionSpec(batch=1, seq=5, mask="causal", seed=17)
    model = attention_model(spec)
    init = next(t for t in model.graph.initializer if len(t.dims) == 4)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[0, 0, 0, 1] = 0.0  # one future position visible: not causal any more
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    (fused,) = assert_rule_preserves(model, RULE, ATTENTION_FP32)
    node = fused_node(fused)
    assert node.attr("unidirectional") is None and len(node.inputs) == 6


# ---- real exports ------------------------------------------------------------------------------------------

def fuse_everywhere(graph, rule):
    count = 0
    while True:
        found = matches_of(graph, rule)
        if not found:
            return graph, count
        graph = ENGINE.apply(graph, found[0])
        count += 1


def check_export_fuses_every_layer(path, rule, layers, op_type):
    model = onnx.load(str(path))
    graph = load_graph(model)
    assert len(graph.by_op("Softmax")) == layers
    fused, count = fuse_everywhere(graph, rule)
    assert count == layers and fused.op_counts().get(op_type) == layers
    assert len(fused) < len(graph) and "Softmax" not in fused.op_counts()
    exported = to_model(fused, fold_constants=True)
    onnx.checker.check_model(exported, full_check=True)
    for seed in range(2):
        report = verify_models(model, exported, tolerance=Tolerance(rtol=1e-4, atol=1e-4), seed=seed)
        assert report.ok, report.to_dict()
    reloaded = load_graph(to_model(fused))  # the contrib op's outputs keep their types through a round trip
    assert reloaded.structural_hash() == fused.structural_hash()
    assert all(reloaded.static_shape(n.outputs[0]) for n in reloaded.by_op(op_type))
    return fused


@pytest.mark.parametrize("family", ["bert", "vit", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_dynamo_exports_fuse_on_every_layer(hf_exports, family, attn):
    check_export_fuses_every_layer(hf_exports(family, attn), RULE, 2, "MultiHeadAttention")


@pytest.mark.parametrize("family,attn,opset", [("bert", "eager", 14), ("vit", "eager", 14), ("bert", "sdpa", 17)])
def test_hf_legacy_exports_fuse_on_every_layer(hf_exports, family, attn, opset):
    # TorchScript exports: a mask whose shape inference cannot tell, no-op Casts and Reshapes on the way
    check_export_fuses_every_layer(hf_exports(family, attn, dynamo=False, opset=opset), RULE, 2, "MultiHeadAttention")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("binding", [(2, 8), (1, 8)])
def test_hf_export_with_symbolic_batch_and_seq(hf_exports, attn, binding):
    # the rule sees the --input-shape binding; the fused model must still run at other batch and seq sizes
    model = onnx.load(str(hf_exports("bert", attn, dynamic=True)))
    names = [i.name for i in model.graph.input]
    graph = load_graph(model, {n: binding for n in names})
    fused, count = fuse_everywhere(graph, RULE)
    assert count == 2
    exported = to_model(fused, fold_constants=True)
    assert [i.type for i in exported.graph.input] == [i.type for i in model.graph.input]
    for shape in [(2, 8), (1, 13), (3, 5)]:
        report = verify_models(model, exported, input_shapes={n: shape for n in names}, tolerance=Tolerance(1e-4, 1e-4))
        assert report.ok, (shape, report.to_dict())


def test_hf_gpt2_becomes_unidirectional(hf_exports):
    fused, _ = fuse_everywhere(load_graph(onnx.load(str(hf_exports("gpt2", "sdpa")))), RULE)
    assert all(n.attr("unidirectional") == 1 for n in fused.by_op("MultiHeadAttention"))


@pytest.mark.parametrize("name,layers", [
    ("bert-base", 2), ("vit-base", 2), ("gpt2", 2), ("mini-dalle", 2), ("transformer-transducer", 4),
])
def test_zoo_transformers_fuse_on_every_layer(zoo_exports, name, layers):
    check_export_fuses_every_layer(zoo_exports(name), RULE, layers, "MultiHeadAttention")
