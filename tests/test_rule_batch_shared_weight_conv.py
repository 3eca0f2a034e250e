import numpy as np
import pytest

from tests.rulecheck import ENGINE, ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, matches_of
from xrlflow.onnx_io import to_model
from xrlflow.verify import verify_models


def _towers(seed, alias_weight):
    """Two activations of different batch sizes through one shared conv weight (and bias); random geometry."""
    b = ModelBuilder(seed)
    rng = b.rng
    channels, width, size = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(6, 11))
    a = b.input("a", [int(rng.integers(1, 3)), channels, size, size + 2])
    c = b.input("c", [int(rng.integers(1, 4)), channels, size, size + 2])
    kernel = [int(k) for k in rng.integers(1, 4, size=2)]
    attrs = dict(
        strides=[int(s) for s in rng.integers(1, 3, size=2)],
        pads=[int(p) for p in rng.integers(0, 3, size=4)],
        dilations=[int(d) for d in rng.integers(1, 3, size=2)],
    )
    w = b.const([width, channels] + kernel)
    bias = [b.const([width])] if rng.integers(0, 2) else []
    # exporters alias a shared weight through Identity: the second tower reads it that way
    w_second = b.op("Identity", [w]) if alias_weight else w
    first = b.op("Conv", [b.op("Relu", [a]), w] + bias, **attrs)
    second = b.op("Conv", [c, w_second] + bias, **attrs)
    b.output(first, b.op("Sigmoid", [second]))
    return b.model()


@pytest.mark.parametrize("seed,alias", [(0, False), (1, True), (2, True), (3, False)])
def test_batch_then_unbatch_preserves_function(seed, alias):
    model = _towers(seed, alias)
    (batched,) = assert_rule_preserves(model, "batch-shared-weight-conv")
    assert batched.op_counts()["Conv"] == 1
    (unbatched,) = assert_rule_preserves(to_model(batched), "unbatch-shared-weight-conv")
    assert unbatched.op_counts()["Conv"] == 2
    assert verify_models(model, to_model(unbatched, fold_constants=True)).ok


def test_reverse_applies_directly_to_the_batched_graph():
    model = _towers(4, True)
    graph = load_graph(model)
    batched = ENGINE.apply(graph, matches_of(graph, "batch-shared-weight-conv")[0])
    (reverse,) = matches_of(batched, "unbatch-shared-weight-conv")
    restored = ENGINE.apply(batched, reverse)
    assert restored.op_counts()["Conv"] == 2 and "Concat" not in restored.op_counts()
    assert verify_models(model, to_model(restored)).ok


def test_near_miss_one_conv_feeds_the_other():
    """Batching Conv(A) with Conv(Relu(Conv(A))) would make the merged conv read its own output."""
    b = ModelBuilder(5)
    a = b.input("a", [1, 3, 8, 8])
    w = b.const([3, 3, 3, 3])
    first = b.op("Conv", [a, w], pads=[1, 1, 1, 1])
    second = b.op("Conv", [b.op("Relu", [first]), w], pads=[1, 1, 1, 1])
    b.output(second)
    model = b.model()
    assert_no_match(model, "batch-shared-weight-conv")
    # the same two convs on independent inputs do batch
    b = ModelBuilder(5)
    a, c = b.input("a", [1, 3, 8, 8]), b.input("c", [1, 3, 8, 8])
    w = b.const([3, 3, 3, 3])
    b.output(b.op("Conv", [a, w], pads=[1, 1, 1, 1]), b.op("Conv", [b.op("Relu", [c]), w], pads=[1, 1, 1, 1]))
    assert_rule_preserves(b.model(), "batch-shared-weight-conv")


def _pair(second_shape=(2, 3, 8, 8), second_attrs=None, second_weight=None, second_bias=None):
    b = ModelBuilder(6)
    a, c = b.input("a", [1, 3, 8, 8]), b.input("c", list(second_shape))
    w = b.const([4, 3, 3, 3])
    bias = b.const([4])
    first = b.op("Conv", [a, w, bias], pads=[1, 1, 1, 1])
    second_inputs = [c, second_weight(b) if second_weight else w, second_bias(b) if second_bias else bias]
    second = b.op("Conv", second_inputs, **(second_attrs or dict(pads=[1, 1, 1, 1])))
    b.output(first, second)
    return b.model()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(second_shape=(1, 3, 8, 9)),  # spatial shapes differ
        dict(second_attrs=dict(pads=[1, 1, 1, 1], strides=[2, 2])),  # different strides
        dict(second_weight=lambda b: b.const([4, 3, 3, 3])),  # an equal-shaped but different weight
        dict(second_bias=lambda b: b.const([4])),  # a different bias
        dict(second_weight=lambda b: b.input("w", [4, 3, 3, 3])),  # weight is not a constant
    ],
)
def test_near_misses(kwargs):
    model = _pair(**kwargs)
    assert verify_models(model, model).ok  # a valid model that onnxruntime runs
    assert_no_match(model, "batch-shared-weight-conv")
    assert_rule_preserves(_pair(), "batch-shared-weight-conv")  # the pair without the difference does batch


def test_unbatch_near_miss_split_sizes_differ():
    b = ModelBuilder(7)
    a, c = b.input("a", [2, 3, 6, 6]), b.input("c", [2, 3, 6, 6])
    y = b.op("Conv", [b.op("Concat", [a, c], axis=0), b.const([2, 3, 1, 1])])
    b.output(*b.op("Split", [y, b.const(None, value=[1, 3], dtype=np.int64)], n_out=2, axis=0))
    assert_no_match(b.model(), "unbatch-shared-weight-conv")


def test_near_miss_batch_dim_bound_by_input_shape():
    """A symbolic batch dim fixed only for search must not become a constant Split size."""
    b = ModelBuilder(8)
    a, c = b.input("a", ["n", 3, 8, 8]), b.input("c", [2, 3, 8, 8])
    w = b.const([4, 3, 3, 3])
    b.output(b.op("Conv", [a, w], pads=[1, 1, 1, 1]), b.op("Conv", [c, w], pads=[1, 1, 1, 1]))
    model = b.model()
    assert matches_of(load_graph(model, {"a": (1, 3, 8, 8)}), "batch-shared-weight-conv") == []
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # the same model with a static batch
    assert len(matches_of(load_graph(model), "batch-shared-weight-conv")) == 1
