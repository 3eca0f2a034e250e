import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, round_trip

# (M, K, N, bias shape or None, transA, transB, alpha, beta): square and non-square products
GEMMS = [
    (3, 4, 5, (5,), 0, 0, 1.0, 1.0),
    (4, 4, 4, (4,), 0, 1, 0.5, 2.0),
    (3, 3, 3, (3, 3), 1, 0, 1.0, 0.5),
    (2, 5, 3, (2, 1), 1, 1, 1.5, 1.0),
    (4, 2, 4, None, 0, 0, 1.0, 1.0),
    (3, 4, 3, (), 1, 0, 1.0, 1.0),
]


def _gemm(b, m, k, n, bias, trans_a, trans_b, alpha, beta, computed_b=False):
    a = b.input("a", [k, m] if trans_a else [m, k])
    w_shape = [n, k] if trans_b else [k, n]
    w = b.input("w", w_shape) if computed_b else b.const(w_shape, scale=0.5)
    inputs = [a, w] + ([b.const(bias)] if bias is not None else [])
    return b.op("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)


@pytest.mark.parametrize("case", GEMMS)
def test_transpose_then_untranspose_gemm(case):
    b = ModelBuilder(1)
    b.output(b.op("Transpose", [_gemm(b, *case)], perm=[1, 0]))
    model = b.model()
    (moved,), backs = round_trip(model, "transpose-gemm", "untranspose-gemm")
    assert moved.op_counts().get("Transpose", 0) <= 1  # only a constant bias's transpose remains
    assert next(n for n in moved.nodes.values() if n.op_type == "Gemm").inputs[1] == "a"


@pytest.mark.parametrize("case", GEMMS[:4])
def test_untranspose_gemm_on_a_plain_gemm(case):
    b = ModelBuilder(2)
    b.output(b.op("Relu", [_gemm(b, *case, computed_b=True)]))
    (result,) = assert_rule_preserves(b.model(), "untranspose-gemm")
    assert result.op_counts()["Transpose"] >= 1


@pytest.mark.parametrize("position,square", [(0, False), (1, False), (0, True), (1, True)])
def test_absorb_and_extract_transpose(position, square):
    b = ModelBuilder(3)
    m, k, n = (4, 4, 4) if square else (2, 3, 5)
    a = b.input("a", [k, m] if position == 0 else [m, k])
    w = b.input("w", [n, k] if position == 1 else [k, n])
    operands = [a, w]
    operands[position] = b.op("Transpose", [operands[position]], perm=[1, 0])
    b.output(b.op("Gemm", operands + [b.const((n,))], alpha=0.7))
    model = b.model()
    (absorbed,), (back,) = round_trip(model, "absorb-transpose-into-gemm", "extract-transpose-from-gemm")
    gemm = next(n for n in absorbed.nodes.values() if n.op_type == "Gemm")
    assert "Transpose" not in absorbed.op_counts() and gemm.attr("transA" if position == 0 else "transB") == 1


def test_extract_both_flags():
    b = ModelBuilder(4)
    b.output(b.op("Gemm", [b.input("a", [3, 3]), b.input("w", [3, 3])], transA=1, transB=1))
    results = assert_rule_preserves(b.model(), "extract-transpose-from-gemm", min_matches=2)
    assert len(results) == 2


def test_near_miss_gemm_rules():
    b = ModelBuilder(5)
    gemm = b.op("Gemm", [b.input("a", [3, 4]), b.const((4, 5))])
    b.output(b.op("Transpose", [gemm], perm=[1, 0]), gemm)  # the product is read twice
    assert_no_match(b.model(), "transpose-gemm")
    b = ModelBuilder(6)
    t = b.op("Transpose", [b.input("a", [2, 3, 4])], perm=[0, 2, 1])  # not a rank-2 Gemm operand
    b.output(b.op("MatMul", [t, b.const((3, 2))]))
    b.output(b.op("Gemm", [b.input("c", [2, 3]), b.const((3, 2))]))
    assert_no_match(b.model(), "absorb-transpose-into-gemm")
    assert_no_match(b.model(), "extract-transpose-from-gemm")
