import numpy as np
import onnx
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, load_graph
from xrlflow.onnx_io import to_model
from xrlflow.verify import Tolerance


def _random_layout(rng, n):
    rank = int(rng.integers(2, 5))
    shape = [int(d) for d in rng.integers(1, 5, size=rank)]
    axis = int(rng.integers(0, rank))
    sizes = [int(s) for s in rng.integers(1, 5, size=n)]
    shape[axis] = sum(sizes)
    # constants cover the axis, from a random rank on; off-axis dims are full or broadcast (1) alike for all
    c_rank = int(rng.integers(rank - axis, rank + 1))
    keep = rng.random(rank) < 0.6
    return shape, axis, sizes, c_rank, keep


def _constant_shape(shape, axis, size, c_rank, keep):
    full = [size if i == axis else (d if keep[i] else 1) for i, d in enumerate(shape)]
    return full[len(shape) - c_rank:]


def _split_then_binary(seed, op, n=None, constant_first=False):
    b = ModelBuilder(seed)
    rng = b.rng
    n = n or int(rng.integers(2, 4))
    shape, axis, sizes, c_rank, keep = _random_layout(rng, n)
    x = b.input("x", shape)
    pieces = b.op("Split", [x, b.const(None, dtype=np.int64, value=sizes)], n_out=n, axis=axis - len(shape) * int(rng.integers(0, 2)))
    outs = []
    for p, size in zip(pieces, sizes):
        c = b.const(_constant_shape(shape, axis, size, c_rank, keep))
        outs.append(b.op(op, [c, p] if constant_first else [p, c]))
    b.output(*outs)
    return b.model()


def _binary_then_concat(seed, op):
    b = ModelBuilder(seed)
    rng = b.rng
    n = int(rng.integers(2, 4))
    shape, axis, sizes, c_rank, keep = _random_layout(rng, n)
    values = []
    for i, size in enumerate(sizes):
        s = list(shape)
        s[axis] = size
        c = b.const(_constant_shape(shape, axis, size, c_rank, keep))
        values.append(b.op(op, [b.input(f"x{i}", s), c]))
    b.output(b.op("Concat", values, axis=axis))
    return b.model()


@pytest.mark.parametrize("seed,op,constant_first", [(0, "Add", False), (1, "Mul", False), (2, "Add", True), (3, "Mul", True)])
def test_split_hoist_then_sink_round_trip(seed, op, constant_first):
    model = _split_then_binary(seed, op, constant_first=constant_first)
    (hoisted,) = assert_rule_preserves(model, "hoist-const-binary-above-split")
    assert hoisted.op_counts()[op] == 1
    (sunk,) = assert_rule_preserves(to_model(hoisted), "sink-const-binary-below-split")
    assert sunk.op_counts()[op] == len(model.graph.output)


@pytest.mark.parametrize("seed,op", [(4, "Add"), (5, "Mul"), (6, "Add"), (7, "Mul")])
def test_concat_hoist_then_sink_round_trip(seed, op):
    model = _binary_then_concat(seed, op)
    (hoisted,) = assert_rule_preserves(model, "hoist-const-binary-over-concat")
    assert hoisted.op_counts()[op] == 1
    assert hoisted.producer_of(hoisted.outputs[0]).op_type == op
    (sunk,) = assert_rule_preserves(to_model(hoisted), "sink-const-binary-into-concat")
    assert sunk.op_counts()[op] == len(model.graph.input)


def test_bias_adds_after_merged_matmul():
    b = ModelBuilder(8)
    x = b.input("x", [3, 5])
    y = b.op("MatMul", [x, b.const((5, 7))])
    p0, p1 = b.op("Split", [y, b.const(None, dtype=np.int64, value=[3, 4])], n_out=2, axis=-1)
    b.output(b.op("Relu", [b.op("Add", [p0, b.const((3,))])]), b.op("Relu", [b.op("Add", [p1, b.const((4,))])]))
    (hoisted,) = assert_rule_preserves(b.model(), "hoist-const-binary-above-split")
    add = hoisted.by_op("Add")[0]
    assert hoisted.producer_of(add.inputs[0]).op_type == "MatMul"


def test_float16_graph_keeps_float16_constants():
    b = ModelBuilder(9)
    x = b.input("x", [2, 6], dtype=onnx.TensorProto.FLOAT16)
    pieces = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 4])], n_out=2, axis=1)
    b.output(*[b.op("Mul", [p, b.const((size,), dtype=np.float16)]) for p, size in zip(pieces, (2, 4))])
    (hoisted,) = assert_rule_preserves(b.model(), "hoist-const-binary-above-split", tolerance=Tolerance(1e-3, 1e-3))
    concat = hoisted.by_op("Concat")[0]
    assert hoisted.dtype(concat.outputs[0]) == onnx.TensorProto.FLOAT16
    exported = to_model(hoisted, fold_constants=True)
    assert all(t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64) for t in exported.graph.initializer)


def test_near_miss_constant_broadcast_along_split_axis():
    b = ModelBuilder(10)
    x = b.input("x", [2, 6])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[3, 3])], n_out=2, axis=1)
    b.output(b.op("Add", [p0, b.const((3,))]), b.op("Add", [p1, b.const((1,))]))  # wrong size on the axis
    assert_no_match(b.model(), "hoist-const-binary-above-split")


def test_near_miss_constants_disagree_off_axis():
    b = ModelBuilder(11)
    x = b.input("x", [4, 6])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[3, 3])], n_out=2, axis=1)
    b.output(b.op("Add", [p0, b.const((4, 3))]), b.op("Add", [p1, b.const((1, 3))]))
    assert_no_match(b.model(), "hoist-const-binary-above-split")


def test_near_miss_mixed_ops_piece_read_elsewhere_or_graph_output():
    b = ModelBuilder(12)
    x = b.input("x", [2, 6])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 4])], n_out=2, axis=1)
    b.output(b.op("Add", [p0, b.const((2,))]), b.op("Mul", [p1, b.const((4,))]))
    assert_no_match(b.model(), "hoist-const-binary-above-split")
    b = ModelBuilder(13)
    x = b.input("x", [2, 6])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 4])], n_out=2, axis=1)
    b.output(b.op("Add", [p0, b.const((2,))]), b.op("Add", [p1, b.const((4,))]), p1)
    assert_no_match(b.model(), "hoist-const-binary-above-split")


def test_near_miss_constant_that_broadcasts_the_activation_up():
    b = ModelBuilder(14)
    x = b.input("x", [1, 6])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 4])], n_out=2, axis=1)
    b.output(b.op("Add", [p0, b.const((3, 2))]), b.op("Add", [p1, b.const((3, 4))]))
    assert_no_match(b.model(), "hoist-const-binary-above-split")


def test_sink_near_misses():
    b = ModelBuilder(15)
    x = b.input("x", [2, 6])
    y = b.op("Add", [x, b.const((1,))])  # the constant does not span the split axis
    b.output(*b.op("Split", [y, b.const(None, dtype=np.int64, value=[2, 4])], n_out=2, axis=1))
    assert_no_match(b.model(), "sink-const-binary-below-split")
    b = ModelBuilder(16)
    x = b.input("x", [2, 6])
    y = b.op("Mul", [x, b.const((6,))])
    b.output(*b.op("Split", [y, b.const(None, dtype=np.int64, value=[2, 4])], n_out=2, axis=1), y)
    assert_no_match(b.model(), "sink-const-binary-below-split")
    b = ModelBuilder(17)
    joined = b.op("Concat", [b.input("a", [2, 3]), b.input("c", [2, 3])], axis=0)
    b.output(b.op("Add", [joined, b.const((3,))]))  # the constant does not span the concat axis
    assert_no_match(b.model(), "sink-const-binary-into-concat")


def test_sink_keeps_graph_output_names():
    b = ModelBuilder(18)
    x = b.input("x", [2, 6])
    y = b.op("Add", [x, b.const((2, 6))])
    b.output(*b.op("Split", [y, b.const(None, dtype=np.int64, value=[5, 1])], n_out=2, axis=1))
    model = b.model()
    (sunk,) = assert_rule_preserves(model, "sink-const-binary-below-split")
    assert sunk.outputs == load_graph(model).outputs
    assert all(sunk.producer_of(o).op_type == "Add" for o in sunk.outputs)


def test_near_miss_pieces_of_a_constant_split_added_together():
    # found by the property test: Split of a constant whose two pieces feed one Add (each "constant" operand
    # is the other piece); hoisting would read the removed Split's outputs
    b = ModelBuilder(19)
    x = b.input("x", [2, 6])
    w0, w1 = b.op("Split", [b.const((2, 6)), b.const(None, dtype=np.int64, value=[3, 3])], n_out=2, axis=1)
    b.output(b.op("Mul", [x, b.op("Concat", [b.op("Add", [w0, w1]), b.const((2, 3))], axis=1)]))
    assert_no_match(b.model(), "hoist-const-binary-above-split")
