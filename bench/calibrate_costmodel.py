"""Calibrate the cost model against measured end-to-end latency on random rewrite sequences.

For each model: random sequences of 1-8 rule applications (matches picked uniformly from
xrlflow.rules.default_engine()), deduplicated by structural hash, each measured with MeasuredLatency and
estimated by CostModel. Reports Spearman rank correlation (per model, where it matters for a search, and
pooled) for the plain sum, the measured-table variant (TASO-style per-kernel timings, --table) and the
linear correction (fitted on even-indexed graphs, evaluated on odd-indexed ones, so the number is held out).

    .venv/bin/python bench/calibrate_costmodel.py                       # CPU, writes the results file
    .venv/bin/python bench/calibrate_costmodel.py --device cuda --profile h200 --table \\
        --export-table $OUT/h200_cuda.json --out $OUT/costmodel_calibration_cuda.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

from xrlflow.costmodel import (
    FEATURE_NAMES, CostModel, InGraphMapping, LinearCorrection, OpTable, build_op_table, fit_fallback_scale, fit_in_graph, spearman,
)
from xrlflow.measure import MeasureConfig, MeasuredLatency, parse_pin_cpu
from xrlflow.rules.registry import default_engine
from xrlflow.testing import Sample, load_model, random_sequences

DEFAULT_MODELS = ("bert-base:small", "inception-v3:small", "squeezenet:small")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--per-model", type=int, default=70, help="distinct graphs per model (the original included)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--profile", default="cpu", help="cost-model profile (cpu, h200)")
    p.add_argument("--max-seconds", type=float, default=1.0, help="timing cap per graph")
    p.add_argument("--table", action="store_true", help="also measure per-kernel tables and report that variant")
    p.add_argument("--load-table", help="use this per-kernel table (JSON) instead of measuring one")
    p.add_argument("--export-table", help="write the measured per-kernel table to this JSON file")
    p.add_argument("--cache-path", default=None, help="latency cache file (default: the user cache)")
    p.add_argument("--sessions", type=int, default=1,
                   help="sessions per measurement; with 2 or more the report adds session-vs-session Spearman (the noise ceiling)")
    p.add_argument("--cuda-graph", choices=("on", "off"), default="on",
                   help="on CUDA, time the graph replayed as a CUDA graph (MeasureConfig.cuda_graph; default on)")
    p.add_argument("--pin-cpu", default=None, help="pin the measurement worker to this CPU (auto: the last one allowed)")
    p.add_argument("--measured-json", default=None,
                   help="reuse the measurements of an earlier run's --json (same models, --per-model and --seed) instead of measuring")
    p.add_argument("--fit-in-graph", action="store_true",
                   help="fit the table's in-graph mapping (OpTable.in_graph) on the measured graphs; report it held out and leave-one-model-out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results markdown (default bench/results/costmodel_calibration_<device>.md)")
    p.add_argument("--json", default=None, help="also write every sample as JSON here")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    started = time.time()
    samples: list[Sample] = []
    for spec in args.models:
        base = load_model(spec)
        samples += random_sequences(spec, base, args.per_model, rng)
        print(f"{spec}: {len(base.nodes)} nodes, {sum(s.model == spec for s in samples)} distinct graphs", flush=True)

    pin = parse_pin_cpu(args.pin_cpu)
    config = MeasureConfig.create(device=args.device, max_seconds=args.max_seconds, cache_path=args.cache_path, seed=args.seed,
                           sessions=args.sessions, pin_cpu=pin, cuda_graph=args.cuda_graph == "on")
    if args.measured_json:
        return offline(args, samples, started)
    with MeasuredLatency(config) as measurer:
        for i, s in enumerate(samples):
            result = measurer.latency(s.graph)
            if result.ok:
                s.measured_ms, s.low_ms, s.high_ms, s.session_ms = result.ms, result.low_ms, result.high_ms, result.session_ms
            if i % 25 == 0:
                print(f"measured {i + 1}/{len(samples)}", flush=True)
        table = None
        if args.load_table:
            table = OpTable.load(args.load_table)
        elif args.table or args.export_table:
            table = build_op_table([s.graph for s in samples], measurer, args.profile)
            if args.export_table:
                table.save(args.export_table)
        device_label = measurer.device
        ort_version = measurer.ort_version
        provider = config.provider

    return report(args, argv, samples, table, started, f"{device_label} ({platform.machine()}, {platform.system()}), {provider}, "
                  f"onnxruntime {ort_version}", pin)


def offline(args: argparse.Namespace, samples: list[Sample], started: float) -> int:
    """Reuse an earlier run's measurements: the graphs are regenerated and must match its rows."""
    rows = json.loads(Path(args.measured_json).read_text())
    if len(rows) != len(samples) or any(r["model"] != s.model or r["rules"] != s.rules for r, s in zip(rows, samples)):
        raise SystemExit(f"calibrate_costmodel: {args.measured_json} does not hold these graphs (other models, --per-model or --seed?)")
    for r, s in zip(rows, samples):
        s.measured_ms, s.low_ms, s.high_ms = r["measured_ms"], r["low_ms"], r["high_ms"]
        s.session_ms = tuple(r.get("session_ms", ()))
    table = OpTable.load(args.load_table) if args.load_table else None
    if table is not None and args.fit_in_graph:
        table = dataclasses.replace(table, in_graph=None)  # the plain rows price kernels as isolated; the fit adds the mapping
    return report(args, None, samples, table, started, f"measurements from {args.measured_json}", None)


def report(args: argparse.Namespace, argv: list[str] | None, samples: list[Sample], table: OpTable | None,
           started: float, machine: str, pin: int | None) -> int:
    ok = [s for s in samples if np.isfinite(s.measured_ms)]
    measured = np.array([s.measured_ms for s in ok])
    plain = CostModel(args.profile)
    variants: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    variants["plain sum (analytic)"] = [plain.latency(s.graph).ms for s in ok]
    estimate_ms = (time.perf_counter() - t0) / max(len(ok), 1) * 1e3
    if table is not None:
        tabled = CostModel(args.profile, table=table)
        variants["per-kernel table"] = [tabled.latency(s.graph).ms for s in ok]
    in_graph_note = ""
    if table is not None and args.fit_in_graph:
        graphs, groups = [s.graph for s in ok], np.array([s.model for s in ok])

        def mapped(fit_on: np.ndarray) -> tuple[InGraphMapping, np.ndarray]:
            mapping = fit_in_graph(table, [g for g, m in zip(graphs, fit_on) if m], measured[fit_on], list(groups[fit_on]), args.profile)
            model = CostModel(args.profile, table=dataclasses.replace(table, in_graph=mapping))
            return mapping, np.array([model.latency(g).ms for g in graphs])

        held_out = np.arange(len(ok)) % 2 == 1
        _, estimate = mapped(~held_out)
        variants["per-kernel table + in-graph mapping (held out)"] = list(np.where(held_out, estimate, np.nan))
        other_models = np.full(len(ok), np.nan)
        for spec in args.models:
            _, estimate = mapped(groups != spec)
            other_models[groups == spec] = estimate[groups == spec]
        variants["per-kernel table + in-graph mapping (fitted on the other models)"] = list(other_models)
        mapping, estimate = mapped(np.ones(len(ok), dtype=bool))
        variants["per-kernel table + in-graph mapping (fitted on all)"] = list(estimate)
        fitted = fit_fallback_scale(dataclasses.replace(table, in_graph=mapping), graphs, args.profile)
        if args.export_table:
            fitted.save(args.export_table)
        in_graph_note = (f"\nIn-graph mapping fitted on all graphs: a kernel costs max({mapping.scale:.3f} x isolated "
                         f"{mapping.offset_ms * 1e3:+.2f} us, {mapping.floor_ms * 1e3:.2f} us)"
                         + (f"; written with its fallback scale to {args.export_table}" if args.export_table else "") + ".\n")
    corrected_note = ""
    for label, base_model in [("plain sum (analytic)", plain)] + ([("per-kernel table", tabled)] if table is not None else []):
        feats = np.array([base_model.features(s.graph) for s in ok])
        train = np.arange(len(ok)) % 2 == 0
        fit = LinearCorrection.fit(feats[train], measured[train])
        corrected = np.maximum(feats @ np.array(fit.coefficients), 1e-6)
        corrected[train] = np.nan  # report held-out graphs only
        variants[f"{label} + linear correction (held out)"] = list(corrected)
        corrected_note += f"\n- correction on {label}: " + ", ".join(f"{n}={c:.4g}" for n, c in zip(FEATURE_NAMES, fit.coefficients))

    measured_second = np.array([s.session_ms[1] if len(s.session_ms) >= 2 else np.nan for s in ok])
    if np.isfinite(measured_second).sum() > 2:
        # one session's median against another's (graphs measured this run, not cache hits): how well the
        # measurement ranks the graphs itself, the ceiling for any estimate
        variants["measured, session 1 (vs session 2 as truth)"] = [s.session_ms[0] if len(s.session_ms) >= 2 else np.nan for s in ok]
    rows = []
    for label, est in variants.items():
        est_arr = np.array(est)
        keep = np.isfinite(est_arr)
        per_model = []
        truth = measured_second if label.startswith("measured, session 1") else measured
        for spec in args.models:
            idx = np.array([s.model == spec for s in ok]) & keep
            per_model.append(spearman(est_arr[idx], truth[idx]) if idx.sum() > 2 else float("nan"))
        rows.append((label, spearman(est_arr[keep], truth[keep]), per_model, int(keep.sum())))

    spreads = {spec: (lambda m: (m.max() / m.min()) if len(m) else float("nan"))(
        np.array([s.measured_ms for s in ok if s.model == spec])) for spec in args.models}
    ci = np.array([(s.high_ms - s.low_ms) / 2 / s.measured_ms for s in ok])
    command = "python bench/calibrate_costmodel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Cost-model calibration ({args.device}, profile {args.profile})",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine}",
        f"- command: `{command.strip()}`",
        f"- graphs: {len(samples)} distinct ({len(ok)} measured ok) from random 1-8 step rewrite sequences over "
        f"{', '.join(args.models)}; wall time {time.time() - started:.0f} s",
        (f"- measurement: {args.sessions} session(s) per graph (median of their medians; worker "
         f"{'not pinned' if pin is None else f'pinned to CPU {pin}'}), adaptive runs, CI target 1%, cap {args.max_seconds} s per graph; "
         if not args.measured_json else f"- measurement: as recorded in {args.measured_json} (see the results file of that run); ")
        + "achieved median "
        f"relative CI half-width {np.median(ci) * 100:.2f}% (90th percentile {np.quantile(ci, 0.9) * 100:.2f}%)",
        "- measured spread within each model (slowest/fastest variant): "
        + ", ".join(f"{k} {v:.3f}x" for k, v in spreads.items()),
        f"- cost-model time: {estimate_ms:.3f} ms per graph (plain analytic, first estimate of each graph)",
        "",
        "| estimate | Spearman pooled | " + " | ".join(f"Spearman {m}" for m in args.models) + " | graphs |",
        "|---|---|" + "---|" * len(args.models) + "---|",
    ]
    for label, pooled, per_model, n in rows:
        lines.append(f"| {label} | {pooled:.3f} | " + " | ".join(f"{v:.3f}" for v in per_model) + f" | {n} |")
    lines += ["", "Correction coefficients (features: " + ", ".join(FEATURE_NAMES) + "):" + corrected_note, in_graph_note]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or Path(__file__).parent / "results" / f"costmodel_calibration_{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps([
            {"model": s.model, "steps": s.steps, "rules": s.rules, "measured_ms": s.measured_ms,
             "low_ms": s.low_ms, "high_ms": s.high_ms, "session_ms": list(s.session_ms),
             **{label: est[i] for label, est in variants.items()}}
            for i, s in enumerate(ok)
        ], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
