"""`xrlflow rules`: list the rule registry (its order is the agent's action layout), or the matches in a model."""

from __future__ import annotations

import argparse
import json


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="list the rewrite rules, or where they apply in a model")
    p.add_argument("--model", metavar="FILE", help="list the applicable rewrites in this ONNX model")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="bind symbolic input dims, e.g. ids=1x128")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_rules)


def run_rules(args: argparse.Namespace) -> int:
    from xrlflow.rules import RULE_FINGERPRINT, RULES, default_engine

    if args.model:
        from xrlflow.onnx_io import load_graph, parse_input_shapes

        graph = load_graph(args.model, parse_input_shapes(args.input_shape))
        matches = default_engine().matches(graph)
        counts = {r.name: 0 for r in RULES}
        for m in matches:
            counts[m.rule] += 1
        if args.json:
            print(json.dumps({
                "nodes": len(graph), "matches": len(matches), "by_rule": counts,
                "list": [{"rule": m.rule, "nodes": list(m.nodes)} for m in matches],
            }, indent=2))
        else:
            print(f"{args.model}: {len(graph)} nodes, {len(matches)} applicable rewrites")
            for name, n in counts.items():
                if n:
                    print(f"  {name:<34} {n}")
        return 0
    if args.json:
        print(json.dumps({
            "fingerprint": RULE_FINGERPRINT,
            "rules": [{"name": r.name, "reverse": r.reverse, "description": r.description} for r in RULES],
        }, indent=2))
        return 0
    width = max(len(r.name) for r in RULES)
    for r in RULES:
        print(f"{r.name:<{width}}  {r.description}")
    print(f"\n{len(RULES)} rules, fingerprint {RULE_FINGERPRINT}")
    return 0
