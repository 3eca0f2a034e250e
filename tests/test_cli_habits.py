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


# ---- exit codes ---------------------------------------------------------------------------------------------------
def test_exit_codes_are_distinct_and_in_the_help(model_file, tmp_path, monkeypatch, capsys):
    import xrlflow.optimizer as optimizer

    for command in ([], ["optimize"]):
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "exit codes: 0 success, 2 bad input or usage, 3 the optimised model failed verification" in help_text
        assert "1 internal error" in help_text

    assert _optimize(tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx", "--search", "greedy") == 2
    assert "no such file" in capsys.readouterr().err

    def broken_export(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(optimizer, "to_model", broken_export)
    assert _optimize(model_file, "-o", tmp_path / "o.onnx", "--search", "greedy") == 1
    err = capsys.readouterr().err.strip()
    assert err == "xrlflow: internal error: RuntimeError: a bug" and not (tmp_path / "o.onnx").exists()


# ---- --version, -q / -v -------------------------------------------------------------------------------------------
def test_version(capsys):
    from xrlflow.version import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"xrlflow {__version__}"


@pytest.fixture()
def unrunnable_model(tmp_path):
    """A model onnxruntime cannot run (an op of an unknown domain): optimising it warns that it is not verified."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Foo", ["r"], ["y"], domain="com.example", name="foo")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("flags, warned, informed", [
    ([], True, False),
    (["-q"], False, False),
    (["-v"], True, True),
])
def test_quiet_and_verbose_set_what_stderr_shows(unrunnable_model, tmp_path, flags, warned, informed, capsys):
    assert _optimize(unrunnable_model, *flags, "-o", tmp_path / "o.onnx", "--search", "greedy") == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert any(line.startswith("xrlflow: warning: onnxruntime cannot run the input model") for line in lines) == warned
    assert any(line.startswith("xrlflow: optimising ") for line in lines) == informed
    assert "wrote " in captured.out  # stdout (the summary) does not depend on -q / -v


def test_verbosity_flags_go_before_or_after_the_command(unrunnable_model, tmp_path, capsys):
    assert main(["-q", "optimize", str(unrunnable_model), "-o", str(tmp_path / "o.onnx"), "--search", "greedy",
                 "--latency", "cost"]) == 0
    assert capsys.readouterr().err == ""


def test_python_warnings_follow_the_verbosity(monkeypatch, capsys):
    import warnings

    import xrlflow.rules_cli as rules_cli

    real = rules_cli.run_rules

    def warning_rules(args):
        warnings.warn("something a library says", UserWarning)
        return real(args)

    monkeypatch.setattr(rules_cli, "run_rules", warning_rules)
    assert main(["rules"]) == 0
    assert capsys.readouterr().err.strip() == "xrlflow: warning: UserWarning: something a library says"
    assert main(["rules", "-q"]) == 0
    assert capsys.readouterr().err == ""
