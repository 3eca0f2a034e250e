"""What tests, bench/ and experiments/ share: zoo models in the form searches start from, random rewrite
sequences of them, the nodes onnxruntime keeps of a model after its own fusions, the newest checkpoint."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from pathlib import Path

from xrlflow.engine import prepare_for_search
from xrlflow.ir import Graph
from xrlflow.onnx_io import load_graph
from xrlflow.rules import CANONICAL_RULES
from xrlflow.rules.registry import default_engine

# memory re-labels: onnxruntime keeps them as nodes, but they launch no kernel
ALIASES = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape")


@dataclass
class Sample:
    """A graph reached by `steps` random rewrites (`rules`, comma-separated) of a zoo model, and its timings."""

    model: str
    steps: int
    rules: str
    graph: Graph
    measured_ms: float = float("nan")
    low_ms: float = float("nan")
    high_ms: float = float("nan")
    session_ms: tuple[float, ...] = ()


def load_model(spec: str) -> Graph:
    """`name` or `name:small` from the zoo, in the canonical form searches start from (BatchNorm folded)."""
    from xrlflow.zoo import export_model

    name, _, size = spec.partition(":")
    graph = load_graph(export_model(name, small=size == "small"))
    return prepare_for_search(graph, default_engine(), CANONICAL_RULES)


def random_sequences(name: str, graph: Graph, count: int, rng: random.Random, max_steps: int = 8) -> list[Sample]:
    """`graph` and up to `count - 1` distinct graphs reached from it by 1 to `max_steps` random rewrites."""
    engine = default_engine()
    seen = {graph.structural_hash()}
    samples = [Sample(name, 0, "", graph)]
    attempts = 0
    while len(samples) < count and attempts < count * 20:
        attempts += 1
        g, rules = graph, []
        for _ in range(rng.randint(1, max_steps)):
            matches = engine.matches(g)
            if not matches:
                break
            m = rng.choice(matches)
            g = engine.apply(g, m)
            rules.append(m.rule)
        h = g.structural_hash()
        if rules and h not in seen:
            seen.add(h)
            samples.append(Sample(name, len(rules), ",".join(rules), g))
    return samples


def onnxruntime_nodes(model: bytes, device: str, folder: str) -> collections.Counter:
    """Op counts of the nodes onnxruntime keeps after its graph optimisations (ORT_ENABLE_EXTENDED) on the
    device's execution provider, memory re-labels left out; `folder` receives the optimised model."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    ort.InferenceSession(model, options, providers=providers)
    nodes = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
    return collections.Counter(n.op_type for n in nodes if n.op_type not in ALIASES)


def newest_checkpoint(folder: Path, explicit: str | None = None) -> str | None:
    """`explicit` when given, else the most recently written entry of `folder` (None when there is none)."""
    if explicit:
        return explicit
    if not folder.is_dir():
        return None
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    return str(entries[-1]) if entries else None
