import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, matches_of
from xrlflow.onnx_io import to_model

UNARIES = [("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("LeakyRelu", {"alpha": 0.2}), ("Erf", {})]


def _split_then_unary(seed, op, attrs, graph_output_piece=False):
    """x -> Split along a random axis into random pieces -> op on each piece."""
    b = ModelBuilder(seed)
    rng = b.rng
    rank = int(rng.integers(1, 5))
    shape = [int(d) for d in rng.integers(2, 6, size=rank)]
    axis = int(rng.integers(-rank, rank))
    n = int(rng.integers(2, 4))
    total = shape[axis]
    shape[axis] = total = max(total, n)
    cuts = sorted(rng.choice(np.arange(1, total), size=n - 1, replace=False).tolist())
    sizes = [e - s for s, e in zip([0] + cuts, cuts + [total])]
    x = b.input("x", shape)
    pieces = b.op("Split", [x, b.const(None, dtype=np.int64, value=sizes)], n_out=n, axis=axis)
    b.output(*[b.op(op, [p], **attrs) for p in pieces])
    if graph_output_piece:
        b.output(pieces[0])
    return b.model()


@pytest.mark.parametrize("seed", range(4))
def test_hoist_then_sink_round_trip(seed):
    op, attrs = UNARIES[seed % len(UNARIES)]
    model = _split_then_unary(seed, op, attrs)
    (hoisted,) = assert_rule_preserves(model, "hoist-unary-above-split")
    assert hoisted.op_counts()[op] == 1
    split = hoisted.by_op("Split")[0]
    assert hoisted.producer_of(split.inputs[0]).op_type == op
    (sunk,) = assert_rule_preserves(to_model(hoisted), "sink-unary-below-split")
    assert sunk.op_counts()[op] == hoisted.op_counts()["Split"] * len(split.outputs)


def test_opset18_split_with_num_outputs():
    b = ModelBuilder(9, opset=18)
    x = b.input("x", [4, 6])
    pieces = b.op("Split", [x], n_out=3, axis=1, num_outputs=3)
    b.output(*[b.op("Relu", [p]) for p in pieces])
    (hoisted,) = assert_rule_preserves(b.model(), "hoist-unary-above-split")
    assert_rule_preserves(to_model(hoisted), "sink-unary-below-split")


def test_near_miss_piece_read_elsewhere():
    b = ModelBuilder(1)
    x = b.input("x", [3, 4])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 2])], n_out=2, axis=1)
    b.output(b.op("Relu", [p0]), b.op("Relu", [p1]), b.op("Neg", [p1]))
    assert_no_match(b.model(), "hoist-unary-above-split")


def test_near_miss_different_ops_or_attributes():
    for ops in ([("Relu", {}), ("Sigmoid", {})], [("LeakyRelu", {"alpha": 0.1}), ("LeakyRelu", {"alpha": 0.2})]):
        b = ModelBuilder(2)
        x = b.input("x", [3, 4])
        pieces = b.op("Split", [x, b.const(None, dtype=np.int64, value=[1, 3])], n_out=2, axis=1)
        b.output(*[b.op(op, [p], **attrs) for p, (op, attrs) in zip(pieces, ops)])
        assert_no_match(b.model(), "hoist-unary-above-split")


def test_split_piece_that_is_a_graph_output_does_not_match():
    assert_no_match(_split_then_unary(3, "Relu", {}, graph_output_piece=True), "hoist-unary-above-split")


def test_sink_keeps_graph_output_names_and_other_readers():
    b = ModelBuilder(4)
    x = b.input("x", [2, 6])
    r = b.op("Relu", [x])
    p0, p1 = b.op("Split", [r, b.const(None, dtype=np.int64, value=[4, 2])], n_out=2, axis=1)
    b.output(p0, b.op("Neg", [p1]), b.op("Exp", [p1]))
    model = b.model()
    (sunk,) = assert_rule_preserves(model, "sink-unary-below-split")
    assert sunk.outputs == load_graph(model).outputs
    assert sunk.op_counts()["Relu"] == 2


def test_sink_near_miss_unary_output_read_twice():
    b = ModelBuilder(5)
    x = b.input("x", [2, 6])
    r = b.op("Relu", [x])
    p0, p1 = b.op("Split", [r, b.const(None, dtype=np.int64, value=[3, 3])], n_out=2, axis=1)
    b.output(p0, p1, r)
    assert_no_match(b.model(), "sink-unary-below-split")


def test_hoist_keeps_graph_output_names_of_the_activations():
    model = _split_then_unary(6, "Tanh", {})
    (hoisted,) = assert_rule_preserves(model, "hoist-unary-above-split")
    assert set(hoisted.outputs) <= set(hoisted.producer)
    assert all(hoisted.producer_of(o).op_type == "Split" for o in hoisted.outputs)
    assert not matches_of(hoisted, "hoist-unary-above-split")
