"""Cost-model speedups of a policy against greedy search on the graphs the policy was trained on.

    python bench/policy_vs_greedy.py --policy checkpoints/xrlflow-h200 [--steps 50] [--rollouts 4]
        [--only bert-base@b1s128,squeezenet@b8] [--out bench/results/policy_vs_greedy.md]

Rebuilds the training graphs from the run's run.json (zoo models at the run's shapes, its ONNX files), in the
form training saw them (canonical rules applied), and runs greedy search and the policy (one deterministic
and `--rollouts` sampled rollouts) on each with the latency service the policy was trained for (`--latency
cost --device cuda`: the bundled H200 table). No onnxruntime timing: these are the cost model's numbers.
Writes a markdown table and a .json beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default=str(REPO / "checkpoints" / "xrlflow-h200"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--only", default="", help="comma-separated training graph names (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "policy_vs_greedy.md"))
    args = p.parse_args(argv)

    import torch

    from xrlflow.agents import read_meta
    from xrlflow.agents.policy_search import search_with_policy
    from xrlflow.report import markdown_table, write_json, write_text
    from xrlflow.rules import default_engine
    from xrlflow.search import SearchConfig, greedy_search
    from xrlflow.services import make_latency_service
    from xrlflow.train import TrainConfig, load_zoo_graphs

    torch.set_num_threads(1)
    meta = read_meta(args.policy)
    train_cfg = TrainConfig.from_dict(meta["train_config"])
    graphs = load_zoo_graphs(train_cfg.models, train_cfg.small, train_cfg.batches, train_cfg.seqs)
    wanted = {n for n in args.only.split(",") if n}
    engine = default_engine()
    config = SearchConfig(steps=args.steps, rollouts=args.rollouts)
    rows, data = [], []
    for name, graph in graphs:
        if wanted and name not in wanted:
            continue
        service = make_latency_service(train_cfg.latency, train_cfg.device)
        started = time.perf_counter()
        greedy = greedy_search(graph, engine, service, config)
        greedy_s = time.perf_counter() - started
        service = make_latency_service(train_cfg.latency, train_cfg.device)
        started = time.perf_counter()
        policy = search_with_policy(args.policy, graph, engine, service, config, train_cfg.device)
        policy_s = time.perf_counter() - started
        ratio = policy.speedup / greedy.speedup
        rows.append([name, str(len(graph)), f"{greedy.speedup:.3f}x", str(len(greedy.applied)), f"{greedy_s:.1f} s",
                     f"{policy.speedup:.3f}x", str(len(policy.applied)), f"{policy_s:.1f} s", f"{ratio:.3f}"])
        data.append({"graph": name, "nodes": len(graph), "greedy_speedup": greedy.speedup,
                     "greedy_rewrites": len(greedy.applied), "greedy_seconds": greedy_s,
                     "policy_speedup": policy.speedup, "policy_rewrites": len(policy.applied),
                     "policy_seconds": policy_s, "policy_rules": [m.rule for m in policy.applied]})
        print(" | ".join(rows[-1]), flush=True)
    header = ["training graph", "nodes", "greedy", "rewrites", "greedy time", "policy", "rewrites", "policy time",
              "policy / greedy"]
    wins = sum(d["policy_speedup"] > d["greedy_speedup"] * 1.001 for d in data)
    losses = sum(d["policy_speedup"] < d["greedy_speedup"] / 1.001 for d in data)
    text = "\n".join([
        "# Policy vs greedy search on the training graphs (cost model)",
        "",
        f"- command: python bench/policy_vs_greedy.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"- policy: {args.policy} (rules {meta['rule_fingerprint']}, {meta.get('num_timesteps')} env steps)",
        f"- latency: {meta.get('latency_service')} (the service the policy was trained with); speedups are the cost "
        "model's, not measured",
        f"- search: greedy up to {args.steps} rewrites; policy: 1 deterministic + {args.rollouts} sampled rollouts",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch 1 thread",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- policy better than greedy (> 0.1%) on {wins} of {len(data)} graphs, worse on {losses}",
        "",
        markdown_table(header, rows),
        "",
    ])
    out = Path(args.out)
    write_text(out, text)
    write_json(out.with_suffix(".json"), {"policy": args.policy, "results": data})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
