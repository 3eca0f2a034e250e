import pytest

from tests.rulecheck import ENGINE, ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, matches_of
from xrlflow.onnx_io import to_model
from xrlflow.verify import verify_models


def _conv_sum(seed, biases):
    """Add(Conv(x, W1, b1), Conv(x, W2, b2)) with random shapes and one random geometry for both convs."""
    b = ModelBuilder(seed)
    rng = b.rng
    group = int(rng.choice([1, 2]))
    channels, width, size = group * int(rng.integers(1, 4)), group * int(rng.integers(1, 4)), int(rng.integers(6, 11))
    x = b.input("x", [int(rng.integers(1, 3)), channels, size, size])
    kernel = [int(k) for k in rng.integers(1, 4, size=2)]
    attrs = dict(
        strides=[int(s) for s in rng.integers(1, 3, size=2)],
        pads=[int(p) for p in rng.integers(0, 3, size=4)],
        dilations=[int(d) for d in rng.integers(1, 3, size=2)],
        group=group,
    )
    outs = []
    for has_bias in biases:
        inputs = [x, b.const([width, channels // group] + kernel)] + ([b.const([width])] if has_bias else [])
        outs.append(b.op("Conv", inputs, **attrs))
    b.output(b.op("Relu", [b.op("Add", outs)]))
    return b.model()


@pytest.mark.parametrize(
    "seed,biases", [(0, (True, True)), (1, (True, False)), (2, (False, True)), (3, (False, False)), (4, (True, True))]
)
def test_fuse_then_split_preserves_function(seed, biases):
    model = _conv_sum(seed, biases)
    (fused,) = assert_rule_preserves(model, "fuse-conv-sum")
    assert fused.op_counts()["Conv"] == 1
    (split,) = assert_rule_preserves(to_model(fused), "split-conv-sum")
    assert split.op_counts()["Conv"] == 2
    assert verify_models(model, to_model(split, fold_constants=True)).ok


def test_reverse_restores_both_biases():
    model = _conv_sum(5, (True, True))
    graph = load_graph(model)
    fused = ENGINE.apply(graph, matches_of(graph, "fuse-conv-sum")[0])
    (reverse,) = matches_of(fused, "split-conv-sum")
    restored = ENGINE.apply(fused, reverse)
    # the original weights and biases, read directly again: the summed constants are dead
    original_inputs = sorted(n.inputs for n in graph.by_op("Conv"))
    assert sorted(n.inputs for n in restored.by_op("Conv")) == original_inputs
    assert verify_models(model, to_model(restored)).ok


def _pair(second_attrs=None, second_input=None, second_kernel=(3, 3), second_weight=None, extra_reader=False):
    b = ModelBuilder(6)
    x = b.input("x", [1, 3, 8, 8])
    first = b.op("Conv", [x, b.const([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    source = second_input(b) if second_input else x
    w = second_weight(b) if second_weight else b.const([4, 3] + list(second_kernel))
    second = b.op("Conv", [source, w], **(second_attrs or dict(pads=[1, 1, 1, 1])))
    b.output(b.op("Add", [first, second]))
    if extra_reader:
        b.output(second)
    return b.model()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(second_input=lambda b: b.input("y", [1, 3, 8, 8])),  # different inputs
        dict(second_kernel=(1, 1), second_attrs=dict(pads=[0, 0, 0, 0])),  # different kernel shapes
        dict(second_attrs=dict(pads=[2, 2, 2, 2], dilations=[2, 2])),  # different dilations
        dict(second_weight=lambda b: b.input("w", [4, 3, 3, 3])),  # weight is not a constant
        dict(extra_reader=True),  # a conv output is also read elsewhere
    ],
)
def test_near_misses(kwargs):
    model = _pair(**kwargs)
    assert verify_models(model, model).ok  # a valid model that onnxruntime runs
    assert_no_match(model, "fuse-conv-sum")
    assert_rule_preserves(_pair(), "fuse-conv-sum")  # the pair without the difference does fuse


def test_split_near_miss_broadcast_weight_sum():
    b = ModelBuilder(7)
    x = b.input("x", [1, 3, 8, 8])
    w = b.op("Add", [b.const([4, 3, 3, 3]), b.const([1])])  # broadcasts a scalar: not a sum of two weights
    b.output(b.op("Conv", [x, w]))
    assert_no_match(b.model(), "split-conv-sum")
