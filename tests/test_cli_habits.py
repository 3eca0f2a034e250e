"""A new user's habits on the command line: normal file permissions, exit codes, --version, -q/-v, default
output and method, the shape syntaxes, flags checked before any work, the policy device warning, the printed
estimate and the chart."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
    said = iter(range(100))

    def warning_rules(args):
        warnings.warn(f"something a library says ({next(said)})", UserWarning)  # a new text: never filtered as seen
        return real(args)

    monkeypatch.setattr(rules_cli, "run_rules", warning_rules)
    assert main(["rules", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["rules"]) == 0
    assert capsys.readouterr().err.strip() == "xrlflow: warning: UserWarning: something a library says (1)"


# ---- the method: greedy by default, --policy alone is the shipped policy -----------------------------------------
def _parsed(*argv: str):
    import argparse

    from xrlflow.optimize_cli import add_optimize_arguments

    parser = argparse.ArgumentParser()
    add_optimize_arguments(parser)
    return parser.parse_args(list(argv))


def test_without_policy_or_search_the_cli_and_the_api_run_greedy(model_file, tmp_path):
    import json

    from xrlflow.cli_options import config_from
    from xrlflow.optimizer import OptimizeConfig

    assert config_from(OptimizeConfig, _parsed("m.onnx", "-o", "o.onnx", "--no-progress")) == \
        config_from(OptimizeConfig, {"no_progress": True}) == OptimizeConfig(search="greedy", progress=False)
    report = tmp_path / "r.json"
    assert _optimize(model_file, "-o", tmp_path / "o.onnx", "--report", report) == 0
    assert json.loads(report.read_text())["method"] == "greedy search"


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory):
    """A folder laid out as the installed xrlflow.checkpoints, holding a policy trained for a few steps on the
    current rule registry under the shipped name (the real shipped policy may predate today's registry)."""
    from xrlflow.costmodel import CostModel
    from xrlflow.onnx_io import load_graph
    from xrlflow.train import EnvConfig, PolicyConfig, TrainConfig, train

    folder = tmp_path_factory.mktemp("installed")
    config = TrainConfig(
        models=("attention-like",), steps=16, num_envs=1, n_steps=16, batch_size=8, n_epochs=1,
        env=EnvConfig(max_steps=4), policy=PolicyConfig(hidden=8, layers=1), checkpoint_every=16,
        run_name="xrlflow-h200", checkpoints_dir=str(folder / "checkpoints"), runs_dir=str(folder / "runs"),
        progress=False,
    )
    train(config, graphs=[("attention-like", load_graph(attention_like_model()))], latency=CostModel("cpu"))
    return folder / "checkpoints"


@pytest.fixture()
def installed(tiny_shipped, monkeypatch):
    import xrlflow.shipped as shipped

    monkeypatch.setattr(shipped, "shipped_checkpoints_dir", lambda: tiny_shipped)
    return tiny_shipped / "xrlflow-h200"


def test_policy_alone_is_the_shipped_policy():
    from xrlflow.optimize_cli import resolve_policy_flag
    from xrlflow.shipped import shipped_policy

    args = _parsed("m.onnx", "-o", "o.onnx", "--policy")
    assert args.policy == ""
    resolve_policy_flag(args)
    assert args.policy == str(shipped_policy("xrlflow-h200"))
    named = _parsed("m.onnx", "-o", "o.onnx", "--policy", "xrlflow-h200")
    resolve_policy_flag(named)
    assert named.policy == args.policy


@pytest.mark.parametrize("policy_flag", [["--policy", "checkpoints/xrlflow-h200"], ["--policy"]])
def test_the_readme_policy_path_works_outside_the_checkout(model_file, tmp_path, monkeypatch, installed, policy_flag):
    """`--policy checkpoints/xrlflow-h200` (the README's) or `--policy` alone, run from a folder without
    checkpoints/, finds the installed package's copy (tests/test_packaging.py checks that the wheel carries it),
    through the CLI and the Python API."""
    import json

    import xrlflow

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = tmp_path / "r.json"
    rc = _optimize(model_file, "-o", tmp_path / "o.onnx", "--rollouts", "0", "--steps", "3", "--report", report,
                   *policy_flag)
    assert rc == 0
    assert json.loads(report.read_text())["method"] == f"policy {installed}"
    result = xrlflow.optimize(model_file, policy="", latency="cost", rollouts=0, steps=3)
    assert result.report["method"] == f"policy {installed}" and result.report["verification"]["ok"]


# ---- the default output --------------------------------------------------------------------------------------------
def test_output_defaults_to_model_opt_onnx_beside_the_input(model_file, tmp_path, capsys):
    import hashlib

    before = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert _optimize(model_file) == 0
    written = tmp_path / "model.opt.onnx"
    assert f"wrote {written}" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(written))
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("model, output", [
    ("a/m.onnx", "a/m.opt.onnx"), ("m.ONNX", "m.opt.onnx"), ("a/m", "a/m.opt.onnx"), ("m.opt.onnx", "m.opt.opt.onnx"),
])
def test_default_output_names(model, output):
    from xrlflow.optimize_cli import default_output

    assert default_output(model) == output


# ---- --input-shape and input_shape= -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["x=1x64", "x:1,64", "x=1,64", "x:1x64", "x:1X64"])
def test_input_shape_flag_takes_both_spellings(spec):
    from xrlflow.onnx_io import parse_input_shapes

    assert parse_input_shapes([spec]) == {"x": (1, 64)}


def test_a_name_with_colons_keeps_them():
    from xrlflow.onnx_io import parse_input_shapes

    assert parse_input_shapes(["input:0:1,3", "ids:0=2x8"]) == {"input:0": (1, 3), "ids:0": (2, 8)}


@pytest.mark.parametrize("spec", ["x", "x=1x-3", "x:1,,3", ":1,3", "x=1.5x2"])
def test_bad_input_shape_flags_are_one_line(spec, tmp_path, model_file, capsys):
    assert _optimize(model_file, "-o", tmp_path / "o.onnx", "--input-shape", spec) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xrlflow: error: bad --input-shape {spec!r}") and "\n" not in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture()
def batch_model():
    """The attention-like model with a symbolic batch (8 when bound as the fixed model has it)."""
    model = attention_like_model()
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    return model


@pytest.mark.parametrize("dims", ["8x32", "8,32", (8, 32), [8, 32]])
def test_python_api_input_shape_takes_strings_and_sequences(batch_model, dims):
    import numpy as np

    import xrlflow

    dims = tuple(np.int64(d) for d in dims) if isinstance(dims, list) else dims
    result = xrlflow.optimize(batch_model, latency="cost", input_shape={"x": dims})
    assert result.report["config"]["input_shapes"] == {"x": [8, 32]} and result.report["verification"]["ok"]


@pytest.mark.parametrize("shapes, says", [
    ({"x": "8xa"}, "input_shape['x'] = '8xa'"), ({"x": (8, 0)}, "input_shape['x'] = (8, 0)"),
    ({"x": 8}, "input_shape['x'] = 8"), ({"x": (8.0, 32)}, "input_shape['x'] = (8.0, 32)"),
    ({3: (8, 32)}, "the key 3 is not an input name"),
])
def test_python_api_bad_input_shape_is_bad_input(batch_model, shapes, says):
    import xrlflow
    from xrlflow.errors import BadInputError

    with pytest.raises(BadInputError) as raised:
        xrlflow.optimize(batch_model, latency="cost", input_shape=shapes)
    assert says in str(raised.value)


# ---- flags checked before any work -------------------------------------------------------------------------------
def _refused_before_any_work(model_file, tmp_path, monkeypatch, capsys, *flags) -> str:
    """Run with `flags`; the optimisation must never start, nothing be written, and one line say why."""
    import xrlflow.optimizer as optimizer

    def no_work(*args, **kwargs):
        raise AssertionError("the optimisation started before the flags were checked")

    monkeypatch.setattr(optimizer, "optimize", no_work)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _optimize(model_file, *flags) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    err = capsys.readouterr().err.strip()
    assert err.startswith("xrlflow: error: ") and "\n" not in err
    return err


def test_a_chart_format_matplotlib_cannot_write_is_refused_first(model_file, tmp_path, monkeypatch, capsys):
    err = _refused_before_any_work(model_file, tmp_path, monkeypatch, capsys,
                                   "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--plot", tmp_path / "p.txt")
    assert "--plot" in err and "cannot write .txt" in err and ".png" in err and ".svg" in err


@pytest.mark.parametrize("case", ["no-folder", "read-only-folder", "same-file", "report-is-folder"])
def test_unwritable_outputs_are_refused_first(model_file, tmp_path, monkeypatch, capsys, case):
    if case == "read-only-folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    flags = {
        "no-folder": ["-o", tmp_path / "missing" / "o.onnx"],
        "read-only-folder": ["-o", locked / "o.onnx"],
        "same-file": ["-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx"],
        "report-is-folder": ["--report", locked],
    }[case]
    err = _refused_before_any_work(model_file, tmp_path, monkeypatch, capsys, *flags)
    said = {"no-folder": "does not exist", "read-only-folder": "not writable", "same-file": "name the same file",
            "report-is-folder": "is a folder"}[case]
    assert said in err


def test_a_folder_given_as_the_model_says_so(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    err = _refused_before_any_work(folder, tmp_path, monkeypatch, capsys)
    assert err == f"xrlflow: error: {folder} is a folder, not an ONNX file"
    onnx.save(attention_like_model(), folder / "model.onnx")
    err = _refused_before_any_work(folder, tmp_path, monkeypatch, capsys)
    assert err.endswith("is a folder, not an ONNX file (it holds model.onnx: give one of those)")


@pytest.mark.parametrize("command", [["measure", "{folder}", "--no-cache"], ["rules", "--model", "{folder}"]])
def test_other_commands_and_the_api_name_a_folder_too(tmp_path, command, capsys):
    import xrlflow
    from xrlflow.errors import BadInputError

    folder = tmp_path / "export"
    folder.mkdir()
    assert main([a.format(folder=folder) for a in command]) == 2
    assert capsys.readouterr().err.strip() == f"xrlflow: error: {folder} is a folder, not an ONNX file"
    with pytest.raises(BadInputError, match="is a folder, not an ONNX file"):
        xrlflow.optimize(str(folder))


# ---- the policy's target device ----------------------------------------------------------------------------------
@pytest.fixture()
def cuda_policy(tmp_path, installed):
    """The tiny policy, its run.json saying it was trained for cuda."""
    import json
    import shutil

    folder = tmp_path / "cuda-run"
    shutil.copytree(installed, folder)
    meta = json.loads((folder / "run.json").read_text())
    meta["train_config"]["device"] = "cuda"
    (folder / "run.json").write_text(json.dumps(meta))
    return folder


def test_a_policy_for_another_device_is_warned_about_before_the_search(model_file, tmp_path, cuda_policy, capsys):
    import json

    report = tmp_path / "r.json"
    assert _optimize(model_file, "--policy", cuda_policy, "--rollouts", "0", "--steps", "2", "--report", report) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    warned = [line for line in lines if "trained for --device cuda" in line]
    assert len(warned) == 1 and warned[0].startswith("xrlflow: warning: the policy ")
    assert "optimises for --device cpu" in warned[0]
    assert any("trained for --device cuda" in w for w in json.loads(report.read_text())["warnings"])


def test_a_policy_for_the_same_device_is_not_warned_about(model_file, tmp_path, cuda_policy, installed, capsys):
    from xrlflow.shipped import device_mismatch, policy_target_device

    assert policy_target_device(installed) == "cpu" and policy_target_device(cuda_policy / "policy.zip") == "cuda"
    assert device_mismatch(cuda_policy, "cuda") is None and device_mismatch(installed, "cpu") is None
    assert _optimize(model_file, "--policy", installed, "--rollouts", "0", "--steps", "2") == 0
    assert "trained for" not in capsys.readouterr().err
    assert policy_target_device(tmp_path / "nowhere") is None


# ---- the printed table ---------------------------------------------------------------------------------------------
def test_a_cost_model_estimate_is_printed_without_an_interval(model_file, tmp_path, capsys):
    assert _optimize(model_file, "-o", tmp_path / "o.onnx") == 0
    rows = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  latency")]
    assert [row.startswith(label) for row, label in zip(rows, ("latency before (cost-model estimate) ",
                                                                 "latency after  (cost-model estimate) "))] == [True, True]
    assert all("[" not in row and row.endswith(" ms") for row in rows)


def test_a_measured_latency_keeps_its_interval():
    from xrlflow.report import format_latency

    measured = {"ms": 1.5, "low_ms": 1.4, "high_ms": 1.6, "runs": 30, "source": "measured", "ok": True}
    assert format_latency(measured) == "1.5 ms [1.4, 1.6]"
    assert format_latency({**measured, "source": "cost-model", "low_ms": 1.5, "high_ms": 1.5}) == "1.5 ms"
    assert format_latency({**measured, "low_ms": 1.5, "high_ms": 1.5}) == "1.5 ms"


# ---- the chart -----------------------------------------------------------------------------------------------------
def _drawn_lines(fig) -> dict[str, list[tuple[float, float]]]:
    ax = fig.axes[0]
    return {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}


def test_the_chart_draws_one_line_per_rollout(model_file):
    import xrlflow
    from xrlflow.report import latency_chart, latency_figure

    report = xrlflow.optimize(str(model_file), search="random", rollouts=5, steps=3, latency="cost").report
    assert {r["rollout"] for r in report["history"]} == set(range(5))
    chart = latency_chart(report)
    assert list(chart.series) == [f"rollout {r}" for r in range(5)]
    start = report["latency"]["before"]["ms"]
    for rollout, points in enumerate(chart.series.values()):
        steps = [s for s, _ in points]
        assert points[0] == (0, start) and steps == list(range(len(points)))  # from the input, never a sawtooth
        assert [v for _, v in points[1:]] == [r["current_ms"] for r in report["history"] if r["rollout"] == rollout]
    lines = _drawn_lines(latency_figure(chart))
    assert [label for label in lines if label.startswith("rollout")] == list(chart.series)
    assert lines["graph kept"][0][1] == pytest.approx(min(r["best_ms"] for r in report["history"]))


def test_a_policy_chart_names_its_deterministic_rollout():
    from xrlflow.report import latency_chart

    history = [{"step": i + 1, "current_ms": 2.0 - 0.1 * i, "best_ms": 2.0 - 0.1 * i, "candidates": 3, "rollout": r}
               for r in range(3) for i in range(2)]
    report = {"history": history, "latency": {"before": {"ms": 2.1}}, "rewrites": [{}], "method": "policy p"}
    assert list(latency_chart(report).series) == ["rollout 0 (deterministic)", "rollout 1 (sampled)", "rollout 2 (sampled)"]


def test_many_rollouts_share_one_legend_entry():
    from xrlflow.report import latency_chart, latency_figure

    history = [{"step": r + 1, "current_ms": 1.0, "best_ms": 1.0, "candidates": 1, "rollout": r} for r in range(30)]
    report = {"history": history, "latency": {"before": {"ms": 2.0}}, "rewrites": [{}], "method": "random search"}
    legend = latency_figure(latency_chart(report)).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["rollouts (30)", "input model", "graph kept"]


def test_a_run_without_rewrites_draws_a_flat_line_and_says_so(unrunnable_model, tmp_path):
    import json

    from xrlflow.report import latency_chart, latency_figure

    report_path, plot = tmp_path / "r.json", tmp_path / "p.svg"
    assert _optimize(unrunnable_model, "-o", tmp_path / "o.onnx", "--report", report_path, "--plot", plot, "-q") == 0
    report = json.loads(report_path.read_text())
    assert report["rewrites"] == [] and report["history"] == []
    fig = latency_figure(latency_chart(report))
    (label, points), = _drawn_lines(fig).items()
    start = report["latency"]["before"]["ms"]
    assert label == "input model" and len(points) >= 2 and {v for _, v in points} == {start}
    assert points[0][0] < points[-1][0]  # a line, not a lone dot
    assert "no rewrite kept" in " ".join(t.get_text() for t in fig.axes[0].texts)
    assert plot.read_text().lstrip().startswith("<?xml") and "no rewrite kept" in plot.read_text()
