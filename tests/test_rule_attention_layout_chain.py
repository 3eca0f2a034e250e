"""The head-major attention layout composes from the generic transpose-algebra rules.

On the zoo's bert-base (small) after merge-parallel-matmul, a sequence of generic rewrites (each one an
offered engine match, picked here by a predicate as a search would pick it) reaches the hand-built layout of
REFERENCE.md: QKV computed transposed as one Gemm, Split per head with no copy, scores and context on
transposed operands (FusedMatMul transA/transB), the output projection as Gemm(ctx^T, Wo, transA=1). Every
step is verified on onnxruntime's CPU EP; onnxruntime's optimised graph of the result has no Transpose left.
The same driver fits HF BERT and GPT-2 (fused c_attn Gemm + Split) exported by torch's dynamo exporter, with
eager and SDPA attention (SDPA: scale split over Q and K, K^T as a Reshape-Transpose-Reshape sandwich,
Where/IsNaN after the Softmax).
"""

from __future__ import annotations

import collections
import os
import tempfile

import onnx
import onnxruntime as ort
import pytest

from xrlflow.engine import Match
from xrlflow.ir import Graph
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.rules import default_engine
from xrlflow.verify import Tolerance, verify_models

ENGINE = default_engine()
TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)


def perm(g: Graph, node_name: str) -> tuple[int, ...]:
    return tuple(g.nodes[node_name].attr("perm") or ())


def producer_op(g: Graph, node_name: str, position: int = 0) -> str:
    node = g.producer_of(g.nodes[node_name].inputs[position])
    return "" if node is None else node.op_type


def exhaust(g: Graph, rule: str, pick, applied: list[Match], params=None) -> Graph:
    """Apply the first offered `rule` match that `pick` accepts until none is left."""
    for _ in range(100):
        found = [m for m in ENGINE.matches(g) if m.rule == rule and (params is None or m.params == params) and pick(g, m)]
        if not found:
            return g
        g = ENGINE.apply(g, found[0])
        applied.append(found[0])
    raise AssertionError(f"{rule} did not run out of matches")


def head_major(g: Graph) -> tuple[Graph, list[Match]]:
    applied: list[Match] = []
    # torch's SDPA decomposition: sqrt(scale) on Q and on K moves onto the scores (one scalar Mul, which
    # FusedMatMul takes as alpha), and K^T's Reshape-Transpose-Reshape sandwich folds into one Transpose
    g = exhaust(g, "move-scale-out-of-matmul", lambda g, m: not g.is_constant(g.nodes[m.nodes[0]].inputs[1]), applied)
    g = exhaust(g, "fold-const-chain", lambda g, m: producer_op(g, m.nodes[0]) == "Mul" and g.nodes[m.nodes[0]].op_type == "Mul", applied)
    g = exhaust(g, "move-transpose-before-reshape", lambda g, m: producer_op(g, m.nodes[1]) == "Transpose", applied)
    g = exhaust(g, "compose-reshapes", lambda g, m: True, applied)
    g = exhaust(g, "cancel-identity-reshape", lambda g, m: True, applied)
    g = exhaust(g, "compose-transposes", lambda g, m: True, applied)
    # Q and V: Transpose(head split, (0,2,1,3)) = swap of the last two after (0,2,3,1), K's layout
    g = exhaust(g, "split-transpose", lambda g, m: perm(g, m.nodes[0]) == (0, 2, 1, 3) and producer_op(g, m.nodes[0]) == "Reshape", applied, ("swap-last",))
    # the three (0,2,3,1) keep each head together: they move above the head split ...
    g = exhaust(g, "move-transpose-before-reshape", lambda g, m: perm(g, m.nodes[0]) == (0, 2, 3, 1), applied)
    # ... above the Split of the merged projection, across its bias, into the projection itself
    g = exhaust(g, "move-transpose-before-split", lambda g, m: True, applied)
    g = exhaust(g, "move-transpose-before-const-binary", lambda g, m: producer_op(g, m.nodes[0]) == "Add", applied)
    g = exhaust(g, "transpose-matmul", lambda g, m: g.is_constant(g.nodes[m.nodes[1]].inputs[1]), applied)
    # exports whose projection is a rank-2 Gemm between Reshapes (GPT-2's Conv1D): across the Reshape, into it
    g = exhaust(g, "move-transpose-before-reshape", lambda g, m: producer_op(g, m.nodes[1]) == "Gemm", applied)
    g = exhaust(g, "transpose-gemm", lambda g, m: True, applied)
    # context: its (0,2,1,3) becomes (0,3,1,2) after a swap; the swap turns P@V into V^T@P^T, whose V^T is there
    g = exhaust(g, "split-transpose", lambda g, m: perm(g, m.nodes[0]) == (0, 2, 1, 3) and producer_op(g, m.nodes[0]) == "MatMul", applied, ("swap-first",))
    g = exhaust(g, "transpose-matmul", lambda g, m: producer_op(g, m.nodes[1]) in ("Softmax", "Where"), applied)
    g = exhaust(g, "compose-transposes", lambda g, m: True, applied)
    g = exhaust(g, "cancel-identity-transpose", lambda g, m: True, applied)
    g = exhaust(g, "move-reshape-before-transpose", lambda g, m: perm(g, m.nodes[1]) == (0, 3, 1, 2), applied)
    # projections as Gemms, whose operand Transposes become flags
    g = exhaust(g, "matmul-add-to-gemm", lambda g, m: producer_op(g, m.nodes[1]) == "Transpose", applied)
    gemm_inputs = lambda g: {v for n in g.by_op("Gemm") for v in n.inputs}
    g = exhaust(g, "move-reshape-before-transpose", lambda g, m: g.nodes[m.nodes[0]].outputs[0] in gemm_inputs(g), applied)
    g = exhaust(g, "absorb-transpose-into-gemm", lambda g, m: True, applied)
    return g, applied


def ort_optimised_ops(model: onnx.ModelProto) -> collections.Counter:
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(folder, "optimised.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.fixture(scope="module")
def merged_bert(tmp_path_factory):
    zoo = pytest.importorskip("xrlflow.zoo")
    model = zoo.export_model("bert-base", small=True, cache_dir=str(tmp_path_factory.mktemp("zoo")))
    g = load_graph(model)
    while True:
        found = [m for m in ENGINE.matches(g) if m.rule == "merge-parallel-matmul"]
        if not found:
            return model, g
        g = ENGINE.apply(g, found[0])


def test_head_major_chain_on_zoo_bert(merged_bert):
    model, merged = merged_bert
    layers = len(merged.by_op("Softmax"))
    before = ort_optimised_ops(to_model(merged, fold_constants=True))
    assert before["Transpose"] == 4 * layers  # the four layout copies per layer
    result, applied = head_major(merged)
    assert all(m.rule != "merge-parallel-matmul" for m in applied)
    report = verify_models(model, to_model(result, fold_constants=True), tolerance=TOLERANCE)
    assert report.ok, report.reason
    after = ort_optimised_ops(to_model(result, fold_constants=True))
    assert after["Transpose"] == 0, after
    assert after["FusedMatMul"] == 2 * layers  # scores (transA) and context (transB)
    gemms = [n for n in result.by_op("Gemm")]
    assert sum(1 for n in gemms if n.attr("transA") == 1) == 2 * layers  # QKV^T = W^T X^T and ctx^T -> Gemm(transA)
    per_layer = collections.Counter(m.rule for m in applied)
    assert {r: c // layers for r, c in per_layer.items()} == {
        "split-transpose": 3, "move-transpose-before-reshape": 3, "move-transpose-before-split": 1,
        "move-transpose-before-const-binary": 1, "transpose-matmul": 2, "compose-transposes": 1,
        "cancel-identity-transpose": 1, "move-reshape-before-transpose": 3, "matmul-add-to-gemm": 2,
        "absorb-transpose-into-gemm": 3,
    }


def test_every_step_of_the_chain_is_exact(merged_bert):
    model, merged = merged_bert
    _, applied = head_major(merged)
    g = merged
    for step, match in enumerate(applied):
        g = ENGINE.apply(g, match)
        if step % 5 == 4 or step == len(applied) - 1:
            report = verify_models(model, to_model(g, fold_constants=True), tolerance=TOLERANCE, seed=step)
            assert report.ok, f"after step {step} ({match.rule}): {report.reason}"


def _hf_export(kind: str, attention: str, folder) -> onnx.ModelProto:
    """A 2-layer HF model with random weights, exported by torch's dynamo exporter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64, attn_implementation=attention)
        module, args = transformers.GPT2Model(config), (torch.randint(0, 500, (1, 16)),)
        module.config.use_cache = False
    else:
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=500, attn_implementation=attention)
        module, args = transformers.BertModel(config), (torch.randint(0, 500, (1, 16)),)
    path = os.path.join(str(folder), f"{kind}_{attention}.onnx")
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, path, dynamo=True, external_data=False)
    return onnx.load(path)


@pytest.mark.parametrize("kind,attention", [("gpt2", "eager"), ("gpt2", "sdpa"), ("bert", "eager"), ("bert", "sdpa")])
def test_head_major_chain_on_hf_dynamo_exports(kind, attention, tmp_path):
    model = _hf_export(kind, attention, tmp_path)
    g = load_graph(model)
    while True:
        found = [m for m in ENGINE.matches(g) if m.rule == "merge-parallel-matmul"]
        if not found:
            break
        g = ENGINE.apply(g, found[0])
    layers = len(g.by_op("Softmax"))
    assert ort_optimised_ops(to_model(g, fold_constants=True))["Transpose"] == 4 * layers
    result, applied = head_major(g)
    report = verify_models(model, to_model(result, fold_constants=True), tolerance=TOLERANCE)
    assert report.ok, report.reason
    after = ort_optimised_ops(to_model(result, fold_constants=True))
    assert after["Transpose"] == 0 and after["FusedMatMul"] == 2 * layers, after
    if kind == "gpt2":  # the fused c_attn is already one Gemm: it is computed transposed by transpose-gemm
        assert sum(m.rule == "transpose-gemm" for m in applied) == layers
