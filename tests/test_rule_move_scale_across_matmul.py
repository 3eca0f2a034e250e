import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, round_trip


def _scaled_scores(seed, q_shape, k_shape, op, scalar_shape, weight_b=False):
    b = ModelBuilder(seed)
    q = b.input("q", q_shape)
    k = b.const(k_shape) if weight_b else b.input("k", k_shape)
    s = b.const(scalar_shape, value=np.full(scalar_shape, 0.125 if op == "Mul" else 8.0, dtype=np.float32))
    b.output(b.op("Softmax", [b.op(op, [b.op("MatMul", [q, k]), s])], axis=-1))
    return b.model()


@pytest.mark.parametrize("q_shape,k_shape,op,scalar_shape", [
    ((1, 2, 4, 3), (1, 2, 3, 4), "Mul", ()),      # scores [b, h, s, s]: square
    ((2, 5, 3), (2, 3, 4), "Div", (1,)),
    ((3, 3), (3, 3), "Mul", (1, 1)),
])
def test_scale_into_then_out_of_matmul(q_shape, k_shape, op, scalar_shape):
    results, backs = round_trip(_scaled_scores(1, q_shape, k_shape, op, scalar_shape), "move-scale-into-matmul", "move-scale-out-of-matmul")
    assert len(results) == 2  # onto Q or onto K
    for r in results:
        mm = next(n for n in r.nodes.values() if n.op_type == "MatMul")
        assert {r.producer_of(v).op_type for v in mm.inputs if r.producer_of(v)} == {op}


def test_scale_onto_q_beside_a_constant_key():
    results, _ = round_trip(_scaled_scores(2, (2, 4, 3), (3, 4), "Mul", (), weight_b=True), "move-scale-into-matmul", "move-scale-out-of-matmul")
    assert len(results) == 1


def test_near_miss_non_scalar_or_scale_read_twice():
    b = ModelBuilder(3)
    mm = b.op("MatMul", [b.input("q", [2, 3]), b.input("k", [3, 2])])
    b.output(b.op("Mul", [mm, b.const((2,))]))  # a per-column scale, not a scalar
    mm2 = b.op("MatMul", [b.input("q2", [2, 3]), b.input("k2", [3, 2])])
    b.output(b.op("Mul", [mm2, b.const((), value=np.float32(0.5))]), mm2)
    b.output(b.op("Div", [b.const((), value=np.float32(2.0)), b.op("MatMul", [b.input("q3", [2, 3]), b.input("k3", [3, 2])])]))
    assert_no_match(b.model(), "move-scale-into-matmul")
