"""The head-major attention chain on one attention layer: backtracking reaches it, greedy does not.

The layer is the zoo's bert-base at full dims cut to one block (batch 1, seq 128, merged QKV once
merge-parallel-matmul has run): every kernel of it and of its rewrites has a measured entry in the bundled H200
table, so the prices are measurements, not the analytic fallback. The rules are the ones the head-major chain is
built from (tests/test_rule_attention_layout_chain.py, including the Gemm route GPT-2's Conv1D takes); the
contrib-op attention fusions are left out, since they replace the attention instead of re-laying it out.

Under the H200 prices the chain starts with steps that change nothing (the first split-transpose and
move-transpose-before-reshape are priced equal to their input) and later passes steps priced slower than their
predecessor (transpose-matmul after move-transpose-before-const-binary: 1.2% slower on this layer), so greedy,
which takes only strict improvements, stops with the four layout Transposes in place. Backtracking
(TASO-style, budget 1500, alpha 1.05; it finds the layout near expansion 1000) walks through them to a
layout that onnxruntime compiles with no Transpose.
"""

from __future__ import annotations

import collections

import pytest

from xrlflow.engine import prepare_for_search
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.rules import CANONICAL_RULES, default_engine
from xrlflow.search import SearchConfig, backtracking_search, greedy_search
from xrlflow.verify import Tolerance, verify_models

CHAIN_RULES = (
    "merge-parallel-matmul", "split-transpose", "move-transpose-before-reshape", "move-transpose-before-split",
    "move-transpose-before-const-binary", "transpose-matmul", "compose-transposes", "cancel-identity-transpose",
    "move-reshape-before-transpose", "matmul-add-to-gemm", "absorb-transpose-into-gemm", "transpose-gemm",
    "untranspose-gemm", "extract-transpose-from-gemm", "compose-reshapes",
)
SEARCH = SearchConfig(steps=60, budget=1500, alpha=1.05)  # the layout is found near expansion 1000


@pytest.fixture(scope="module")
def layer():
    pytest.importorskip("torch")
    from bench.enumerate_layer import one_layer_model

    model = one_layer_model("bert-base", batch=1, seq=128)
    return model, prepare_for_search(load_graph(model), default_engine(), CANONICAL_RULES)


@pytest.fixture(scope="module")
def searches(layer):
    from xrlflow.costmodel import CostModel

    _, graph = layer
    cost = CostModel.for_device("h200")
    assert cost.table_coverage(graph) == 1.0
    engine = default_engine().restricted(CHAIN_RULES)
    return cost, greedy_search(graph, engine, cost, SEARCH), backtracking_search(graph, engine, cost, SEARCH)


def transposes_after_ort(graph) -> int:
    from tests.test_rule_attention_layout_chain import ort_optimised_ops

    return ort_optimised_ops(to_model(graph, fold_constants=True))["Transpose"]


def test_the_layer_starts_with_four_layout_transposes(layer):
    _, graph = layer
    assert len(graph.by_op("Softmax")) == 1
    assert transposes_after_ort(graph) == 4


def test_greedy_stops_before_the_head_major_layout(searches):
    _, greedy, _ = searches
    assert greedy.speedup > 1.0  # it does merge QKV and take the other strict improvements
    assert transposes_after_ort(greedy.best) > 0


def test_backtracking_reaches_the_head_major_layout(layer, searches):
    model, _ = layer
    cost, greedy, backtrack = searches
    assert transposes_after_ort(backtrack.best) == 0
    assert backtrack.best_latency.ms < greedy.best_latency.ms
    report = verify_models(model, to_model(backtrack.best, fold_constants=True), tolerance=Tolerance(rtol=1e-4, atol=1e-5))
    assert report.ok, report.reason
    # the path it found is a chain through steps priced no better (or worse) than the step before: a delayed reward
    graph, previous, delayed = layer[1], cost.latency(layer[1]).ms, 0
    engine = default_engine().restricted(CHAIN_RULES)
    for match in backtrack.applied:
        graph = engine.apply(graph, match)
        now = cost.latency(graph).ms
        delayed += now >= previous
        previous = now
    assert delayed > 0
    assert abs(previous - backtrack.best_latency.ms) < 1e-9
    rules = collections.Counter(m.rule for m in backtrack.applied)
    assert rules["merge-parallel-matmul"] == 1 and rules["move-transpose-before-split"] == 1
