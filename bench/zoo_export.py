"""Export every full-size zoo model once into a fresh temporary cache and record nodes, size, params, time.

Usage: .venv/bin/python bench/zoo_export.py [--output bench/results/zoo_export.md] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from xrlflow import zoo
from xrlflow.measure import device_name




def check_and_run(path: Path, config: zoo.ModelConfig) -> float:
    """onnx.checker (full_check) plus one onnxruntime CPU inference; returns the inference time in ms."""
    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        spec.name: rng.standard_normal(spec.shape, dtype=np.float32)
        if spec.integer_high is None
        else rng.integers(0, spec.integer_high, spec.shape, dtype=np.int64)
        for spec in zoo.model_inputs(config)
    }
    session.run(None, feeds)  # warm-up
    started = time.perf_counter()
    session.run(None, feeds)
    return (time.perf_counter() - started) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "zoo_export.md"))
    parser.add_argument("--models", nargs="*", default=[entry.name for entry in zoo.list_models()])
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="xrlflow-zoo-bench-") as cache_dir:
        for name in args.models:
            config = zoo.resolve_config(name)
            started = time.perf_counter()
            path = zoo.cached_export_path(config, cache_dir)
            seconds = time.perf_counter() - started
            model = onnx.load(str(path), load_external_data=False)
            size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
            started = time.perf_counter()
            cached_path = zoo.cached_export_path(config, cache_dir)
            cache_hit_seconds = time.perf_counter() - started
            assert cached_path == path
            ort_ms = check_and_run(path, config)
            row = {
                "name": name,
                "shape": ", ".join(spec.shape_text() for spec in zoo.model_inputs(config)),
                "params": zoo.count_parameters(config),
                "nodes": len(model.graph.node),
                "megabytes": size / 1e6,
                "seconds": seconds,
                "cache_hit_ms": cache_hit_seconds * 1e3,
                "ort_ms": ort_ms,
            }
            rows.append(row)
            print(f"{name:24s} {row['nodes']:6d} nodes {row['megabytes']:8.1f} MB {seconds:6.1f} s ORT {ort_ms:.0f} ms", flush=True)

    command = "python " + " ".join(shlex.quote(arg) for arg in [os.path.relpath(__file__), *sys.argv[1:]])
    lines = [
        "# Model zoo export benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {device_name('cpu')}",
        f"- load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        "(other jobs shared the machine when above the CPU count: treat times as rough)",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}",
        f"- exporter: TorchScript (`dynamo=False`), opset {zoo.OPSET}, builder version {zoo.BUILDER_VERSION}",
        f"- command: `{command}`",
        "- each model exported once into a fresh temporary cache; export time includes building the module with",
        "  seeded weights, BatchNorm calibration, export and the atomic cache write; cache hit is the second call;",
        "  every export passed onnx.checker (full_check) and ran in onnxruntime (CPU, ORT time = one warm run).",
        "",
        "| model | input | params | nodes | file size (MB) | export time (s) | cache hit (ms) | ORT run (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['shape']} | {row['params'] / 1e6:.1f}M | {row['nodes']} | "
            f"{row['megabytes']:.1f} | {row['seconds']:.1f} | {row['cache_hit_ms']:.2f} | {row['ort_ms']:.0f} |"
        )
    lines.append(f"| **total** | | | | {sum(r['megabytes'] for r in rows):.1f} | {sum(r['seconds'] for r in rows):.1f} | | |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
