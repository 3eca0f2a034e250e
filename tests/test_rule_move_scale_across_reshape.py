import numpy as np
import pytest

from tests.rulecheck import ENGINE, FP32, ModelBuilder, assert_no_match, load_graph, matches_of, round_trip
from xrlflow.onnx_io import to_model
from xrlflow.verify import verify_models


@pytest.mark.parametrize("shape,target,op,scalar_first", [
    ((1, 6, 8), (1, 6, 2, 4), "Mul", False),   # attention's head split
    ((4, 4), (2, 8), "Div", False),
    ((2, 3, 4), (24,), "Mul", True),
])
def test_scale_before_then_after_reshape(shape, target, op, scalar_first):
    b = ModelBuilder(1)
    r = b.op("Reshape", [b.input("x", shape), b.const(None, value=list(target), dtype="int64")])
    s = b.const((), value=np.float32(0.25 if op == "Mul" else 4.0))
    b.output(b.op("Relu", [b.op(op, [s, r] if scalar_first else [r, s])]))
    (moved,), _ = round_trip(b.model(), "move-scale-before-reshape", "move-scale-after-reshape")
    assert moved.consumer_nodes("x")[0].op_type == op


def test_near_miss_scale_that_is_not_a_scalar_or_divides_the_scalar():
    b = ModelBuilder(2)
    r = b.op("Reshape", [b.input("x", [2, 6]), b.const(None, value=[3, 4], dtype="int64")])
    b.output(b.op("Mul", [r, b.const((4,))]))  # per-column: not invariant under the Reshape
    r2 = b.op("Reshape", [b.input("y", [2, 6]), b.const(None, value=[3, 4], dtype="int64")])
    b.output(b.op("Div", [b.const((), value=np.float32(2.0)), r2]))  # s / x is not a scale of x
    assert_no_match(b.model(), "move-scale-before-reshape")


def test_attention_scale_reaches_the_query_projection():
    """Mul(Q @ K^T, s) with Q = Transpose(Reshape(X@Wq + bq)): the scale folds into Wq and bq, through
    move-scale-into-matmul, move-transpose-after-const-binary, move-scale-before-reshape, expand-mul-add and
    fold-scale-into-matmul; each step is checked numerically."""
    b = ModelBuilder(3)
    x = b.input("x", [1, 6, 8])
    q = b.op("Add", [b.op("MatMul", [x, b.const((8, 8), scale=0.5)]), b.const((8,))])
    k = b.op("Add", [b.op("MatMul", [x, b.const((8, 8), scale=0.5)]), b.const((8,))])
    heads = b.const(None, value=[1, 6, 2, 4], dtype="int64")
    q_t = b.op("Transpose", [b.op("Reshape", [q, heads])], perm=[0, 2, 1, 3])
    k_t = b.op("Transpose", [b.op("Reshape", [k, heads])], perm=[0, 2, 3, 1])
    scores = b.op("Mul", [b.op("MatMul", [q_t, k_t]), b.const((), value=np.float32(0.5))])
    b.output(b.op("Softmax", [scores], axis=-1))
    model = b.model()
    steps = [
        ("move-scale-into-matmul", lambda m, g: m.params == (0,)),
        ("move-transpose-after-const-binary", lambda m, g: True),
        ("move-scale-before-reshape", lambda m, g: True),
        ("expand-mul-add", lambda m, g: True),
        ("fold-scale-into-matmul", lambda m, g: True),
    ]
    graph = load_graph(model)
    for rule, pick in steps:
        found = [m for m in matches_of(graph, rule) if pick(m, graph)]
        assert found, f"{rule} does not apply"
        graph = ENGINE.apply(graph, found[0])
        for fold in (False, True):
            report = verify_models(model, to_model(graph, fold_constants=fold), tolerance=FP32)
            assert report.ok, f"after {rule} (fold={fold}): {report.reason}"
    mm_scores = [n for n in graph.by_op("MatMul") if not graph.is_constant(n.inputs[1])]
    assert all(graph.consumer_nodes(n.outputs[0])[0].op_type == "Softmax" for n in mm_scores)
    weights = [n for n in graph.by_op("MatMul") if graph.is_constant(n.inputs[1])]
    assert any(graph.producer_of(n.inputs[1]) is not None and graph.producer_of(n.inputs[1]).op_type == "Mul" for n in weights)
