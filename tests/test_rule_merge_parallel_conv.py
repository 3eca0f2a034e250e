import numpy as np
import pytest

from tests.rulecheck import ENGINE, ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, matches_of
from xrlflow.onnx_io import to_model
from xrlflow.verify import verify_models


def _random_geometry(rng, size):
    """Kernel, strides, pads, dilations for a 2-D conv over a `size` x `size` image (output never empty)."""
    kernel = [int(k) for k in rng.integers(1, 4, size=2)]
    strides = [int(s) for s in rng.integers(1, 3, size=2)]
    pads = [int(p) for p in rng.integers(0, 3, size=4)]
    dilations = [int(d) for d in rng.integers(1, 3, size=2)]
    for axis in range(2):
        assert size + pads[axis] + pads[axis + 2] >= dilations[axis] * (kernel[axis] - 1) + 1
    return kernel, dict(strides=strides, pads=pads, dilations=dilations)


def _parallel_convs(seed, n, bias):
    b = ModelBuilder(seed)
    rng = b.rng
    channels, size = int(rng.integers(1, 6)), int(rng.integers(6, 12))
    x = b.input("x", [int(rng.integers(1, 3)), channels, size, size])
    kernel, attrs = _random_geometry(rng, size)
    outs = []
    for i in range(n):
        width = int(rng.integers(1, 6))
        inputs = [x, b.const([width, channels] + kernel)] + ([b.const([width])] if bias else [])
        y = b.op("Conv", inputs, **attrs)
        outs.append(b.op("Relu", [y]) if i % 2 else y)  # some members' outputs are graph outputs themselves
    b.output(*outs)
    return b.model()


@pytest.mark.parametrize("seed,n,bias", [(0, 2, True), (1, 3, False), (2, 4, True), (3, 3, True)])
def test_merge_then_split_preserves_function(seed, n, bias):
    model = _parallel_convs(seed, n, bias)
    (merged,) = assert_rule_preserves(model, "merge-parallel-conv")
    assert merged.op_counts()["Conv"] == 1
    restored = assert_rule_preserves(to_model(merged), "split-merged-conv")
    assert [g.op_counts()["Conv"] for g in restored] == [n]
    assert verify_models(model, to_model(restored[0], fold_constants=True)).ok


def test_reverse_applies_directly_to_the_merged_graph():
    model = _parallel_convs(4, 3, True)
    graph = load_graph(model)
    merged = ENGINE.apply(graph, matches_of(graph, "merge-parallel-conv")[0])
    (reverse,) = matches_of(merged, "split-merged-conv")
    restored = ENGINE.apply(merged, reverse)
    assert restored.op_counts()["Conv"] == 3
    assert verify_models(model, to_model(restored)).ok


def test_one_maximal_group_per_kernel_shape():
    b = ModelBuilder(5)
    x = b.input("x", [1, 3, 8, 8])
    outs = [b.op("Conv", [x, b.const([2, 3, 1, 1])]) for _ in range(3)]
    outs += [b.op("Conv", [x, b.const([4, 3, 3, 3])], pads=[1, 1, 1, 1]) for _ in range(2)]
    b.output(*outs)
    found = matches_of(load_graph(b.model()), "merge-parallel-conv")
    assert sorted(m.params for m in found) == [(2,), (3,)]
    assert_rule_preserves(b.model(), "merge-parallel-conv", min_matches=2)


def _pair(second_attrs=None, second_weight=None, second_bias=True, channels=4, group_weight_channels=None):
    b = ModelBuilder(6)
    x = b.input("x", [1, channels, 9, 9])
    first = b.op("Conv", [x, b.const([4, channels, 3, 3]), b.const([4])], pads=[1, 1, 1, 1])
    w = second_weight(b) if second_weight else b.const([4, group_weight_channels or channels, 3, 3])
    inputs = [x, w] + ([b.const([4])] if second_bias else [])
    second = b.op("Conv", inputs, **(second_attrs or dict(pads=[1, 1, 1, 1])))
    b.output(first, second)
    return b.model()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(second_attrs=dict(pads=[1, 1, 1, 1], strides=[2, 2])),  # different strides
        dict(second_attrs=dict(pads=[0, 0, 0, 0])),  # different pads
        dict(second_attrs=dict(pads=[1, 1, 1, 1], group=2), group_weight_channels=2),  # grouped conv
        dict(second_attrs=dict(auto_pad="SAME_UPPER")),  # implicit padding
        dict(second_weight=lambda b: b.input("w", [4, 4, 3, 3])),  # weight is not a constant
        dict(second_bias=False),  # bias on one member only
    ],
)
def test_near_misses(kwargs):
    model = _pair(**kwargs)
    assert verify_models(model, model).ok  # a valid model that onnxruntime runs
    assert_no_match(model, "merge-parallel-conv")
    assert_rule_preserves(_pair(), "merge-parallel-conv")  # the same pair without the difference does merge


def test_split_near_misses():
    b = ModelBuilder(7)
    x = b.input("x", [1, 2, 6, 6])
    y = b.op("Conv", [x, b.const([4, 2, 1, 1])])
    b.output(*b.op("Split", [y, b.const(None, value=[3, 3], dtype=np.int64)], n_out=2, axis=2))  # spatial split
    assert_no_match(b.model(), "split-merged-conv")

    b = ModelBuilder(8)
    x = b.input("x", [1, 2, 6, 6])
    y = b.op("Conv", [x, b.const([4, 2, 1, 1])])
    pieces = b.op("Split", [y, b.const(None, value=[1, 3], dtype=np.int64)], n_out=2, axis=1)
    b.output(*pieces, b.op("Relu", [y]))  # the conv output has a second reader
    assert_no_match(b.model(), "split-merged-conv")


def test_merge_follows_a_shared_concat_so_the_split_cancels():
    from tests.rulecheck import ModelBuilder
    from xrlflow.onnx_io import load_graph

    b = ModelBuilder(11)
    x = b.input("x", [1, 4, 6, 6])
    # named so that name order and Concat order disagree
    first = b.op("Conv", [x, b.const((3, 4, 1, 1))])
    second = b.op("Conv", [x, b.const((2, 4, 1, 1))])
    b.nodes[-1].name, b.nodes[-2].name = "a_conv", "z_conv"
    b.output(b.op("Relu", [b.op("Concat", [first, second], axis=1)]))
    g = load_graph(b.model())
    (merge,) = [m for m in ENGINE.matches(g) if m.rule == "merge-parallel-conv"]
    merged = ENGINE.apply(g, merge)
    assert [m.rule for m in ENGINE.matches(merged)].count("cancel-split-concat") == 1
