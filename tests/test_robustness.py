"""Issue 8: what users of ONNX optimisers hit on real models, each on a model built here, end to end through
`xrlflow optimize` (CLI) or `xrlflow.optimize` (Python API), with the deterministic cost model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import xrlflow
from tests.rulecheck import ModelBuilder
from xrlflow.cli import main
from xrlflow.verify import Tolerance, compare_outputs, run_model


def _cli(*args) -> int:
    return main(["optimize", *map(str, args), "--latency", "cost", "--no-progress"])


def _run(model_or_path, feeds):
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _projections(b: ModelBuilder, x: str, width: int, n: int = 3, dtype=np.float32) -> list[str]:
    """`n` parallel MatMul + bias projections of `x` (what merge-parallel-matmul merges)."""
    return [b.op("Add", [b.op("MatMul", [x, b.const((width, width), 0.2, dtype)]), b.const((width,), 0.1, dtype)])
            for _ in range(n)]


# ---- dynamic shapes --------------------------------------------------------------------------------------------
def _dynamic_model() -> onnx.ModelProto:
    b = ModelBuilder(3, opset=18)
    x = b.input("x", ["batch", "seq", 16])
    y = b.input("y", ["batch", "seq", 16])
    q, k, v = _projections(b, x, 16)
    shared = b.const((16, 16), 0.2)  # one weight, two activations: batch-shared-weight-matmul's domain
    sx, sy = b.op("MatMul", [x, shared]), b.op("MatMul", [y, shared])
    pieces = b.op("Split", [b.op("Add", [q, k])], n_out=2, axis=1, num_outputs=2)  # equal halves of the seq axis
    joined = b.op("Concat", [b.op("Relu", [pieces[0]]), b.op("Relu", [pieces[1]])], axis=1)
    b.output(b.op("Add", [joined, v]), b.op("Add", [sx, sy]))
    model = b.model()
    for o in model.graph.output:  # declared symbolic, as exporters do
        o.type.tensor_type.shape.dim[0].dim_param = "batch"
        o.type.tensor_type.shape.dim[1].dim_param = "seq"
    return model


def test_dynamic_shapes_stay_symbolic_and_run_at_other_shapes(tmp_path):
    path, out, report_path = tmp_path / "dyn.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_dynamic_model(), path)
    rc = _cli(path, "-o", out, "--search", "greedy", "--input-shape", "x=1x8x16", "--input-shape", "y=1x8x16",
              "--report", report_path)
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["rewrites"]
    # rewrites whose validity depends on a bound dim were not applied
    assert "batch-shared-weight-matmul" not in report["rewrites_by_rule"]
    assert report["verification"]["other_shapes"]["ok"]
    assert report["verification"]["other_shapes"]["input_shapes"] == {"x": [2, 16, 16], "y": [2, 16, 16]}
    optimised = onnx.load(out)
    for vi in list(optimised.graph.input) + list(optimised.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[:2]] == ["batch", "seq"], vi.name
    assert not any(vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_value == 1
                   for vi in optimised.graph.value_info)
    rng = np.random.default_rng(0)
    for shape in [(3, 5, 16), (2, 7, 16), (1, 1, 16)]:
        feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in ("x", "y")}
        for a, b in zip(_run(path, feeds), _run(out, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_a_rewrite_that_bakes_a_bound_dim_is_caught_at_the_second_binding(tmp_path, monkeypatch):
    """The final check at another binding catches a rule that ignores dim_is_bound (here: the guard removed)."""
    import xrlflow.ir

    monkeypatch.setattr(xrlflow.ir.Graph, "dim_is_bound", lambda self, value, axis: False)
    from xrlflow.optimizer import OptimizeConfig, VerificationError, optimize

    from xrlflow.latency import Latency

    class FewerMatMuls:  # prefers the batched graph whatever its real cost
        name = "matmul-count"
        deterministic = True

        def latency(self, graph):
            ms = float(len(graph.by_op("MatMul")))
            return Latency(ms, ms, ms, 1, "cost-model")

    config = OptimizeConfig(search="greedy", latency="cost", input_shapes={"x": (1, 8, 16), "y": (1, 8, 16)},
                            rules=("batch-shared-weight-matmul",))
    with pytest.raises(VerificationError) as caught:
        optimize(_dynamic_model(), config, latency_service=FewerMatMuls())
    assert "other input shapes" in str(caught.value)
    assert caught.value.report["broken_rewrite"]["rule"] == "batch-shared-weight-matmul"


# ---- custom domains and ops onnxruntime cannot run -------------------------------------------------------------
def _custom_op_model() -> onnx.ModelProto:
    b = ModelBuilder(4)
    x = b.input("x", [4, 16])
    q, k, v = _projections(b, x, 16)
    b.output(b.op("Add", [k, v]), q)
    model = b.model()
    custom = helper.make_node("FancyNorm", [q], ["fancy"], name="fancy_norm", domain="com.example", epsilon=1e-3, doc_string="vendor op")
    model.graph.node.append(custom)
    model.graph.output.append(helper.make_tensor_value_info("fancy", TensorProto.FLOAT, [4, 16]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_custom_op_passes_through_and_the_report_says_nothing_was_verified(tmp_path, capsys):
    path, out, report_path = tmp_path / "custom.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    model = _custom_op_model()
    onnx.save(model, path)
    rc = main(["optimize", str(path), "-o", str(out), "--search", "greedy", "--no-progress", "--report", str(report_path)])
    assert rc == 0  # measured latency requested: falls back to the cost model
    err = capsys.readouterr().err
    assert "warning" in err and "NOT verified" in err and "Traceback" not in err
    report = json.loads(report_path.read_text())
    assert report["written"] and report["verification"]["skipped"] and not report["verification"]["ok"]
    assert any("cost model" in w for w in report["warnings"])
    assert report["op_counts"]["after"].get("MatMul", 0) < report["op_counts"]["before"]["MatMul"]
    optimised = onnx.load(out)
    fancy = [n for n in optimised.graph.node if n.op_type == "FancyNorm"]
    assert len(fancy) == 1 and fancy[0].domain == "com.example" and fancy[0].doc_string == "vendor op"
    assert list(fancy[0].attribute) == list(model.graph.node[-1].attribute)
    assert ("com.example", 1) in {(o.domain, o.version) for o in optimised.opset_import}


# ---- control flow ----------------------------------------------------------------------------------------------
def test_loop_body_reading_an_outer_value_produced_by_a_merged_matmul(tmp_path):
    b = ModelBuilder(5)
    x = b.input("x", [4, 16])
    q, k, v = _projections(b, x, 16)
    body = helper.make_graph(
        [helper.make_node("Add", ["carried", q], ["next"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("next", TensorProto.FLOAT, [4, 16])],
    )
    trips = b.const((), value=3, dtype=np.int64)
    cond = b.const((), value=True, dtype=np.bool_)
    looped = b.op("Loop", [trips, cond, k], body=body)
    b.output(b.op("Add", [looped, v]))
    path, out, report_path = tmp_path / "loop.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(b.model(), path)
    assert _cli(path, "-o", out, "--search", "greedy", "--report", report_path) == 0
    report = json.loads(report_path.read_text())
    assert report["rewrites_by_rule"].get("merge-parallel-matmul", 0) >= 1 and report["verification"]["ok"]
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, feeds)[0], _run(path, feeds)[0], rtol=1e-4, atol=1e-5)


# ---- fp16 and quantised models ---------------------------------------------------------------------------------
def _float_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        yield t.name, t.data_type
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield node.name, a.t.data_type
            elif a.name in ("value_float", "value_floats"):
                yield node.name, TensorProto.FLOAT


def test_fp16_model_gets_no_fp32_constants(tmp_path):
    f16 = np.float16
    b = ModelBuilder(6)
    x = b.input("x", [4, 16], TensorProto.FLOAT16)
    q, k, v = _projections(b, x, 16, dtype=f16)
    scaled = b.op("MatMul", [b.op("Mul", [q, b.const((), value=0.5, dtype=f16)]), b.const((16, 16), 0.2, f16)])
    image = b.input("image", [1, 4, 8, 8], TensorProto.FLOAT16)
    conv = b.op("Conv", [image, b.const((8, 4, 3, 3), 0.2, f16), b.const((8,), 0.1, f16)], pads=[1, 1, 1, 1])
    c1 = b.op("Conv", [image, b.const((8, 4, 3, 3), 0.2, f16)], pads=[1, 1, 1, 1])
    bn = b.op("BatchNormalization", [conv, b.const((8,), 0.1, f16, value=np.linspace(0.5, 1.5, 8)), b.const((8,), 0.1, f16),
                                     b.const((8,), 0.1, f16), b.const((8,), value=np.linspace(0.5, 2, 8), dtype=f16)])
    b.output(b.op("Add", [k, v]), scaled, b.op("Add", [bn, c1]))
    path, out, report_path = tmp_path / "fp16.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(b.model(), path)
    rc = _cli(path, "-o", out, "--search", "greedy", "--report", report_path, "--rtol", "1e-2", "--atol", "1e-2")
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["rewrites"] and report["canonicalised"]  # BatchNorm folded, projections merged
    optimised = onnx.load(out)
    onnx.checker.check_model(optimised, full_check=True)
    leaked = [(name, dtype) for name, dtype in _float_tensors(optimised) if dtype in (TensorProto.FLOAT, TensorProto.DOUBLE)]
    assert not leaked
    assert "BatchNormalization" not in report["op_counts"]["after"]


def test_qdq_model_keeps_its_quantize_dequantize_nodes(tmp_path):
    b = ModelBuilder(7)
    x = b.input("x", [4, 16])
    scale, zero = b.const((), value=0.05), b.const((), value=0, dtype=np.int8)
    xq = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale, zero]), scale, zero])
    outs = []
    for i in range(3):
        w = b.const((16, 16), dtype=np.int8, value=np.random.default_rng(i).integers(-100, 100, (16, 16)))
        outs.append(b.op("MatMul", [xq, b.op("DequantizeLinear", [w, b.const((), value=0.01), b.const((), value=0, dtype=np.int8)])]))
    b.output(*outs)
    model = b.model()
    path, out, report_path = tmp_path / "qdq.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    assert _cli(path, "-o", out, "--search", "greedy", "--report", report_path) == 0
    optimised = onnx.load(out)
    ops = [n.op_type for n in optimised.graph.node]
    assert ops.count("DequantizeLinear") == 4 and ops.count("QuantizeLinear") == 1
    int8_weights = [t for t in optimised.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 3
    assert not [t for t in optimised.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2]


# ---- no blow-up ------------------------------------------------------------------------------------------------
def test_output_never_grows_beyond_the_merged_bytes(tmp_path):
    b = ModelBuilder(8)
    x = b.input("x", [256, 64])
    q, k, v = _projections(b, x, 64)
    tiled = b.op("Tile", [b.const((1, 64), 1.0), b.const((2,), value=[256, 1], dtype=np.int64)])
    expanded = b.op("Expand", [b.const((1, 64), 1.0), b.const((2,), value=[256, 64], dtype=np.int64)])
    filled = b.op("ConstantOfShape", [b.const((2,), value=[256, 64], dtype=np.int64)],
                  value=numpy_helper.from_array(np.array([0.5], np.float32)))
    b.output(b.op("Add", [b.op("Add", [q, tiled]), b.op("Add", [k, expanded])]), b.op("Mul", [v, filled]))
    path, out, report_path = tmp_path / "grow.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(b.model(), path)
    assert _cli(path, "-o", out, "--search", "greedy", "--report", report_path) == 0
    size = json.loads(report_path.read_text())["size"]
    assert size["input_bytes"] == path.stat().st_size and size["output_bytes"] == out.stat().st_size
    assert out.stat().st_size <= path.stat().st_size + size["merged_bytes"]
    merged_report = tmp_path / "merged.json"
    assert _cli(path, "-o", out, "--search", "greedy", "--rules", "merge-parallel-matmul", "--device", "cuda", "--report", merged_report) == 0
    size = json.loads(merged_report.read_text())["size"]
    assert size["merged_bytes"] >= 64 * 64 * 4 * 3  # the merged projection weights
    assert out.stat().st_size <= path.stat().st_size + size["merged_bytes"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert {"Tile", "Expand", "ConstantOfShape"} <= set(ops)
    largest_input = max(numpy_helper.to_array(t).nbytes for t in onnx.load(path).graph.initializer)
    assert max(numpy_helper.to_array(t).nbytes for t in onnx.load(out).graph.initializer) <= 3 * largest_input


# ---- names and metadata ----------------------------------------------------------------------------------------
def test_names_order_opsets_and_metadata_are_kept(tmp_path):
    b = ModelBuilder(9)
    x2, x1 = b.input("second_input", [4, 16]), b.input("first_input", [4, 16])
    q, k, v = _projections(b, x1, 16)
    b.output(b.op("Add", [v, x2]), b.op("Add", [q, k]))
    model = b.model()
    model.producer_name, model.producer_version, model.domain, model.model_version = "exporter", "9.9", "org.test", 7
    model.doc_string, model.graph.doc_string = "model doc", "graph doc"
    model.graph.node[1].doc_string = "bias of the first projection"
    model.graph.output[0].doc_string = "the sum"
    onnx.helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    path, out = tmp_path / "meta.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    assert _cli(path, "-o", out, "--search", "greedy") == 0
    got = onnx.load(out)
    assert [i.name for i in got.graph.input] == ["second_input", "first_input"]
    assert [o.name for o in got.graph.output] == [o.name for o in model.graph.output]
    assert got.graph.output[0].doc_string == "the sum"
    assert [(o.domain, o.version) for o in got.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert (got.producer_name, got.producer_version, got.domain, got.model_version) == ("exporter", "9.9", "org.test", 7)
    assert (got.doc_string, got.graph.doc_string) == ("model doc", "graph doc")
    assert {p.key: p.value for p in got.metadata_props} == {"author": "tests", "license": "MIT"}
    kept = {n.name: n for n in got.graph.node}
    assert kept.get(model.graph.node[1].name) is None or kept[model.graph.node[1].name].doc_string == "bias of the first projection"
    names = [n.name for n in got.graph.node]
    assert len(set(names)) == len(names) and all(names)
    new = [n for n in names if n not in {m.name for m in model.graph.node}]
    assert new and all(n.split("/")[0] in ("merge-parallel-matmul", "matmul-add-to-gemm") for n in new), new


# ---- determinism -----------------------------------------------------------------------------------------------
def test_same_input_flags_and_seed_give_identical_bytes(tmp_path):
    from tests.test_search import attention_like_model

    path = tmp_path / "m.onnx"
    onnx.save(attention_like_model(layers=3), path)
    outputs = []
    for i in range(2):
        out = tmp_path / f"out{i}.onnx"
        assert _cli(path, "-o", out, "--search", "random", "--rollouts", "3", "--seed", "11") == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


# ---- verification ----------------------------------------------------------------------------------------------
def test_user_inputs_nan_and_per_output_tolerances(tmp_path):
    b = ModelBuilder(10)
    x = b.input("x", [4, 16])
    q, k, v = _projections(b, x, 16)
    b.output(b.op("Log", [q]), b.op("Add", [k, v]))  # Log of negatives: NaN in both models
    model = b.model()
    path, out, report_path, feeds_path = tmp_path / "nan.onnx", tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "in.npz"
    onnx.save(model, path)
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)}
    np.savez(feeds_path, **feeds)
    log_out, sum_out = (o.name for o in model.graph.output)
    rc = _cli(path, "-o", out, "--search", "greedy", "--inputs", feeds_path, "--report", report_path,
              "--tolerance", f"{sum_out}=1e-3,1e-4")
    assert rc == 0
    ver = json.loads(report_path.read_text())["verification"]
    assert ver["ok"] and ver["inputs"] == str(feeds_path)
    assert ver["tolerances"] == {log_out: [1e-4, 1e-5], sum_out: [1e-3, 1e-4]}
    assert {o["name"] for o in ver["outputs"]} == {log_out, sum_out}
    assert all("max_abs_error" in o and "max_rel_error" in o for o in ver["outputs"])
    assert np.isnan(run_model(model, feeds)[0]).any()

    nan = np.array([np.nan, 1.0], np.float32)
    assert compare_outputs(["y"], [nan], [nan.copy()]).ok
    assert not compare_outputs(["y"], [nan], [np.array([0.0, 1.0], np.float32)]).ok
    tight = compare_outputs(["a", "b"], [np.ones(2), np.ones(2)], [np.ones(2) * 1.01, np.ones(2) * 1.01],
                            {"a": Tolerance(0.1, 0), "b": Tolerance(1e-4, 0)})
    assert [o.ok for o in tight.outputs] == [True, False]
    assert _cli(path, "-o", tmp_path / "o2.onnx", "--search", "greedy", "--tolerance", "no_such_output=1,1") == 2
    assert _cli(path, "-o", tmp_path / "o2.onnx", "--search", "greedy", "--tolerance", f"{sum_out}=abc") == 2
    assert not (tmp_path / "o2.onnx").exists()


# ---- control ---------------------------------------------------------------------------------------------------
def test_rule_selection_and_the_rewrite_log(tmp_path, capsys):
    from tests.test_search import attention_like_model
    from xrlflow.rules import rule_names

    path = tmp_path / "m.onnx"
    onnx.save(attention_like_model(), path)
    assert main(["rules"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in rule_names())
    only, none = tmp_path / "only.json", tmp_path / "none.json"
    assert _cli(path, "-o", tmp_path / "a.onnx", "--search", "greedy", "--rules", "merge-parallel-matmul", "--report", only) == 0
    assert _cli(path, "-o", tmp_path / "b.onnx", "--search", "greedy", "--disable-rules", "merge-parallel-matmul", "--report", none) == 0
    only_report, none_report = json.loads(only.read_text()), json.loads(none.read_text())
    assert set(only_report["rewrites_by_rule"]) == {"merge-parallel-matmul"} and only_report["rules"] == ["merge-parallel-matmul"]
    assert "merge-parallel-matmul" not in none_report["rewrites_by_rule"]
    for entry in only_report["rewrites"]:
        assert entry["rule"] == "merge-parallel-matmul" and entry["nodes_before"] and entry["nodes_after"]
        assert all(n.startswith("merge-parallel-matmul/") for n in entry["nodes_after"])
    counts = only_report["op_counts"]
    assert counts["before"]["MatMul"] - counts["after"]["MatMul"] == 4  # two layers: Q/K/V 3 -> 1


# ---- Python API ------------------------------------------------------------------------------------------------
def test_python_api_mirrors_the_cli(tmp_path):
    from tests.test_search import attention_like_model

    path, out = tmp_path / "m.onnx", tmp_path / "api.onnx"
    onnx.save(attention_like_model(), path)
    result = xrlflow.optimize(str(path), search="greedy", latency="cost", rules=["merge-parallel-matmul"], output=str(out),
                              tolerance={onnx.load(path).graph.output[0].name: (1e-3, 1e-4)})
    assert isinstance(result.model, onnx.ModelProto) and result.report["verification"]["ok"]
    assert result.report["written"] and result.report["size"]["output_bytes"] == out.stat().st_size
    assert onnx.load(out).SerializeToString() == result.model.SerializeToString()
    from_proto = xrlflow.optimize(onnx.load(path), search="greedy", latency="cost", rules=["merge-parallel-matmul"])
    assert from_proto.model.SerializeToString() == result.model.SerializeToString()
    assert callable(xrlflow.optimize) and hasattr(__import__("xrlflow.optimizer").optimizer, "OptimizeConfig")


# ---- over 2 GB -------------------------------------------------------------------------------------------------
_BIG_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from xrlflow.cli import main
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def _big_model(folder, vocab: int, width: int = 1024) -> tuple[onnx.ModelProto, int]:
    """A Gather embedding table over 2 GiB in external data (written sparse: only the rows ids reach hold
    numbers) feeding two mergeable projections; the table never exists in this process's memory."""
    b = ModelBuilder(12)
    ids = b.input("ids", [2, 4], TensorProto.INT64)
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[vocab, width])
    table.data_location = TensorProto.EXTERNAL
    nbytes = vocab * width * 4
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(nbytes))):
        entry = table.external_data.add()
        entry.key, entry.value = key, value
    with open(folder / "big.onnx.data", "wb") as data:
        data.write(np.random.default_rng(0).standard_normal((16, width)).astype(np.float32).tobytes())
        data.truncate(nbytes)
    embedded = b.op("Gather", ["table", ids], axis=0)
    q, k = _projections(b, embedded, width, n=2)  # weights (1024 x 1024) stay inline
    b.output(b.op("Add", [q, k]))
    graph = helper.make_graph(b.nodes, "big", b.inputs, [helper.make_tensor_value_info(b.outputs[0], TensorProto.FLOAT, [2, 4, width])],
                              [table] + b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), nbytes


@pytest.mark.slow
def test_model_over_2gb_loads_optimises_and_writes_external_data(tmp_path):
    model, table_bytes = _big_model(tmp_path, vocab=525_000)
    assert table_bytes > 1 << 31
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())  # the skeleton: the table lives in big.onnx.data
    out, report_path = tmp_path / "out" / "big.opt.onnx", tmp_path / "r.json"
    out.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _BIG_SCRIPT, "optimize", str(path), "-o", str(out), "--search", "greedy", "--latency", "cost",
         "--device", "cuda", "--rules", "merge-parallel-matmul", "--external-data", "--report", str(report_path), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["rc"] == 0
    print(f"peak RSS {stats['peak_rss_bytes'] / 2**30:.2f} GiB for {table_bytes / 2**30:.2f} GiB of weights")
    assert stats["peak_rss_bytes"] < 2 * table_bytes, stats  # memory within ~2x the weights
    report = json.loads(report_path.read_text())
    assert report["verification"]["ok"] and report["rewrites_by_rule"] == {"merge-parallel-matmul": 1}
    assert out.stat().st_size < 1 << 20  # the .onnx file is a skeleton; weights are in OUT.data
    data = out.parent / "big.opt.onnx.data"
    assert data.stat().st_size >= table_bytes
    skeleton = onnx.load(out, load_external_data=False)
    table = next(t for t in skeleton.graph.initializer if t.name == "table")
    assert table.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in table.external_data}["location"] == "big.opt.onnx.data"
    feeds = {"ids": np.array([[0, 3, 5, 15], [1, 2, 9, 4]], np.int64)}
    np.testing.assert_allclose(_run(out, feeds)[0], _run(path, feeds)[0], rtol=1e-4, atol=1e-4)
