import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, dims, round_trip
from xrlflow.onnx_io import to_model


def _chain(seed, rank, constant_weights):
    b = ModelBuilder(seed)
    rng = b.rng
    lead, (m, k, r, n) = dims(rng, rank - 2), dims(rng, 4, 1, 8)
    x = b.input("x", lead + [m, k])
    if constant_weights:
        a, w = b.const((k, r), scale=0.5), b.const((r, n), scale=0.5)
    else:
        a, w = b.input("a", [k, r]), b.input("w", [r, n])
    b.output(b.op("Relu", [b.op("MatMul", [b.op("MatMul", [x, a]), w])]))
    return b.model()


@pytest.mark.parametrize("seed,rank,constant_weights", [(0, 2, True), (1, 3, True), (2, 4, False), (3, 3, False)])
def test_reassociate_then_split_preserves_function(seed, rank, constant_weights):
    model = _chain(seed, rank, constant_weights)
    (regrouped,), (split_back,) = round_trip(model, "reassociate-matmul", "split-matmul-chain")
    x_readers = regrouped.consumer_nodes("x")
    assert [n.op_type for n in x_readers] == ["MatMul"] and regrouped.producer_of(x_readers[0].inputs[1]).op_type == "MatMul"
    if constant_weights:  # A@B is a constant: the export folds it, one MatMul is left
        assert sum(n.op_type == "MatMul" for n in to_model(regrouped, fold_constants=True).graph.node) == 1
    assert [n.op_type for n in split_back.consumer_nodes("x")] == ["MatMul"]
    assert split_back.op_counts()["MatMul"] == 2


def test_near_miss_inner_product_read_twice():
    b = ModelBuilder(4)
    x = b.input("x", [3, 4])
    xa = b.op("MatMul", [x, b.const((4, 5))])
    b.output(b.op("MatMul", [xa, b.const((5, 2))]), xa)
    assert_no_match(b.model(), "reassociate-matmul")


def test_near_miss_batched_weight():
    b = ModelBuilder(5)
    x = b.input("x", [2, 3, 4])
    b.output(b.op("MatMul", [b.op("MatMul", [x, b.const((2, 4, 5))]), b.const((5, 2))]))
    assert_no_match(b.model(), "reassociate-matmul")


def test_near_miss_split_weight_product_read_twice():
    b = ModelBuilder(6)
    x = b.input("x", [3, 4])
    w = b.op("MatMul", [b.const((4, 2)), b.input("v", [2, 5])])
    b.output(b.op("MatMul", [x, w]), w)
    assert_no_match(b.model(), "split-matmul-chain")
