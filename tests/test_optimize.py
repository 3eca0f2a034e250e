"""`xrlflow optimize` end to end with the cost model: a verified model and a report, refusals of bad input
(exit 2, nothing written, input untouched), and a deliberately broken rule caught by verification (exit 3,
nothing written, the report names the rewrite)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from tests.test_search import attention_like_model
from xrlflow.cli import main
from xrlflow.optimizer import OptimizeConfig, VerificationError, optimize
from xrlflow.search import SearchConfig
from xrlflow.verify import random_inputs, verify_models

MERGE_RULES = "merge-parallel-matmul,split-merged-matmul"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(attention_like_model(), path)
    return path


def _optimize(*args) -> int:
    return main(["optimize", *map(str, args), "--latency", "cost", "--no-progress"])


def test_optimize_writes_a_verified_model_and_report(model_file, tmp_path, capsys):
    out, report_path, plot = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "steps.png"
    before = _digest(model_file)
    rc = _optimize(model_file, "-o", out, "--search", "greedy", "--report", report_path, "--plot", plot)
    assert rc == 0
    assert _digest(model_file) == before
    optimised = onnx.load(out)
    onnx.checker.check_model(optimised, full_check=True)
    original = onnx.load(model_file)
    assert verify_models(original, optimised, seed=7).ok
    report = json.loads(report_path.read_text())
    assert report["written"] and report["verification"]["ok"]
    assert report["rewrites"] and report["rewrites_by_rule"]["merge-parallel-matmul"] >= 1
    first = report["rewrites"][0]
    assert first["rule"] and first["bound_nodes"] and first["nodes_before"] and first["nodes_after"]
    assert report["latency"]["after"]["ms"] < report["latency"]["before"]["ms"]
    assert report["op_counts"]["after"]["MatMul"] < report["op_counts"]["before"]["MatMul"]
    assert {o["name"] for o in report["verification"]["outputs"]} == {o.name for o in original.graph.output}
    assert all(o["max_abs_error"] <= 1e-4 for o in report["verification"]["outputs"])
    assert plot.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "merge-parallel-matmul" in printed


def test_python_api_with_given_inputs(tmp_path):
    model = attention_like_model()
    feeds = random_inputs(model, seed=5)
    np.savez(tmp_path / "feeds.npz", **feeds)
    result = optimize(model, OptimizeConfig(search="backtrack", latency="cost", search_config=SearchConfig(budget=6), inputs=str(tmp_path / "feeds.npz")))
    assert result.report["verification"]["inputs"].endswith("feeds.npz")
    assert verify_models(model, result.model, feeds).ok
    assert result.report["latency"]["speedup"] > 1.0


def test_output_equal_to_input_is_refused(model_file, capsys):
    before = _digest(model_file)
    rc = _optimize(model_file, "-o", model_file.parent / "." / model_file.name, "--search", "greedy")
    assert rc == 2
    assert "input model" in capsys.readouterr().err
    assert _digest(model_file) == before


def test_corrupt_model_is_refused_and_nothing_is_written(tmp_path, capsys):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04junk" + bytes(range(256)))
    before = _digest(bad)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    rc = _optimize(bad, "-o", out, "--search", "greedy", "--report", report)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("xrlflow: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx"]
    assert _digest(bad) == before


@pytest.mark.parametrize("extra", [
    ["--policy", "no/such/checkpoint"],
    ["--search", "greedy", "--inputs", "missing.npz"],
    ["--search", "greedy", "--rules", "no-such-rule"],
    ["--search", "greedy", "--input-shape", "nope=1x2"],
])
def test_bad_flags_exit_2_without_output(model_file, tmp_path, extra, capsys):
    out = tmp_path / "out.onnx"
    rc = _optimize(model_file, "-o", out, *extra)
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_inputs_file_with_wrong_names_is_refused(model_file, tmp_path):
    np.savez(tmp_path / "feeds.npz", not_an_input=np.zeros((8, 32), np.float32))
    out = tmp_path / "out.onnx"
    assert _optimize(model_file, "-o", out, "--search", "greedy", "--inputs", tmp_path / "feeds.npz") == 2
    assert not out.exists()


def test_a_broken_rewrite_is_caught_and_named(model_file, tmp_path, monkeypatch, capsys):
    import xrlflow.rules.merge_parallel_matmul as family

    real_concat = family.concat

    def concat_weights_in_the_wrong_order(edit, g, values, axis):
        # same shapes (all projections are square), so only the numbers tell: Q, K and V trade weights
        return real_concat(edit, g, list(values)[::-1] if axis == 1 else list(values), axis)

    monkeypatch.setattr(family, "concat", concat_weights_in_the_wrong_order)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    rc = _optimize(model_file, "-o", out, "--search", "greedy", "--rules", MERGE_RULES, "--report", report_path)
    assert rc == 3
    assert not out.exists()
    report = json.loads(report_path.read_text())
    assert not report["written"] and not report["verification"]["ok"]
    broken = report["broken_rewrite"]
    assert broken["rule"] == "merge-parallel-matmul" and broken["index"] == 1
    assert broken["bound_nodes"] == report["rewrites"][0]["bound_nodes"]
    assert "merge-parallel-matmul" in capsys.readouterr().err

    with pytest.raises(VerificationError) as caught:
        optimize(str(model_file), OptimizeConfig(search="greedy", latency="cost", rules=tuple(MERGE_RULES.split(","))))
    assert caught.value.report["broken_rewrite"]["rule"] == "merge-parallel-matmul"


# ---- the policy path -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A policy trained for a handful of steps (its quality is beside the point: the wiring is tested)."""
    from xrlflow.costmodel import CostModel
    from xrlflow.onnx_io import load_graph
    from xrlflow.train import EnvConfig, PolicyConfig, TrainConfig, train

    folder = tmp_path_factory.mktemp("policy")
    config = TrainConfig(
        models=("attention-like",), steps=16, num_envs=1, n_steps=16, batch_size=8, n_epochs=1,
        env=EnvConfig(max_steps=4), policy=PolicyConfig(hidden=8, layers=1), checkpoint_every=16, run_name="tiny", checkpoints_dir=str(folder / "checkpoints"),
        runs_dir=str(folder / "runs"), progress=False,
    )
    train(config, graphs=[("attention-like", load_graph(attention_like_model()))], latency=CostModel("cpu"))
    return folder / "checkpoints" / "tiny"


def test_policy_optimize_end_to_end(model_file, tmp_path, tiny_policy):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    rc = _optimize(model_file, "-o", out, "--policy", tiny_policy, "--rollouts", "2", "--steps", "4", "--report", report_path)
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["method"].startswith("policy") and report["verification"]["ok"]
    assert report["latency"]["after"]["ms"] <= report["latency"]["before"]["ms"]
    assert {r["rollout"] for r in report["history"]} <= {0, 1, 2}
    assert verify_models(onnx.load(model_file), onnx.load(out)).ok


def test_the_policy_search_is_handed_in_not_imported(model_file, tiny_policy):
    """The optimizer runs a policy through the `policy_searcher` it is given (the agent's), never its own."""
    from xrlflow.agents.policy_search import search_with_policy

    config = OptimizeConfig(policy=str(tiny_policy), latency="cost", search_config=SearchConfig(rollouts=1, steps=4))
    with pytest.raises(ValueError, match="policy_searcher"):
        optimize(str(model_file), config)
    calls = []

    def recording_searcher(*args):
        calls.append(args[0])
        return search_with_policy(*args)

    result = optimize(str(model_file), config, policy_searcher=recording_searcher)
    assert calls == [str(tiny_policy)] and result.report["method"].startswith("policy")


def _fake_checkpoint(folder, fingerprint: str, policy_bytes: bytes):
    folder.mkdir()
    (folder / "policy.zip").write_bytes(policy_bytes)
    (folder / "run.json").write_text(json.dumps({"rule_fingerprint": fingerprint, "env_config": {}}))
    return folder


@pytest.mark.parametrize("case", ["corrupt", "other-registry", "no-metadata"])
def test_unusable_policy_exits_2_and_writes_nothing(model_file, tmp_path, case, capsys, tiny_policy):
    from xrlflow.rules import RULE_FINGERPRINT

    if case == "corrupt":
        policy = _fake_checkpoint(tmp_path / "ckpt", RULE_FINGERPRINT, b"PK\x03\x04 this is not a zip archive")
    elif case == "other-registry":
        policy = _fake_checkpoint(tmp_path / "ckpt", "0123456789abcdef", (tiny_policy / "policy.zip").read_bytes())
    else:
        policy = tmp_path / "ckpt"
        policy.mkdir()
        (policy / "policy.zip").write_bytes((tiny_policy / "policy.zip").read_bytes())
    out = tmp_path / "out.onnx"
    rc = _optimize(model_file, "-o", out, "--policy", policy, "--report", tmp_path / "r.json")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("xrlflow: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "r.json").exists()
