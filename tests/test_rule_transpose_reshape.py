import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, load_graph, matches_of, round_trip
from xrlflow.rules.transpose_reshape import reshape_groups


# (x shape, perm, reshape target) for Reshape(Transpose(x, perm)): merges/splits of axes the perm keeps together
RESHAPE_AFTER = [
    ((2, 3, 4), (1, 2, 0), (12, 2)),                  # merge of (3, 4), which (1,2,0) keeps in order
    ((1, 4, 3, 5), (0, 3, 1, 2), (1, 5, 12)),         # attention's context merge, heads kept together
    ((4, 4, 4), (2, 0, 1), (4, 2, 2, 4)),             # a split of one axis
    ((2, 3, 4, 5), (0, 2, 3, 1), (2, 20, 3)),
    ((3, 3), (1, 0), (3, 3, 1)),                      # trailing size-1 axis
]

# (x shape, reshape target, perm) for Transpose(Reshape(x), perm): the head split of Q/K/V
RESHAPE_BEFORE = [
    ((1, 6, 8), (1, 6, 2, 4), (0, 2, 3, 1)),          # K: [b, s, h*dh] -> [b, h, dh, s]
    ((2, 4, 4), (2, 4, 2, 2), (0, 2, 3, 1)),          # square
    ((6, 4), (2, 3, 4), (2, 0, 1)),
    ((3, 4, 5), (12, 5), (1, 0)),                     # a merge
]


@pytest.mark.parametrize("shape,perm,target", RESHAPE_AFTER)
def test_reshape_before_transpose_and_back(shape, perm, target):
    b = ModelBuilder(1)
    t = b.op("Transpose", [b.input("x", shape)], perm=list(perm))
    b.output(b.op("Relu", [b.op("Reshape", [t, b.const(None, value=list(target), dtype="int64")])]))
    (moved,), _ = round_trip(b.model(), "move-reshape-before-transpose", "move-transpose-before-reshape")
    assert moved.consumer_nodes("x")[0].op_type == "Reshape"


@pytest.mark.parametrize("shape,target,perm", RESHAPE_BEFORE)
def test_transpose_before_reshape_and_back(shape, target, perm):
    b = ModelBuilder(2)
    r = b.op("Reshape", [b.input("x", shape), b.const(None, value=list(target), dtype="int64")])
    b.output(b.op("Sigmoid", [b.op("Transpose", [r], perm=list(perm))]))
    (moved,), _ = round_trip(b.model(), "move-transpose-before-reshape", "move-reshape-before-transpose")
    assert moved.consumer_nodes("x")[0].op_type == "Transpose"


def test_near_miss_perm_separates_a_split_group():
    # Q's layout: [b, s, h*dh] -> [b, s, h, dh] -> (0, 2, 1, 3) puts s between h and dh
    b = ModelBuilder(3)
    r = b.op("Reshape", [b.input("x", [1, 6, 8]), b.const(None, value=[1, 6, 2, 4], dtype="int64")])
    b.output(b.op("Transpose", [r], perm=[0, 2, 1, 3]))
    # an order-reversing perm of a split group
    r2 = b.op("Reshape", [b.input("y", [6, 4]), b.const(None, value=[2, 3, 4], dtype="int64")])
    b.output(b.op("Transpose", [r2], perm=[1, 0, 2]))
    assert_no_match(b.model(), "move-transpose-before-reshape")


def test_near_miss_merge_of_axes_the_perm_separates_or_reorders():
    b = ModelBuilder(4)
    t = b.op("Transpose", [b.input("x", [2, 3, 4])], perm=[2, 1, 0])  # (4, 3, 2): merging 4*3 reorders x's axes
    b.output(b.op("Reshape", [t, b.const(None, value=[12, 2], dtype="int64")]))
    t2 = b.op("Transpose", [b.input("y", [2, 3, 4])], perm=[1, 0, 2])  # a reshape that is neither split nor merge
    b.output(b.op("Reshape", [t2, b.const(None, value=[2, 12], dtype="int64")]))
    assert_no_match(b.model(), "move-reshape-before-transpose")


def test_reshape_groups():
    assert reshape_groups((1, 16, 64), (1, 16, 4, 16)) == [((0,), ()), ((), (0,)), ((1,), (1,)), ((2,), (2, 3))]
    assert reshape_groups((4, 1, 3), (12,)) == [((0, 1, 2), (0,))]
    assert reshape_groups((6, 4), (4, 6)) is None
    assert reshape_groups((2, 12), (2, 3, 4)) == [((0,), (0,)), ((1,), (1, 2))]


def _head_split(seq):
    b = ModelBuilder(5)
    r = b.op("Reshape", [b.input("x", [seq, 8]), b.const(None, value=[-1, 2, 4], dtype="int64")])
    b.output(b.op("Transpose", [r], perm=[1, 2, 0]))
    return b.model()


def test_near_miss_bound_dims_are_not_baked():
    assert matches_of(load_graph(_head_split(6)), "move-transpose-before-reshape")  # static: it applies
    bound = load_graph(_head_split("s"), {"x": (6, 8)})  # seq bound only by --input-shape: it must not
    assert matches_of(bound, "move-transpose-before-reshape") == []
