"""The package's rooms, read from the source (ast), so a violation is caught without importing anything:

- only the agent (`agents/`) and the training entry point import SB3, sb3-contrib, torch-geometric;
- only `envs/` and `agents/` (and those entry points) import gymnasium; torch only there and in the zoo;
- the search and the optimizer never import the agent (the policy search is handed in);
- the rules import nothing of the env, the agent or torch;
- no import cycle among xrlflow's modules.

Every import counts, module-level or inside a function: a lazy import keeps a heavy dependency from loading
until it is needed (torch for `xrlflow optimize --policy`), but it is still a dependency of the module, so
the rooms and the cycle check see it. Imports under `if TYPE_CHECKING:` never run and are left out.
(tests/test_cli_imports.py checks the other side at run time: which commands load torch.)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's source lives (pyproject.toml's package-dir)
PACKAGE_DIRS = {"xrlflow": "xrlflow", "xrlflow.agents": "agents", "xrlflow.envs": "envs", "xrlflow.rules": "rules",
                "xrlflow.checkpoints": "checkpoints"}
SCRIPTS = ("train.py", "evaluate.py")  # the repository root's entry points (`python train.py`, `python evaluate.py`)
TRAINING_ENTRY = ("xrlflow.train", "train.py", "evaluate.py")
RL_LIBRARIES = ("stable_baselines3", "sb3_contrib", "torch_geometric")


@dataclass(frozen=True)
class Import:
    importer: str  # module name, or a script's file name
    target: str  # the imported module (for `from m import name`: m.name when that is a module, else m)
    line: int
    lazy: bool  # inside a function

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.target}" + (" (in a function)" if self.lazy else "")


def module_files(root: Path = ROOT, package_dirs: dict[str, str] = PACKAGE_DIRS) -> dict[str, Path]:
    """Module name -> source file, for every module of the packages (a package is its __init__.py)."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _under_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _under_type_checking(child):
                continue
            inside = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the importer's package
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    found.append(Import(name, submodule if submodule in modules else base, child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def all_imports(root: Path = ROOT, package_dirs: dict[str, str] = PACKAGE_DIRS,
                scripts: tuple[str, ...] = SCRIPTS) -> tuple[dict[str, Path], list[Import]]:
    modules = module_files(root, package_dirs)
    found = [i for name, path in modules.items() for i in imports_of(name, path, modules)]
    found += [i for script in scripts if (root / script).is_file()
              for i in imports_of(script, root / script, modules)]
    return modules, found


def _top(target: str) -> str:
    return target.split(".")[0]


def _in(name: str, *rooms: str) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


def import_cycles(modules: dict[str, Path], found: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module, each sorted. A module importing itself is no
    cycle (measure_worker does, run as __main__, so that its results pickle under its module name)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for i in found:
        if i.importer in modules and i.target in modules and i.target != i.importer:
            edges[i.importer].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            connect(v)
    return cycles


def layer_violations(modules: dict[str, Path], found: list[Import]) -> list[str]:
    """Every import that breaks a room's rule (see the module docstring), as one line each."""
    problems = []
    for i in found:
        top, who = _top(i.target), i.importer
        if top in RL_LIBRARIES and not (_in(who, "xrlflow.agents") or who in TRAINING_ENTRY):
            problems.append(f"{i}: only agents/ and the training entry point use {top}")
        if top == "gymnasium" and not (_in(who, "xrlflow.agents", "xrlflow.envs") or who in TRAINING_ENTRY):
            problems.append(f"{i}: only envs/ and agents/ use gymnasium")
        if top == "torch" and not (_in(who, "xrlflow.agents", "xrlflow.zoo") or who in TRAINING_ENTRY):
            problems.append(f"{i}: the core is free of torch (only agents/, the zoo and training use it)")
        if who in ("xrlflow.search", "xrlflow.optimizer") and _in(i.target, "xrlflow.agents"):
            problems.append(f"{i}: the search and the optimizer are handed the policy, they never import the agent")
        if _in(who, "xrlflow.rules") and (_in(i.target, "xrlflow.envs", "xrlflow.agents") or top in ("torch", "gymnasium", *RL_LIBRARIES)):
            problems.append(f"{i}: the rules know nothing of the env, the agent or torch")
    return problems


# ---- the tree --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree():
    return all_imports()


def test_the_scan_sees_every_room(tree):
    modules, found = tree
    for expected in ("xrlflow.optimizer", "xrlflow.search", "xrlflow.agents.policy_search", "xrlflow.envs.padding",
                     "xrlflow.rules.registry", "xrlflow.zoo.export", "xrlflow.costmodel.model"):
        assert expected in modules
    # the lazy imports are there too (the policy search's torch, the CLI's agent)
    assert any(i.importer == "xrlflow.optimize_cli" and i.target == "xrlflow.agents.policy_search" and i.lazy for i in found)
    assert any(i.importer == "train.py" and i.target == "xrlflow.train" for i in found)


def test_each_room_imports_only_what_it_may(tree):
    problems = layer_violations(*tree)
    assert not problems, "\n".join(problems)


def test_there_is_no_import_cycle(tree):
    cycles = import_cycles(*tree)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# ---- the checks themselves, on a made-up tree ------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checks_catch_lazy_imports_relative_imports_and_cycles(tmp_path):
    _write(tmp_path, {
        "xrlflow/__init__.py": "",
        "xrlflow/search.py": "def run():\n    from xrlflow.agents import policy\n",
        "xrlflow/optimizer.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\nfrom . import search\n",
        "xrlflow/core.py": "def f():\n    import gymnasium\n    import stable_baselines3.common\n",
        "xrlflow/a.py": "from xrlflow import b\n",
        "xrlflow/b.py": "def late():\n    from .a import x\n",
        "agents/__init__.py": "",
        "agents/policy.py": "import torch\nimport sb3_contrib\n",
        "rules/__init__.py": "",
        "rules/r.py": "from xrlflow.envs import EnvConfig\n",
        "envs/__init__.py": "import gymnasium\n",
    })
    modules, found = all_imports(tmp_path, {"xrlflow": "xrlflow", "xrlflow.agents": "agents",
                                            "xrlflow.envs": "envs", "xrlflow.rules": "rules"}, ())
    problems = layer_violations(modules, found)
    assert any(p.startswith("xrlflow.search:2 imports xrlflow.agents.policy (in a function)") for p in problems)
    assert any(p.startswith("xrlflow.core:2 imports gymnasium") for p in problems)
    assert any(p.startswith("xrlflow.core:3 imports stable_baselines3.common") for p in problems)
    assert any(p.startswith("xrlflow.rules.r:1 imports xrlflow.envs") for p in problems)
    assert len(problems) == 4  # torch under TYPE_CHECKING, the agent's own libraries and the env's gymnasium pass
    assert import_cycles(modules, found) == [["xrlflow.a", "xrlflow.b"]]  # b's import is relative and lazy
