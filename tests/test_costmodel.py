"""The cost model: kernel grouping (onnxruntime's fusions), launch-aware ranking, tables, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, matches_of, ENGINE
from xrlflow.costmodel import (
    CPU_PROFILE, H200_PROFILE, CostModel, LinearCorrection, OpTable, build_op_table, group_kernels, kernel_key,
    kernel_model, spearman,
)
from xrlflow.errors import BadInputError
from xrlflow.latency import LatencyService
from xrlflow.measure import MeasureConfig, MeasuredLatency
from xrlflow.onnx_io import load_graph
from xrlflow.verify import random_inputs, run_model


def qkv_model(width: int = 256, seq: int = 32, bias: bool = True, const_chain: bool = False, identity: bool = False):
    b = ModelBuilder(seed=1)
    x = b.input("x", [1, seq, width])
    outs = []
    for _ in range(3):
        w = b.const([width, width], scale=0.05)
        if const_chain:  # a weight computed from constants only: folded by onnxruntime at session creation
            w = b.op("Mul", [b.op("Add", [w, b.const([width, width])]), b.const([1], value=[0.5])])
        if identity:
            w = b.op("Identity", [w])
        y = b.op("MatMul", [x, w])
        if bias:
            y = b.op("Add", [y, b.const([width])])
        outs.append(y)
    b.output(b.op("Add", [b.op("Add", [outs[0], outs[1]]), outs[2]]))
    return b.model()


def merged(graph):
    found = matches_of(graph, "merge-parallel-matmul")
    assert found
    return ENGINE.apply(graph, found[0])


def test_is_a_latency_service_and_deterministic():
    graph = load_graph(qkv_model())
    a, b = CostModel("cpu"), CostModel("cpu")
    assert isinstance(a, LatencyService)
    la, lb = a.latency(graph), b.latency(load_graph(qkv_model()))
    assert la.ok and la.source == "cost-model" and la.ms > 0
    assert la.ms == lb.ms == a.latency(graph).ms


def test_constant_only_nodes_and_identity_cost_nothing():
    for profile in ("cpu", "h200"):
        model = CostModel(profile)
        plain = model.latency(load_graph(qkv_model())).ms
        assert model.latency(load_graph(qkv_model(const_chain=True))).ms == pytest.approx(plain)
        assert model.latency(load_graph(qkv_model(identity=True))).ms == pytest.approx(plain)


def test_matmul_with_bias_is_one_kernel_and_merging_removes_launches():
    graph = load_graph(qkv_model())
    kernels = group_kernels(graph, H200_PROFILE)
    assert sum(k.ops == ("MatMul", "Add") for k in kernels) == 3
    after = group_kernels(merged(graph), H200_PROFILE)
    assert sum(k.ops == ("MatMul", "Add") for k in after) == 1
    assert sum(not k.alias for k in after) < sum(not k.alias for k in kernels)


def test_more_kernels_for_the_same_flops_cost_more_when_launches_dominate():
    """Small batch on the H200 profile: the merged Q/K/V (one GEMM + Split) beats three GEMMs."""
    graph = load_graph(qkv_model(width=256, seq=16))
    h200 = CostModel("h200")
    assert h200.latency(merged(graph)).ms < h200.latency(graph).ms
    # the same FLOPs split over more kernels: one 64x128 projection vs two 64x64 projections
    one, two = _projections(1), _projections(2)
    assert h200.features(one)[2] == pytest.approx(h200.features(two)[2])  # FLOP term
    assert h200.features(two)[1] == h200.features(one)[1] + 1  # kernel count
    assert h200.latency(two).ms > h200.latency(one).ms


def _projections(pieces: int):
    b = ModelBuilder(seed=2)
    x = b.input("x", [1, 8, 64])
    b.output(*[b.op("MatMul", [x, b.const([64, 128 // pieces])]) for _ in range(pieces)])
    return load_graph(b.model())


def test_conv_fusions_follow_the_execution_provider():
    b = ModelBuilder(seed=3)
    x = b.input("x", [1, 8, 16, 16])
    c = b.op("Conv", [x, b.const([8, 8, 3, 3])], pads=[1, 1, 1, 1])
    s = b.op("Add", [c, x])
    b.output(b.op("Relu", [s]))
    graph = load_graph(b.model())
    cpu = [k.ops for k in group_kernels(graph, CPU_PROFILE)]
    gpu = [k.ops for k in group_kernels(graph, H200_PROFILE)]
    assert cpu == [("Conv", "Add", "Relu")]
    assert gpu == [("Conv",), ("Add",), ("Relu",)]


def test_unknown_profile_is_bad_input():
    with pytest.raises(BadInputError):
        CostModel("tpu")


def test_kernel_model_runs_and_computes_what_the_kernel_computes():
    graph = load_graph(qkv_model(width=32, seq=4))
    kernel = next(k for k in group_kernels(graph, CPU_PROFILE) if k.ops == ("MatMul", "Add"))
    model, runtime = kernel_model(graph, kernel)
    feeds = random_inputs(model)
    (out,) = run_model(model, feeds)
    mm, add = (graph.nodes[n] for n in kernel.nodes)
    expected = feeds[mm.inputs[0]] @ graph.constant_array(mm.inputs[1]) + graph.constant_array(add.inputs[1])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert [r[0] for r in runtime] == [mm.inputs[0]]
    assert "MatMul" in kernel_key(graph, kernel) and "Add" in kernel_key(graph, kernel)


def test_measured_table_is_used_and_survives_a_json_round_trip(tmp_path):
    graph = load_graph(qkv_model(width=64, seq=8))
    config = MeasureConfig.create(cache_path=str(tmp_path / "c.sqlite"), warmup_runs=2, min_runs=20, max_runs=200, max_seconds=0.5)
    with MeasuredLatency(config) as measurer:
        table = build_op_table([graph], measurer, "cpu")
        assert measurer.cache.op_table(measurer.device)  # stored per device in the shared database
    assert table.baseline_ms > 0 and len(table.entries) >= 2
    path = tmp_path / "table.json"
    table.save(path)
    loaded = OpTable.load(path)
    assert loaded == table
    with_table = CostModel("cpu", table=loaded)
    kernels = [k for k in group_kernels(graph, CPU_PROFILE) if not k.alias]
    expected = sum(max(loaded.entries[kernel_key(graph, k)] - loaded.baseline_ms, 0) + CPU_PROFILE.launch_ms
                   for k in kernels if kernel_key(graph, k) in loaded.entries)
    assert expected > 0
    assert with_table.latency(graph).ms >= expected
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BadInputError):
        OpTable.load(tmp_path / "bad.json")


def test_linear_correction_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    features = np.column_stack([rng.uniform(1, 5, 50), rng.integers(10, 100, 50), np.ones(50)])
    target = features @ np.array([1.5, 0.01, 0.2])
    fit = LinearCorrection.fit(features, target)
    np.testing.assert_allclose(fit.coefficients, [1.5, 0.01, 0.2], atol=1e-9)
    corrected = CostModel("cpu", correction=LinearCorrection((2.0, 0, 0, 0, 0, 0)))
    graph = load_graph(qkv_model())
    assert corrected.latency(graph).ms == pytest.approx(2 * CostModel("cpu").latency(graph).ms)


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)
    assert -1 < spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) < 1


def test_fallback_scale_prices_unmeasured_kernels_like_measured_ones():
    from xrlflow.costmodel import CostModel, OpTable, fit_fallback_scale, group_kernels, kernel_key, PROFILES
    from xrlflow.onnx_io import load_graph
    from xrlflow.zoo import export_model

    graph = load_graph(export_model("squeezenet", small=True))
    prof = PROFILES["h200"]
    analytic = CostModel("h200")
    # a table that measured every kernel at exactly 3x the analytic estimate
    entries = {}
    for k in group_kernels(graph, prof):
        if not k.alias:
            entries[kernel_key(graph, k)] = 3.0 * analytic.kernel_ms(graph, k) - prof.launch_ms + 0.01
    table = fit_fallback_scale(OpTable("h200", "test", "0", 0.01, entries), [graph], "h200")
    assert abs(table.fallback_scale["*"] - 3.0) < 1e-6 and abs(table.fallback_scale["Conv"] - 3.0) < 1e-6
    # with no entries left, the fallback reproduces the measured prices
    empty = OpTable("h200", "test", "0", 0.01, {}, table.fallback_scale)
    measured = CostModel("h200", OpTable("h200", "test", "0", 0.01, entries)).latency(graph).ms
    assert abs(CostModel("h200", empty).latency(graph).ms - measured) / measured < 1e-6


@pytest.mark.parametrize("name", ["bert-base", "vit-xrl", "inception-v3", "squeezenet"])
def test_kernel_grouping_matches_the_graph_onnxruntime_runs(name, tmp_path):
    # The kernels the cost model prices are the nodes onnxruntime keeps after fusing (Gemm, FusedMatMul with
    # the attention scale, Gelu, SkipLayerNormalization, FusedConv); the GPU profile leaves out the CPU-only
    # Conv + Add + Relu fusion, which these models do not use.
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import graph_to_bytes
    from xrlflow.rules import CANONICAL_RULES
    from xrlflow.testing import onnxruntime_nodes  # the count bench/kernel_grouping.py reports per EP
    from xrlflow.zoo import export_model

    # searches start from the canonical form (BatchNorm folded into Conv, as onnxruntime does too)
    graph = prepare_for_search(load_graph(export_model(name, small=True)), ENGINE, CANONICAL_RULES)
    launched = [k for k in group_kernels(graph, H200_PROFILE) if not k.alias]
    assert len(launched) == sum(onnxruntime_nodes(graph_to_bytes(graph), "cpu", str(tmp_path)).values())


def _gelu_graph(divisor: float, half: float = 0.5):
    b = ModelBuilder(seed=3)
    x = b.op("MatMul", [b.input("x", [1, 8, 32]), b.const([32, 64])])
    erf = b.op("Erf", [b.op("Div", [x, b.const([], value=[divisor])])])
    gelu = b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.const([], value=[1.0])])]), b.const([], value=[half])])
    scores = b.op("MatMul", [gelu, b.op("Transpose", [gelu], perm=[0, 2, 1])])
    b.output(b.op("Mul", [scores, b.const([], value=[0.125])]))
    return load_graph(b.model())


def test_gelu_and_matmul_scale_are_one_kernel_each_and_near_misses_are_not(tmp_path):
    from xrlflow.onnx_io import graph_to_bytes
    from xrlflow.testing import onnxruntime_nodes

    kernels = [k.ops for k in group_kernels(_gelu_graph(2 ** 0.5), H200_PROFILE) if not k.alias]
    assert ("Div", "Erf", "Add", "Mul", "Mul") in kernels
    # MatMul, Gelu, FusedMatMul (the Transpose as transB, the scale as alpha)
    assert sorted(kernels) == sorted([("MatMul",), ("Div", "Erf", "Add", "Mul", "Mul"), ("MatMul", "Mul", "Transpose")])
    # x / 1.5 is not GELU, nor is a final * 0.4: onnxruntime's GeluFusion checks the constants, so do we; the
    # final scalar Mul then feeds only MatMuls (one through the folded Transpose) and becomes their alpha
    for graph in (_gelu_graph(1.5), _gelu_graph(2 ** 0.5, half=0.4)):
        ops = [k.ops for k in group_kernels(graph, H200_PROFILE) if not k.alias]
        assert not any(len(o) == 5 for o in ops) and len(ops) == 6
        assert len(ops) == sum(onnxruntime_nodes(graph_to_bytes(graph), "cpu", str(tmp_path)).values())
    # a scale that is not one number (a per-column Mul) stays its own kernel
    b = ModelBuilder(seed=4)
    y = b.op("MatMul", [b.input("x", [4, 16]), b.const([16, 16])])
    b.output(b.op("Mul", [y, b.const([16])]))
    assert [k.ops for k in group_kernels(load_graph(b.model()), H200_PROFILE) if not k.alias] == [("MatMul",), ("Mul",)]


def test_in_graph_mapping_round_trips_and_its_fit_reproduces_latencies_made_by_a_known_mapping(tmp_path):
    import dataclasses
    import random

    from xrlflow.costmodel import InGraphMapping, fit_in_graph
    from xrlflow.zoo import export_model

    truth = InGraphMapping(scale=1.2, offset_ms=-0.0025, floor_ms=0.00175)  # on the fit's grid
    graphs, groups = [], []
    for name in ("squeezenet", "bert-base"):
        base = load_graph(export_model(name, small=True))
        rng = random.Random(0)
        for _ in range(12):
            g = base
            for _ in range(rng.randint(0, 3)):
                found = ENGINE.matches(g)
                if found:
                    g = ENGINE.apply(g, rng.choice(found))
            graphs.append(g)
            groups.append(name)
    analytic = CostModel("h200")
    entries = {}
    for g in graphs:
        for k in group_kernels(g, H200_PROFILE):
            if not k.alias:
                entries[kernel_key(g, k)] = 0.01 + 2.0 * analytic.kernel_ms(g, k)
    table = OpTable("h200", "test", "0", 0.01, entries)
    measured = [CostModel("h200", dataclasses.replace(table, in_graph=truth)).latency(g).ms + 0.05 for g in graphs]
    fitted = fit_in_graph(table, graphs, measured, groups, "h200")
    # these graphs' kernel counts and times are nearly collinear, so several mappings fit exactly; the fit
    # must find one that reproduces every measured latency up to the constant
    estimate = np.array([CostModel("h200", dataclasses.replace(table, in_graph=fitted)).latency(g).ms for g in graphs])
    assert np.std(np.asarray(measured) - estimate) < 1e-9
    # a mapping off the truth does not: the scale moves the estimates apart
    wrong = np.array([CostModel("h200", dataclasses.replace(table, in_graph=dataclasses.replace(fitted, scale=fitted.scale * 0.8))).latency(g).ms for g in graphs])
    assert np.std(np.asarray(measured) - wrong) > 1e-4
    path = tmp_path / "t.json"
    dataclasses.replace(table, in_graph=fitted).save(path)
    assert OpTable.load(path).in_graph == fitted
    assert fitted.cost(0.0) == fitted.floor_ms
    assert truth.cost(0.0) == truth.floor_ms and truth.cost(0.01) == pytest.approx(1.2 * 0.01 - 0.0025)
