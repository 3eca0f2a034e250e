import numpy as np
import pytest

from tests.rulecheck import ENGINE, ModelBuilder, assert_no_match, assert_rule_preserves, load_graph


def _layout(rng):
    rank = int(rng.integers(1, 5))
    shape = [int(d) for d in rng.integers(1, 5, size=rank)]
    axis = int(rng.integers(0, rank))
    sizes = [int(s) for s in rng.integers(1, 5, size=int(rng.integers(2, 5)))]
    shape[axis] = sum(sizes)
    return shape, axis, sizes


def _pieces(b, shape, axis, sizes):
    """One graph input per size: `shape` with `sizes[i]` on `axis`."""
    return [b.input(f"x{i}", [size if d == axis else n for d, n in enumerate(shape)]) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("seed", range(4))
def test_cancel_split_concat(seed):
    b = ModelBuilder(seed)
    shape, axis, sizes = _layout(b.rng)
    x = b.op("Relu", [b.input("x", shape)])
    pieces = b.op("Split", [x, b.const(None, dtype=np.int64, value=sizes)], n_out=len(sizes), axis=axis)
    b.output(b.op("Sigmoid", [b.op("Concat", pieces, axis=axis - len(shape))]))
    (cancelled,) = assert_rule_preserves(b.model(), "cancel-split-concat")
    assert "Split" not in cancelled.op_counts() and "Concat" not in cancelled.op_counts()
    assert ENGINE.rule("cancel-split-concat").reverse is None


@pytest.mark.parametrize("seed", range(4, 8))
def test_cancel_concat_split(seed):
    b = ModelBuilder(seed)
    shape, axis, sizes = _layout(b.rng)
    values = [b.op("Relu", [x]) for x in _pieces(b, shape, axis, sizes)]
    joined = b.op("Concat", values, axis=axis)
    pieces = b.op("Split", [joined, b.const(None, dtype=np.int64, value=sizes)], n_out=len(sizes), axis=axis)
    b.output(*[b.op("Tanh", [p]) for p in pieces])
    (cancelled,) = assert_rule_preserves(b.model(), "cancel-concat-split")
    assert "Split" not in cancelled.op_counts() and "Concat" not in cancelled.op_counts()


@pytest.mark.parametrize("seed", range(8, 12))
def test_cancel_slice_concat(seed):
    b = ModelBuilder(seed)
    shape, axis, sizes = _layout(b.rng)
    values = _pieces(b, shape, axis, sizes)
    joined = b.op("Concat", values, axis=axis)
    pick = int(b.rng.integers(0, len(sizes)))
    start = sum(sizes[:pick])
    end = start + sizes[pick]
    total = sum(sizes)
    # negative and over-long bounds exercise ONNX clamping
    starts = [start - total if seed % 2 else start, 0]
    ends = [end if end < total else 1 << 40, 1 << 40]
    other = (axis + 1) % len(shape)
    axes = [axis, other] if other != axis else [axis]
    sliced = b.op("Slice", [
        joined, b.const(None, dtype=np.int64, value=starts[:len(axes)]),
        b.const(None, dtype=np.int64, value=ends[:len(axes)]), b.const(None, dtype=np.int64, value=axes),
    ])
    b.output(b.op("Relu", [sliced]))
    (cancelled,) = assert_rule_preserves(b.model(), "cancel-slice-concat")
    assert "Slice" not in cancelled.op_counts()


def test_graph_outputs_keep_their_names():
    b = ModelBuilder(20)
    x = b.input("x", [2, 5])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 3])], n_out=2, axis=1)
    joined = b.op("Concat", [p0, p1], axis=1)
    b.output(joined, p1)
    model = b.model()
    (cancelled,) = assert_rule_preserves(model, "cancel-split-concat")
    assert cancelled.outputs == load_graph(model).outputs

    b = ModelBuilder(21)
    a, c = b.input("a", [2, 2]), b.input("c", [2, 3])
    joined = b.op("Concat", [a, c], axis=1)
    p0, p1 = b.op("Split", [joined, b.const(None, dtype=np.int64, value=[2, 3])], n_out=2, axis=1)
    b.output(p0, b.op("Relu", [p1]), joined)
    model = b.model()
    (cancelled,) = assert_rule_preserves(model, "cancel-concat-split")
    assert cancelled.outputs == load_graph(model).outputs


def test_near_misses():
    b = ModelBuilder(30)  # Concat on another axis than the Split
    x = b.input("x", [4, 4])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[2, 2])], n_out=2, axis=1)
    b.output(b.op("Concat", [p0, p1], axis=0))
    assert_no_match(b.model(), "cancel-split-concat")

    b = ModelBuilder(31)  # pieces out of order
    x = b.input("x", [4, 4])
    p0, p1 = b.op("Split", [x, b.const(None, dtype=np.int64, value=[1, 3])], n_out=2, axis=1)
    b.output(b.op("Concat", [p1, p0], axis=1))
    assert_no_match(b.model(), "cancel-split-concat")

    b = ModelBuilder(32)  # split sizes differ from the concat inputs' sizes
    joined = b.op("Concat", [b.input("a", [2, 2]), b.input("c", [2, 4])], axis=1)
    b.output(*b.op("Split", [joined, b.const(None, dtype=np.int64, value=[3, 3])], n_out=2, axis=1))
    assert_no_match(b.model(), "cancel-concat-split")

    b = ModelBuilder(33)  # slice straddles two inputs
    joined = b.op("Concat", [b.input("a", [2, 2]), b.input("c", [2, 4])], axis=1)
    b.output(b.op("Slice", [joined, b.const(None, dtype=np.int64, value=[1]), b.const(None, dtype=np.int64, value=[3]),
                            b.const(None, dtype=np.int64, value=[1])]))
    assert_no_match(b.model(), "cancel-slice-concat")

    b = ModelBuilder(34)  # slice also cuts another axis
    joined = b.op("Concat", [b.input("a", [3, 2]), b.input("c", [3, 4])], axis=1)
    b.output(b.op("Slice", [joined, b.const(None, dtype=np.int64, value=[0, 0]), b.const(None, dtype=np.int64, value=[2, 2]),
                            b.const(None, dtype=np.int64, value=[1, 0])]))
    assert_no_match(b.model(), "cancel-slice-concat")

    b = ModelBuilder(35)  # step 2
    joined = b.op("Concat", [b.input("a", [2, 2]), b.input("c", [2, 4])], axis=1)
    b.output(b.op("Slice", [joined, b.const(None, dtype=np.int64, value=[2]), b.const(None, dtype=np.int64, value=[6]),
                            b.const(None, dtype=np.int64, value=[1]), b.const(None, dtype=np.int64, value=[2])]))
    assert_no_match(b.model(), "cancel-slice-concat")
