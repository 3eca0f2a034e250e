"""A new user's habits on the command line: normal file permissions, exit codes, --version, -q/-v, default
output and method, the shape syntaxes, flags checked before any work, the policy device warning, the printed
estimate and the chart."""

from __future__ import annotations

import os
import stat

import onnx
import pytest

from tests.test_search import attention_like_model
from xrlflow.cli import main


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(attention_like_model(), path)
    return path


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _optimize(*args) -> int:
    return main(["optimize", *map(str, args), "--latency", "cost", "--no-progress"])


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_mode_a_new_file_gets(model_file, tmp_path, umask_022):
    out, report, plot = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "p.png"
    assert _optimize(model_file, "-o", out, "--search", "greedy", "--report", report, "--plot", plot) == 0
    assert {p.name: _mode(p) for p in (out, report, plot)} == {p.name: 0o644 for p in (out, report, plot)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx", "p.png", "r.json"]  # no temp files


def test_atomic_writes_follow_the_umask(tmp_path):
    from xrlflow.atomic import write_bytes

    previous = os.umask(0o027)
    try:
        write_bytes(tmp_path / "a.txt", b"x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a.txt") == 0o640 and (tmp_path / "a.txt").read_bytes() == b"x"
