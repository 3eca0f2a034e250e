"""Does the cost model rank rewritten transformers as the H200 does? Variants of the zoo's bert-base and gpt2
(full size, batch 1, seq 128): the canonical graph, merged projections, each step of the head-major attention
chain (tests/test_rule_attention_layout_chain.py's sequence of generic transposition rewrites, snapshot after
each rule's run), and the contrib-op attention fusions; each with the cost model's prediction.

    .venv/bin/python -m bench.chain_variants prepare --dir bench/out/chain            # here (CPU, torch for the zoo)
    python3 bench/chain_variants.py time --dir bench/out/chain --json $OUT/chain_timing.json   # GPU machine
    .venv/bin/python -m bench.chain_variants report --dir bench/out/chain --json chain_timing.json \\
        -o bench/results/chain_variants_h200.md

`prepare --predict-only` re-prices an existing set after the table changed (bench/table_fill.py merge), keeping
its files and timings. `prepare` verifies each variant against the original on onnxruntime's CPU EP and writes it with its large
weights stripped (xrlflow.paired_timing.strip_weights), so the set travels in a few MB. `time` refills
them with random values and times each variant against the canonical graph as paired, interleaved A/B runs
(xrlflow/paired_timing.py; numpy, onnx and onnxruntime only). `report` computes Spearman between the predicted
and the measured times per model and says whether the chain's first step is predicted and measured slower
and its end faster.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from xrlflow.atomic import write_bytes
from xrlflow.paired_timing import strip_weights

HEAD_MAJOR_PREFIX = "head-major"
ATTENTION_FUSIONS = ("fuse-multihead-attention", "fuse-packed-qkv-attention")


class ChainError(Exception):
    """A one-line reason why the variants cannot be built."""


# ---- graphs (CPU side; also used by bench/table_fill.py --rewrites) ---------------------------------------
def zoo_graph(name: str, batch: int, seq: int, small: bool = False):
    """The zoo model (full size unless `small`; `seq` for sequence models) in the canonical form searches start
    from."""
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import load_graph
    from xrlflow.rules import CANONICAL_RULES, default_engine
    from xrlflow.zoo import export_model
    from xrlflow.zoo.registry import get_entry

    if not get_entry(name).takes_seq:
        seq = None  # image models (vit-base) have a fixed input size
    return prepare_for_search(load_graph(export_model(name, small=small, batch=batch, seq=seq)), default_engine(), CANONICAL_RULES)


def exhaust(graph, rule: str, limit: int = 1000):
    """`graph` with `rule` applied at its first offered site until none is left."""
    from xrlflow.rules import default_engine

    engine = default_engine()
    for _ in range(limit):
        found = [m for m in engine.matches(graph) if m.rule == rule]
        if not found:
            return graph
        graph = engine.apply(graph, found[0])
    raise ChainError(f"{rule} did not run out of matches after {limit} applications")


def require_rules(names) -> None:
    from xrlflow.rules import rule_names

    missing = sorted(set(names) - set(rule_names()))
    if missing:
        raise ChainError(f"rules not registered here: {', '.join(missing)} (they come with the attention-fusion and "
                         "transpose-algebra branches)")


def head_major_steps(merged) -> list[tuple[str, object]]:
    """(label, graph) after each rule's run of the head-major chain on a graph with merged projections."""
    try:
        from tests.test_rule_attention_layout_chain import head_major
    except ImportError as exc:
        raise ChainError(f"the head-major chain (tests/test_rule_attention_layout_chain.py) is not importable: {exc}; "
                         "run as `python -m bench.<script>` from the repository root") from None
    from xrlflow.rules import default_engine

    engine = default_engine()
    _, applied = head_major(merged)
    steps = []
    graph = merged
    for i, match in enumerate(applied):
        graph = engine.apply(graph, match)
        if i + 1 == len(applied) or applied[i + 1].rule != match.rule:
            steps.append((f"{HEAD_MAJOR_PREFIX}-{len(steps) + 1:02d}-{match.rule}", graph))
    return steps


def variants(name: str, batch: int, seq: int, small: bool = False) -> Iterator[tuple[str, object]]:
    """The checked variants of one zoo model: (label, graph), the canonical graph first."""
    require_rules(("merge-parallel-matmul",) + ATTENTION_FUSIONS)
    base = zoo_graph(name, batch, seq, small)
    yield "canonical", base
    merged = exhaust(base, "merge-parallel-matmul")
    yield "merged", merged
    steps = head_major_steps(merged)
    yield from steps
    for rule in ATTENTION_FUSIONS:
        for label, graph in (("canonical", base), ("merged", merged)):
            fused = exhaust(graph, rule)
            if fused is not graph:
                yield f"{label}+{rule}", fused


# ---- the three phases --------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> int:
    from xrlflow.costmodel import CostModel
    from xrlflow.onnx_io import to_model
    from xrlflow.verify import verify_models

    model = CostModel.for_device(args.profile)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"profile": args.profile, "batch": args.batch, "seq": args.seq, "small": args.small, "models": {}}
    if args.predict_only:  # re-price the written variants (after a table change); files and timings stay valid
        written = json.loads((folder / "manifest.json").read_text())
        manifest = {**written, "profile": args.profile, "models": dict(written["models"])}
        for name in args.models:
            rows = manifest["models"][name]
            for label, graph in variants(name, written["batch"], written["seq"], written["small"]):
                cost = model.estimate(graph)
                rows[label] = {**rows[label], "predicted_ms": cost.ms, "kernels": int(cost.features[1]),
                               "table_coverage": model.table_coverage(graph)}
                print(f"[{name}] {label}: {cost.ms:.4f} ms predicted, coverage {rows[label]['table_coverage']:.2f}", flush=True)
        write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
        return 0
    for name in args.models:
        rows: dict[str, dict] = {}
        original = None
        for label, graph in variants(name, args.batch, args.seq, args.small):
            proto = to_model(graph, fold_constants=True)
            proto.ir_version = min(proto.ir_version, 10)  # onnxruntime 1.31 on the GPU machine
            if original is None:
                original = proto
                status = "original"
            else:
                check = verify_models(original, proto)
                status = "verified" if check.ok else f"does not verify: {check.reason[:120]}"
            cost = model.estimate(graph)
            file = f"{name}/{label}.onnx"
            (folder / name).mkdir(exist_ok=True)
            write_bytes(folder / file, strip_weights(proto).SerializeToString())
            rows[label] = {"file": file, "predicted_ms": cost.ms, "kernels": int(cost.features[1]),
                           "table_coverage": model.table_coverage(graph), "status": status}
            print(f"[{name}] {label}: {cost.ms:.4f} ms predicted, {rows[label]['kernels']} kernels, "
                  f"coverage {rows[label]['table_coverage']:.2f}, {status}", flush=True)
        manifest["models"][name] = rows
    write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
    return 0


def time_all(args: argparse.Namespace) -> int:
    import onnx
    import onnxruntime

    from xrlflow.paired_timing import TimingSetting, paired_timing, refilled_copy

    folder = Path(args.dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    setting = TimingSetting(device=args.device, cuda_graph=not args.no_cuda_graph, cycles=args.cycles, runs=args.runs)
    work = Path(args.work)

    def filled(file: str) -> str:
        return refilled_copy(folder, file, work)

    results = {"setting": setting.label, "onnxruntime": onnxruntime.__version__,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "models": {}}
    deadline = time.monotonic() + args.max_seconds
    for name, rows in manifest["models"].items():
        base = filled(rows["canonical"]["file"])
        results["models"][name] = {}
        for label, row in rows.items():
            if label == "canonical" or time.monotonic() > deadline:
                continue
            try:
                variant = filled(row["file"])
                timing = paired_timing(base, variant, setting).as_dict()
                Path(variant).unlink()  # full-size refilled models are ~0.5 GB each
            except Exception as exc:  # one failing variant must not lose the others' timings
                timing = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            results["models"][name][label] = timing
            print(f"[{name}] {label}: {timing}", flush=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def measured_speedups(timings: list[dict], model: str) -> dict[str, float]:
    """Variant -> measured speedup over the canonical graph (1.0 for the canonical graph itself), the median
    over the given timing files."""
    import numpy as np

    values: dict[str, list[float]] = {"canonical": [1.0]}
    for timing in timings:
        for label, row in timing.get("models", {}).get(model, {}).items():
            if "speedup" in row:
                values.setdefault(label, []).append(float(row["speedup"]))
            elif "ms" in row and "canonical_ms" in row:  # xrlflow-measure style: absolute times of both
                values.setdefault(label, []).append(float(row["canonical_ms"]) / float(row["ms"]))
    return {label: float(np.median(v)) for label, v in values.items()}


def report(args: argparse.Namespace) -> int:
    from xrlflow.costmodel import spearman

    manifest = json.loads((Path(args.dir) / "manifest.json").read_text())
    timings = [json.loads(Path(p).read_text()) for p in args.json]
    lines = [
        "# Cost model against measured rewritten variants",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; profile {manifest['profile']}, "
        f"batch {manifest['batch']}, seq {manifest['seq']}; timing: {', '.join(sorted({t.get('setting', '?') for t in timings}))}",
        f"- command: `python -m bench.chain_variants {' '.join(sys.argv[1:])}`",
        "- predicted speedup = predicted canonical / predicted variant; measured speedup: paired A/B against the canonical graph",
        "",
    ]
    verdicts = []
    for name, rows in manifest["models"].items():
        measured = measured_speedups(timings, name)
        base_ms = rows["canonical"]["predicted_ms"]
        predicted = {label: base_ms / row["predicted_ms"] for label, row in rows.items()}
        common = [label for label in rows if label in measured]
        rho = spearman([predicted[x] for x in common], [measured[x] for x in common]) if len(common) > 2 else float("nan")
        lines += [f"## {name}: Spearman {rho:.3f} over {len(common)} variants", "",
                  "| variant | kernels | table coverage | predicted speedup | measured speedup |", "|---|---|---|---|---|"]
        for label, row in rows.items():
            got = f"{measured[label]:.3f}x" if label in measured else "-"
            lines.append(f"| {label} | {row['kernels']} | {row['table_coverage']:.2f} | {predicted[label]:.3f}x | {got} |")
        chain = [label for label in rows if label.startswith(HEAD_MAJOR_PREFIX)]
        if chain:
            first, last = chain[0], chain[-1]
            reference = "merged"
            for label in (first, last):
                p = predicted[label] / predicted[reference]
                m = measured[label] / measured[reference] if label in measured and reference in measured else None
                lines.append(f"\n- {label} over {reference}: predicted {p:.3f}x" + (f", measured {m:.3f}x" if m else ""))
            verdicts.append(f"{name}: first step predicted {'slower' if predicted[first] < predicted[reference] else 'not slower'}, "
                            f"end predicted {'faster' if predicted[last] > predicted[reference] else 'not faster'}")
        lines.append("")
    lines += ["## Chain", "", *[f"- {v}" for v in verdicts], ""]
    text = "\n".join(lines)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--dir", required=True)
    pp.add_argument("--models", nargs="+", default=["bert-base", "gpt2"])
    pp.add_argument("--batch", type=int, default=1)
    pp.add_argument("--seq", type=int, default=128)
    pp.add_argument("--profile", default="h200")
    pp.add_argument("--small", action="store_true", help="the zoo's small variants (a quick check of this script)")
    pp.add_argument("--predict-only", action="store_true",
                    help="only re-price the variants of an existing --dir (after the table changed)")
    pt = sub.add_parser("time")
    pt.add_argument("--dir", required=True)
    pt.add_argument("--json", required=True)
    pt.add_argument("--work", default="/tmp/xrlflow_chain_variants", help="where the refilled models go")
    pt.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    pt.add_argument("--no-cuda-graph", action="store_true")
    pt.add_argument("--cycles", type=int, default=15)
    pt.add_argument("--runs", type=int, default=20)
    pt.add_argument("--max-seconds", type=float, default=540.0)
    pr = sub.add_parser("report")
    pr.add_argument("--dir", required=True)
    pr.add_argument("--json", nargs="+", required=True)
    pr.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    from xrlflow.errors import BadInputError

    try:
        if args.command != "prepare" and not (Path(args.dir) / "manifest.json").is_file():
            raise ChainError(f"{args.dir}: no manifest.json (run prepare first)")
        return {"prepare": prepare, "time": time_all, "report": report}[args.command](args)
    except (ChainError, BadInputError, OSError, ValueError, KeyError) as exc:
        print(f"chain_variants: {type(exc).__name__ if not isinstance(exc, ChainError) else 'error'}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
