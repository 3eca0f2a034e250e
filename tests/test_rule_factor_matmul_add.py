import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, dims, round_trip


def _matmul_sum(seed, rank, constant_weights, swap):
    b = ModelBuilder(seed)
    rng = b.rng
    lead, (m, k, n) = dims(rng, rank - 2), dims(rng, 3, 1, 8)
    x = b.input("x", lead + [m, k])
    weights = [b.const((k, n), scale=0.5) for _ in range(2)] if constant_weights else [b.input(f"w{i}", [k, n]) for i in range(2)]
    terms = [b.op("MatMul", [x, w]) for w in weights]
    b.output(b.op("Relu", [b.op("Add", terms[::-1] if swap else terms)]))
    return b.model()


@pytest.mark.parametrize("seed,rank,constant_weights,swap", [(0, 2, True, False), (1, 3, True, True), (2, 4, False, True), (3, 3, False, False)])
def test_factor_then_expand_matmul_add(seed, rank, constant_weights, swap):
    model = _matmul_sum(seed, rank, constant_weights, swap)
    (factored,), (expanded,) = round_trip(model, "factor-matmul-add", "expand-matmul-add")
    assert factored.op_counts()["MatMul"] == 1 and expanded.op_counts()["MatMul"] == 2


def _mul_sum(seed):
    """A*B + A*C with random broadcastable shapes and the shared factor A on random sides of each Mul."""
    b = ModelBuilder(seed)
    rng = b.rng
    full = dims(rng, int(rng.integers(1, 4)), 1, 5)
    def sub_shape():  # a numpy-broadcastable sub-shape of `full`
        tail = full[len(full) - int(rng.integers(0, len(full) + 1)):]
        return [d if rng.random() < 0.6 else 1 for d in tail]
    a = b.input("a", full)
    factors = [b.const(sub_shape(), scale=0.5), b.input("c", sub_shape())]
    terms = []
    for other in factors:
        terms.append(b.op("Mul", [a, other] if rng.random() < 0.5 else [other, a]))
    b.output(b.op("Add", terms))
    return b.model()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_factor_then_expand_mul_add(seed):
    model = _mul_sum(seed)
    (factored,), (expanded,) = round_trip(model, "factor-mul-add", "expand-mul-add")
    assert factored.op_counts()["Mul"] == 1 and expanded.op_counts()["Mul"] == 2


def test_factor_mul_add_square_factor():
    b = ModelBuilder(5)
    a, c = b.input("a", [3, 4]), b.input("c", [4])
    b.output(b.op("Add", [b.op("Mul", [a, a]), b.op("Mul", [c, a])]))
    (factored,) = assert_rule_preserves(b.model(), "factor-mul-add")
    assert factored.op_counts()["Mul"] == 1


def test_near_miss_matmuls_on_different_inputs_or_read_twice():
    b = ModelBuilder(6)
    x, y = b.input("x", [3, 4]), b.input("y", [3, 4])
    b.output(b.op("Add", [b.op("MatMul", [x, b.const((4, 5))]), b.op("MatMul", [y, b.const((4, 5))])]))
    shared = b.op("MatMul", [x, b.const((4, 5))])
    b.output(b.op("Add", [shared, b.op("MatMul", [x, b.const((4, 5))])]), shared)
    assert_no_match(b.model(), "factor-matmul-add")


def test_near_miss_weights_of_different_shape():
    b = ModelBuilder(7)
    x = b.input("x", [3, 4])
    b.output(b.op("Add", [b.op("MatMul", [x, b.const((4, 5))]), b.op("MatMul", [x, b.const((4, 1))])]))
    assert_no_match(b.model(), "factor-matmul-add")


def test_near_miss_no_shared_factor():
    b = ModelBuilder(8)
    a, c, d = b.input("a", [3, 4]), b.input("c", [3, 4]), b.input("d", [3, 4])
    b.output(b.op("Add", [b.op("Mul", [a, c]), b.op("Mul", [d, b.const((3, 4))])]))
    assert_no_match(b.model(), "factor-mul-add")


def test_near_miss_expand_sum_read_twice():
    b = ModelBuilder(9)
    x, a, c = b.input("x", [3, 4]), b.input("a", [4, 2]), b.input("c", [4, 2])
    s = b.op("Add", [a, c])
    b.output(b.op("MatMul", [x, s]), b.op("Mul", [b.input("y", [4, 2]), s]))
    model = b.model()
    assert_no_match(model, "expand-matmul-add")
    assert_no_match(model, "expand-mul-add")
