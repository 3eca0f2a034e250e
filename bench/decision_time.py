"""Decision time (everything but the latency service) of the greedy search and the policy on BERT-base.

    python bench/decision_time.py [--model bert-base] [--policy checkpoints/RUN] [--steps 50] [--rollouts 4]

Decision time is the wall time of a search minus the time spent inside the latency service: matching,
applying rewrites, hashing, featurising and running the policy. The latency service is the CPU cost model
(deterministic, so every run takes the same path). Target: <= 5 s on the 2-core development machine.
Writes bench/results/decision_time.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from pathlib import Path
from xrlflow.measure import device_name

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 5.0




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert-base")
    p.add_argument("--small", action="store_true")
    p.add_argument("--policy", help="a policy checkpoint (default: the newest entry under checkpoints/, if any)")
    p.add_argument("--policy-note", default="", help="what the checkpoint is (written into the results)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rollouts", type=int, default=4, help="policy: sampled rollouts besides the greedy one")
    p.add_argument("--repeat", type=int, default=3, help="runs of each method (the median is reported)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "decision_time.md"))
    args = p.parse_args(argv)

    import onnxruntime
    import torch

    import xrlflow
    from xrlflow.costmodel import CostModel
    from xrlflow.onnx_io import load_graph
    from xrlflow.agents.policy_search import search_with_policy
    from xrlflow.report import markdown_table, write_json, write_text
    from xrlflow.rules import RULE_FINGERPRINT, default_engine
    from xrlflow.search import SearchConfig, run_search
    from xrlflow.zoo import export_model

    from xrlflow.testing import newest_checkpoint

    torch.set_num_threads(1)
    graph = load_graph(export_model(args.model, small=args.small))
    engine = default_engine()
    policy = newest_checkpoint(REPO / "checkpoints", args.policy)
    runs: dict[str, list] = {"greedy": []}
    for _ in range(args.repeat):
        service = CostModel("cpu")  # a fresh one per run: no warm per-kernel memo carried over
        runs["greedy"].append(run_search("greedy", graph, engine, service, SearchConfig(steps=args.steps)))
    if policy:
        runs["policy"] = []
        config = SearchConfig(steps=args.steps, rollouts=args.rollouts)
        for _ in range(args.repeat):
            runs["policy"].append(search_with_policy(policy, graph, engine, CostModel("cpu"), config))

    rows, data = [], {}
    for method, results in runs.items():
        decision = statistics.median(r.decision_seconds for r in results)
        latency = statistics.median(r.latency_seconds for r in results)
        steps = results[0].history
        label = "greedy search" if method == "greedy" else f"policy (greedy + {args.rollouts} sampled rollouts)"
        per_step = decision / max(1, len(steps))
        rows.append([
            label, f"{decision:.2f} s", f"{per_step * 1000:.0f} ms", str(len(steps)), str(len(results[0].applied)),
            str(results[0].latency_calls), f"{latency:.2f} s", f"{results[0].speedup:.3f}x",
            "yes" if decision <= TARGET_SECONDS else "NO",
        ])
        data[method] = {
            "decision_seconds": [r.decision_seconds for r in results], "latency_seconds": [r.latency_seconds for r in results],
            "steps": len(steps), "rewrites": len(results[0].applied), "latency_calls": results[0].latency_calls,
            "cost_model_speedup": results[0].speedup,
        }
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/decision_time.py", *sys.argv[1:]]),
        "machine": f"{device_name('cpu')}, {os.cpu_count()} cores",
        "versions": f"xrlflow {xrlflow.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        "model": f"{args.model}{' (small)' if args.small else ''}: {len(graph)} nodes, {len(engine.matches(graph))} matches at the start",
        "rules": f"{len(engine.rules)} rules, registry {RULE_FINGERPRINT}",
        "policy": f"{policy} {args.policy_note}".strip() if policy else "no policy checkpoint (none under checkpoints/)",
    }
    header = ["method", "decision time (median)", "per step", "steps", "rewrites kept", "graphs costed",
              "cost-model time", "cost-model speedup", f"<= {TARGET_SECONDS:g} s"]
    text = "\n".join([
        "# Decision time (excluding latency)",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- at most {args.steps} rewrites per path; latency service: the CPU cost model; median of {args.repeat} runs; "
        "torch and onnxruntime limited to one thread",
        "- decision time = wall time of the search minus the time inside the latency service (matching, applying, "
        "hashing, featurising, running the policy)",
        "",
        markdown_table(header, rows),
        "",
    ])
    out = Path(args.out)
    write_text(out, text)
    write_json(out.with_suffix(".json"), {"environment": env, "results": data})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
