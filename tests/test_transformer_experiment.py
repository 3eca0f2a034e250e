"""experiments/transformer_speedup.py end to end on one small model: prepare (greedy, TASO backtracking with a
tiny budget, onnxruntime's optimizer), time on the CPU EP with minimal repeats (in a fresh process, which must
not load torch or transformers: the GPU machine has neither), and report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "transformer_speedup.py"
METHODS = ["greedy", "taso", "ort-opt"]


def _experiment():
    spec = importlib.util.spec_from_file_location("transformer_speedup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime.transformers")
    folder = tmp_path_factory.mktemp("experiment")
    code = _experiment().main(["prepare", "--dir", str(folder), "--small", "--models", "bert-xrl",
                               "--methods", *METHODS, "--taso-budget", "3"])
    assert code == 0
    return folder


def test_prepare_writes_a_self_contained_verified_set(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    entry = manifest["models"]["bert-xrl"]
    assert (prepared / entry["file"]).is_file() and entry["shape"].startswith("paper")
    assert set(entry["methods"]) == set(METHODS)
    for method, info in entry["methods"].items():
        assert info["verify"]["ok"], (method, info["verify"])
        assert (prepared / info["file"]).is_file()
    taso = entry["methods"]["taso"]
    assert taso["budget"] == 3 and taso["expansions"] == 3 and taso["stopped_by"] == "budget"
    assert entry["methods"]["greedy"]["rewrites"] > 0
    assert manifest["size_mb"] < 60 and "weights" in manifest
    assert "bert-base" in manifest["left_out"]  # what was not prepared is said
    assert entry["prepared"]["versions"]["onnxruntime"]


def test_a_method_prepared_again_keeps_the_others_and_both_commands(prepared):
    assert _experiment().main(["prepare", "--dir", str(prepared), "--small", "--models", "bert-xrl",
                               "--methods", "greedy"]) == 0
    entry = json.loads((prepared / "manifest.json").read_text())["models"]["bert-xrl"]
    assert set(entry["methods"]) == set(METHODS)
    commands = entry["prepared"]["commands"]
    assert len(commands) == 2 and "--taso-budget 3" in commands[0] and commands[1].endswith("--methods greedy")


def test_time_on_the_cpu_ep_without_torch_and_report(prepared, tmp_path):
    timing_path = tmp_path / "cpu.json"
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['transformer_speedup.py', 'time', '--dir', {str(prepared)!r}, '--json', {str(timing_path)!r}, "
        f"'--device', 'cpu', '--threads', '1', '--cycles', '2', '--runs', '2', '--warmup', '1', '--work', {str(tmp_path / 'work')!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print('LOADED', [m for m in ('torch', 'transformers', 'onnxruntime.transformers') if m in sys.modules])\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LOADED []" in run.stdout
    timing = json.loads(timing_path.read_text())
    assert timing["cuda_graph"] is False and "CPU EP" in timing["setting"]
    row = timing["models"]["bert-xrl"]
    assert set(row) == set(METHODS)
    for result in row.values():
        assert result["speedup"] > 0 and result["a_ms"] > 0 and result["speedup_low"] <= result["speedup"] <= result["speedup_high"]

    out = tmp_path / "results.md"
    assert _experiment().main(["report", "--dir", str(prepared), "--json", str(timing_path), "-o", str(out)]) == 0
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    for title in ("ORT alone (plain runs)", "ORT optimizer", "ORT optimizer fp16", "greedy", "TASO", "RL", "pipeline",
                  "pipeline fp16"):
        assert f"| {title} " in header + " ", title
    row_line = next(line for line in text.splitlines() if line.startswith("| bert-xrl"))
    assert "budget 3 spent" in row_line and row_line.count("x** [") == len(METHODS)
    assert "not prepared" in row_line  # the methods this test left out
    assert "transformer_speedup.py time" in text and "onnxruntime" in text and timing["date"] in text
