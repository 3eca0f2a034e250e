"""`xrlflow measure FILE...` (locally, or in parallel on a Ray pool) and `xrlflow cache stats|clear`."""

from __future__ import annotations

import argparse
import json


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measure models' end-to-end latency with onnxruntime (cached)")
    p.add_argument("model", nargs="+", help="ONNX file(s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x128", help="bind a symbolic input dim")
    p.add_argument("--opt-level", default="ORT_ENABLE_ALL", help="onnxruntime graph optimisation level")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on the CPU (default 1)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="cap on timing time")
    p.add_argument("--sessions", type=int, default=1, metavar="K",
                   help="time K sessions of each model round-robin; the latency is the median of their medians")
    p.add_argument("--pin-cpu", default=None, metavar="N|auto",
                   help="run the measurement worker on CPU core N (auto: the last core this process may use)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, time plain runs instead of a replayed CUDA graph (host launch time included; noisy)")
    p.add_argument("--timeout", type=float, default=120.0, help="kill the measurement after this many seconds")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the latency cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--ray-address", default=None, metavar="local|auto|HOST:PORT",
                   help="measure on a Ray pool (local starts Ray on this machine)")
    p.add_argument("--workers", type=int, default=None, metavar="M",
                   help="Ray measurement workers (default: one per GPU on cuda, else 1); needs --ray-address")
    p.set_defaults(handler=run_measure)

    c = sub.add_parser("cache", help="inspect or clear the latency cache")
    c.add_argument("action", choices=("stats", "clear"))
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(handler=run_cache)


def run_measure(args: argparse.Namespace) -> int:
    import sys

    from xrlflow.errors import BadInputError
    from xrlflow.measure import MeasureConfig, parse_pin_cpu
    from xrlflow.onnx_io import load_graph, parse_input_shapes

    if args.workers is not None and args.ray_address is None:
        raise BadInputError("--workers needs --ray-address (local starts Ray on this machine)")
    if args.workers is not None and args.workers < 1:
        raise BadInputError(f"--workers must be at least 1, got {args.workers}")
    config = MeasureConfig.create(
        device=args.device, opt_level=args.opt_level, intra_op_threads=args.threads,
        max_seconds=args.max_seconds, timeout_s=args.timeout, cache_path="" if args.no_cache else None,
        cuda_graph=False if args.no_cuda_graph else None, sessions=args.sessions, pin_cpu=parse_pin_cpu(args.pin_cpu),
    )
    shapes = parse_input_shapes(args.input_shape)
    graphs = [load_graph(path, shapes) for path in args.model]
    if args.ray_address is None:
        from xrlflow.measure import MeasuredLatency

        with MeasuredLatency(config) as service:
            results = [service.latency(g) for g in graphs]
            device, ort_version = service.device, service.ort_version
    else:
        from xrlflow.measure_pool import MeasurementPool, PoolConfig
        from xrlflow.ray_session import RaySession

        with RaySession(args.ray_address), MeasurementPool(PoolConfig(config, workers=args.workers)) as pool:
            results = pool.latencies(graphs)
            device, ort_version = pool.client.device, pool.client.ort_version
    reports = [{
        "model": path, "device": device, "provider": config.provider, "onnxruntime": ort_version,
        "opt_level": config.opt_level, "ok": result.ok, "median_ms": result.ms if result.ok else None,
        "ci95_ms": [result.low_ms, result.high_ms] if result.ok else None, "runs": result.runs,
        "source": result.source, "reason": result.reason, "session_medians_ms": list(result.session_ms),
    } for path, result in zip(args.model, results)]
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        for path, result in zip(args.model, results):
            if result.ok:
                print(
                    f"{path}: {result.ms:.4f} ms median (95% CI {result.low_ms:.4f}-{result.high_ms:.4f}, "
                    f"{result.runs} runs, {result.source}) on {device}, {config.provider}, onnxruntime {ort_version}"
                )
    failed = [(path, r) for path, r in zip(args.model, results) if not r.ok]
    for path, result in failed:
        where = f"{path}: " if len(args.model) > 1 else ""
        print(f"xrlflow: error: {where}measurement failed: {result.reason}", file=sys.stderr)
    return 2 if failed else 0


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
