import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, round_trip

# (x shape, perm, constant's broadcast kind, op, constant first): bias Adds and scales
CASES = [
    ((3, 4), (1, 0), "bias", "Add", False),
    ((3, 3), (1, 0), "full", "Sub", True),
    ((2, 3, 4), (1, 2, 0), "bias", "Mul", False),
    ((2, 3, 4), (2, 0, 1), "scalar", "Div", False),
    ((2, 2, 2), (1, 2, 0), "middle-one", "Add", True),
    ((1, 4, 3, 5), (0, 2, 3, 1), "middle-one", "Mul", False),
    ((2, 3, 4, 4), (0, 1, 3, 2), "one", "Div", True),
]


def constant_shape(kind, target):
    """A constant shape that broadcasts into `target` without enlarging it."""
    return {
        "bias": tuple(target[-1:]), "full": tuple(target), "scalar": (), "one": (1,),
        "middle-one": tuple(target[-3:-2]) + (1,) + tuple(target[-1:]),
    }[kind]


def _constant(b, kind, target, op, seed):
    c_shape = constant_shape(kind, target)
    value = np.abs(np.random.default_rng(seed).standard_normal(c_shape)) + 0.5 if op == "Div" else None
    return b.const(c_shape, value=value)


@pytest.mark.parametrize("shape,perm,c_shape,op,const_first", CASES)
def test_transpose_after_then_before_const_binary(shape, perm, c_shape, op, const_first):
    b = ModelBuilder(1)
    t = b.op("Transpose", [b.input("x", shape)], perm=list(perm))
    c = _constant(b, c_shape, [shape[p] for p in perm], op, 1)
    b.output(b.op("Tanh", [b.op(op, [c, t] if const_first else [t, c])]))
    (moved,), _ = round_trip(b.model(), "move-transpose-after-const-binary", "move-transpose-before-const-binary")
    assert moved.consumer_nodes("x")[0].op_type == op


@pytest.mark.parametrize("shape,perm,c_shape,op,const_first", CASES)
def test_transpose_before_then_after_const_binary(shape, perm, c_shape, op, const_first):
    b = ModelBuilder(2)
    c = _constant(b, c_shape, shape, op, 2)
    x = b.input("x", shape)
    b.output(b.op("Transpose", [b.op(op, [c, x] if const_first else [x, c])], perm=list(perm)))
    (moved,), _ = round_trip(b.model(), "move-transpose-before-const-binary", "move-transpose-after-const-binary")
    assert moved.consumer_nodes("x")[0].op_type == "Transpose"


def test_near_miss_computed_operand_or_enlarging_constant():
    b = ModelBuilder(3)
    t = b.op("Transpose", [b.input("x", [2, 3])], perm=[1, 0])
    b.output(b.op("Add", [t, b.input("y", [3, 2])]))  # not a constant
    t2 = b.op("Transpose", [b.input("z", [1, 3])], perm=[1, 0])
    b.output(b.op("Add", [t2, b.const((3, 4))]))  # the constant enlarges the result
    assert_no_match(b.model(), "move-transpose-after-const-binary")
