import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, load_graph
from xrlflow.onnx_io import to_model

UNARIES = [("Relu", {}), ("Sigmoid", {}), ("LeakyRelu", {"alpha": 0.3}), ("Tanh", {})]


def _unary_then_concat(seed, op, attrs):
    """n inputs of random sizes along a random axis -> op on each -> Concat."""
    b = ModelBuilder(seed)
    rng = b.rng
    rank = int(rng.integers(1, 5))
    shape = [int(d) for d in rng.integers(1, 5, size=rank)]
    axis = int(rng.integers(-rank, rank))
    values = []
    for i in range(int(rng.integers(2, 5))):
        s = list(shape)
        s[axis] = int(rng.integers(1, 5))
        values.append(b.op(op, [b.input(f"x{i}", s)], **attrs))
    b.output(b.op("Concat", values, axis=axis))
    return b.model()


@pytest.mark.parametrize("seed", range(4))
def test_hoist_then_sink_round_trip(seed):
    op, attrs = UNARIES[seed]
    model = _unary_then_concat(seed, op, attrs)
    n_inputs = len(model.graph.input)
    (hoisted,) = assert_rule_preserves(model, "hoist-unary-over-concat")
    assert hoisted.op_counts()[op] == 1
    assert hoisted.producer_of(hoisted.outputs[0]).op_type == op
    (sunk,) = assert_rule_preserves(to_model(hoisted), "sink-unary-into-concat")
    assert sunk.op_counts()[op] == n_inputs
    assert sunk.producer_of(sunk.outputs[0]).op_type == "Concat"


def test_near_miss_input_read_elsewhere():
    b = ModelBuilder(1)
    a, c = b.op("Relu", [b.input("a", [2, 3])]), b.op("Relu", [b.input("c", [2, 2])])
    b.output(b.op("Concat", [a, c], axis=1), c)
    assert_no_match(b.model(), "hoist-unary-over-concat")


def test_near_miss_one_input_not_activated():
    b = ModelBuilder(2)
    a = b.op("Relu", [b.input("a", [2, 3])])
    b.output(b.op("Concat", [a, b.input("c", [2, 2])], axis=1))
    assert_no_match(b.model(), "hoist-unary-over-concat")


def test_near_miss_concat_read_elsewhere():
    b = ModelBuilder(3)
    joined = b.op("Concat", [b.input("a", [2, 3]), b.input("c", [2, 2])], axis=1)
    b.output(b.op("Relu", [joined]), joined)
    assert_no_match(b.model(), "sink-unary-into-concat")


def test_repeated_concat_input_sinks_and_keeps_output_name():
    b = ModelBuilder(4)
    a = b.input("a", [2, 3])
    b.output(b.op("Sigmoid", [b.op("Concat", [a, a, b.input("c", [2, 1])], axis=-1)]))
    model = b.model()
    (sunk,) = assert_rule_preserves(model, "sink-unary-into-concat")
    assert sunk.outputs == load_graph(model).outputs
    assert sunk.op_counts()["Sigmoid"] == 3
