import numpy as np
import pytest

from tests.rulecheck import ENGINE, ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, matches_of
from xrlflow.onnx_io import to_model
from xrlflow.verify import verify_models


def _siblings(seed):
    """A small-kernel conv and a sibling whose kernel is larger by an even amount per axis; random geometry."""
    b = ModelBuilder(seed)
    rng = b.rng
    channels, size = int(rng.integers(1, 5)), int(rng.integers(7, 12))
    x = b.input("x", [int(rng.integers(1, 3)), channels, size, size + 1])
    small = [int(k) for k in rng.choice([1, 2, 3], size=2)]
    large = [k + 2 * int(g) for k, g in zip(small, rng.integers(0, 3, size=2))]
    if large == small:
        large[0] += 2
    strides = [int(s) for s in rng.integers(1, 3, size=2)]
    small_width, large_width = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    small_inputs = [x, b.const([small_width, channels] + small)]
    if rng.integers(0, 2):
        small_inputs.append(b.const([small_width]))
    small_attrs = dict(strides=strides, pads=[int(p) for p in rng.integers(0, 3, size=4)])
    if rng.integers(0, 2):
        small_attrs["kernel_shape"] = small  # spelled out: the rewrite must update it
    y_small = b.op("Conv", small_inputs, **small_attrs)
    large_inputs = [x, b.const([large_width, channels] + large), b.const([large_width])]
    y_large = b.op("Conv", large_inputs, strides=strides, pads=[k // 2 for k in large] * 2)
    b.output(b.op("Relu", [y_small]), y_large)
    return b.model(), small, large


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_enlarge_then_shrink_preserves_function(seed):
    model, small, large = _siblings(seed)
    (enlarged,) = assert_rule_preserves(model, "enlarge-conv-kernel")
    kernels = sorted(tuple(enlarged.static_shape(n.inputs[1])[2:]) for n in enlarged.by_op("Conv"))
    assert kernels == [tuple(large)] * 2
    assert enlarged.op_counts()["Pad"] == 1
    (shrunk,) = assert_rule_preserves(to_model(enlarged), "shrink-conv-kernel")
    assert sorted(tuple(shrunk.static_shape(n.inputs[1])[2:]) for n in shrunk.by_op("Conv")) == sorted(
        [tuple(small), tuple(large)]
    )
    assert "Pad" not in shrunk.op_counts()
    assert verify_models(model, to_model(shrunk, fold_constants=True)).ok


def test_enlarge_then_merge_yields_one_conv():
    b = ModelBuilder(10)
    x = b.input("x", [1, 8, 14, 14])
    pointwise = b.op("Conv", [x, b.const([16, 8, 1, 1]), b.const([16])])
    spatial = b.op("Conv", [x, b.const([24, 8, 3, 3]), b.const([24])], pads=[1, 1, 1, 1])
    b.output(b.op("Relu", [pointwise]), b.op("Relu", [spatial]))
    model = b.model()
    graph = load_graph(model)
    assert matches_of(graph, "merge-parallel-conv") == []  # different kernels: no merge before enlarging
    (enlarge,) = matches_of(graph, "enlarge-conv-kernel")
    enlarged = ENGINE.apply(graph, enlarge)
    (merge,) = matches_of(enlarged, "merge-parallel-conv")
    merged = ENGINE.apply(enlarged, merge)
    assert merged.op_counts()["Conv"] == 1
    for fold in (False, True):
        report = verify_models(model, to_model(merged, fold_constants=fold))
        assert report.ok, report.to_dict()


def _pair(small_kernel=(1, 1), small_attrs=None, large_attrs=None, small_weight=None, channels=4):
    b = ModelBuilder(11)
    x = b.input("x", [1, channels, 10, 10])
    w = small_weight(b) if small_weight else b.const([4, channels] + list(small_kernel))
    y_small = b.op("Conv", [x, w], **(small_attrs or {}))
    y_large = b.op("Conv", [x, b.const([4, channels, 3, 3])], **(large_attrs or dict(pads=[1, 1, 1, 1])))
    b.output(y_small, y_large)
    return b.model()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(small_kernel=(2, 2)),  # odd kernel difference: no symmetric zero padding exists
        dict(small_kernel=(1, 2)),  # odd on one axis only
        dict(small_attrs=dict(strides=[2, 2])),  # different strides
        dict(small_attrs=dict(dilations=[2, 2])),  # dilated
        dict(small_weight=lambda b: b.const([4, 2, 1, 1]), small_attrs=dict(group=2)),  # grouped conv
        dict(small_weight=lambda b: b.input("w", [4, 4, 1, 1])),  # weight is not a constant
        dict(large_attrs=dict(pads=[1, 1, 1, 1], dilations=[2, 2])),  # the sibling is dilated
    ],
)
def test_near_misses(kwargs):
    model = _pair(**kwargs)
    assert verify_models(model, model).ok  # a valid model that onnxruntime runs
    assert_no_match(model, "enlarge-conv-kernel")
    assert_rule_preserves(_pair(), "enlarge-conv-kernel")  # the pair without the difference does match


def _padded_weight_conv(pad_amounts, conv_pads, fill=None):
    b = ModelBuilder(12)
    x = b.input("x", [1, 3, 9, 9])
    pad_inputs = [b.const([5, 3, 1, 1]), b.const(None, value=pad_amounts, dtype=np.int64)]
    if fill is not None:
        pad_inputs.append(b.const(None, value=fill, dtype=np.float32))
    w = b.op("Pad", pad_inputs)
    # The padded weight is a graph output too: onnxruntime's PadFusion would otherwise fuse this Pad into the
    # Conv's data input and fail to load the model (see enlarge-conv-kernel).
    b.output(b.op("Conv", [x, w], pads=conv_pads), w)
    return b.model()


def test_shrink_on_any_symmetric_zero_pad():
    shrunk = assert_rule_preserves(_padded_weight_conv([0, 0, 1, 2, 0, 0, 1, 2], [2, 3, 1, 2], fill=0.0), "shrink-conv-kernel")
    assert [n.attr("pads") for g in shrunk for n in g.by_op("Conv")] == [(1, 1, 0, 0)]


@pytest.mark.parametrize(
    "pad_amounts,conv_pads,fill",
    [
        ([0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1], None),  # asymmetric padding
        ([0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 0, 0], None),  # conv pads smaller than the padding
        ([0, 0, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1], 0.5),  # pads with a non-zero value
        ([1, 0, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1], None),  # pads the output-channel axis too
    ],
)
def test_shrink_near_misses(pad_amounts, conv_pads, fill):
    model = _padded_weight_conv(pad_amounts, conv_pads, fill)
    assert_no_match(model, "shrink-conv-kernel")
