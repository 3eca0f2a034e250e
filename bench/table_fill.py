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

`--rewrites` adds the graphs the attention-layout and attention-fusion rules produce on the zoo's transformers
at full size (default bert-base, vit-base, gpt2, mini-dalle at batch 1 and 8, seq 128): the canonical graph
and the one with merged projections, each of REWRITE_RULES applied once at every site of both, each attention
fusion applied everywhere, and every step of the head-major chain (bench/chain_variants.py). Run it from the
repository root as a module (it imports the chain from tests/):

    .venv/bin/python -m bench.table_fill export --table xrlflow/data/h200_cudagraph_ort1.31.1.json \
        --folder .kernels --rewrites
    .venv/bin/python -m bench.table_fill export --table T.json --folder .kernels --rewrites --check   # all measured?

Large float weights are written stripped (xrlflow.paired_timing.strip_weights) and refilled with random
values by `measure` (a kernel's time does not depend on them), so the folder stays a few MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

from xrlflow.atomic import write_bytes
from xrlflow.paired_timing import fill_weights, strip_weights
from xrlflow.testing import load_model, random_sequences

# the rules whose every site --rewrites applies: transposition algebra, Gemm/MatMul forms, attention fusions
REWRITE_RULES = (
    "transpose-matmul", "untranspose-matmul", "compose-transposes", "split-transpose", "cancel-identity-transpose",
    "absorb-transpose-into-gemm", "extract-transpose-from-gemm", "transpose-gemm", "untranspose-gemm",
    "move-reshape-before-transpose", "move-transpose-before-reshape", "move-transpose-before-split",
    "move-transpose-after-split", "move-transpose-after-concat", "move-transpose-before-concat",
    "move-transpose-after-const-binary", "move-transpose-before-const-binary", "move-scale-into-matmul",
    "move-scale-out-of-matmul", "move-scale-before-reshape", "move-scale-after-reshape", "compose-reshapes",
    "cancel-identity-reshape", "move-transpose-before-unary", "move-transpose-after-unary", "matmul-add-to-gemm",
    "gemm-to-matmul-add", "fuse-multihead-attention", "fuse-packed-qkv-attention",
)


def rewrite_graphs(models, batches, seq: int, rules=REWRITE_RULES, small: bool = False, log=print):
    """The graphs --rewrites prices: see the module's docstring."""
    from xrlflow.errors import BadInputError
    from xrlflow.rules import default_engine

    try:
        from bench.chain_variants import ATTENTION_FUSIONS, exhaust, head_major_steps, require_rules, zoo_graph
    except ModuleNotFoundError:
        raise BadInputError("--rewrites imports bench/ and tests/: run it as `python -m bench.table_fill` from the "
                            "repository root") from None

    require_rules(tuple(rules) + ("merge-parallel-matmul",))
    engine = default_engine()
    for name in models:
        for batch in batches:
            base = zoo_graph(name, batch, seq, small)
            merged = exhaust(base, "merge-parallel-matmul")
            yield base
            yield merged
            sites = 0
            for graph in (base, merged):
                for match in engine.matches(graph):
                    if match.rule in rules:
                        sites += 1
                        yield engine.apply(graph, match)
                for rule in ATTENTION_FUSIONS:
                    if rule in rules:
                        yield exhaust(graph, rule)
            steps = head_major_steps(merged)
            yield from (graph for _, graph in steps)
            if steps:
                for rule in ATTENTION_FUSIONS:
                    if rule in rules:
                        yield exhaust(steps[-1][1], rule)
            log(f"{name} batch {batch}: {sites} single rewrites, {len(steps)} head-major steps")


def export(args: argparse.Namespace) -> int:
    from xrlflow.costmodel import PROFILES, OpTable, distinct_kernel_models

    table = OpTable.load(args.table)
    profile = PROFILES[args.profile]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest: list[dict] = []

    def graphs():
        for group, per_model in zip(args.models or (), args.per_model or ()):
            rng = random.Random(args.seed)
            for spec in group:
                yield from (sample.graph for sample in random_sequences(spec, load_model(spec), per_model, rng))
        if args.rewrites:
            yield from rewrite_graphs(args.rewrite_models, args.batches, args.seq, small=args.small)

    if args.check:
        missing = [key for key, _, _ in distinct_kernel_models(graphs(), profile, table.entries)]
        for key in missing:
            print(f"missing: {key}")
        print(f"{len(missing)} kernels missing from {args.table}")
        return 1 if missing else 0
    for key, model, runtime in distinct_kernel_models(graphs(), profile, table.entries):
        name = f"k{len(manifest):04d}.onnx"
        write_bytes(folder / name, strip_weights(model).SerializeToString())
        manifest.append({"file": name, "key": key, "inputs": [[n, t, list(s)] for n, t, s in runtime],
                         "ops": [node.op_type for node in model.graph.node]})
    write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{len(manifest)} kernels missing from {args.table} written to {folder} ({size / 1e6:.1f} MB)")
    return 0


def measure(args: argparse.Namespace) -> int:
    import onnx

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
            model = fill_weights(onnx.load(folder / item["file"]))
            result = measurer.measure_model(model.SerializeToString(), specs)
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
    e.add_argument("--models", nargs="+", action="append", help="a group of zoo specs (repeatable)")
    e.add_argument("--per-model", type=int, action="append", help="graphs per model, one per --models")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--rewrites", action="store_true", help="also the graphs of REWRITE_RULES on the zoo's transformers")
    e.add_argument("--rewrite-models", nargs="+", default=["bert-base", "vit-base", "gpt2", "mini-dalle"])
    e.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    e.add_argument("--seq", type=int, default=128)
    e.add_argument("--small", action="store_true", help="the zoo's small variants (a quick check of --rewrites)")
    e.add_argument("--check", action="store_true", help="write nothing; exit 1 when the table misses a kernel")
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
    if args.command == "export":
        if len(args.models or ()) != len(args.per_model or ()):
            p.error("give one --per-model for each --models group")
        if not args.models and not args.rewrites:
            p.error("give --models groups, --rewrites, or both")
    try:
        return {"export": export, "measure": measure, "merge": merge}[args.command](args)
    except Exception as exc:  # bad input (a missing file, a table that is not one, rules not registered): one line
        from xrlflow.errors import BadInputError

        if isinstance(exc, (BadInputError, OSError, ValueError, KeyError)) or type(exc).__name__ == "ChainError":
            print(f"table_fill: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
