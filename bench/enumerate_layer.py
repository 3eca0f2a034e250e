"""Enumerate one transformer layer under the current rules and compare the best graph with greedy's.

    .venv/bin/python -m bench.enumerate_layer [--models bert-base gpt2 ...] [--max-graphs 20000] [--max-depth 30]
        [--profile h200] [-o bench/results/enumerate_layer.md]

Per model family, the zoo model (full dims, batch 1, its default sequence) is cut to one layer (each
TransformerStack keeps its first block; the transducer keeps one audio and one label layer) and brought to the
canonical form searches start from. A breadth-first enumeration then visits distinct graphs (dedup by structural
hash) until `--max-graphs` are known or no graph within `--max-depth` rewrites is left; every graph is priced
by the cost model. It reports per family: graphs found (and whether the space was exhausted), the best graph's
predicted latency against greedy's, the depth of the best graph's chain (its shortest path from the input),
the rules on that chain, and whether that chain passes through a step predicted slower than its predecessor (a
delayed reward). Because the shortest chain is only one of the ways to the best graph, it also says whether any
path among the enumerated graphs reaches the best graph without ever getting slower.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from xrlflow.atomic import write_bytes

REPO = Path(__file__).resolve().parents[1]
LAYER_FAMILIES = ("bert-base", "gpt2", "mini-dalle", "transformer-transducer", "vit-base")


class EnumerationError(Exception):
    """A one-line reason why the enumeration cannot run."""


# ---- one-layer graphs (also used by bench/search_chains.py and tests/test_search_chains.py) ----------------
def one_layer_model(name: str, batch: int = 1, seq: int | None = None):
    """The zoo model `name` (full dims) with each TransformerStack cut to one block, exported with the
    zoo's settings (TorchScript exporter, opset, seeded weights and inputs)."""
    from torch import nn

    from xrlflow.zoo.export import _export_onnx
    from xrlflow.zoo.registry import build_model, get_entry
    from xrlflow.zoo.transformer_models import TransformerStack

    if not get_entry(name).takes_seq:
        seq = None
    built = build_model(name, small=False, batch=batch, seq=seq)
    stacks = [m for m in built.module.modules() if isinstance(m, TransformerStack)]
    if not stacks:
        raise EnumerationError(f"{name} has no transformer stack to cut to one layer")
    for stack in stacks:
        stack.blocks = nn.ModuleList(list(stack.blocks)[:1])
    with tempfile.TemporaryDirectory() as work:
        return _export_onnx(built, Path(work))


def one_layer_graph(name: str, batch: int = 1, seq: int | None = None):
    """`one_layer_model` as an IR graph after the canonical rules (what a search starts from)."""
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import load_graph
    from xrlflow.rules import CANONICAL_RULES, default_engine

    return prepare_for_search(load_graph(one_layer_model(name, batch, seq)), default_engine(), CANONICAL_RULES)


# ---- the enumeration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnumerationConfig:
    max_graphs: int = 30000  # distinct graphs to know at most (the input included)
    max_depth: int = 30  # rewrites from the input at most


@dataclass
class Enumeration:
    """The enumerated graphs: index 0 is the input; parent/rule give each graph's shortest chain."""

    graphs: list = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)
    edges: list[list[int]] = field(default_factory=list)  # children of each expanded graph (all, seen or new)
    expanded: int = 0
    capped: bool = False  # stopped at max_graphs with graphs left to expand
    depth_cut: bool = False  # some graph at max_depth had rewrites left
    seconds: float = 0.0

    def chain(self, index: int) -> list[int]:
        path = [index]
        while path[-1] != 0:
            path.append(self.parent[path[-1]])
        return path[::-1]

    def best(self) -> int:
        return min(range(len(self.graphs)), key=lambda i: (self.latency_ms[i], self.depth[i]))

    def reachable_without_slowdown(self, target: int) -> bool:
        """Whether some path over enumerated edges reaches `target` with every step no slower than the last."""
        seen, frontier = {0}, [0]
        while frontier:
            node = frontier.pop()
            if node == target:
                return True
            for child in self.edges[node] if node < len(self.edges) else ():
                if child not in seen and self.latency_ms[child] <= self.latency_ms[node]:
                    seen.add(child)
                    frontier.append(child)
        return False


def enumerate_graphs(graph, engine, service, config: EnumerationConfig = EnumerationConfig()) -> Enumeration:
    """Breadth-first over distinct graphs (structural hash), each priced by `service`."""
    from xrlflow.trajectory import latency_ms, try_apply

    started = time.perf_counter()
    result = Enumeration()
    index: dict[str, int] = {}

    def add(g, depth: int, parent: int, rule: str) -> int:
        index[g.structural_hash()] = len(result.graphs)
        result.graphs.append(g)
        result.latency_ms.append(latency_ms(service.latency(g)))
        result.depth.append(depth)
        result.parent.append(parent)
        result.rule.append(rule)
        return len(result.graphs) - 1

    add(graph, 0, 0, "")
    queue = collections.deque([0])
    while queue:
        node = queue.popleft()
        matches = engine.matches(result.graphs[node])
        if result.depth[node] >= config.max_depth:
            result.depth_cut = result.depth_cut or bool(matches)
            result.edges.append([])
            continue
        children: list[int] = []
        for match in matches:
            child = try_apply(engine, result.graphs[node], match)
            if child is None:
                continue
            known = index.get(child.structural_hash())
            if known is None:
                if len(result.graphs) >= config.max_graphs:
                    result.capped = True
                    continue
                known = add(child, result.depth[node] + 1, node, match.rule)
                queue.append(known)
            children.append(known)
        result.edges.append(children)
        result.expanded += 1
        if result.capped:
            break  # the rest of the queue stays unexpanded: expanding it would only add edges
    # graphs never expanded (cap) get no edges; keep `edges` indexable by graph
    result.edges.extend([] for _ in range(len(result.graphs) - len(result.edges)))
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class FamilyReport:
    name: str
    nodes: int
    table_coverage: float
    input_ms: float
    greedy_ms: float
    greedy_steps: int
    greedy_rules: dict[str, int]
    enumeration: Enumeration
    best: int
    chain: list[int]
    delayed_reward: bool
    monotone: bool


def run_family(name: str, profile: str, config: EnumerationConfig) -> FamilyReport:
    from xrlflow.costmodel import CostModel
    from xrlflow.rules import default_engine
    from xrlflow.search import SearchConfig, greedy_search

    engine = default_engine()
    model = CostModel.for_device(profile)
    graph = one_layer_graph(name)
    greedy = greedy_search(graph, engine, model, SearchConfig(steps=200))
    enumeration = enumerate_graphs(graph, engine, model, config)
    best = enumeration.best()
    chain = enumeration.chain(best)
    lat = enumeration.latency_ms
    delayed = any(lat[b] > lat[a] for a, b in zip(chain, chain[1:]))
    return FamilyReport(
        name=name, nodes=len(graph.nodes), table_coverage=model.table_coverage(graph), input_ms=lat[0],
        greedy_ms=greedy.best_latency.ms, greedy_steps=len(greedy.applied),
        greedy_rules=dict(collections.Counter(m.rule for m in greedy.applied)), enumeration=enumeration, best=best,
        chain=chain, delayed_reward=delayed, monotone=enumeration.reachable_without_slowdown(best),
    )


def render(reports: list[FamilyReport], args: argparse.Namespace, seconds: float) -> str:
    from xrlflow.rules import rule_names

    lines = [
        "# One transformer layer, enumerated under the current rules",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; machine: {platform.node()} "
        f"({platform.processor() or platform.machine()}), {len(rule_names())} rules; total {seconds:.0f} s",
        f"- command: `python -m bench.enumerate_layer {' '.join(sys.argv[1:])}`".rstrip(),
        f"- cost model profile `{args.profile}` (the bundled H200 table); batch 1, each family's default sequence; the "
        "zoo model with each TransformerStack cut to its first block (transducer: one audio + one label layer), "
        "after the canonical rules",
        f"- breadth-first over distinct graphs (structural hash); cap {args.max_graphs} graphs, depth limit "
        f"{args.max_depth}; greedy: xrlflow.search.greedy_search (strict improvements, up to 200 steps)",
        "- speedups are predicted, over the input layer; `delayed` = the best graph's shortest chain passes through "
        "a step predicted slower than its predecessor; `monotone path` = some path over the enumerated graphs reaches "
        "the best graph without a slower step",
        "",
        "| family | nodes | table coverage | graphs | expanded | exhausted | deepest | time | input ms | greedy | best | best/greedy | best depth | delayed | monotone path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        e = r.enumeration
        exhausted = "yes" if not (e.capped or e.depth_cut) else ("no (cap)" if e.capped else "no (depth)")
        best_ms = e.latency_ms[r.best]
        lines.append(
            f"| {r.name} | {r.nodes} | {r.table_coverage:.2f} | {len(e.graphs)} | {e.expanded} | {exhausted} | "
            f"{max(e.depth)} | {e.seconds:.0f} s | {r.input_ms:.4f} | {r.input_ms / r.greedy_ms:.3f}x "
            f"({r.greedy_steps} steps) | {r.input_ms / best_ms:.3f}x | {r.greedy_ms / best_ms:.3f}x | "
            f"{len(r.chain) - 1} | {'yes' if r.delayed_reward else 'no'} | {'yes' if r.monotone else 'no'} |"
        )
    lines.append("")
    for r in reports:
        e = r.enumeration
        lines.append(f"## {r.name}")
        lines.append("")
        lines.append(f"- greedy's rules: {', '.join(f'{k} x{v}' for k, v in sorted(r.greedy_rules.items())) or 'none'}")
        steps = []
        for a, b in zip(r.chain, r.chain[1:]):
            slower = " (slower)" if e.latency_ms[b] > e.latency_ms[a] else ""
            steps.append(f"{e.rule[b]} {e.latency_ms[b]:.4f}{slower}")
        lines.append(f"- best graph's shortest chain (predicted ms after each step): input {e.latency_ms[0]:.4f} -> "
                     + " -> ".join(steps))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(LAYER_FAMILIES), choices=LAYER_FAMILIES)
    p.add_argument("--max-graphs", type=int, default=EnumerationConfig.max_graphs)
    p.add_argument("--max-depth", type=int, default=EnumerationConfig.max_depth)
    p.add_argument("--profile", default="h200")
    p.add_argument("-o", "--out", help="write the markdown report here (default: print it)")
    args = p.parse_args(argv)
    if args.max_graphs < 1 or args.max_depth < 0:
        print("error: --max-graphs must be >= 1 and --max-depth >= 0", file=sys.stderr)
        return 2
    started = time.perf_counter()
    config = EnumerationConfig(args.max_graphs, args.max_depth)
    reports = []
    try:
        for name in args.models:
            report = run_family(name, args.profile, config)
            e = report.enumeration
            print(f"[{name}] {len(e.graphs)} graphs in {e.seconds:.0f} s; greedy {report.greedy_ms:.4f} ms, best "
                  f"{e.latency_ms[report.best]:.4f} ms at depth {len(report.chain) - 1}", flush=True)
            reports.append(report)
    except EnumerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = render(reports, args, time.perf_counter() - started)
    if args.out:
        write_bytes(args.out, (text + "\n").encode())
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
