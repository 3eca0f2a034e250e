import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, matches_of
from xrlflow.onnx_io import to_model


@pytest.mark.parametrize("shape,first,second", [
    ((1, 4, 6, 6), (4, 6, 6), (1, 4, 6, 6)),    # torch's SDPA sandwich: back to the input's shape
    ((2, 3, 4), (6, 4), (4, 6)),
    ((3, 3), (9,), (1, 9)),
])
def test_compose_reshapes(shape, first, second):
    b = ModelBuilder(1)
    r = b.op("Reshape", [b.input("x", shape), b.const(None, value=list(first), dtype="int64")])
    b.output(b.op("Relu", [b.op("Reshape", [r, b.const(None, value=list(second), dtype="int64")])]))
    (composed,) = assert_rule_preserves(b.model(), "compose-reshapes")
    assert composed.op_counts()["Reshape"] == 1
    if tuple(second) == tuple(shape):
        (cancelled,) = assert_rule_preserves(to_model(composed), "cancel-identity-reshape")
        assert "Reshape" not in cancelled.op_counts()


def test_near_miss_identity_reshape_changes_shape():
    b = ModelBuilder(2)
    b.output(b.op("Reshape", [b.input("x", [2, 3, 4]), b.const(None, value=[2, 4, 3], dtype="int64")]))
    b.output(b.op("Reshape", [b.input("y", [2, 3]), b.const(None, value=[3, 2], dtype="int64")]))
    assert_no_match(b.model(), "cancel-identity-reshape")
    assert_no_match(b.model(), "compose-reshapes")


def test_near_miss_compose_reshapes_refuses_bound_dims():
    b = ModelBuilder(3)
    r = b.op("Reshape", [b.input("x", [1, "s", 4]), b.const(None, value=[-1, 4], dtype="int64")])
    b.output(b.op("Reshape", [r, b.const(None, value=[1, -1, 2, 2], dtype="int64")]))
    assert matches_of(load_graph(b.model(), {"x": (1, 3, 4)}), "compose-reshapes") == []
