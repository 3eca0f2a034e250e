"""Measurement noise and cost: CV of repeated measurements, cost per unique graph, cache hit rate.

    .venv/bin/python bench/measure_noise.py                          # CPU -> bench/results/measure_cpu.md
    .venv/bin/python bench/measure_noise.py --device cuda --out $OUT/measure_cuda.md

- CV: the same BERT-like graph measured `--repeats` times from scratch (new session each time, no cache):
  coefficient of variation of the medians (target <= 3%), plus an interleaved A/A comparison.
- Cost per unique graph: wall time of `latency()` on distinct rewritten graphs with an empty cache (export,
  session creation and timing), and the number of timed runs the 1% CI target needed.
- Cache hits per second: in-process hits on the same graph value, and hits served by SQLite from a cache
  object that has not seen the key (another process's measurement).
- Cost-model speed on the full BERT-base graph (the <= a few ms target).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_costmodel import load_model, random_sequences  # noqa: E402

from xrlflow.costmodel import CostModel  # noqa: E402
from xrlflow.latency_cache import LatencyCache  # noqa: E402
from xrlflow.measure import MeasureConfig, MeasuredLatency, input_specs  # noqa: E402
from xrlflow.onnx_io import graph_to_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="bert-base:small", help="zoo model for the noise test")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--unique", type=int, default=20, help="distinct graphs for the cost-per-graph number")
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    graph = load_model(args.model)
    lines_extra: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = MeasureConfig(device=args.device, max_seconds=args.max_seconds, cache_path=str(Path(tmp) / "c.sqlite"))
        with MeasuredLatency(config) as service:
            model_bytes, specs = graph_to_bytes(graph), input_specs(graph)
            service.measure_model(model_bytes, specs)  # start the worker outside the numbers
            medians, runs, walls = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = service.measure_model(model_bytes, specs)
                walls.append(time.perf_counter() - t0)
                medians.append(r.ms)
                runs.append(r.runs)
            medians_arr = np.array(medians)
            cv = float(medians_arr.std(ddof=1) / medians_arr.mean())
            aa = service.compare(graph, graph)

            variants = random_sequences(args.model, graph, args.unique + 1, random.Random(1))[1:]
            t0 = time.perf_counter()
            unique_runs = []
            for s in variants:
                unique_runs.append(service.latency(s.graph).runs)
            per_graph = (time.perf_counter() - t0) / max(len(variants), 1)

            # cache hits: same graph value (in-process dict)
            service.latency(graph)
            n = 50000
            t0 = time.perf_counter()
            for _ in range(n):
                service.latency(graph)
            memory_rate = n / (time.perf_counter() - t0)
            keys = [service.cache_key(s.graph) for s in variants]
        with LatencyCache(Path(tmp) / "c.sqlite") as fresh:
            fresh.get(keys[0])
            rounds = 200
            t0 = time.perf_counter()
            for i in range(rounds):
                fresh._memory.clear()  # force the SQLite path every time
                for k in keys:
                    fresh.get(k)
            sqlite_rate = rounds * len(keys) / (time.perf_counter() - t0)
        device_label, provider, ort_version = service.device, config.provider, service.ort_version

    try:
        full = load_model("bert-base")
        variants_full = random_sequences("bert-base", full, 6, random.Random(2))
        model = CostModel("h200" if args.device == "cuda" else "cpu")
        model.latency(full)
        times = []
        for s in variants_full:
            t0 = time.perf_counter()
            model.latency(s.graph)
            times.append(time.perf_counter() - t0)
        lines_extra.append(
            f"| cost model, BERT-base ({len(full.nodes)} nodes), per rewritten graph | {np.median(times) * 1e3:.2f} ms median "
            f"(max {max(times) * 1e3:.2f} ms, {len(times)} graphs) | <= a few ms |"
        )
    except Exception as exc:  # the zoo needs torch for the first export; the number is optional
        lines_extra.append(f"| cost model, BERT-base | not run: {type(exc).__name__}: {exc} | |")

    command = "python bench/measure_noise.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"# Measurement noise and cost ({args.device})",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {device_label} ({platform.machine()}), {provider}, onnxruntime {ort_version}",
        f"- command: `{command.strip()}`",
        f"- graph: {args.model} ({len(graph.nodes)} nodes), median {np.mean(medians_arr):.4f} ms",
        "",
        "| quantity | value | target |",
        "|---|---|---|",
        f"| CV of {args.repeats} repeated measurements (fresh session each) | {cv * 100:.2f}% "
        f"(medians {medians_arr.min():.4f}-{medians_arr.max():.4f} ms, {int(np.median(runs))} runs each, "
        f"{np.median(walls):.2f} s each) | <= 3% |",
        f"| interleaved A/A ratio | {aa.ratio:.4f} (95% CI {aa.low:.4f}-{aa.high:.4f}, {aa.runs} cycles of 4 runs per graph) | 1.00 |",
        f"| cost per unique graph (export + session + timing) | {per_graph * 1e3:.0f} ms "
        f"(median {int(np.median(unique_runs))} timed runs, {len(variants)} graphs) | |",
        f"| cache hits per second, in-process (same graph value) | {memory_rate:,.0f} | >= 10,000 |",
        f"| cache hits per second, from SQLite (key not seen in-process) | {sqlite_rate:,.0f} | |",
        *lines_extra,
        "",
    ])
    print(text)
    out = Path(args.out or Path(__file__).parent / "results" / f"measure_{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
