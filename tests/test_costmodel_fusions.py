"""The cost model's grouping of Transposes and contrib ops, checked against the nodes onnxruntime keeps (CPU
EP, ORT_ENABLE_EXTENDED), and the work it prices for onnxruntime's contrib kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xrlflow.costmodel import H200_PROFILE, group_kernels, kernel_model, kernel_work
from xrlflow.onnx_io import graph_to_bytes, load_graph
from xrlflow.testing import onnxruntime_nodes

F = TensorProto.FLOAT


def model(nodes, inputs, constants=(), outputs=("z",), shapes=None):
    """`shapes`: the types of values onnx's shape inference cannot infer (contrib ops' outputs)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(v if v is not None else rng.standard_normal(s), np.float32), n)
             for n, s, v in constants]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, F, (shapes or {}).get(n)) for n in outputs], inits,
                          value_info=[helper.make_tensor_value_info(n, F, s) for n, s in (shapes or {}).items() if n not in outputs])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    return load_graph(onnx.shape_inference.infer_shapes(proto))


def tr(x, y, perm):
    return helper.make_node("Transpose", [x], [y], perm=perm)


def mm(a, b, c):
    return helper.make_node("MatMul", [a, b], [c])


def n(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, **attrs)


SCALE = ("s", [], 0.125)
# (case, graph, kernels onnxruntime runs): what its transpose optimiser and transpose fusions leave
CASES = {
    "swap into MatMul A": (lambda: model([tr("x", "t", [0, 1, 3, 2]), mm("t", "y", "z")], [("x", [2, 3, 8, 4]), ("y", [2, 3, 8, 5])]), 1),
    "swap into two MatMuls": (lambda: model([tr("y", "t", [0, 1, 3, 2]), mm("x", "t", "z"), mm("x", "t", "z2")],
                                            [("x", [2, 3, 8, 4]), ("y", [2, 3, 5, 4])], outputs=("z", "z2")), 2),
    "swap also read by Relu": (lambda: model([tr("y", "t", [0, 1, 3, 2]), mm("x", "t", "z"), n("Relu", ["t"], ["z2"])],
                                             [("x", [2, 3, 8, 4]), ("y", [2, 3, 5, 4])], outputs=("z", "z2")), 3),
    "swap that is an output": (lambda: model([tr("y", "t", [0, 1, 3, 2]), mm("x", "t", "z")],
                                             [("x", [2, 3, 8, 4]), ("y", [2, 3, 5, 4])], outputs=("z", "t")), 2),
    "head split into MatMul": (lambda: model([tr("x", "t", [0, 2, 1, 3]), mm("t", "y", "z")], [("x", [2, 8, 3, 4]), ("y", [2, 3, 4, 5])]), 2),
    "batch transpose into MatMul": (lambda: model([tr("x", "t", [1, 2, 0, 3]), mm("t", "y", "z")], [("x", [8, 2, 3, 4]), ("y", [2, 3, 4, 5])]), 1),
    "batch and swap into MatMul": (lambda: model([tr("x", "t", [1, 2, 3, 0]), mm("t", "y", "z")], [("x", [4, 2, 3, 8]), ("y", [2, 3, 4, 5])]), 1),
    "swap, MatMul, Div": (lambda: model([tr("y", "t", [0, 1, 3, 2]), mm("x", "t", "m"), n("Div", ["m", "s"], ["z"])],
                                        [("x", [2, 3, 8, 4]), ("y", [2, 3, 5, 4])], [SCALE]), 1),
    "scale, swap, MatMul": (lambda: model([n("Mul", ["y", "s"], ["ys"]), tr("ys", "t", [0, 1, 3, 2]), mm("x", "t", "z")],
                                          [("x", [2, 3, 8, 4]), ("y", [2, 3, 5, 4])], [SCALE]), 1),
    "scale, MatMul, bias (a Gemm)": (lambda: model([n("Mul", ["x", "s"], ["xs"]), mm("xs", "w", "m"), n("Add", ["m", "b"], ["z"])],
                                                   [("x", [2, 8, 16])], [SCALE, ("w", [16, 5], None), ("b", [5], None)]), 2),
    "2-D Transpose into Gemm": (lambda: model([tr("x", "t", [1, 0]), n("Gemm", ["t", "w", "b"], ["z"])], [("x", [16, 8])],
                                              [("w", [16, 5], None), ("b", [5], None)]), 1),
    "2-D Transpose into MatMul + bias": (lambda: model([tr("x", "t", [1, 0]), mm("t", "w", "m"), n("Add", ["m", "b"], ["z"])],
                                                       [("x", [16, 8])], [("w", [16, 5], None), ("b", [5], None)]), 1),
    "3-D swap into MatMul + bias": (lambda: model([tr("x", "t", [0, 2, 1]), mm("t", "w", "m"), n("Add", ["m", "b"], ["z"])],
                                                  [("x", [2, 16, 8])], [("w", [16, 5], None), ("b", [5], None)]), 2),
    "Transpose after Gemm without bias": (lambda: model([n("Gemm", ["x", "w"], ["m"]), tr("m", "z", [1, 0])], [("x", [8, 16])],
                                                        [("w", [16, 5], None)]), 1),
    "Transpose after Gemm with bias": (lambda: model([n("Gemm", ["x", "w", "b"], ["m"]), tr("m", "z", [1, 0])], [("x", [8, 16])],
                                                     [("w", [16, 5], None), ("b", [5], None)]), 2),
    "two Transposes compose": (lambda: model([tr("x", "a", [0, 2, 3, 1]), tr("a", "b", [0, 2, 1, 3]), n("Relu", ["b"], ["z"])], [("x", [2, 3, 4, 5])]), 2),
    "two Transposes cancel": (lambda: model([tr("x", "a", [0, 2, 3, 1]), tr("a", "b", [0, 3, 1, 2]), n("Relu", ["b"], ["z"])], [("x", [2, 3, 4, 5])]), 1),
    "inverse across a bias": (lambda: model([tr("x", "a", [0, 2, 3, 1]), n("Add", ["a", "c"], ["a2"]), tr("a2", "b", [0, 3, 1, 2]), n("Relu", ["b"], ["z"])],
                                            [("x", [2, 3, 4, 5])], [("c", [3], None)]), 2),
    "inverse across Relu": (lambda: model([tr("x", "a", [0, 2, 3, 1]), n("Relu", ["a"], ["a2"]), tr("a2", "z", [0, 3, 1, 2])], [("x", [2, 3, 4, 5])]), 1),
    "across a scale into a head split": (lambda: model([tr("y", "a", [0, 2, 1, 3]), n("Div", ["a", "s"], ["a2"]), tr("a2", "t", [0, 1, 3, 2]), mm("x", "t", "z")],
                                                       [("x", [2, 3, 8, 4]), ("y", [2, 5, 3, 4])], [SCALE]), 3),
    "Transpose before a runtime Add": (lambda: model([tr("x", "a", [0, 2, 1, 3]), n("Add", ["a", "y"], ["z"])], [("x", [2, 3, 4, 5]), ("y", [2, 4, 3, 5])]), 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transposes_are_grouped_as_onnxruntime_runs_them(case, tmp_path):
    build, expected = CASES[case]
    graph = build()
    launched = [k for k in group_kernels(graph, H200_PROFILE) if not k.alias]
    assert sum(onnxruntime_nodes(graph_to_bytes(graph), "cpu", str(tmp_path)).values()) == expected
    assert len(launched) == expected, [k.ops for k in launched]


def test_a_folded_transpose_is_measured_with_its_matmul(tmp_path):
    # the standalone kernel model holds the Transpose and the scale, so onnxruntime fuses them when timing it
    graph = CASES["scale, swap, MatMul"][0]()
    (kernel,) = [k for k in group_kernels(graph, H200_PROFILE) if not k.alias]
    assert sorted(kernel.ops) == ["MatMul", "Mul", "Transpose"]
    built, _ = kernel_model(graph, kernel)
    assert built.ir_version <= 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "k.onnx")
    ort.InferenceSession(built.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert [node.op_type for node in onnx.load(str(tmp_path / "k.onnx")).graph.node] == ["FusedMatMul"]


def contrib_model(batch=2, seq=16, hidden=32, heads=4, kv=None, typed=True):
    kv = kv or seq
    nodes = [
        n("MultiHeadAttention", ["q", "k", "v"], ["mha"], domain="com.microsoft", num_heads=heads),
        n("Attention", ["x", "w", "wb"], ["att"], domain="com.microsoft", num_heads=heads),
        n("FusedMatMul", ["x", "y"], ["fmm"], domain="com.microsoft", transB=1, alpha=0.5),
        n("SkipLayerNormalization", ["att", "x", "g", "lb"], ["sln"], domain="com.microsoft"),
        n("BiasGelu", ["x", "lb"], ["bg"], domain="com.microsoft"),
        n("FastGelu", ["x"], ["fg"], domain="com.microsoft"),
        n("Gelu", ["x"], ["ge"], domain="com.microsoft"),
    ]
    return model(nodes, [("q", [batch, seq, hidden]), ("k", [batch, kv, hidden]), ("v", [batch, kv, hidden]),
                         ("x", [batch, seq, hidden]), ("y", [batch, 24, hidden])],
                 [("w", [hidden, 3 * hidden], None), ("wb", [3 * hidden], None), ("g", [hidden], None), ("lb", [hidden], None)],
                 outputs=("mha", "fmm", "sln", "bg", "fg", "ge"),
                 shapes={"mha": [batch, seq, hidden], "att": [batch, seq, hidden], "fmm": [batch, seq, 24],
                         "sln": [batch, seq, hidden], "bg": [batch, seq, hidden], "fg": [batch, seq, hidden],
                         "ge": [batch, seq, hidden]} if typed else None)


def test_contrib_ops_are_kernels_with_their_work(tmp_path):
    batch, seq, hidden, heads, kv = 2, 16, 32, 4, 16
    graph = contrib_model(batch, seq, hidden, heads, kv)
    kernels = {k.ops: k for k in group_kernels(graph, H200_PROFILE) if not k.alias}
    assert set(kernels) == {(op,) for op in ("MultiHeadAttention", "Attention", "FusedMatMul", "SkipLayerNormalization",
                                              "BiasGelu", "FastGelu", "Gelu")}
    assert len(kernels) == sum(onnxruntime_nodes(graph_to_bytes(graph), "cpu", str(tmp_path)).values())
    attention = 4 * batch * seq * kv * hidden + 5 * batch * heads * seq * kv  # Q.K^T, P.V and the softmax
    assert kernel_work(graph, kernels[("MultiHeadAttention",)])[0] == attention
    assert kernel_work(graph, kernels[("Attention",)])[0] == attention + 2 * batch * seq * hidden * 3 * hidden
    assert kernel_work(graph, kernels[("FusedMatMul",)])[0] == 2 * batch * seq * 24 * hidden  # K from transB
    # without the output types (a file onnx's shape inference ran on) the work comes from the inputs alone
    bare = contrib_model(batch, seq, hidden, heads, kv, typed=False)
    for kernel in group_kernels(bare, H200_PROFILE):
        assert kernel_work(bare, kernel)[0] == kernel_work(graph, kernels[kernel.ops])[0] > 0, kernel.ops
    # work grows with the sequence: attention quadratically
    longer = contrib_model(batch, 2 * seq, hidden, heads, 2 * kv)
    mha = next(k for k in group_kernels(longer, H200_PROFILE) if k.ops == ("MultiHeadAttention",))
    assert kernel_work(longer, mha)[0] == 4 * attention
    # each contrib kernel stands alone as a model onnxruntime loads (IR <= 10, the contrib domain imported)
    for kernel in kernels.values():
        built, runtime = kernel_model(graph, kernel)
        assert built.ir_version <= 10 and "com.microsoft" in {o.domain for o in built.opset_import}
        session = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32) for name, _, shape in runtime}
        session.run(None, feeds)


@pytest.mark.parametrize("name", ["bert-base", "gpt2"])
def test_every_single_rewrite_of_the_new_rules_is_grouped_as_onnxruntime_runs_it(name, tmp_path):
    # each site of the transposition-algebra and attention-fusion rules, on the canonical graph and the one with
    # merged projections, and every step of the head-major chain: kernels priced == nodes onnxruntime keeps
    from bench.chain_variants import ChainError, exhaust, head_major_steps, require_rules, zoo_graph
    from bench.table_fill import REWRITE_RULES
    from xrlflow.rules import default_engine

    try:
        require_rules(REWRITE_RULES)
    except ChainError as exc:
        pytest.skip(str(exc))
    engine = default_engine()
    base = zoo_graph(name, 1, 32, small=True)
    merged = exhaust(base, "merge-parallel-matmul")
    graphs = [(label, graph) for label, graph in head_major_steps(merged)]
    for start, label in ((base, "canonical"), (merged, "merged")):
        graphs += [(f"{label}: {m.rule}", engine.apply(start, m)) for m in engine.matches(start) if m.rule in REWRITE_RULES]
    assert len(graphs) > 50
    wrong = []
    for label, graph in graphs:
        priced = sum(1 for k in group_kernels(graph, H200_PROFILE) if not k.alias)
        kept = sum(onnxruntime_nodes(graph_to_bytes(graph), "cpu", str(tmp_path)).values())
        if priced != kept:
            wrong.append(f"{label}: {priced} priced, {kept} kept")
    assert not wrong, wrong[:5]
