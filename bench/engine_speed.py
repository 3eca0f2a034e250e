"""Engine speed on real graphs: matches, time to enumerate them, time per apply + hash, peak memory.

    python bench/engine_speed.py [--models bert-base,resnext50] [--repeat 20]

Targets (issue 2, 2-core machine): enumerate <= 50 ms and apply + hash <= 5 ms on BERT-base.
Writes bench/results/engine_speed.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
import tracemalloc
from pathlib import Path

import onnx

from xrlflow.onnx_io import load_graph
from xrlflow.rules import RULES, default_engine
from xrlflow.zoo import export_model
from xrlflow.measure import device_name




def bench_model(name: str, repeat: int) -> dict:
    model = export_model(name)
    t0 = time.perf_counter()
    graph = load_graph(model)
    load_s = time.perf_counter() - t0
    engine = default_engine()
    enum_times = []
    for _ in range(repeat):
        graph.memo().clear()  # drop memoised matches so each run enumerates from scratch
        t = time.perf_counter()
        matches = engine.matches(graph)
        enum_times.append(time.perf_counter() - t)
    by_rule: dict[str, int] = {}
    for m in matches:
        by_rule[m.rule] = by_rule.get(m.rule, 0) + 1
    apply_times = []
    for m in matches[: max(1, min(len(matches), 200))]:
        t = time.perf_counter()
        new = engine.apply(graph, m)
        new.structural_hash()
        apply_times.append(time.perf_counter() - t)
    tracemalloc.start()
    g2 = load_graph(model)
    for m in engine.matches(g2)[:20]:
        engine.apply(g2, m).structural_hash()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "model": name, "nodes": len(graph), "matches": len(matches), "by_rule": by_rule,
        "load_s": load_s,
        "enum_ms_median": 1e3 * statistics.median(enum_times),
        "enum_ms_spread": (1e3 * min(enum_times), 1e3 * max(enum_times)),
        "apply_hash_ms_median": 1e3 * statistics.median(apply_times) if apply_times else float("nan"),
        "apply_hash_ms_spread": (1e3 * min(apply_times), 1e3 * max(apply_times)) if apply_times else (0, 0),
        "applies": len(apply_times),
        "peak_mib": peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="bert-base,resnext50")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default="bench/results/engine_speed.md")
    args = parser.parse_args()
    rows = [bench_model(n, args.repeat) for n in args.models.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Engine speed",
        "",
        f"- date: {datetime.date.today()}; commit {commit}",
        f"- machine: {device_name('cpu')}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, Python {platform.python_version()}, onnx {onnx.__version__}",
        f"- command: `python bench/engine_speed.py --models {args.models} --repeat {args.repeat}`",
        f"- rules: {len(RULES)} registered",
        "- enumerate = all matches of all rules from scratch (memo cleared); apply + hash = one rewrite and the",
        "  canonical hash of the new graph, over the first 200 matches; peak = tracemalloc peak while loading the",
        "  graph and applying 20 rewrites (weights are shared, so this is the IR's own overhead).",
        "",
        "| model | nodes | matches | enumerate ms (median, min-max) | apply+hash ms (median, min-max) | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['matches']} | {r['enum_ms_median']:.1f} ({r['enum_ms_spread'][0]:.1f}-{r['enum_ms_spread'][1]:.1f}) "
            f"| {r['apply_hash_ms_median']:.2f} ({r['apply_hash_ms_spread'][0]:.2f}-{r['apply_hash_ms_spread'][1]:.2f}) | {r['peak_mib']:.1f} |"
        )
    lines += ["", "Matches by rule:", ""]
    for r in rows:
        lines.append(f"- {r['model']}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_rule"].items())))
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
