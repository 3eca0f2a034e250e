import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, matches_of, load_graph, round_trip
from xrlflow.onnx_io import to_model


@pytest.mark.parametrize("x_shape,n,bias_shape,bias_first", [
    ((3, 4), 5, (5,), False),
    ((4, 4), 4, (1, 4), True),       # square
    ((2, 3, 4), 3, (3,), False),
    ((1, 16, 8), 8, (1, 1, 8), True),
])
def test_projection_on_rows_to_gemm_and_back(x_shape, n, bias_shape, bias_first):
    b = ModelBuilder(1)
    y = b.op("MatMul", [b.input("x", x_shape), b.const((x_shape[-1], n), scale=0.5)])
    c = b.const(bias_shape)
    b.output(b.op("Relu", [b.op("Add", [c, y] if bias_first else [y, c])]))
    (gemm,), _ = round_trip(b.model(), "matmul-add-to-gemm", "gemm-to-matmul-add")
    assert gemm.op_counts()["Gemm"] == 1 and "MatMul" not in gemm.op_counts()


@pytest.mark.parametrize("m,y_shape,bias_shape", [(6, (1, 4, 5), (6, 1)), (4, (4, 4), (4, 1)), (3, (1, 1, 2, 3), (1, 3, 1))])
def test_transposed_projection_to_gemm(m, y_shape, bias_shape):
    b = ModelBuilder(2)
    y = b.op("MatMul", [b.const((m, y_shape[-2]), scale=0.5), b.input("y", y_shape)])
    b.output(b.op("Add", [y, b.const(bias_shape)]))
    (gemm,), _ = round_trip(b.model(), "matmul-add-to-gemm", "gemm-to-matmul-add")
    assert gemm.op_counts()["Gemm"] == 1


def test_output_projection_transpose_folds_into_transA():
    # ctx^T [1, h*dh, s] -> Transpose -> projection: the head-major layout's output projection
    b = ModelBuilder(3)
    t = b.op("Transpose", [b.input("ctx_t", [1, 8, 6])], perm=[0, 2, 1])
    b.output(b.op("Add", [b.op("MatMul", [t, b.const((8, 8), scale=0.5)]), b.const((8,))]))
    (gemm,) = assert_rule_preserves(b.model(), "matmul-add-to-gemm")
    (moved,) = assert_rule_preserves(to_model(gemm), "move-reshape-before-transpose")
    (folded,) = assert_rule_preserves(to_model(moved), "absorb-transpose-into-gemm")
    assert "Transpose" not in folded.op_counts()
    assert next(n for n in folded.nodes.values() if n.op_type == "Gemm").attr("transA") == 1


def test_near_miss_bias_that_is_not_a_row_or_a_column():
    b = ModelBuilder(4)
    y = b.op("MatMul", [b.input("x", [2, 3, 4]), b.const((4, 5))])
    b.output(b.op("Add", [y, b.const((3, 5))]))  # varies along the rows: not a Gemm bias once rows merge
    y2 = b.op("MatMul", [b.const((3, 4)), b.input("y", [2, 4, 5])])  # leading axis 2: W@Y is no single Gemm
    b.output(b.op("Add", [y2, b.const((3, 1))]))
    y3 = b.op("MatMul", [b.input("z", [3, 4]), b.const((4, 5))])
    b.output(b.op("Add", [y3, b.input("zb", [3, 5])]), y3)  # the product is read twice
    assert_no_match(b.model(), "matmul-add-to-gemm")


def test_near_miss_bound_rows_are_not_baked():
    b = ModelBuilder(5)
    y = b.op("MatMul", [b.input("x", [1, "s", 4]), b.const((4, 5))])
    b.output(b.op("Add", [y, b.const((5,))]))
    assert matches_of(load_graph(b.model(), {"x": (1, 3, 4)}), "matmul-add-to-gemm") == []
