"""Do greedy and backtracking reach the head-major attention layout? Zoo bert-base under the H200 cost model.

    .venv/bin/python -m bench.search_chains [--runs full:greedy:all full:backtrack:all:1000 layer:backtrack:chain:1000 ...]
        [--alpha 1.05] [--steps 400] [-o bench/results/search_chains.md]

A run is `graph:method:rules[:budget]`: graph `full` (bert-base, batch 1, seq 128, 12 layers) or `layer` (the same
cut to one layer, bench/enumerate_layer.py); method `greedy` or `backtrack` (xrlflow.search); rules `all` (every
registered rule), `nofuse` (all but the contrib-op attention fusions) or `chain` (the rules the head-major chain
is built from, tests/test_search_chains.py). Each run reports its search time, expansions, the predicted
speedup, the Transposes left in onnxruntime's optimised graph (CPU EP; 4 per layer before, 0 in the head-major
layout), how many layers that makes head-major, and how often each rule was applied.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import platform
import sys
import time
from dataclasses import dataclass

from xrlflow.atomic import write_bytes

# what bench/results/search_chains.md ran; full:backtrack:all:1000 takes about an hour on 2 cores (3.3 s per expansion)
DEFAULT_RUNS = ("layer:greedy:all", "layer:backtrack:all:1000", "layer:greedy:chain", "layer:backtrack:chain:1000",
                "layer:backtrack:nofuse:1000", "layer:backtrack:nofuse:3000", "layer:backtrack:all:3000",
                "full:greedy:all", "full:backtrack:all:100", "full:greedy:chain", "full:backtrack:chain:300")
FUSION_RULES = ("fuse-multihead-attention", "fuse-packed-qkv-attention")


class RunError(Exception):
    """A one-line reason why a run cannot be done."""


@dataclass(frozen=True)
class RunSpec:
    graph: str
    method: str
    rules: str
    budget: int

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ("full", "layer") or parts[1] not in ("greedy", "backtrack") \
                or parts[2] not in ("all", "nofuse", "chain"):
            raise RunError(f"bad run {text!r}: want full|layer:greedy|backtrack:all|nofuse|chain[:budget]")
        try:
            budget = int(parts[3]) if len(parts) == 4 else 1
        except ValueError:
            raise RunError(f"bad budget in {text!r}") from None
        if budget < 1:
            raise RunError(f"bad budget in {text!r}: must be >= 1")
        return cls(parts[0], parts[1], parts[2], budget)

    @property
    def label(self) -> str:
        return f"{self.graph}:{self.method}:{self.rules}" + (f":{self.budget}" if self.method == "backtrack" else "")


def engine_for(rules: str):
    from tests.test_search_chains import CHAIN_RULES
    from xrlflow.rules import default_engine, rule_names

    if rules == "all":
        return default_engine()
    if rules == "chain":
        return default_engine().restricted(CHAIN_RULES)
    return default_engine().restricted([r for r in rule_names() if r not in FUSION_RULES])


def load(graph: str):
    if graph == "full":
        from bench.chain_variants import zoo_graph

        return zoo_graph("bert-base", 1, 128)
    from bench.enumerate_layer import one_layer_graph

    return one_layer_graph("bert-base", 1, 128)


def run(spec: RunSpec, graphs: dict, args: argparse.Namespace) -> dict:
    from tests.test_rule_attention_layout_chain import ort_optimised_ops
    from xrlflow.costmodel import CostModel
    from xrlflow.onnx_io import to_model
    from xrlflow.search import SearchConfig, backtracking_search, greedy_search

    if spec.graph not in graphs:
        graphs[spec.graph] = load(spec.graph)
    graph = graphs[spec.graph]
    cost = CostModel.for_device("h200")
    config = SearchConfig(steps=args.steps, budget=spec.budget, alpha=args.alpha)
    search = greedy_search if spec.method == "greedy" else backtracking_search
    started = time.perf_counter()
    result = search(graph, engine_for(spec.rules), cost, config)
    seconds = time.perf_counter() - started
    layers = len(graph.by_op("Softmax"))
    ops = ort_optimised_ops(to_model(result.best, fold_constants=True))
    transposes = ops["Transpose"]
    fused = ops["Attention"] + ops["MultiHeadAttention"]
    best_at = next((h.step for h in result.history if abs(h.best_ms - result.best_latency.ms) < 1e-12), 0)
    return {
        "spec": spec, "seconds": seconds, "expansions": len(result.history), "best_at": best_at,
        "graphs": result.graphs_seen, "speedup": result.speedup, "input_ms": result.initial_latency.ms,
        "best_ms": result.best_latency.ms, "layers": layers, "transposes": transposes, "fused": fused,
        "rules": collections.Counter(m.rule for m in result.applied), "path": len(result.applied),
        "coverage": cost.table_coverage(graph),
    }


def render(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# Greedy and backtracking against the head-major attention layout (zoo bert-base, H200 cost model)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; machine: {platform.node()} "
        f"(2 shared CPU cores), total {seconds:.0f} s",
        f"- command: `python -m bench.search_chains {' '.join(sys.argv[1:])}`".rstrip(),
        f"- batch 1, seq 128; `full` = 12 layers, `layer` = cut to one; backtracking alpha {args.alpha}, at most "
        f"{args.steps} rewrites on a path; speedups predicted by `CostModel.for_device('h200')` over the input",
        "- Transposes: left in onnxruntime's optimised graph (CPU EP, ORT_ENABLE_ALL); the input has 4 per layer; a "
        "layer is head-major when its 4 are gone (layers with fused attention have none either: `fused`)",
        "",
        "| run | time | expansions | best found at | graphs priced | predicted speedup | Transposes left | head-major layers | fused attention | rewrites |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head_major = max(0, r["layers"] - r["fused"] - (r["transposes"] + 3) // 4)
        expansions = r["expansions"] if r["spec"].method == "backtrack" else f"{r['expansions']} steps"
        lines.append(
            f"| {r['spec'].label} | {r['seconds']:.0f} s | {expansions} | {r['best_at']} | {r['graphs']} | "
            f"{r['speedup']:.3f}x | {r['transposes']} | {head_major}/{r['layers']} | {r['fused']} | {r['path']} |"
        )
    lines += ["", "Rules applied on each run's path to its best graph:", ""]
    for r in rows:
        lines.append(f"- {r['spec'].label}: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["rules"].items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--steps", type=int, default=400, help="most rewrites on one path (greedy steps)")
    p.add_argument("-o", "--out", help="write the markdown report here (default: print it)")
    args = p.parse_args(argv)
    try:
        specs = [RunSpec.parse(text) for text in args.runs]
        if args.alpha < 1.0 or args.steps < 1:
            raise RunError("--alpha must be >= 1 and --steps >= 1")
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    graphs: dict = {}
    rows = []
    for spec in specs:
        row = run(spec, graphs, args)
        print(f"[{spec.label}] {row['seconds']:.0f} s, {row['speedup']:.3f}x, {row['transposes']} Transposes left, "
              f"{row['fused']} fused", flush=True)
        rows.append(row)
    text = render(rows, args, time.perf_counter() - started)
    if args.out:
        write_bytes(args.out, (text + "\n").encode())
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
