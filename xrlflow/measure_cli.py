"""`xrlflow measure FILE` and `xrlflow cache stats|clear`."""

from __future__ import annotations

import argparse
import json


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measure a model's end-to-end latency with onnxruntime (cached)")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x128", help="bind a symbolic input dim")
    p.add_argument("--opt-level", default="ORT_ENABLE_ALL", help="onnxruntime graph optimisation level")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on the CPU (default 1)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="cap on timing time")
    p.add_argument("--timeout", type=float, default=120.0, help="kill the measurement after this many seconds")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the latency cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_measure)

    c = sub.add_parser("cache", help="inspect or clear the latency cache")
    c.add_argument("action", choices=("stats", "clear"))
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(handler=run_cache)


def run_measure(args: argparse.Namespace) -> int:
    from xrlflow.measure import MeasureConfig, MeasuredLatency
    from xrlflow.onnx_io import load_graph, parse_input_shapes

    config = MeasureConfig(
        device=args.device, opt_level=args.opt_level, intra_op_threads=args.threads,
        max_seconds=args.max_seconds, timeout_s=args.timeout, cache_path="" if args.no_cache else None,
    )
    graph = load_graph(args.model, parse_input_shapes(args.input_shape))
    with MeasuredLatency(config) as service:
        result = service.latency(graph)
        report = {
            "model": args.model, "device": service.device, "provider": config.provider,
            "onnxruntime": service.ort_version, "opt_level": config.opt_level, "ok": result.ok,
            "median_ms": result.ms if result.ok else None, "ci95_ms": [result.low_ms, result.high_ms] if result.ok else None,
            "runs": result.runs, "source": result.source, "reason": result.reason,
        }
    if args.json:
        print(json.dumps(report, indent=2))
    elif result.ok:
        print(
            f"{args.model}: {result.ms:.4f} ms median (95% CI {result.low_ms:.4f}-{result.high_ms:.4f}, "
            f"{result.runs} runs, {result.source}) on {service.device}, {config.provider}, onnxruntime {service.ort_version}"
        )
    if not result.ok:
        import sys

        print(f"xrlflow: error: measurement failed: {result.reason}", file=sys.stderr)
        return 2
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from xrlflow.latency_cache import LatencyCache

    with LatencyCache() as cache:
        if args.action == "clear":
            removed = cache.clear()
            print(json.dumps({"removed": removed}) if args.json else f"cleared {removed} entries from {cache.path}")
            return 0
        stats = cache.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['path']}: {stats['measurements']} measurements ({stats['failed']} failed), {stats['bytes']} bytes")
    for s in stats["by_setting"]:  # type: ignore[union-attr]
        print(f"  {s['entries']:>7}  {s['device']} / {s['provider']} / onnxruntime {s['ort_version']}")
    for table, n in stats["op_tables"].items():  # type: ignore[union-attr]
        print(f"  {n:>7}  per-kernel entries in {table}")
    return 0
