"""Malformed and hostile inputs: each through `xrlflow optimize X -o Y --latency cost` gets one clear line on
stderr and exit code 2, no traceback, nothing written (the output folder unchanged) and the input unchanged."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import exporters
from tests.rulecheck import ModelBuilder


def _good_model() -> onnx.ModelProto:
    b = ModelBuilder(0)
    x = b.input("x", [4, 8])
    b.output(b.op("Add", [b.op("MatMul", [x, b.const((8, 8))]), b.op("MatMul", [x, b.const((8, 8))])]))
    return b.model()


def _save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def not_onnx(folder):
    path = folder / "model.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    return path


def empty_file(folder):
    path = folder / "model.onnx"
    path.write_bytes(b"")
    return path


def truncated(folder):
    path = folder / "model.onnx"
    path.write_bytes(_good_model().SerializeToString()[:150])
    return path


def _external(folder, location: str, data_bytes: int | None = None):
    model = _good_model()
    weight = model.graph.initializer[0]
    array = numpy_helper.to_array(weight)
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    if data_bytes is not None:
        (folder / "weights.bin").write_bytes(array.tobytes()[:data_bytes])
    return _save(model, folder)


def wrong_external_path(folder):
    return _external(folder, "no_such_weights.bin")


def external_path_escapes(folder):
    (folder.parent / "outside.bin").write_bytes(b"\0" * 256)
    return _external(folder, "../outside.bin")


def external_absolute_path(folder):
    return _external(folder, "/etc/passwd")


def external_data_too_short(folder):
    return _external(folder, "weights.bin", data_bytes=100)


def opset_8_the_converter_cannot_upgrade(folder):
    # Older opsets are upgraded to 13 (tests/test_opset_upgrade.py); this valid Scan-8 is one the converter refuses.
    return _save(exporters.scan_8_with_sequence_lens(), folder)


def cyclic_graph(folder):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder)


def duplicate_value_names(folder):
    model = _good_model()
    model.graph.node[1].output[0] = model.graph.node[0].output[0]
    return _save(model, folder)


def dangling_input(folder):
    model = _good_model()
    model.graph.node[0].input[1] = "nothing_makes_this"
    return _save(model, folder)


def zero_size_tensor(folder):
    model = _good_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((0, 8), np.float32), model.graph.initializer[0].name))
    return _save(model, folder)


def huge_declared_dims(folder):
    model = _good_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
    return _save(model, folder)


def huge_initializer_dims(folder):
    model = _good_model()
    weight = model.graph.initializer[0]
    del weight.dims[:]
    weight.dims.extend([1 << 20, 1 << 20])
    return _save(model, folder)


def non_utf8_names(folder):
    data = bytearray(_good_model().SerializeToString())
    index = data.find(b"n1_MatMul")
    data[index:index + 2] = b"\xff\xfe"
    path = folder / "model.onnx"
    path.write_bytes(bytes(data))
    return path


def a_directory(folder):
    path = folder / "model.onnx"
    path.mkdir()
    return path


def output_produced_by_nothing(folder):
    model = _good_model()
    model.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, [4, 8]))
    return _save(model, folder)


def initializer_size_mismatch(folder):
    model = _good_model()
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-12]
    return _save(model, folder)


def typed_data_count_mismatch(folder):
    model = _good_model()
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight).reshape(-1)[:10]
    weight.ClearField("raw_data")
    weight.float_data.extend(values.tolist())
    return _save(model, folder)


def no_graph(folder):
    path = folder / "model.onnx"
    path.write_bytes(helper.make_opsetid("", 17).SerializeToString())
    return path


def duplicate_initializers(folder):
    model = _good_model()
    model.graph.initializer.append(model.graph.initializer[0])
    return _save(model, folder)


CORPUS = [
    not_onnx, empty_file, truncated, wrong_external_path, external_path_escapes, external_absolute_path,
    external_data_too_short, opset_8_the_converter_cannot_upgrade, cyclic_graph, duplicate_value_names, dangling_input, zero_size_tensor,
    huge_declared_dims, huge_initializer_dims, non_utf8_names, a_directory, output_produced_by_nothing,
    initializer_size_mismatch, typed_data_count_mismatch, no_graph, duplicate_initializers,
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def _optimize(model: Path, output: Path):
    return subprocess.run(
        [sys.executable, "-m", "xrlflow.cli", "optimize", str(model), "-o", str(output), "--latency", "cost",
         "--search", "greedy", "--no-progress", "--report", str(output.with_suffix(".json"))],
        capture_output=True, text=True, timeout=120, env={**os.environ, "XRLFLOW_DEBUG": ""},
    )


@pytest.mark.parametrize("make", CORPUS, ids=[f.__name__ for f in CORPUS])
def test_bad_input_is_refused_cleanly(make, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    model = make(folder)
    before = _snapshot(tmp_path)
    result = _optimize(model, tmp_path / "out.onnx")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xrlflow: error:"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _snapshot(tmp_path) == before  # nothing written, input unchanged


@pytest.mark.parametrize("where", ["missing-folder", "readonly-folder"])
def test_unwritable_output_is_refused_before_any_work(where, tmp_path):
    if where == "readonly-folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    model = _save(_good_model(), tmp_path)
    target = tmp_path / "missing" / "out.onnx"
    if where == "readonly-folder":
        target = tmp_path / "locked" / "out.onnx"
        target.parent.mkdir()
        target.parent.chmod(0o555)
    before = _snapshot(tmp_path)
    try:
        result = _optimize(model, target)
    finally:
        target.parent.chmod(0o755) if target.parent.exists() else None
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(tmp_path) == before


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 15
