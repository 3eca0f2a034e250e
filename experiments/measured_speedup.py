"""Measured speedups in one process (search, measure and time on the same machine): the original model under
onnxruntime, our greedy search, the RL policy, onnxruntime's transformers optimizer, and ours followed by it,
on the X-RLflow transformer models and three real architectures; also the harness of a shipped policy's
model card (`--no-ort-opt --name policy_card --models ...`). `experiments/transformer_speedup.py` is the
paper's comparison split in prepare (CPU) / time (GPU) / report.

    python experiments/measured_speedup.py [--device cpu|cuda] [--small] [--models bert-base gpt2 ...]

Every latency is end-to-end onnxruntime time (ORT_ENABLE_ALL) measured by `xrlflow.measure`; every speedup
is a paired, interleaved A/B comparison against the original model (median of per-pair ratios, 95% CI).
Searches pick rewrites with `--search-latency` (default: the cost model, which keeps a CPU run affordable;
`measured` times every candidate). Every optimised model is verified against the original before timing.
Writes results/transformer_speedup_<device>[_small].{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

REPO = Path(__file__).resolve().parents[1]
MODELS = ("bert-xrl", "vit-xrl", "mini-dalle", "transformer-transducer", "bert-base", "vit-base", "gpt2")
# onnxruntime.transformers model_type for each model, and the zoo dims that give its heads and width
ORT_MODEL_TYPE = {
    "bert-xrl": ("bert", "BERT_XRL"), "vit-xrl": ("vit", "VIT_BASE"), "mini-dalle": ("gpt2", "MINI_DALLE"),
    "transformer-transducer": ("bert", "TRANSDUCER"), "bert-base": ("bert", "BERT_BASE"),
    "vit-base": ("vit", "VIT_BASE"), "gpt2": ("gpt2", "GPT2_SMALL_MODEL"),
}
SMALL_DIMS = {
    "BERT_XRL": "BERT_XRL_SMALL", "VIT_BASE": "VIT_SMALL", "MINI_DALLE": "MINI_DALLE_SMALL",
    "TRANSDUCER": "TRANSDUCER_SMALL", "BERT_BASE": "BERT_SMALL", "GPT2_SMALL_MODEL": "GPT2_TINY",
}
# ops the ORT transformers optimizer fuses into (their presence means it did something)
ORT_FUSED_OPS = frozenset({
    "Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "FastGelu", "BiasGelu",
    "Gelu", "LayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "BiasAdd",
    "QuickGelu", "GroupQueryAttention", "RotaryEmbedding",
})
METHODS = ("greedy", "rl", "ort-opt", "ours+ort-opt")
METHOD_TITLES = {"greedy": "greedy (ours)", "rl": "RL (ours)", "ort-opt": "ORT transformers opt", "ours+ort-opt": "ours + ORT opt"}


@dataclass
class Cell:
    """One method on one model: a latency and paired speedup, or why there is none."""

    ms: float | None = None  # the candidate's median in the paired run
    original_ms: float | None = None  # the original's median in the same paired run
    speedup: float | None = None
    speedup_low: float | None = None
    speedup_high: float | None = None
    note: str = ""
    rewrites: int | None = None
    seconds: float | None = None  # time the method took to produce its model

    def text(self) -> str:
        if self.ms is None:
            return self.note or "-"
        out = f"{self.speedup:.3f}x [{self.speedup_low:.3f}, {self.speedup_high:.3f}]"
        if self.original_ms is not None:
            out += f" ({self.ms:.3f} vs {self.original_ms:.3f} ms)"
        return out + (f" {self.note}" if self.note else "")


@dataclass
class Row:
    model: str
    nodes: int
    original_ms: float | None = None
    original_ci: tuple[float, float] | None = None
    cells: dict[str, Cell] = field(default_factory=dict)


def _dims(name: str, small: bool):
    from xrlflow import zoo

    key = ORT_MODEL_TYPE[name][1]
    return getattr(zoo, SMALL_DIMS[key] if small else key)


def ort_transformers_optimize(model: onnx.ModelProto, name: str, small: bool, device: str) -> tuple[onnx.ModelProto | None, str]:
    """onnxruntime's transformers optimizer on `model`: (optimised model or None, note saying what happened)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = ORT_MODEL_TYPE[name][0]
    dims = _dims(name, small)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, path)
        try:
            # opt_level 0: only the python fusions, so the result stays portable; ORT_ENABLE_ALL runs at load
            optimised = optimize_model(
                str(path), model_type=model_type, num_heads=dims.heads, hidden_size=dims.dim, opt_level=0,
                use_gpu=device == "cuda",
            ).model
        except Exception as exc:  # the peer crashing is a result, not an error of this script
            return None, f"crashed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})" if str(exc) else f"crashed ({type(exc).__name__})"
    domains = {n.domain for n in optimised.graph.node if n.domain not in ("", "ai.onnx")}
    imported = {o.domain for o in optimised.opset_import}
    for domain in sorted(domains - imported):  # the optimizer's in-memory model omits its contrib-op imports
        optimised.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    before = Counter(n.op_type for n in model.graph.node)
    after = Counter(n.op_type for n in optimised.graph.node)
    fused = {op: after[op] - before.get(op, 0) for op in ORT_FUSED_OPS if after[op] > before.get(op, 0)}
    note = f"model_type {model_type}; " + (
        "fused " + ", ".join(f"{n} {op}" for op, n in sorted(fused.items())) if fused else "fused nothing"
    )
    return optimised, note


def _paired(service, graph, candidate_model: onnx.ModelProto) -> Cell:
    from xrlflow.onnx_io import load_graph

    try:
        candidate = load_graph(candidate_model)
    except Exception as exc:
        return Cell(note=f"cannot load its output ({str(exc)[:80]})")
    comparison = service.compare(graph, candidate)
    if not comparison.ok:
        return Cell(note=f"measurement failed ({comparison.reason[:80]})")
    return Cell(
        ms=comparison.b.ms, original_ms=comparison.a.ms, speedup=comparison.speedup, speedup_low=1.0 / comparison.high,
        speedup_high=1.0 / comparison.low,
    )


def run_model(name: str, args: argparse.Namespace, measured, search_service, policy: str | None) -> Row:
    from xrlflow.onnx_io import load_graph
    from xrlflow.agents.policy_search import search_with_policy
    from xrlflow.optimizer import OptimizeConfig, SearchConfig, VerificationError, optimize
    from xrlflow.verify import verify_models
    from xrlflow.zoo import export_model

    model = export_model(name, small=args.small)
    graph = load_graph(model)
    row = Row(name, len(graph))
    original = measured.latency(graph)
    row.original_ms = original.ms if original.ok else None
    row.original_ci = (original.low_ms, original.high_ms) if original.ok else None
    print(f"[{name}] {len(graph)} nodes, original {original.ms:.3f} ms", flush=True)

    ours: onnx.ModelProto | None = None
    ours_label = ""
    # ort_fusions="off": these columns are xrlflow's rewrites alone (onnxruntime's optimizer has its own column)
    searches = [("greedy", OptimizeConfig(search="greedy", latency=args.search_latency, device=args.device, ort_fusions="off", search_config=SearchConfig(steps=args.steps)))]
    if policy:
        searches.append(("rl", OptimizeConfig(
            policy=policy, latency=args.search_latency, device=args.device, ort_fusions="off", search_config=SearchConfig(steps=args.steps, rollouts=args.rollouts),
        )))
    else:
        row.cells["rl"] = Cell(note="no policy")
    for method, config in searches:
        started = time.perf_counter()
        try:
            result = optimize(model, config, latency_service=search_service, policy_searcher=search_with_policy)
        except VerificationError as exc:
            row.cells[method] = Cell(note=f"verification failed: {exc}"[:160])
            continue
        except Exception as exc:
            row.cells[method] = Cell(note=f"failed: {type(exc).__name__}: {str(exc)[:100]}")
            traceback.print_exc()
            continue
        cell = _paired(measured, graph, result.model) if result.search.applied else Cell(
            ms=original.ms, speedup=1.0, speedup_low=1.0, speedup_high=1.0, note="(no rewrite)")
        cell.rewrites = len(result.search.applied)
        cell.seconds = time.perf_counter() - started
        row.cells[method] = cell
        ours, ours_label = result.model, method  # RL replaces greedy as "ours" when it ran
        print(f"[{name}] {method}: {cell.text()}, {cell.rewrites} rewrites, {cell.seconds:.1f} s", flush=True)

    if args.no_ort_opt:
        return row
    if name not in ORT_MODEL_TYPE:
        row.cells["ort-opt"] = Cell(note="not a transformer")
        row.cells["ours+ort-opt"] = Cell(note="not a transformer")
        return row
    started = time.perf_counter()
    ort_model, note = ort_transformers_optimize(model, name, args.small, args.device)
    row.cells["ort-opt"] = _verified_cell(measured, graph, model, ort_model, note, verify_models)
    row.cells["ort-opt"].seconds = time.perf_counter() - started
    print(f"[{name}] ort-opt: {row.cells['ort-opt'].text()}", flush=True)

    if ours is None:
        row.cells["ours+ort-opt"] = Cell(note="ours failed")
    else:
        combined, note = ort_transformers_optimize(ours, name, args.small, args.device)
        row.cells["ours+ort-opt"] = _verified_cell(measured, graph, model, combined, f"{ours_label} then {note}", verify_models)
        print(f"[{name}] ours+ort-opt: {row.cells['ours+ort-opt'].text()}", flush=True)
    return row


def _verified_cell(measured, graph, original: onnx.ModelProto, candidate: onnx.ModelProto | None, note: str, verify_models) -> Cell:
    if candidate is None:
        return Cell(note=note)
    check = verify_models(original, candidate)
    if not check.ok:
        return Cell(note=f"{note}; does not verify ({check.reason[:80]})")
    cell = _paired(measured, graph, candidate)
    cell.note = f"{cell.note} {note}".strip() if cell.ms is None else f"({note})"
    return cell


def environment(args: argparse.Namespace, device_label: str) -> dict[str, Any]:
    import numpy
    import onnxruntime
    import torch

    import xrlflow

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "experiments/measured_speedup.py", *sys.argv[1:]]),
        "device": f"{args.device} ({device_label})",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "xrlflow": xrlflow.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "search_latency": args.search_latency,
        "measurement": {"max_seconds": args.max_seconds, "target_rel_ci": args.target_rel_ci, "threads": args.threads},
    }


def write_results(rows: list[Row], env: dict[str, Any], args: argparse.Namespace) -> list[Path]:
    from xrlflow.report import markdown_table, plot_speedup_bars, write_json, write_text

    stem = f"{args.name}_{args.device}{'_small' if args.small else ''}"
    out = Path(args.out)
    header = ["model", "nodes", "original"] + [METHOD_TITLES[m] for m in METHODS]
    table = markdown_table(header, [
        [r.model, str(r.nodes), f"{r.original_ms:.3f} ms" if r.original_ms is not None else "failed"]
        + [r.cells.get(m, Cell(note="-")).text().replace("|", "/") for m in METHODS]
        for r in rows
    ])
    lines = [
        f"# Transformer speedups ({env['device']}{', small variants' if args.small else ''})",
        "",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- versions: xrlflow {env['xrlflow']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}, "
        f"python {env['python']}",
        f"- measurement: onnxruntime ORT_ENABLE_ALL, {env.get('provider', '')} (on CUDA /cudagraph: the run replayed "
        f"as one CUDA graph), {args.threads} intra-op thread(s), adaptive runs until the 95% CI "
        f"of the median is within {args.target_rel_ci:.0%} (at most {args.max_seconds:g} s per measurement)",
        f"- searches pick rewrites with the {'cost model' if args.search_latency == 'cost' else 'measured latency'}; "
        f"greedy: at most {args.steps} rewrites; RL: greedy policy rollout + {args.rollouts} sampled",
        "- each cell: the speedup over the original from interleaved A/B pairs (median of per-pair ratios) with "
        "its 95% CI, then the two medians of that paired run (optimised vs original); the 'original' column is a "
        "separate measurement; every optimised model was verified against the original "
        "(CPU EP, rtol 1e-4, atol 1e-5) before timing",
        "- 'ours + ORT opt': our optimised model (RL when a policy ran, else greedy) passed through the ORT "
        "transformers optimizer (opt_level 0: python fusions only; ORT_ENABLE_ALL still runs at session creation)",
        "",
        table,
        "",
    ]
    for r in rows:
        extra = [f"{METHOD_TITLES[m]}: {c.rewrites} rewrites in {c.seconds:.1f} s" for m, c in r.cells.items()
                 if c.rewrites is not None and c.seconds is not None]
        if extra:
            lines.append(f"- {r.model}: " + "; ".join(extra))
    write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    write_json(out / f"{stem}.json", {"environment": env, "rows": [
        {"model": r.model, "nodes": r.nodes, "original_ms": r.original_ms, "original_ci_ms": r.original_ci,
         "methods": {m: vars(c) for m, c in r.cells.items()}} for r in rows
    ]})
    plot_speedup_bars(
        out / f"{stem}.png", [r.model for r in rows],
        {METHOD_TITLES[m]: [r.cells.get(m, Cell()).speedup for r in rows] for m in METHODS},
        title=f"speedup over onnxruntime alone ({args.device}{', small' if args.small else ''})",
    )
    return [out / f"{stem}.{ext}" for ext in ("md", "json", "png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--small", action="store_true", help="the zoo's small variants (a quick check)")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="zoo models (default: the transformer set; any zoo model is accepted)")
    p.add_argument("--no-ort-opt", action="store_true", help="skip the onnxruntime transformers optimizer columns")
    p.add_argument("--name", default="transformer_speedup", help="stem of the result files")
    p.add_argument("--search-latency", choices=("cost", "measured"), default="cost")
    p.add_argument("--steps", type=int, default=50, help="most rewrites per search path")
    p.add_argument("--rollouts", type=int, default=4, help="RL: sampled rollouts besides the greedy one")
    p.add_argument("--policy", help="policy checkpoint (default: the newest entry under checkpoints/)")
    p.add_argument("--max-seconds", type=float, default=5.0, help="cap per latency measurement")
    p.add_argument("--target-rel-ci", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--out", default=str(REPO / "results"))
    args = p.parse_args(argv)
    from xrlflow.zoo import list_models

    known = [e.name for e in list_models()]
    unknown = [m for m in args.models if m not in known]
    if unknown:
        p.error(f"unknown zoo model(s) {', '.join(unknown)}; choose from {', '.join(known)}")

    from xrlflow.measure import MeasureConfig, MeasuredLatency
    from xrlflow.services import make_latency_service
    from xrlflow.testing import newest_checkpoint

    config = MeasureConfig.create(
        device=args.device, max_seconds=args.max_seconds, target_rel_ci=args.target_rel_ci,
        intra_op_threads=args.threads,
    )
    policy = newest_checkpoint(REPO / "checkpoints", args.policy)
    rows = []
    with MeasuredLatency(config) as measured:
        search_service = measured if args.search_latency == "measured" else make_latency_service("cost", args.device)
        for name in args.models:
            rows.append(run_model(name, args, measured, search_service, policy))
        env = environment(args, measured.device)
        env["provider"] = config.provider
    env["policy"] = policy or "no policy"
    for path in write_results(rows, env, args):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
