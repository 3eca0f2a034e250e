"""`xrlflow rules`: list the rule registry (its order is the agent's action layout)."""

from __future__ import annotations

import argparse
import json


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="list the rewrite rules")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_rules)


def run_rules(args: argparse.Namespace) -> int:
    from xrlflow.rules import RULE_FINGERPRINT, RULES

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
