import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves


def _parallel(seed, n, rank, bias, k=None):
    b = ModelBuilder(seed)
    rng = b.rng
    k = k or int(rng.integers(2, 9))
    lead = [int(d) for d in rng.integers(1, 5, size=rank - 1)]
    x = b.input("x", lead + [k])
    outs = []
    for _ in range(n):
        width = int(rng.integers(1, 7))
        y = b.op("MatMul", [x, b.const((k, width))])
        if bias:
            y = b.op("Add", [y, b.const((width,))])
        outs.append(b.op("Relu", [y]))
    b.output(*outs)
    return b.model()


@pytest.mark.parametrize("seed,n,rank,bias", [(0, 2, 2, False), (1, 3, 3, True), (2, 4, 4, True), (3, 3, 2, False)])
def test_merge_then_split_preserves_function(seed, n, rank, bias):
    model = _parallel(seed, n, rank, bias)
    (merged,) = assert_rule_preserves(model, "merge-parallel-matmul")
    assert merged.op_counts()["MatMul"] == 1
    # the reverse undoes it, numerically the same again
    from xrlflow.onnx_io import to_model
    (split_back,) = assert_rule_preserves(to_model(merged), "split-merged-matmul")
    assert split_back.op_counts()["MatMul"] == n


def test_near_miss_weights_not_constant():
    b = ModelBuilder(5)
    x = b.input("x", [2, 4])
    w = b.input("w", [4, 3])  # a graph input, not a constant
    b.output(b.op("MatMul", [x, w]), b.op("MatMul", [x, b.const((4, 3))]))
    assert_no_match(b.model(), "merge-parallel-matmul")


def test_near_miss_different_inputs():
    b = ModelBuilder(6)
    x, y = b.input("x", [2, 4]), b.input("y", [2, 4])
    b.output(b.op("MatMul", [x, b.const((4, 3))]), b.op("MatMul", [y, b.const((4, 3))]))
    assert_no_match(b.model(), "merge-parallel-matmul")


def test_shared_initializer_with_many_users():
    b = ModelBuilder(7)
    x = b.input("x", [3, 4])
    w = b.const((4, 5))
    b.output(b.op("MatMul", [x, w]), b.op("MatMul", [x, w]), b.op("Add", [w, w]))
    assert_rule_preserves(b.model(), "merge-parallel-matmul")
