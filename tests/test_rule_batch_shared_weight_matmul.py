import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, dims, load_graph, matches_of, round_trip


def _shared_weight(seed, rank, alias):
    b = ModelBuilder(seed)
    rng = b.rng
    lead, (k, n, ma, mb) = dims(rng, rank - 2), dims(rng, 4, 1, 7)
    x = b.input("x", lead + [ma, k])
    y = b.input("y", lead + [mb, k])
    w = b.const((k, n), scale=0.5)
    w_alias = b.op("Identity", [w]) if alias else w
    b.output(b.op("Relu", [b.op("MatMul", [x, w])]), b.op("MatMul", [y, w_alias]))
    return b.model()


@pytest.mark.parametrize("seed,rank,alias", [(0, 2, False), (1, 3, True), (2, 4, False), (3, 3, False)])
def test_batch_then_unbatch_preserves_function(seed, rank, alias):
    model = _shared_weight(seed, rank, alias)
    (batched,), (unbatched,) = round_trip(model, "batch-shared-weight-matmul", "unbatch-shared-weight-matmul")
    assert batched.op_counts()["MatMul"] == 1 and batched.op_counts()["Split"] == 1
    assert unbatched.op_counts()["MatMul"] == 2 and "Split" not in unbatched.op_counts()


def test_three_users_give_every_pair():
    b = ModelBuilder(4)
    w = b.const((4, 3))
    xs = [b.input(f"x{i}", [i + 1, 4]) for i in range(3)]
    b.output(*[b.op("MatMul", [x, w]) for x in xs])
    assert len(assert_rule_preserves(b.model(), "batch-shared-weight-matmul")) == 3


def test_near_miss_one_output_feeds_the_other():
    b = ModelBuilder(5)
    x = b.input("x", [3, 4])
    w = b.const((4, 4), scale=0.5)
    first = b.op("MatMul", [x, w])
    b.output(b.op("MatMul", [b.op("Relu", [first]), w]))  # same weight and shapes, but batching makes a cycle
    assert_no_match(b.model(), "batch-shared-weight-matmul")


def test_near_miss_batch_dims_differ_or_weight_not_constant():
    b = ModelBuilder(6)
    x, y = b.input("x", [2, 3, 4]), b.input("y", [1, 3, 4])
    w = b.const((4, 5))
    v = b.input("v", [4, 5])
    b.output(b.op("MatMul", [x, w]), b.op("MatMul", [y, w]), b.op("MatMul", [x, v]), b.op("MatMul", [y, v]))
    assert_no_match(b.model(), "batch-shared-weight-matmul")


def test_near_miss_unbatch_split_sizes_differ():
    b = ModelBuilder(7)
    x, y = b.input("x", [2, 4]), b.input("y", [3, 4])
    cat = b.op("Concat", [x, y], axis=0)
    pieces = b.op("Split", [b.op("MatMul", [cat, b.const((4, 5))]), b.const(None, dtype=np.int64, value=[1, 4])], n_out=2, axis=0)
    b.output(*pieces)
    assert_no_match(b.model(), "unbatch-shared-weight-matmul")


def test_dependent_pairs_left_out_exactly_as_graph_reaches_says():
    b = ModelBuilder(8)
    w = b.const((4, 4), scale=0.5)
    h = b.input("x", [3, 4])
    for _ in range(3):  # a weight tied across layers: every pair of this chain depends on each other
        h = b.op("Relu", [b.op("MatMul", [h, w])])
    side = b.op("MatMul", [b.input("y", [2, 4]), w])
    b.output(h, side)
    graph = load_graph(b.model())
    matmuls = [n.name for n in graph.by_op("MatMul")]
    independent = {
        tuple(sorted((p, q))) for i, p in enumerate(matmuls) for q in matmuls[i + 1:]
        if not graph.reaches([p], [q]) and not graph.reaches([q], [p])
    }
    assert len(independent) == 3
    assert {m.nodes for m in matches_of(graph, "batch-shared-weight-matmul")} == independent
