import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, dims, load_graph, matches_of, round_trip


def _three_projections(seed, rank):
    """(X@A1 + X@A2) + X@A3: both regroupings keep a MatMul pair that shares X."""
    b = ModelBuilder(seed)
    rng = b.rng
    lead, (m, k, n) = dims(rng, rank - 2), dims(rng, 3, 1, 7)
    x = b.input("x", lead + [m, k])
    p1, p2, p3 = (b.op("MatMul", [x, b.const((k, n), scale=0.5)]) for _ in range(3))
    b.output(b.op("Relu", [b.op("Add", [b.op("Add", [p1, p2]), p3])]))
    return b.model(), p3


@pytest.mark.parametrize("seed,rank", [(0, 2), (1, 3), (2, 4)])
def test_regroup_right_then_left_matmul_sums(seed, rank):
    model, outside = _three_projections(seed, rank)
    rights, lefts = round_trip(model, "reassociate-add", "reassociate-add-left")
    assert len(rights) == 2 and len(lefts) == 4  # p1 or p2 stays outside; then either of the pair rejoins
    for g in rights:  # the new inner Add pairs the formerly outside MatMul with one sharing x
        factorable = [g.nodes[m.nodes[0]] for m in matches_of(g, "factor-matmul-add")]
        assert any(outside in add.inputs for add in factorable)


def test_regroup_exposes_shared_mul_factor():
    b = ModelBuilder(3)
    a, c, d, y = (b.input(name, [3, 4]) for name in "acdy")
    b.output(b.op("Add", [b.op("Add", [y, b.op("Mul", [a, c])]), b.op("Mul", [d, a])]))
    model = b.model()
    (regrouped,) = assert_rule_preserves(model, "reassociate-add")
    assert len(matches_of(regrouped, "factor-mul-add")) == 1 and matches_of(load_graph(model), "factor-mul-add") == []


def test_mul_regroup_exposes_factor_for_sibling():
    b = ModelBuilder(4)
    a, s, c, d = b.input("a", [3, 4]), b.input("s", [4]), b.input("c", [3, 4]), b.input("d", [3, 4])
    chain = b.op("Mul", [b.op("Mul", [a, s]), c])  # (a*s)*c + s*d: regroup to s*(a*c)
    b.output(b.op("Add", [chain, b.op("Mul", [s, d])]))
    model = b.model()
    (regrouped,) = assert_rule_preserves(model, "reassociate-add")
    assert len(matches_of(regrouped, "factor-mul-add")) == 1 and matches_of(load_graph(model), "factor-mul-add") == []


def test_near_miss_regrouping_exposes_nothing():
    b = ModelBuilder(5)
    x, y, z = b.input("x", [3, 4]), b.input("y", [3, 4]), b.input("z", [3, 4])
    b.output(b.op("Add", [b.op("Add", [x, y]), z]))
    b.output(b.op("Add", [b.op("Add", [z, b.op("MatMul", [x, b.const((4, 4))])]), b.op("MatMul", [y, b.const((4, 4))])]))
    b.output(b.op("Add", [b.op("Add", [x, b.const((4,))]), b.const((4,))]))  # constants: fold-const-chain's job
    model = b.model()
    assert_no_match(model, "reassociate-add")
    assert_no_match(model, "reassociate-add-left")


def test_near_miss_inner_read_twice():
    b = ModelBuilder(6)
    x = b.input("x", [3, 4])
    p1, p2, p3 = (b.op("MatMul", [x, b.const((4, 4))]) for _ in range(3))
    inner = b.op("Add", [p1, p2])
    b.output(b.op("Add", [inner, p3]), inner)
    assert_no_match(b.model(), "reassociate-add")
