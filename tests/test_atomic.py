"""Atomic writes (`xrlflow.atomic`) and the writers built on them: a write that fails midway leaves the old
file intact and nothing beside it; one that succeeds replaces it; a model and its external data land as a
pair, the data first."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from xrlflow.atomic import replacing, replacing_with_companion, write_bytes


class Interrupted(Exception):
    """Stands for a crash in the middle of a write."""


def _leftovers(folder, *expected: str) -> list[str]:
    return sorted(set(os.listdir(folder)) - set(expected))


def test_write_bytes_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"  # the folder is created
    write_bytes(target, b"old")
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent, "a.bin") == []


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(Interrupted):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise Interrupted
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, "a.bin") == []


def test_a_file_and_its_companion_are_replaced_companion_first(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(source, destination):
        renamed.append(os.path.basename(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    with replacing_with_companion(target, "m.onnx.data") as tmp:
        assert tmp.name == "m.onnx" and tmp.parent != tmp_path  # same names, in a folder of their own
        tmp.write_bytes(b"new model")
        (tmp.parent / "m.onnx.data").write_bytes(b"new data")
    assert renamed == ["m.onnx.data", "m.onnx"]
    assert target.read_bytes() == b"new model" and (tmp_path / "m.onnx.data").read_bytes() == b"new data"
    assert _leftovers(tmp_path, "m.onnx", "m.onnx.data") == []


def test_a_companion_not_written_is_not_touched(tmp_path):
    target = tmp_path / "m.onnx"
    with replacing_with_companion(target, "m.onnx.data") as tmp:
        tmp.write_bytes(b"model")
    assert target.read_bytes() == b"model" and not (tmp_path / "m.onnx.data").exists()
    assert _leftovers(tmp_path, "m.onnx") == []


def test_a_failure_mid_pair_keeps_both_old_files(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    with pytest.raises(Interrupted):
        with replacing_with_companion(target, "m.onnx.data") as tmp:
            (tmp.parent / "m.onnx.data").write_bytes(b"new data")
            tmp.write_bytes(b"half a model")
            raise Interrupted
    assert target.read_bytes() == b"old model" and (tmp_path / "m.onnx.data").read_bytes() == b"old data"
    assert _leftovers(tmp_path, "m.onnx", "m.onnx.data") == []


def _model(scale: float) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.full((64, 64), scale, np.float32), "w")  # 16 KiB: goes to the data file
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(path) -> float:
    return float(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])[0, 0])


def test_save_model_with_external_data_writes_the_pair_and_survives_a_failed_rewrite(tmp_path, monkeypatch):
    import xrlflow.onnx_export as onnx_export

    target = tmp_path / "out.onnx"
    onnx_export.save_model(_model(1.0), target, external_data=True)
    assert _weight(target) == 1.0 and (tmp_path / "out.onnx.data").is_file()
    onnx_export.save_model(_model(2.0), target, external_data=True)
    assert _weight(target) == 2.0

    real_write = onnx_export.write_with_external_data

    def crashing_write(model, path, data_name):
        real_write(model, path, data_name)
        raise Interrupted  # both temporary files complete, neither renamed

    monkeypatch.setattr(onnx_export, "write_with_external_data", crashing_write)
    with pytest.raises(Interrupted):
        onnx_export.save_model(_model(3.0), target, external_data=True)
    assert _weight(target) == 2.0
    assert _leftovers(tmp_path, "out.onnx", "out.onnx.data") == []


def test_the_cost_model_table_is_written_atomically(tmp_path, monkeypatch):
    from xrlflow.costmodel import OpTable

    table = OpTable("cpu", "CPUExecutionProvider", "1.0", 0.001, {"k": 0.5})
    path = tmp_path / "table.json"
    table.save(path)
    assert OpTable.load(path).entries == {"k": 0.5}

    def crashing_fsync(fd):
        raise Interrupted  # the new table written to the temporary file, not yet renamed

    monkeypatch.setattr(os, "fsync", crashing_fsync)
    with pytest.raises(Interrupted):
        OpTable("cpu", "CPUExecutionProvider", "1.0", 0.001, {"k": 9.0}).save(path)
    monkeypatch.undo()
    assert OpTable.load(path).entries == {"k": 0.5}
    assert _leftovers(tmp_path, "table.json") == []
