import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, dims, load_graph, round_trip


def _swap_last_two(rank):
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _transposed_product(seed, rank_a, rank_b, constant_b, square=False):
    b = ModelBuilder(seed)
    rng = b.rng
    m, k, n = dims(rng, 3, 1, 7)
    if square:  # the product keeps its shape when transposed: only the values tell a dropped Transpose
        n = m = max(m, 2)
    lead = dims(rng, max(rank_a, rank_b) - 2)
    a = b.input("a", lead[len(lead) - (rank_a - 2):] + [m, k])
    w = b.const(lead[len(lead) - (rank_b - 2):] + [k, n], scale=0.5) if constant_b else b.input("b", lead[len(lead) - (rank_b - 2):] + [k, n])
    rank = max(rank_a, rank_b)
    b.output(b.op("Transpose", [b.op("MatMul", [a, w])], perm=_swap_last_two(rank)))
    return b.model()


@pytest.mark.parametrize("seed,rank_a,rank_b,constant_b,square", [
    (0, 2, 2, True, False), (1, 3, 2, False, False), (2, 4, 3, False, False), (3, 3, 3, True, False),
    (4, 2, 2, True, True), (5, 3, 2, False, True), (6, 4, 4, False, True),
])
def test_transpose_then_untranspose_matmul(seed, rank_a, rank_b, constant_b, square):
    model = _transposed_product(seed, rank_a, rank_b, constant_b, square)
    (moved,), (back,) = round_trip(model, "transpose-matmul", "untranspose-matmul")
    assert moved.op_counts()["Transpose"] == 2
    assert [n.op_type for n in moved.consumer_nodes("a")] == ["Transpose"]
    assert back.op_counts()["Transpose"] == 1 and back.consumer_nodes("a")[0].op_type == "MatMul"


def test_rank2_transpose_without_perm_attribute():
    b = ModelBuilder(4)
    b.output(b.op("Transpose", [b.op("MatMul", [b.input("a", [3, 4]), b.input("b", [4, 2])])]))
    assert_rule_preserves(b.model(), "transpose-matmul")


def test_near_miss_perm_not_last_two_or_product_read_twice():
    b = ModelBuilder(5)
    a = b.input("a", [2, 3, 4])
    b.output(b.op("Transpose", [b.op("MatMul", [a, b.const((4, 5))])], perm=[1, 0, 2]))
    shared = b.op("MatMul", [a, b.const((4, 5))])
    b.output(b.op("Transpose", [shared], perm=[0, 2, 1]), shared)
    assert_no_match(b.model(), "transpose-matmul")


def test_near_miss_untranspose_needs_both_operands_transposed():
    b = ModelBuilder(6)
    t = b.op("Transpose", [b.input("b", [4, 3])], perm=[1, 0])
    b.output(b.op("MatMul", [t, b.input("a", [4, 2])]))
    assert_no_match(b.model(), "untranspose-matmul")


UNARY = [("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("Erf", {}), ("LeakyRelu", {"alpha": 0.3}), ("Gelu", {"approximate": "tanh"})]


@pytest.mark.parametrize("seed,unary", list(enumerate(UNARY)))
def test_move_transpose_through_unary(seed, unary):
    op, attrs = unary
    b = ModelBuilder(seed, opset=20)  # Gelu is an ONNX op from opset 20
    rng = b.rng
    rank = int(rng.integers(2, 5))
    x = b.input("x", dims(rng, rank, 1, 5))
    perm = [int(p) for p in rng.permutation(rank)]
    b.output(b.op("Transpose", [b.op(op, [x], **attrs)], perm=perm))
    model = b.model()
    (moved,), (back,) = round_trip(model, "move-transpose-before-unary", "move-transpose-after-unary")
    assert moved.consumer_nodes("x")[0].op_type == "Transpose" and back.consumer_nodes("x")[0].op_type == op
    original = next(n for n in load_graph(model).nodes.values() if n.op_type == op)
    assert next(n for n in moved.nodes.values() if n.op_type == op).attributes == original.attributes
    assert set(dict(original.attributes)) == set(attrs)


def test_near_miss_unary_read_twice_or_not_in_set():
    b = ModelBuilder(7)
    x = b.input("x", [2, 3])
    r = b.op("Relu", [x])
    b.output(b.op("Transpose", [r], perm=[1, 0]), r)
    b.output(b.op("Transpose", [b.op("Exp", [x])], perm=[1, 0]))
    assert_no_match(b.model(), "move-transpose-before-unary")


def test_near_miss_after_unary_transpose_read_twice():
    b = ModelBuilder(8)
    t = b.op("Transpose", [b.input("x", [2, 3])], perm=[1, 0])
    b.output(b.op("Relu", [t]), b.op("Sigmoid", [t]))
    assert_no_match(b.model(), "move-transpose-after-unary")
