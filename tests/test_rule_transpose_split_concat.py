import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, round_trip

# (x shape, split axis, sizes, perm): square and non-square, ranks 2-4, non-self-inverse perms
SPLITS = [
    ((4, 6), 1, (2, 4), (1, 0)),
    ((3, 3, 3), 0, (1, 2), (1, 2, 0)),
    ((2, 6, 4), -2, (3, 3), (2, 0, 1)),
    ((1, 12, 4, 4), 1, (4, 4, 4), (0, 2, 3, 1)),
]


@pytest.mark.parametrize("shape,axis,sizes,perm", SPLITS)
def test_transpose_before_split_and_back(shape, axis, sizes, perm):
    b = ModelBuilder(1)
    pieces = b.op("Split", [b.input("x", shape), b.const(None, value=list(sizes), dtype="int64")], n_out=len(sizes), axis=axis)
    b.output(*[b.op("Relu", [b.op("Transpose", [p], perm=list(perm))]) for p in pieces])
    (moved,), _ = round_trip(b.model(), "move-transpose-before-split", "move-transpose-after-split")
    assert moved.op_counts()["Transpose"] == 1 and moved.consumer_nodes("x")[0].op_type == "Transpose"


@pytest.mark.parametrize("shape,axis,sizes,perm", SPLITS)
def test_transpose_after_split_and_back(shape, axis, sizes, perm):
    b = ModelBuilder(2)
    t = b.op("Transpose", [b.input("x", shape)], perm=list(perm))
    rank = len(shape)
    t_shape = [shape[p] for p in perm]
    t_axis = max(range(rank), key=lambda a: t_shape[a])  # a splittable axis of the transposed value
    cut = [1, t_shape[t_axis] - 1]
    pieces = b.op("Split", [t, b.const(None, value=cut, dtype="int64")], n_out=2, axis=t_axis)
    b.output(*pieces)
    (moved,), _ = round_trip(b.model(), "move-transpose-after-split", "move-transpose-before-split")
    assert moved.consumer_nodes("x")[0].op_type == "Split"


@pytest.mark.parametrize("shapes,axis,perm", [
    (((2, 3), (4, 3)), 1, (1, 0)),
    (((3, 3, 3), (3, 3, 1)), 0, (2, 0, 1)),
    (((2, 3, 4, 5), (2, 3, 2, 5), (2, 3, 1, 5)), 3, (0, 3, 1, 2)),
])
def test_transpose_after_concat_and_back(shapes, axis, perm):
    b = ModelBuilder(3)
    inputs = [b.op("Transpose", [b.input(f"x{i}", s)], perm=list(perm)) for i, s in enumerate(shapes)]
    b.output(b.op("Sigmoid", [b.op("Concat", inputs, axis=axis)]))
    (moved,), _ = round_trip(b.model(), "move-transpose-after-concat", "move-transpose-before-concat")
    assert moved.op_counts()["Transpose"] == 1


def test_near_miss_pieces_with_different_perms_or_an_untransposed_piece():
    b = ModelBuilder(4)
    p1, p2 = b.op("Split", [b.input("x", [2, 4, 3]), b.const(None, value=[2, 2], dtype="int64")], n_out=2, axis=1)
    b.output(b.op("Transpose", [p1], perm=[1, 2, 0]), b.op("Transpose", [p2], perm=[2, 0, 1]))
    q1, q2 = b.op("Split", [b.input("y", [2, 4, 3]), b.const(None, value=[2, 2], dtype="int64")], n_out=2, axis=1)
    b.output(b.op("Transpose", [q1], perm=[1, 2, 0]), q2)
    assert_no_match(b.model(), "move-transpose-before-split")


def test_near_miss_concat_of_mixed_inputs():
    b = ModelBuilder(5)
    t = b.op("Transpose", [b.input("x", [3, 2])], perm=[1, 0])
    b.output(b.op("Concat", [t, b.input("y", [2, 3])], axis=0))
    t1 = b.op("Transpose", [b.input("u", [2, 2, 3])], perm=[1, 2, 0])
    t2 = b.op("Transpose", [b.input("v", [2, 2, 3])], perm=[2, 0, 1])
    b.output(b.op("Concat", [t1, t2], axis=0))
    assert_no_match(b.model(), "move-transpose-after-concat")
