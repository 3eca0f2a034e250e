"""Measurement noise and cost: CV of repeated measurements, cost per unique graph, cache hit rate.

    .venv/bin/python bench/measure_noise.py                          # CPU -> bench/results/measure_cpu.md
    .venv/bin/python bench/measure_noise.py --device cuda --out $OUT/measure_cuda.md

- CV: the same graph measured `--repeats` times from scratch (new session(s) each time, no cache):
  coefficient of variation of the medians (target <= 3% CPU, <= 1% GPU). `--variant NAME:key=value,...`
  adds measurement designs (MeasureConfig fields; `pin_cpu=auto` is the last CPU this process may use),
  measured round-robin with the others so drift hits all alike; `--noise-models` repeats it on more models.
  The first variant is the one every other number below uses; `--aa-repeats` interleaved A/A comparisons.
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

from xrlflow.costmodel import CostModel
from xrlflow.latency_cache import LatencyCache
from xrlflow.measure import MeasureConfig, MeasuredLatency, input_specs, parse_pin_cpu
from xrlflow.onnx_io import graph_to_bytes
from xrlflow.testing import load_model, random_sequences


def parse_variant(text: str) -> tuple[str, dict]:
    """`name` or `name:key=value,key=value` -> (name, MeasureConfig overrides)."""
    import dataclasses

    name, _, spec = text.partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(MeasureConfig)}
    overrides: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"measure_noise: unknown MeasureConfig field {key!r} in variant {text!r}")
        if key == "pin_cpu":
            overrides[key] = parse_pin_cpu(value)
        elif key == "cuda_graph":
            overrides[key] = value in ("1", "true", "yes")
        elif key in ("sessions", "min_runs", "max_runs", "warmup_runs"):
            overrides[key] = int(value)
        elif key in ("max_seconds", "target_rel_ci"):
            overrides[key] = float(value)
        else:
            overrides[key] = value
    return name, overrides


def noise_rows(graph, model: str, variants: list[tuple[str, dict]], base: dict, repeats: int, tmp: str) -> list[str]:
    """CV of `repeats` fresh measurements per variant, variants interleaved round by round."""
    model_bytes, specs = graph_to_bytes(graph), input_specs(graph)
    services = [MeasuredLatency(MeasureConfig.create(**{**base, **over, "cache_path": ""})) for _, over in variants]
    results: list[list] = [[] for _ in variants]
    walls: list[list[float]] = [[] for _ in variants]
    try:
        for service in services:
            service.measure_model(model_bytes, specs)  # start each worker outside the numbers
        for _ in range(repeats):
            for i, service in enumerate(services):
                t0 = time.perf_counter()
                results[i].append(service.measure_model(model_bytes, specs))
                walls[i].append(time.perf_counter() - t0)
    finally:
        for service in services:
            service.close()
    rows = []
    for (name, over), res, wall in zip(variants, results, walls):
        ok = [r for r in res if r.ok]
        if len(ok) < 2:
            reason = next((r.reason for r in res if not r.ok), "too few measurements")
            rows.append(f"| {model} | {name} | failed: {reason[:120]} | | | |")
            continue
        med = np.array([r.ms for r in ok])
        cv = med.std(ddof=1) / med.mean()
        settings = ", ".join(f"{k}={v}" for k, v in over.items()) or "defaults"
        rows.append(
            f"| {model} | {name} ({settings}) | {cv * 100:.2f}% | {np.median(med):.4f} ({med.min():.4f}-{med.max():.4f}) "
            f"| {int(np.median([r.runs for r in ok]))} | {np.median(wall):.2f} s |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="bert-base:small", help="zoo model for the noise test")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--unique", type=int, default=20, help="distinct graphs for the cost-per-graph number")
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--variant", action="append", default=None, metavar="NAME:key=value,...",
                   help="a measurement design to compare (repeatable; the first is used for everything else)")
    p.add_argument("--noise-models", nargs="*", default=[], help="more zoo models for the CV table")
    p.add_argument("--aa-repeats", type=int, default=1, help="interleaved A/A comparisons of the graph")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    base = dict(device=args.device, max_seconds=args.max_seconds)
    graph = load_model(args.model)
    lines_extra: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        cv_rows = noise_rows(graph, args.model, variants, base, args.repeats, tmp)
        print("\n".join(cv_rows), flush=True)
        for extra in args.noise_models:
            cv_rows += noise_rows(load_model(extra), extra, variants, base, args.repeats, tmp)
            print("\n".join(cv_rows[-len(variants):]), flush=True)
        config = MeasureConfig.create(**{**base, **variants[0][1], "cache_path": str(Path(tmp) / "c.sqlite")})
        with MeasuredLatency(config) as service:
            model_bytes, specs = graph_to_bytes(graph), input_specs(graph)
            service.measure_model(model_bytes, specs)  # start the worker outside the numbers
            comparisons = [service.compare(graph, graph) for _ in range(args.aa_repeats)]
            ratios = np.array([c.ratio for c in comparisons if c.ok])
            aa = comparisons[0]
            print(f"A/A ratios: {', '.join(f'{r:.4f}' for r in ratios)}", flush=True)

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
        f"- graph: {args.model} ({len(graph.nodes)} nodes); the numbers under the CV table use the first variant",
        "",
        f"CV of {args.repeats} repeated measurements, each from fresh sessions (variants measured round-robin; "
        f"target <= 3% on the CPU, <= 1% on the GPU):",
        "",
        "| model | variant | CV | median ms (min-max) | runs | wall per measurement |",
        "|---|---|---|---|---|---|",
        *cv_rows,
        "",
        "| quantity | value | target |",
        "|---|---|---|",
        f"| interleaved A/A ratio | {aa.ratio:.4f} (95% CI {aa.low:.4f}-{aa.high:.4f}, {aa.runs} cycles of 4 runs per graph) | 1.00 |",
        *([f"| {len(ratios)} interleaved A/A ratios | median {np.median(ratios):.4f}, range {ratios.min():.4f}-{ratios.max():.4f}, "
           f"sd {ratios.std(ddof=1):.4f} | 1.00 |"] if len(ratios) > 1 else []),
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
