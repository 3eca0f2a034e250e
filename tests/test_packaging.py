"""The wheel carries every package, the shipped policy, the H200 table and the LICENSE; the shipped policy is
found from an installed wheel outside the checkout; onnxruntime comes from the `cpu` or `gpu` extra only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from xrlflow import runtime, shipped
from xrlflow.errors import BadInputError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"xrlflow": "xrlflow", "xrlflow/envs": "envs", "xrlflow/agents": "agents", "xrlflow/rules": "rules",
                "xrlflow/checkpoints": "checkpoints"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources: an in-tree build leaves build/lib behind, whose stale files a later
    # wheel would carry, and the checkout stays untouched.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("xrlflow-*.whl")
    return path


def _metadata(names: list[str], zf: zipfile.ZipFile):
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    return Parser().parsestr(zf.read(meta).decode())


def test_wheel_holds_every_module_the_policy_the_table_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for installed, source in PACKAGE_DIRS.items():
            expected = {f"{installed}/{p.name}" for p in (ROOT / source).glob("*.py")}
            assert f"{installed}/__init__.py" in expected
            assert expected <= set(names), sorted(expected - set(names))
        for name in shipped.SHIPPED_POLICIES:
            for file in shipped.SHIPPED_FILES:
                member = f"xrlflow/checkpoints/{name}/{file}"
                assert zf.read(member) == (ROOT / "checkpoints" / name / file).read_bytes()
        tables = [n for n in names if re.fullmatch(r"xrlflow/data/h200_.*\.json", n)]
        assert tables and {Path(n).name for n in tables} == {p.name for p in (ROOT / "xrlflow" / "data").glob("h200_*.json")}
        assert json.loads(zf.read(tables[0]))  # a readable table, not an LFS pointer
        (license_file,) = [n for n in names if re.search(r"\.dist-info/licenses/LICENSE$", n)]
        text = zf.read(license_file).decode()
        assert text == (ROOT / "LICENSE").read_text() and "Apache License" in text and "Version 2.0, January 2004" in text
        checkpoint_files = {n for n in names if n.startswith("xrlflow/checkpoints/")}
        shipped_members = {f"xrlflow/checkpoints/{n}/{f}" for n in shipped.SHIPPED_POLICIES for f in shipped.SHIPPED_FILES}
        assert checkpoint_files == shipped_members | {"xrlflow/checkpoints/__init__.py"}  # no training runs
        meta = _metadata(names, zf)
    assert meta["License-Expression"] == "Apache-2.0"


def test_onnxruntime_only_through_the_cpu_and_gpu_extras(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = _metadata(zf.namelist(), zf)
    assert {"cpu", "gpu", "test", "distributed"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not any(re.match(r"onnxruntime", r) for r in unconditional), unconditional
    assert any(re.match(r"onnxruntime>=[\d.]+; extra == \"cpu\"", r) for r in requires), requires
    assert any(re.match(r"onnxruntime-gpu>=[\d.]+; extra == \"gpu\"", r) for r in requires), requires
    assert not any("onnxruntime" in r for r in requires if 'extra == "test"' in r or 'extra == "distributed"' in r)


def test_pyproject_packages_each_shipped_file():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["xrlflow.checkpoints"] == "checkpoints"
    listed = set(config["package-data"]["xrlflow.checkpoints"])
    assert listed == {f"{n}/{f}" for n in shipped.SHIPPED_POLICIES for f in shipped.SHIPPED_FILES}


def test_installed_wheel_finds_the_shipped_policy_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, xrlflow\n"
        "from xrlflow.shipped import resolve_policy\n"
        "from xrlflow.agents import load_policy\n"
        "paths = [str(resolve_policy(s)) for s in (None, 'xrlflow-h200', 'checkpoints/xrlflow-h200', 'checkpoints/xrlflow-h200/policy.zip')]\n"
        "policy = load_policy(paths[2])\n"
        "print(json.dumps({'xrlflow': xrlflow.__file__, 'paths': paths, 'loaded': type(policy).__name__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["xrlflow"]).is_relative_to(site)  # the wheel's copy, not the checkout's
    folder = site / "xrlflow" / "checkpoints" / "xrlflow-h200"
    assert found["paths"] == [str(folder)] * 3 + [str(folder / "policy.zip")]
    assert found["loaded"] == "TrainedPolicy"


def test_resolve_policy(tmp_path, monkeypatch):
    default = shipped.shipped_policy()
    assert (default / "policy.zip").is_file() and (default / "run.json").is_file()
    assert shipped.resolve_policy(None) == shipped.resolve_policy("") == default
    monkeypatch.chdir(tmp_path)  # outside the checkout: checkpoints/xrlflow-h200 is not a path here
    assert shipped.resolve_policy("checkpoints/xrlflow-h200") == default
    assert shipped.resolve_policy("xrlflow-h200/policy.zip") == default / "policy.zip"
    own = tmp_path / "checkpoints" / "xrlflow-h200"
    own.mkdir(parents=True)
    assert shipped.resolve_policy("checkpoints/xrlflow-h200") == Path("checkpoints/xrlflow-h200")  # a real path wins
    with pytest.raises(BadInputError, match=r"^xrlflow-h100: no such policy .* \(did you mean 'xrlflow-h200'\?\); shipped: xrlflow-h200$"):
        shipped.resolve_policy("xrlflow-h100")
    with pytest.raises(BadInputError) as caught:
        shipped.resolve_policy("runs/mine")
    assert "did you mean" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(BadInputError, match="did you mean 'xrlflow-h200'"):
        shipped.shipped_policy("xrlflow_h200")


def test_onnxruntime_import_helper(monkeypatch):
    import onnxruntime

    assert runtime.import_onnxruntime() is onnxruntime
    assert "onnxruntime" in runtime.installed_onnxruntime_distributions() or "onnxruntime-gpu" in runtime.installed_onnxruntime_distributions()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    monkeypatch.setattr(runtime, "installed_onnxruntime_distributions", lambda: ())
    with pytest.raises(runtime.OnnxRuntimeMissingError) as caught:
        runtime.import_onnxruntime()
    assert str(caught.value) == "onnxruntime is not installed: pip install 'xrlflow[cpu]', or 'xrlflow[gpu]' for CUDA (one of the two, never both)"
    assert isinstance(caught.value, BadInputError)  # the CLI's one line and exit 2
    monkeypatch.setattr(runtime, "installed_onnxruntime_distributions", lambda: ("onnxruntime-gpu",))
    with pytest.raises(runtime.OnnxRuntimeMissingError, match=r"^onnxruntime is installed \(onnxruntime-gpu\) but cannot be imported: "):
        runtime.import_onnxruntime()


@pytest.mark.parametrize("installed, hint", [
    ((), "pip install 'xrlflow[gpu]'"),
    (("onnxruntime",), "pip uninstall -y onnxruntime && pip install 'xrlflow[gpu]'"),
    (("onnxruntime", "onnxruntime-gpu"), "onnxruntime and onnxruntime-gpu are installed side by side and share one module: "
                                         "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'xrlflow[gpu]'"),
])
def test_cuda_install_hint(installed, hint, monkeypatch):
    monkeypatch.setattr(runtime, "installed_onnxruntime_distributions", lambda: installed)
    assert runtime.cuda_install_hint() == hint


def test_setup_commands_install_the_cpu_extra():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[cpu]'" in readme
    assert "pip install -e '.[cpu,test,distributed]'" in readme and "pip install -q -e '.[cpu,test,distributed]'" in ci
    assert "pip install -e . " not in readme and "'.[test,distributed]'" not in readme + ci
