"""Fill the gaps of a per-kernel table without exporting the zoo on the GPU machine.

A change to the kernel grouping (a new onnxruntime fusion in xrlflow.costmodel) creates kernel keys that a
committed table lacks. Exporting the full zoo again on the GPU machine costs minutes of device time; the
missing kernels themselves are tiny models. So:

    # here: the kernels of these graphs that the table lacks, as small ONNX files plus a manifest
    .venv/bin/python bench/table_fill.py export --table T.json --folder .kernels \\
        --models bert-base inception-v3 squeezenet --per-model 70 \\
        --models bert-xrl vit-xrl gpt2 --per-model 6
    # GPU machine: time each with MeasuredLatency (the same settings as the table), write their entries
    python3 bench/table_fill.py measure --folder .kernels --device cuda --out $OUT/filled.json
    # here: merge the measured entries into the table
    .venv/bin/python bench/table_fill.py merge --table T.json --filled filled.json --out T.json

Graphs are the calibration's random rewrite sequences (same seed and order as bench/calibrate_costmodel.py,
one random.Random per --models group), so the kernels are those the calibration and a search meet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

from xrlflow.testing import load_model, random_sequences


def export(args: argparse.Namespace) -> int:
    from xrlflow.costmodel import PROFILES, OpTable, distinct_kernel_models

    table = OpTable.load(args.table)
    profile = PROFILES[args.profile]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest: list[dict] = []

    def graphs():
        for group, per_model in zip(args.models, args.per_model):
            rng = random.Random(args.seed)
            for spec in group:
                yield from (sample.graph for sample in random_sequences(spec, load_model(spec), per_model, rng))

    for key, model, runtime in distinct_kernel_models(graphs(), profile, table.entries):
        name = f"k{len(manifest):04d}.onnx"
        (folder / name).write_bytes(model.SerializeToString())
        manifest.append({"file": name, "key": key, "inputs": [[n, t, list(s)] for n, t, s in runtime],
                         "ops": [node.op_type for node in model.graph.node]})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{len(manifest)} kernels missing from {args.table} written to {folder} ({size / 1e6:.1f} MB)")
    return 0


def measure(args: argparse.Namespace) -> int:
    from xrlflow.costmodel import baseline_model
    from xrlflow.measure import MeasureConfig, MeasuredLatency
    from xrlflow.measure_worker import InputSpec

    folder = Path(args.folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    config = MeasureConfig.create(device=args.device, max_seconds=args.max_seconds, cache_path="")
    entries: dict[str, float] = {}
    failures: dict[str, str] = {}
    with MeasuredLatency(config) as measurer:
        base, base_inputs = baseline_model()
        baseline = measurer.measure_model(base.SerializeToString(), tuple(InputSpec(n, t, s) for n, t, s in base_inputs))
        for item in manifest:
            specs = tuple(InputSpec(n, t, tuple(s)) for n, t, s in item["inputs"])
            result = measurer.measure_model((folder / item["file"]).read_bytes(), specs)
            if result.ok:
                entries[item["key"]] = result.ms
            else:
                failures[item["key"]] = result.reason
        info = {"device": measurer.device, "provider": config.provider, "ort_version": measurer.ort_version}
    Path(args.out).write_text(json.dumps({**info, "baseline_ms": baseline.ms, "entries": entries, "failures": failures}, indent=1))
    print(f"measured {len(entries)} kernels ({len(failures)} failed), baseline {baseline.ms:.5f} ms on {info['device']}")
    return 0


def merge(args: argparse.Namespace) -> int:
    from xrlflow.costmodel import OpTable

    table = OpTable.load(args.table)
    filled = json.loads(Path(args.filled).read_text())
    if filled["provider"] != table.provider or filled["ort_version"] != table.ort_version:
        raise SystemExit(f"table_fill: {args.filled} was measured with {filled['provider']} / onnxruntime "
                         f"{filled['ort_version']}, the table with {table.provider} / {table.ort_version}")
    # entries are compared against the table's own baseline (the session overhead each contains); a filled
    # entry is shifted by the difference of the two baselines so both sets subtract the same overhead
    shift = table.baseline_ms - float(filled["baseline_ms"])
    entries = dict(table.entries)
    entries.update({k: v + shift for k, v in filled["entries"].items()})
    dataclasses.replace(table, entries=entries).save(args.out)
    print(f"{len(filled['entries'])} entries merged (baseline shift {shift * 1e3:+.2f} us): {len(entries)} in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("--table", required=True)
    e.add_argument("--folder", required=True)
    e.add_argument("--profile", default="h200")
    e.add_argument("--models", nargs="+", action="append", required=True, help="a group of zoo specs (repeatable)")
    e.add_argument("--per-model", type=int, action="append", required=True, help="graphs per model, one per --models")
    e.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure")
    m.add_argument("--folder", required=True)
    m.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    m.add_argument("--max-seconds", type=float, default=0.3)
    m.add_argument("--out", required=True)
    g = sub.add_parser("merge")
    g.add_argument("--table", required=True)
    g.add_argument("--filled", required=True)
    g.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "export" and len(args.models) != len(args.per_model):
        p.error("give one --per-model for each --models group")
    return {"export": export, "measure": measure, "merge": merge}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
