"""Models below opset 13 are upgraded with onnx.version_converter, optimised, and verified against the
user's original file; a model the converter cannot convert gets one line naming the opset and the reason."""

from __future__ import annotations

import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import exporters
from xrlflow.errors import BadInputError
from xrlflow.onnx_io import MIN_OPSET, load_graph, opset_upgrade_note, to_model, upgrade_opset


def _cli_optimize(model: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xrlflow.cli", "optimize", str(model), "-o", str(output), "--search", "greedy",
         "--latency", "cost", "--no-progress", "--report", str(output.with_suffix(".json"))],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XRLFLOW_DEBUG": ""},
    )


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in init:
            continue
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(path: Path, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


MODELS = {
    "cnn-legacy-opset9": lambda: exporters.legacy_cnn(9),
    "cnn-legacy-opset11": lambda: exporters.legacy_cnn(11),
    "transformer-block-opset12": lambda: exporters.legacy_transformer_block(12),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_old_opset_is_upgraded_optimised_and_verified_against_the_original(name, tmp_path):
    original = MODELS[name]()
    old = _opset(original)
    assert old < MIN_OPSET
    source = exporters.save(original, tmp_path / f"{name}.onnx")
    before = source.read_bytes()
    output = tmp_path / "out.onnx"
    result = _cli_optimize(source, output)
    assert result.returncode == 0, result.stderr
    assert re.search(r"verification\s+passed", result.stdout)
    assert source.read_bytes() == before  # the input file is never rewritten in place
    optimised = onnx.load(str(output))
    assert _opset(optimised) == MIN_OPSET
    assert optimised.ir_version >= 7  # what opset 13 requires; the legacy exporter wrote IR 4 at opset 9
    onnx.checker.check_model(optimised, full_check=True)
    # Independently of the tool's own check: the output computes what the user's ORIGINAL file computes.
    feeds = _feeds(original)
    for want, got in zip(_run(source, feeds), _run(output, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert opset_upgrade_note(load_graph(source)) == (
        f"opset {old} upgraded to {MIN_OPSET} with onnx.version_converter (the output carries opset {MIN_OPSET})")


def test_opset_7_is_upgraded():
    from tests.rulecheck import ModelBuilder

    b = ModelBuilder(0)
    x = b.input("x", [4, 8])
    b.output(b.op("Add", [b.op("MatMul", [x, b.const((8, 8))]), b.op("MatMul", [x, b.const((8, 8))])]))
    model = b.model()
    model.opset_import[0].version = 7
    graph = load_graph(model)
    assert graph.context.upgraded_from_opset == 7 and graph.context.opset == MIN_OPSET
    feeds = _feeds(model)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(to_model(graph).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_a_current_opset_is_not_converted():
    model = exporters.keras_style_nhwc(13)
    graph = load_graph(model, {"input_1": (1, 16, 16, 3)})
    assert opset_upgrade_note(graph) is None and graph.context.opset == 13


def test_no_upgrade_restores_the_refusal():
    model = exporters.legacy_cnn(11)
    with pytest.raises(BadInputError, match=r"^opset 11 is older than 13; convert it first \(onnx.version_converter\)$"):
        load_graph(model, upgrade=False)


def test_converter_failure_is_one_line_naming_the_opset_and_the_reason(tmp_path):
    model = exporters.scan_8_with_sequence_lens()
    # a model onnxruntime runs: the refusal is the converter's limit, not a broken file
    feeds = {"lens": np.array([3, 2], np.int64), "init": np.zeros((2, 4), np.float32), "xs": np.ones((2, 3, 4), np.float32)}
    final = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(final, [[3] * 4, [2] * 4])
    with pytest.raises(BadInputError) as caught:
        load_graph(model)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("opset 8 could not be upgraded to 13 by onnx.version_converter: adapt_scan_8_9:")
    assert "Unsupported conversion to opset 9" in message and ".h:" not in message  # no C++ source location

    source = exporters.save(model, tmp_path / "scan8.onnx")
    result = _cli_optimize(source, tmp_path / "out.onnx")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"xrlflow: error: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan8.onnx"]  # nothing written


def test_custom_domain_nodes_and_imports_pass_through(tmp_path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),
        helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"),  # an onnxruntime contrib op
        helper.make_node("Add", ["g", "b"], ["s"]),
        helper.make_node("Unsqueeze", ["s"], ["u"], axes=[0]),  # axes became an input at opset 13
        helper.make_node("ReduceSum", ["u"], ["y"], axes=[0], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], initializer=[w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 6
    source = exporters.save(model, tmp_path / "custom.onnx")
    output = tmp_path / "out.onnx"
    result = _cli_optimize(source, output)
    assert result.returncode == 0, result.stderr
    optimised = onnx.load(str(output))
    assert dict((o.domain, o.version) for o in optimised.opset_import) == {"": 13, "com.microsoft": 1}
    assert [n.op_type for n in optimised.graph.node if n.domain == "com.microsoft"] == ["Gelu"]
    feeds = _feeds(model)
    np.testing.assert_allclose(_run(output, feeds)[0], _run(source, feeds)[0], rtol=1e-4, atol=1e-5)


def _opset11_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32) / 16, f"w{i}") for i in range(2)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("MatMul", ["x", "w1"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Unsqueeze", ["s"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["y"], axes=[0]),
    ]
    graph = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    return model


def test_external_data_weights_are_the_callers_tensors_not_copies(tmp_path):
    model = _opset11_matmul_model()  # 256 KiB weights: over the size the converter only sees as stubs
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    from xrlflow.onnx_io import read_model

    loaded = read_model(folder / "model.onnx")
    graph = load_graph(loaded)
    by_name = {t.name: t for t in loaded.graph.initializer}
    assert all(graph.initializers[n] is by_name[n] for n in ("w0", "w1"))
    exported = to_model(graph)
    assert _opset(exported) == MIN_OPSET
    assert b"__xrlflow_stub__" not in exported.SerializeToString()
    feeds = _feeds(model)
    want = _run(folder / "model.onnx", feeds)
    got = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)

    output = tmp_path / "out.onnx"
    result = _cli_optimize(folder / "model.onnx", output)
    assert result.returncode == 0, result.stderr
    assert re.search(r"rewrites applied\s+1\n", result.stdout)  # the two MatMuls merged
    np.testing.assert_allclose(_run(output, feeds)[0], want[0], rtol=1e-4, atol=1e-5)


def test_upgrade_opset_returns_a_full_model_and_leaves_the_input_alone():
    model = exporters.legacy_cnn(9)
    snapshot = model.SerializeToString()
    upgraded = upgrade_opset(model)
    assert model.SerializeToString() == snapshot
    assert _opset(upgraded) == MIN_OPSET and "Upsample" not in {n.op_type for n in upgraded.graph.node}
    onnx.checker.check_model(upgraded, full_check=True)
    feeds = _feeds(model)
    got = ort.InferenceSession(upgraded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(snapshot, providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_local_functions_and_subgraphs_are_upgraded_with_the_graph(tmp_path):
    # The converter drops model-local functions and the model's and each function's opset must agree, so a
    # function body written for opset 11 (Unsqueeze's axes attribute) is converted as well.
    function = helper.make_function(
        "local", "AddThenUnsqueeze", ["a", "b"], ["c"],
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Unsqueeze", ["s"], ["c"], axes=[0])],
        [helper.make_opsetid("", 11)],
    )
    branch = lambda name: helper.make_graph(  # noqa: E731 - two tiny identical branches
        [helper.make_node("Unsqueeze", ["x"], [name], axes=[0])], name, [],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 3])])
    nodes = [
        helper.make_node("AddThenUnsqueeze", ["x", "x"], ["f"], domain="local"),
        helper.make_node("If", ["cond"], ["i"], then_branch=branch("t"), else_branch=branch("e")),
        helper.make_node("Add", ["f", "i"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "functions",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("local", 1)],
                              functions=[function])
    onnx.checker.check_model(model, full_check=True)
    upgraded = to_model(load_graph(model))
    onnx.checker.check_model(upgraded, full_check=True)
    assert [dict((o.domain, o.version) for o in f.opset_import) for f in upgraded.functions] == [{"": 13}]
    feeds = {"cond": np.array(True), "x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(upgraded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])
    source = exporters.save(model, tmp_path / "functions.onnx")
    result = _cli_optimize(source, tmp_path / "out.onnx")
    assert result.returncode == 0 and re.search(r"verification\s+passed", result.stdout), result.stderr
