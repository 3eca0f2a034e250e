"""Measurement throughput of the Ray measurement pool: unique graphs per second at 1, 2, 4 ... workers.

The graphs are a zoo model and graphs a few rewrites away (what training measures), all distinct by hash; every
worker count measures the same set from an empty cache with a fixed number of timed runs per graph (so the
work per graph is the same at every width). Pool start-up (and each actor's first measurement, which starts its worker process) is excluded; session creation is included.

    # CPU, this machine (1 intra-op thread per worker; Ray bound to loopback in a private network namespace):
    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python bench/ray_throughput.py --workers 1,2,4'
    # GPUs (one actor per whole GPU), e.g. on a 2-GPU machine with ray and onnxruntime-gpu on PYTHONPATH:
    PYTHONPATH=/wheels/site-packages:. python bench/ray_throughput.py --device cuda --workers 1,2 --graphs 48

Writes a markdown table (machine, date, command) to --out, and one JSON line per width to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    workers: tuple[int, ...] = (1, 2, 4)
    model: str = "bert-base"
    small: bool = True
    graphs: int = 16
    runs: int = 1000  # timed runs per graph (fixed: no CI-based early stop)
    warmup: int = 5


def unique_graphs(model: str, small: bool, count: int):
    """The model and graphs a few rewrites away (breadth first), distinct by structural hash, at most `count`."""
    from xrlflow.onnx_io import load_graph
    from xrlflow.rules import default_engine
    from xrlflow.zoo import export_model

    engine = default_engine()
    base = load_graph(export_model(model, small=small))
    graphs, seen, frontier = [base], {base.structural_hash()}, [base]
    while frontier and len(graphs) < count:
        next_frontier = []
        for parent in frontier:
            for match in engine.matches(parent):
                if len(graphs) >= count:
                    return graphs
                try:
                    graph = engine.apply(parent, match)
                except Exception:  # a refused rewrite is simply not part of the set
                    continue
                if graph.structural_hash() not in seen:
                    seen.add(graph.structural_hash())
                    graphs.append(graph)
                    next_frontier.append(graph)
        frontier = next_frontier
    return graphs


def measure_width(cfg: BenchConfig, graphs, warmup_graphs, workers: int) -> dict[str, float]:
    from xrlflow.measure_pool import MeasurementPool, PoolConfig
    from xrlflow.measure import MeasureConfig

    with tempfile.TemporaryDirectory() as folder:
        measure = MeasureConfig.create(device=cfg.device, warmup_runs=cfg.warmup, min_runs=cfg.runs, max_runs=cfg.runs,
                                max_seconds=600.0, target_rel_ci=0.0, cache_path=str(Path(folder) / "latency.sqlite"))
        with MeasurementPool(PoolConfig(measure, workers=workers)) as pool:
            pool.latencies(warmup_graphs[:workers])  # one graph per actor: starts every worker process
            dispatched = pool.stats().dispatched
            start = time.perf_counter()
            results = pool.latencies(graphs)
            seconds = time.perf_counter() - start
            stats = pool.stats()
    failed = sum(not r.ok for r in results)
    if failed:
        raise SystemExit(f"{failed} of {len(graphs)} measurements failed: {next(r.reason for r in results if not r.ok)}")
    return {"workers": workers, "graphs": len(graphs), "seconds": seconds, "graphs_per_s": len(graphs) / seconds,
            "dispatched": stats.dispatched - dispatched}


def machine(device: str) -> str:
    from xrlflow.measure import device_name

    cpu = f"{device_name('cpu')}, {os.cpu_count()} logical CPUs"
    return f"{cpu}, {device_name('cuda')} GPUs" if device == "cuda" else cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    p.add_argument("--model", default="bert-base")
    p.add_argument("--full", action="store_true", help="the zoo model's full size (default: its small variant)")
    p.add_argument("--graphs", type=int, default=16)
    p.add_argument("--runs", type=int, default=1000, help="timed runs per graph")
    p.add_argument("--ray-address", default="local")
    p.add_argument("--out", default=None, help="markdown results file (appends a section)")
    args = p.parse_args(argv)
    bench = BenchConfig(args.device, tuple(int(w) for w in args.workers.split(",")), args.model, not args.full,
                        args.graphs, args.runs)
    from xrlflow.ray_session import RayConfig, RaySession

    everything = unique_graphs(bench.model, bench.small, bench.graphs + max(bench.workers))
    graphs, warmup_graphs = everything[:bench.graphs], everything[bench.graphs:]
    if len(warmup_graphs) < max(bench.workers):
        raise SystemExit(f"{bench.model} has too few distinct one-step rewrites; lower --graphs")
    cpus = max(bench.workers) if bench.device == "cpu" else None
    rows = []
    with RaySession(RayConfig(address=args.ray_address, num_cpus=cpus, object_store_memory=200 << 20)):
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        for workers in bench.workers:
            row = measure_width(bench, graphs, warmup_graphs, workers)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]["graphs_per_s"]
    lines = [
        f"## {bench.device.upper()}: {bench.model}{' (small)' if bench.small else ''}, {len(graphs)} unique graphs, "
        f"{bench.runs} timed runs each",
        "",
        f"- machine: {machine(bench.device)}; Ray cluster GPUs: {gpus}; python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python bench/ray_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| workers | seconds | unique graphs/s | speedup vs 1st row |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['workers']} | {row['seconds']:.2f} | {row['graphs_per_s']:.2f} | "
                     f"{row['graphs_per_s'] / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.write("\n" + text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
