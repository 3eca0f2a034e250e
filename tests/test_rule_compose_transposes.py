import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, round_trip
from xrlflow.onnx_io import to_model

# (input shape, inner perm, outer perm): square and non-square, ranks 2-4, perms that are not self-inverse
CASES = [
    ((3, 4), (1, 0), (1, 0)),
    ((2, 3, 4), (1, 2, 0), (1, 2, 0)),
    ((3, 3, 3), (2, 0, 1), (0, 2, 1)),
    ((2, 3, 4, 5), (0, 2, 1, 3), (0, 1, 3, 2)),
    ((2, 2, 4, 4), (0, 2, 3, 1), (3, 1, 0, 2)),
]


def _pair(shape, p1, p2, seed=0):
    b = ModelBuilder(seed)
    x = b.input("x", shape)
    b.output(b.op("Transpose", [b.op("Transpose", [x], perm=list(p1))], perm=list(p2)))
    return b.model()


@pytest.mark.parametrize("shape,p1,p2", CASES)
def test_compose_transposes(shape, p1, p2):
    (composed,) = assert_rule_preserves(_pair(shape, p1, p2), "compose-transposes")
    assert composed.op_counts().get("Transpose", 0) <= 1


def test_composed_inverse_pair_cancels():
    model = _pair((2, 3, 4), (1, 2, 0), (2, 0, 1))  # (1,2,0) then its inverse
    (composed,) = assert_rule_preserves(model, "compose-transposes")
    (cancelled,) = assert_rule_preserves(to_model(composed), "cancel-identity-transpose")
    assert "Transpose" not in cancelled.op_counts()


@pytest.mark.parametrize("shape,perm", [((2, 3, 4), (1, 2, 0)), ((3, 3, 3, 3), (0, 2, 3, 1)), ((2, 3, 4, 5), (3, 0, 2, 1))])
def test_split_transpose_both_ways_and_back(shape, perm):
    b = ModelBuilder(1)
    b.output(b.op("Relu", [b.op("Transpose", [b.input("x", shape)], perm=list(perm))]))
    model = b.model()
    results, backs = round_trip(model, "split-transpose", "compose-transposes")
    assert len(results) == 2
    for r in results:
        perms = sorted(tuple(n.attr("perm")) for n in r.nodes.values() if n.op_type == "Transpose")
        swap = tuple(range(len(shape) - 2)) + (len(shape) - 1, len(shape) - 2)
        assert swap in perms and len(perms) == 2


def test_near_miss_split_transpose_skips_swap_and_rank2():
    b = ModelBuilder(2)
    b.output(b.op("Transpose", [b.input("x", [2, 3, 4])], perm=[0, 2, 1]))
    b.output(b.op("Transpose", [b.input("y", [3, 3])], perm=[1, 0]))
    assert_no_match(b.model(), "split-transpose")


def test_near_miss_identity_only_when_identity():
    b = ModelBuilder(3)
    b.output(b.op("Transpose", [b.input("x", [3, 3, 3])], perm=[1, 2, 0]))
    b.output(b.op("Transpose", [b.input("y", [3, 3])]))  # default perm reverses: not the identity
    assert_no_match(b.model(), "cancel-identity-transpose")


def test_identity_transpose_of_graph_input_to_output():
    b = ModelBuilder(4)
    b.output(b.op("Transpose", [b.input("x", [2, 3, 4])], perm=[0, 1, 2]))
    (result,) = assert_rule_preserves(b.model(), "cancel-identity-transpose")
    assert "Transpose" not in result.op_counts()


def test_near_miss_compose_needs_a_transpose_producer():
    b = ModelBuilder(5)
    b.output(b.op("Transpose", [b.op("Relu", [b.input("x", [2, 3, 4])])], perm=[1, 2, 0]))
    assert_no_match(b.model(), "compose-transposes")
    assert load_graph(b.model())
