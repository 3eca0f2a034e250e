import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, dims, round_trip
from xrlflow.onnx_io import to_model


def _sub_shape(rng, full):
    """A random numpy-broadcastable sub-shape of `full` (never larger than it)."""
    tail = full[len(full) - int(rng.integers(0, len(full) + 1)):]
    return [d if rng.random() < 0.6 else 1 for d in tail]


def _const_chain(seed, op):
    b = ModelBuilder(seed)
    rng = b.rng
    full = dims(rng, int(rng.integers(1, 5)), 1, 5)
    x = b.input("x", full)
    c1, c2 = (b.const(_sub_shape(rng, full), scale=0.5) for _ in range(2))
    inner = b.op(op, [x, c1] if rng.random() < 0.5 else [c1, x])
    b.output(b.op("Relu", [b.op(op, [inner, c2] if rng.random() < 0.5 else [c2, inner])]))
    return b.model()


@pytest.mark.parametrize("seed,op", [(0, "Add"), (1, "Add"), (2, "Add"), (3, "Mul"), (4, "Mul"), (5, "Mul")])
def test_fold_then_unfold_const_chain(seed, op):
    model = _const_chain(seed, op)
    (folded,), (unfolded,) = round_trip(model, "fold-const-chain", "unfold-const-chain")
    exported = to_model(folded, fold_constants=True)
    assert sum(n.op_type == op for n in exported.graph.node) == 1  # c1 op c2 became one initializer
    assert [n.op_type for n in unfolded.consumer_nodes("x")] == [op]


def test_near_miss_inner_read_twice_or_operand_not_constant():
    b = ModelBuilder(6)
    x = b.input("x", [3, 4])
    inner = b.op("Add", [x, b.const((4,))])
    b.output(b.op("Add", [inner, b.const((4,))]), inner)
    b.output(b.op("Add", [b.op("Add", [x, b.const((4,))]), b.input("y", [4])]))
    b.output(b.op("Mul", [b.op("Add", [x, b.const((4,))]), b.const((4,))]))  # mixed ops
    assert_no_match(b.model(), "fold-const-chain")


def test_near_miss_unfold_constant_read_twice():
    b = ModelBuilder(7)
    x = b.input("x", [3, 4])
    c = b.op("Add", [b.const((4,)), b.const((4,))])
    b.output(b.op("Add", [x, c]), b.op("Add", [b.input("y", [3, 4]), c]))
    assert_no_match(b.model(), "unfold-const-chain")


def _scaled_projection(seed, where, op, scalar_shape):
    b = ModelBuilder(seed)
    rng = b.rng
    lead, (m, k, n) = dims(rng, int(rng.integers(0, 3))), dims(rng, 3, 1, 8)
    x = b.input("x", lead + [m, k])
    w = b.const((k, n), scale=0.5)
    s = b.const(None, value=np.full(scalar_shape, float(rng.uniform(0.2, 2.0)), dtype=np.float32))
    if where == "after":
        y = b.op("MatMul", [x, w])
        y = b.op(op, [y, s] if op == "Div" or rng.random() < 0.5 else [s, y])
    else:
        scaled = b.op(op, [x, s] if op == "Div" or rng.random() < 0.5 else [s, x])
        y = b.op("MatMul", [scaled, w])
    b.output(b.op("Add", [y, b.const((n,))]))
    return b.model()


@pytest.mark.parametrize(
    "seed,where,op,scalar_shape",
    [(0, "after", "Mul", ()), (1, "after", "Div", (1,)), (2, "before", "Mul", (1,)), (3, "before", "Div", ()), (4, "after", "Mul", (1, 1))],
)
def test_fold_then_unfold_scale(seed, where, op, scalar_shape):
    model = _scaled_projection(seed, where, op, scalar_shape)
    (folded,), (unfolded,) = round_trip(model, "fold-scale-into-matmul", "unfold-scale-from-matmul")
    exported = to_model(folded, fold_constants=True)
    assert [n.op_type for n in exported.graph.node] == ["MatMul", "Add"]  # the scale lives in the weight now
    mm = unfolded.consumer_nodes("x")[0]
    assert mm.op_type == "MatMul" and unfolded.consumer_nodes(mm.outputs[0])[0].op_type == op


def test_near_miss_scale_not_scalar_or_weight_not_constant():
    b = ModelBuilder(8)
    x = b.input("x", [3, 4])
    b.output(b.op("Mul", [b.op("MatMul", [x, b.const((4, 5))]), b.const((5,))]))
    b.output(b.op("Mul", [b.op("MatMul", [x, b.input("w", [4, 5])]), b.const(None, value=0.5)]))
    b.output(b.op("MatMul", [b.op("Div", [b.const(None, value=2.0), x]), b.const((4, 5))]))  # s / X is no scale
    assert_no_match(b.model(), "fold-scale-into-matmul")


def test_near_miss_unfold_scale_not_scalar():
    b = ModelBuilder(9)
    w = b.op("Mul", [b.const((4, 5)), b.const((5,))])
    b.output(b.op("MatMul", [b.input("x", [3, 4]), w]))
    assert_no_match(b.model(), "unfold-scale-from-matmul")
