"""The never-slower guarantee and the pipeline's stages, with fake latency services: a result measured slower
is not written, the next-best candidate is taken, the input is written unchanged when none passes, a stage
whose output does not verify is dropped; the A/B interval's A/A coverage; the searches' significance rule;
the CUDA-graph advice (snippet and no-capture message); the opset-upgrade note; a missing onnxruntime."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from tests.test_search import attention_like_model
from xrlflow import ort_stages
from xrlflow.cli import main
from xrlflow.guarantee import ab_interval, cuda_graph_advice, cuda_graph_snippet, repeated_ab
from xrlflow.latency import Latency
from xrlflow.measure import Comparison
from xrlflow.optimizer import OptimizeConfig, optimize
from xrlflow.ort_stages import StageResult
from xrlflow.search import SearchConfig
from xrlflow.trajectory import SearchState, is_better
from xrlflow.verify import verify_models


def _latency(ms: float) -> Latency:
    return Latency(ms, ms, ms, 8, "measured")


class FakeAB:
    """compare_models from a latency per model (`time_of(ModelProto) -> ms`) with a little seeded noise;
    records the pairs it was handed."""

    def __init__(self, time_of, noise: float = 0.002, seed: int = 0) -> None:
        self.time_of = time_of
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.pairs: list[tuple[onnx.ModelProto, onnx.ModelProto]] = []
        self.calls = 0

    def compare_models(self, model_a, specs_a, model_b, specs_b):
        a, b = onnx.load_from_string(model_a), onnx.load_from_string(model_b)
        self.pairs.append((a, b))
        self.calls += 1
        ta, tb = self.time_of(a), self.time_of(b)
        ratio = tb / ta * math.exp(self.rng.normal(0, self.noise))
        return Comparison(ratio, ratio * 0.999, ratio * 1.001, 40, _latency(ta), _latency(tb))


def matmuls(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "MatMul" for n in model.graph.node)


def identities(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Identity" for n in model.graph.node)


CONFIG = OptimizeConfig(search="greedy", latency="cost", ab_repeats=4)


def test_a_result_measured_faster_is_written_and_before_is_the_users_file():
    model = attention_like_model()
    fake = FakeAB(lambda m: float(matmuls(m)))  # fewer MatMuls (merged projections): faster
    result = optimize(model, CONFIG, deployment_service=fake)
    guarantee = result.report["guarantee"]
    assert guarantee["checked"] and not guarantee["fallback"] and guarantee["chosen"] == "xrlflow rewrites"
    assert not result.unchanged and matmuls(result.model) < matmuls(model)
    assert fake.calls == CONFIG.ab_repeats
    # the A/B's "before" is the user's graph (its MatMuls unmerged, its nodes by name), not the search's; it
    # takes slot A in the even compares and slot B in the odd ones
    users = lambda m: [n.name for n in m.graph.node] == [n.name for n in model.graph.node]  # noqa: E731
    assert [(users(a), users(b)) for a, b in fake.pairs] == [(True, False), (False, True)] * (CONFIG.ab_repeats // 2)
    lat = result.report["latency"]
    assert lat["speedup"] > 1 and lat["speedup_low"] > 1 and lat["deployment_setting"] == "cpu, onnxruntime's default threads"
    assert lat["search"]["setting"]  # the search's own setting is stated too
    stage = result.report["stages"][0]
    assert stage["latency_ms"]["measured_faster"] and stage["latency_ms"]["speedup_over_input"] > 1


def test_a_result_measured_slower_is_not_written_the_input_is(tmp_path, capsys):
    path, out, report_path = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(attention_like_model(), path)
    slower = FakeAB(lambda m: 1.0 / matmuls(m))  # merging is measured slower here
    result = optimize(str(path), CONFIG, deployment_service=slower)
    assert result.unchanged and result.report["guarantee"]["chosen"] == "the input"
    assert result.model.SerializeToString() == onnx.load(path).SerializeToString()
    assert "input is written unchanged" in result.report["guarantee"]["message"]
    assert result.report["latency"]["speedup"] == 1.0

    # the command line: exit 0, the output equals the input, and it says so
    import xrlflow.optimizer as optimizer_module

    real = optimizer_module.make_deployment_service
    optimizer_module.make_deployment_service = lambda config: slower
    try:
        rc = main(["optimize", str(path), "-o", str(out), "--search", "greedy", "--latency", "measured", "--no-progress",
                   "--report", str(report_path), "--ab-repeats", "3"])
    finally:
        optimizer_module.make_deployment_service = real
    printed = capsys.readouterr()
    assert rc == 0
    assert onnx.load(out).SerializeToString() == onnx.load(path).SerializeToString()
    assert "is the input unchanged" in printed.out and "FELL BACK" in printed.out
    assert json.loads(report_path.read_text())["guarantee"]["fallback"] is True


def _add_identity(model: onnx.ModelProto, scale: float | None = None) -> onnx.ModelProto:
    """A copy with an Identity (or a wrong Mul by `scale`) before its first output."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    out = edited.graph.output[0].name
    for node in edited.graph.node:
        node.output[:] = [o + "_pre" if o == out else o for o in node.output]
    if scale is None:
        edited.graph.node.append(onnx.helper.make_node("Identity", [out + "_pre"], [out], name="stage_identity"))
    else:
        edited.graph.initializer.append(onnx.numpy_helper.from_array(np.array(scale, np.float32), "stage_scale"))
        edited.graph.node.append(onnx.helper.make_node("Mul", [out + "_pre", "stage_scale"], [out], name="stage_mul"))
    return edited


def _fake_fusions(scale: float | None):
    def fusions(model, options=ort_stages.OrtFusionOptions()):
        return StageResult(_add_identity(model, scale), True, "fake fusions: 1 Identity", fused={"Identity": 1})
    return fusions


def test_the_next_best_candidate_is_taken_when_the_last_stage_is_slower(monkeypatch):
    monkeypatch.setattr(ort_stages, "ort_transformer_fusions", _fake_fusions(None))
    model = attention_like_model()
    # the fused stage (an extra Identity) is measured slower than the input; xrlflow's rewrites faster
    fake = FakeAB(lambda m: matmuls(m) + 10.0 * identities(m))
    result = optimize(model, OptimizeConfig(search="greedy", latency="cost", ort_fusions="on", ab_repeats=3),
                      deployment_service=fake)
    guarantee = result.report["guarantee"]
    assert [c["name"] for c in guarantee["candidates"]] == ["xrlflow rewrites", "+ onnxruntime fusions"]
    assert guarantee["chosen"] == "xrlflow rewrites" and not identities(result.model)
    fused = next(s for s in result.report["stages"] if s["name"] == "onnxruntime fusions")
    assert fused["applied"] and fused["verified"] and not fused["latency_ms"]["measured_faster"]

    # and when the fused stage is the fastest, it is written
    fast = FakeAB(lambda m: matmuls(m) - 2.0 * identities(m))
    result = optimize(model, OptimizeConfig(search="greedy", latency="cost", ort_fusions="on", ab_repeats=3),
                      deployment_service=fast)
    assert result.report["guarantee"]["chosen"] == "+ onnxruntime fusions" and identities(result.model) == 1


def test_a_stage_whose_output_does_not_verify_is_dropped(monkeypatch, capsys):
    monkeypatch.setattr(ort_stages, "ort_transformer_fusions", _fake_fusions(2.0))  # doubles an output
    model = attention_like_model()
    result = optimize(model, OptimizeConfig(search="greedy", latency="cost", ort_fusions="on"))
    fused = next(s for s in result.report["stages"] if s["name"] == "onnxruntime fusions")
    assert not fused["applied"] and fused["verified"] is False and "differ" in fused["dropped"]
    assert any("fusions were dropped" in w for w in result.report["warnings"])
    assert not any(n.name == "stage_mul" for n in result.model.graph.node)
    assert verify_models(model, result.model).ok
    from xrlflow.report import format_summary

    assert "DROPPED" in format_summary(result.report)


def test_without_a_deployment_service_the_guarantee_says_it_was_not_checked():
    result = optimize(attention_like_model(), CONFIG)
    assert result.report["guarantee"] == {
        "deployment_setting": "cpu, onnxruntime's default threads", "checked": False, "fallback": False,
        "message": "not checked: latencies come from the cost model (--latency measured checks it)",
    }
    assert result.report["stages"][0]["latency_ms"]["source"].startswith("estimate")


def test_the_measured_models_carry_static_shapes_from_the_inputs_run():
    from onnx import TensorProto, helper

    from xrlflow.measure_worker import InputSpec
    from xrlflow.guarantee import output_shapes_at, with_bound_shapes

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    specs = (InputSpec("x", TensorProto.FLOAT, (3, 4)),)
    shapes = output_shapes_at(specs, {"x": np.zeros((3, 4), np.float32)}, ["y"], [np.zeros((3, 4), np.float32)])
    assert shapes == {"y": (3, 4)}
    assert output_shapes_at(specs, {"x": np.zeros((2, 4), np.float32)}, ["y"], [np.zeros((2, 4))]) is None
    bound = with_bound_shapes(model, specs, shapes)
    dims = lambda vi: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(bound.graph.input[0]) == [3, 4] and dims(bound.graph.output[0]) == [3, 4]
    assert dims(model.graph.input[0]) == ["batch", 4]  # the caller's model is untouched
    inferred = with_bound_shapes(model, specs)  # onnx's shape inference where the run's shapes are unknown
    assert dims(inferred.graph.output[0]) == [3, 4]


# ---- the interval --------------------------------------------------------------------------------------------
def _aa_service(rng, slot_bias: float):
    """A/A compares with a fixed effect per session draw (sd 0.4%), a narrow within-compare CI, and slot B
    reading `slot_bias` faster whatever runs in it (what a real A/A run on this CPU showed: +0.3%)."""
    def compare(swapped: bool) -> Comparison:
        ratio = math.exp(rng.normal(0, 0.004)) / (1.0 + slot_bias)  # B/A of the two slots
        return Comparison(ratio, ratio * 0.999, ratio * 1.001, 40, _latency(1.0), _latency(ratio))
    return compare


def test_repeated_compares_hold_one_at_their_stated_rate_on_an_aa_service():
    """One compare's own interval misses 1.0 most of the time; the interval over independent compares with
    alternating slots holds it at ~95%, with and without a slot bias."""
    rng = np.random.default_rng(0)
    trials = 400
    for bias in (0.0, 0.003):
        compare = _aa_service(rng, bias)
        single = sum(c.low <= 1.0 <= c.high for c in (compare(False) for _ in range(trials))) / trials
        results = [repeated_ab(compare, 6) for _ in range(trials)]
        held = sum(r.low <= 1.0 <= r.high for r in results) / trials
        assert single < 0.5
        assert 0.92 <= held <= 0.99, (bias, held)
        assert sum(r.faster for r in results) / trials <= 0.05  # an A/A "candidate" rarely passes as faster


def test_without_alternating_slots_a_slot_bias_would_pass_as_a_speedup():
    """Why the roles alternate: the same biased service with the candidate always in slot B."""
    rng = np.random.default_rng(1)
    compare = _aa_service(rng, 0.003)
    fixed = [ab_interval([1.0 / compare(False).ratio for _ in range(6)]) for _ in range(200)]
    assert sum(low > 1.0 for _, low, _ in fixed) / 200 > 0.3
    alternating = [repeated_ab(compare, 6) for _ in range(200)]
    assert sum(r.faster for r in alternating) / 200 <= 0.05


def test_ab_interval_math():
    centre, low, high = ab_interval([1.1, 1.1, 1.1])
    assert centre == pytest.approx(1.1) and low == pytest.approx(1.1) and high == pytest.approx(1.1)
    centre, low, high = ab_interval([1.0, 1.02, 0.98, 1.01])
    assert low < 1.0 < high
    failed = Comparison(math.nan, math.nan, math.nan, 0, Latency.failed("x"), Latency.failed("x"), ok=False, reason="boom")
    result = repeated_ab(lambda swapped: failed, 3)
    assert not result.ok and not result.faster and result.reason == "boom"


# ---- the searches' acceptance --------------------------------------------------------------------------------
def test_a_measured_candidate_must_clear_the_incumbents_interval():
    incumbent = Latency(10.0, 9.9, 10.1, 40, "measured")
    assert not is_better(Latency(9.95, 9.85, 10.05, 40, "measured"), incumbent)  # lower median, overlapping
    assert is_better(Latency(9.7, 9.6, 9.8, 40, "measured"), incumbent)
    assert is_better(Latency(9.99, 9.99, 9.99, 0, "cost-model"), Latency(10.0, 10.0, 10.0, 0, "cost-model"))
    assert not is_better(Latency.failed("x"), incumbent) and is_better(incumbent, Latency.failed("x"))
    from xrlflow.onnx_io import load_graph

    graph = load_graph(attention_like_model(layers=1))
    state = SearchState(graph, incumbent)
    assert not state.offer(graph, Latency(9.95, 9.85, 10.05, 40, "cache"), [])
    assert state.best_latency is incumbent


# ---- CUDA-graph advice ---------------------------------------------------------------------------------------
class FakeProbe:
    def __init__(self, plain_ms: float, replay_ms: float | None, placement) -> None:
        self.plain_ms, self.replay_ms, self.placed = plain_ms, replay_ms, placement

    def latency(self, model, specs, cuda_graph):
        if cuda_graph and self.replay_ms is None:
            return Latency.failed("CUDA graph capture is not possible for this model (a node on the CPU)")
        ms = self.replay_ms if cuda_graph else self.plain_ms
        return Latency(ms, ms * 0.99, ms * 1.01, 50, "measured")

    def placement(self, model, specs):
        return self.placed


def _on_gpu(model):
    return tuple((n.name, n.op_type, "CUDAExecutionProvider") for n in model.graph.node)


def test_cuda_advice_prints_a_snippet_where_replay_pays(tmp_path, capsys):
    model = attention_like_model()
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    probe = FakeProbe(2.0, 0.8, _on_gpu(model))
    fake = FakeAB(lambda m: float(matmuls(m)))
    result = optimize(str(path), OptimizeConfig(search="greedy", latency="cost", device="cuda", ab_repeats=3),
                      deployment_service=fake, cuda_probe=probe)
    advice = result.report["advice"]
    assert advice["capture_possible"] and advice["replay_pays"] and not advice["cpu_nodes"]
    assert advice["latency"]["input"]["plain"]["ms"] == 2.0 and advice["latency"]["output"]["cuda_graph"]["ms"] == 0.8
    snippet = advice["snippet"]
    compile(snippet, "snippet.py", "exec")  # valid Python
    assert '"enable_cuda_graph": "1"' in snippet and "io_binding()" in snippet and "update_inplace" in snippet
    assert "bind_ortvalue_input('x', x)" in snippet and "shape fixed at [8, 32]" in snippet
    assert "ortvalue_from_shape_and_type((8, 32), np.float32" in snippet

    from xrlflow.optimize_cli import write_result
    from xrlflow.report import format_summary

    write_result(result, out, external_data=False)
    assert repr(str(out)) in result.report["advice"]["snippet"]
    printed = format_summary(result.report)
    assert "CUDA graph:" in printed and "replayed" in printed and "enable_cuda_graph" in printed


def test_cuda_advice_names_the_nodes_on_the_cpu_that_block_capture():
    model = attention_like_model()
    placement = list(_on_gpu(model))
    placement[1] = (placement[1][0], placement[1][1], "CPUExecutionProvider")
    advice = cuda_graph_advice(
        {"input": {"plain": {"ok": True, "ms": 2.0, "low_ms": 1.9, "high_ms": 2.1}, "cuda_graph": {"ok": False}},
         "output": {"plain": {"ok": True, "ms": 1.5, "low_ms": 1.4, "high_ms": 1.6},
                    "cuda_graph": {"ok": False, "reason": "CUDA graph capture is not possible"}}},
        placement, "m.onnx", [("x", "float32", (8, 32))], [("y", "float32", (8, 32))])
    assert not advice["capture_possible"] and advice["snippet"] is None
    assert advice["cpu_nodes"] == [f"{placement[1][0]} ({placement[1][1]})"]
    assert "fall back to the CPU and block CUDA-graph capture" in advice["message"]
    # replay possible but not faster: no snippet
    advice = cuda_graph_advice(
        {"output": {"plain": {"ok": True, "ms": 1.0, "low_ms": 0.99, "high_ms": 1.01},
                    "cuda_graph": {"ok": True, "ms": 0.995, "low_ms": 0.98, "high_ms": 1.005}}},
        _on_gpu(model), "m.onnx", [("x", "float32", (8, 32))], [("y", "float32", (8, 32))])
    assert advice["capture_possible"] and not advice["replay_pays"] and advice["snippet"] is None


def test_snippet_names_every_input_with_a_valid_identifier():
    text = cuda_graph_snippet("m.onnx", [("input.ids", "int64", (1, 128)), ("1mask", "int64", (1, 128))],
                              [("logits", "float32", (1, 2))])
    compile(text, "snippet.py", "exec")
    assert "bind_ortvalue_input('input.ids', input_ids)" in text and "v_1mask" in text


def test_node_placement_from_a_profiled_run():
    from xrlflow.measure import MeasureConfig, MeasuredLatency, input_specs
    from xrlflow.onnx_io import load_graph

    model = attention_like_model(layers=1)
    specs = input_specs(load_graph(model))
    with MeasuredLatency(MeasureConfig.create(device="cpu", cache_path="")) as service:
        placed = service.node_placement(model.SerializeToString(), specs)
    assert isinstance(placed, tuple) and placed
    names = {n.name for n in model.graph.node}  # onnxruntime renames the nodes it fuses
    assert {name for name, _, _ in placed} & names
    assert {provider for _, _, provider in placed} == {"CPUExecutionProvider"}


# ---- inputs the pipeline must handle -------------------------------------------------------------------------
def test_an_old_opset_is_upgraded_and_the_report_says_so(tmp_path, capsys):
    old = attention_like_model()  # MatMul, Add, Transpose, 2-D Softmax(axis=-1): the same at opset 11
    next(o for o in old.opset_import if o.domain in ("", "ai.onnx")).version = 11
    path, out, report_path = tmp_path / "old.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(old, path)
    rc = main(["optimize", str(path), "-o", str(out), "--search", "greedy", "--latency", "cost", "--no-progress", "--report", str(report_path)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["opset_upgrade"] == {"from": 11, "to": 13}
    assert "opset 11 upgraded to 13" in capsys.readouterr().err
    rc = main(["optimize", str(path), "-o", str(tmp_path / "o2.onnx"), "--search", "greedy", "--latency", "cost", "--no-upgrade", "--no-progress"])
    assert rc == 2 and not (tmp_path / "o2.onnx").exists()


def test_a_missing_onnxruntime_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import xrlflow.runtime as runtime

    def missing():
        raise runtime.OnnxRuntimeMissingError(f"onnxruntime is not installed: {runtime.INSTALL_HINT}")

    monkeypatch.setattr(runtime, "import_onnxruntime", missing)
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(attention_like_model(), path)
    rc = main(["optimize", str(path), "-o", str(out), "--search", "greedy", "--latency", "cost", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err == [f"xrlflow: error: onnxruntime is not installed: {runtime.INSTALL_HINT}"]


def test_the_final_ab_never_reads_the_cache():
    from xrlflow.guarantee import make_deployment_service

    service = make_deployment_service(OptimizeConfig(threads=2))
    try:
        assert service.cache is None and service.config.session.intra_op_threads == 2
    finally:
        service.close()


def test_deployment_flags_are_checked():
    for bad in (dict(threads=-1), dict(ab_repeats=1), dict(cuda_graph=True), dict(no_ort_fusions=True, ort_fusions="on")):
        with pytest.raises(Exception, match="--"):
            OptimizeConfig(latency="cost", **bad).validate()
    assert OptimizeConfig(device="cuda").uses_ort_fusions and not OptimizeConfig().uses_ort_fusions
    assert OptimizeConfig().allows_contrib_ops and not OptimizeConfig(no_ort_fusions=True).allows_contrib_ops
    off = OptimizeConfig(device="cuda", ort_fusions="off")  # the stage skipped, xrlflow's own fusions kept
    assert not off.uses_ort_fusions and off.allows_contrib_ops
    assert OptimizeConfig(device="cuda", cuda_graph=True).deployment_setting == "cuda, CUDA-graph replay"
    assert OptimizeConfig(threads=4).deployment_setting == "cpu, 4 intra-op threads"


# ---- one live run on the CPU ---------------------------------------------------------------------------------
def test_live_measured_run_on_the_cpu_is_never_slower(tmp_path, monkeypatch):
    """The real measured service: searched at one thread, A/B'd at onnxruntime's default threads."""
    monkeypatch.setenv("XRLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    model = attention_like_model(layers=2, width=64)
    result = optimize(model, OptimizeConfig(search="greedy", latency="measured", ab_repeats=4,
                                            search_config=SearchConfig(steps=4)))
    report = result.report
    guarantee = report["guarantee"]
    assert guarantee["checked"] and guarantee["deployment_setting"] == "cpu, onnxruntime's default threads"
    assert report["latency"]["search"]["setting"] == "cpu, 1 intra-op thread"
    measured = guarantee["candidates"]
    assert measured and all(c["ok"] and len(c["compares"]) == 4 for c in measured)
    if guarantee["fallback"]:
        assert result.model.SerializeToString() == model.SerializeToString()
    else:
        chosen = next(c for c in measured if c["name"] == guarantee["chosen"])
        assert chosen["low"] > 1.0
    assert verify_models(model, result.model).ok
    print(guarantee["message"])
