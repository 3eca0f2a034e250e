"""Commands that need no torch never import it, and `python -m xrlflow` is the `xrlflow` command."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.test_search import attention_like_model

# Runs the CLI's main in a fresh interpreter, then reports whether torch was ever imported.
_RUN = textwrap.dedent("""
    import sys
    from xrlflow.cli import main
    try:
        rc = main(sys.argv[1:])
    except SystemExit as done:  # --help, --version
        rc = done.code
    print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
    sys.exit(rc)
""")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import onnx

    path = tmp_path_factory.mktemp("imports") / "m.onnx"
    onnx.save(attention_like_model(), path)
    return path


@pytest.mark.parametrize("command", [
    ["rules"],
    ["optimize", "{model}", "-o", "{out}", "--search", "greedy", "--latency", "cost"],
    ["cache", "stats"],
    ["measure", "{model}", "--no-cache", "--max-seconds", "1", "--json"],
])
def test_commands_without_torch_never_import_it(command, model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("XRLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    args = [a.format(model=model_file, out=tmp_path / "out.onnx") for a in command]
    done = _run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO_TORCH", f"xrlflow {' '.join(command)} imported torch"


@pytest.mark.parametrize("command", [
    ["--help"], ["--version"], ["optimize", "--help"], ["rules", "--help"], ["measure", "--help"], ["zoo", "--help"],
])
def test_help_never_imports_torch(command):
    """`--help` stays fast: torch (about 2 s to import) is loaded only by the command that runs a policy."""
    done = _run_cli(*command)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO_TORCH", f"xrlflow {' '.join(command)} imported torch"


def test_the_check_sees_torch_when_a_command_imports_it():
    done = _run_cli("zoo", "list", "--small")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "TORCH_IMPORTED"


def test_python_m_xrlflow():
    done = subprocess.run([sys.executable, "-m", "xrlflow", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "optimize" in done.stdout and "rules" in done.stdout and "zoo" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "xrlflow", "optimize"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
