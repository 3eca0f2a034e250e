"""X-RLflow's transformer comparison (MLSys 2023): onnxruntime alone, its transformers optimizer (fp32, fp16),
xrlflow's greedy search, TASO-style backtracking (budget 1000), the RL policy, and xrlflow's default pipeline
(fp32, fp16), on the paper's own graph shapes and on the full-size models.

Three phases, because the GPU machine has no CPU time to search and no torch:

    python experiments/transformer_speedup.py prepare --dir bench/out/experiment [--models ...] [--methods ...]
        [--taso-budget 1000] [--taso-seconds S]
    python experiments/transformer_speedup.py time --dir bench/out/experiment --json OUT.json [--no-cuda-graph]
        [--device cpu]
    python experiments/transformer_speedup.py report --dir bench/out/experiment --json A.json [B.json] -o results.md

`prepare` (any CPU, torch for the zoo's export) exports each model, produces each method's model with the
searches priced by the cost model (the bundled H200 table, `--latency cost --device cuda`), verifies every
output against the original on onnxruntime's CPU EP (fp32: rtol 1e-4, atol 1e-5; fp16: 2e-2), and writes
the models with their large weights stripped (dims and dtype kept: `xrlflow.paired_timing.strip_weights`)
plus `manifest.json`, so the folder is self-contained and a few MB. `time` (numpy, onnx, onnxruntime and
this package only; it never imports torch or transformers) refills the weights with seeded random values and
times each method against onnxruntime alone as paired, interleaved ABBA runs (`xrlflow.paired_timing`),
replayed as CUDA graphs unless `--no-cuda-graph`. `report` writes the markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

# only what the `time` phase may load: no torch, no transformers (prepare imports those inside its functions)
import onnx

from xrlflow.atomic import write_bytes
from xrlflow.paired_timing import TimingSetting, paired_timing, refilled_copy, strip_weights

# model -> (shape family, onnxruntime.transformers model_type)
MODELS = {
    "bert-xrl": ("paper", "bert"),
    "vit-xrl": ("paper", "vit"),
    "mini-dalle": ("paper", "gpt2"),
    "transformer-transducer": ("paper", "bert"),
    "bert-base": ("full-size", "bert"),
    "vit-base": ("full-size", "vit"),
    "gpt2": ("full-size", "gpt2"),
}
METHODS = ("ort-opt", "ort-opt-fp16", "greedy", "taso", "rl", "pipeline", "pipeline-fp16")
TITLES = {
    "ort-opt": "ORT optimizer", "ort-opt-fp16": "ORT optimizer fp16", "greedy": "greedy", "taso": "TASO",
    "rl": "RL", "pipeline": "pipeline", "pipeline-fp16": "pipeline fp16",
}
MAX_SET_MB = 60.0
WEIGHTS_NOTE = ("float initializers of >= 4096 elements travel as dims and dtype only; `time` fills them with "
                "seeded N(0, 0.02) values (latency does not depend on them); every output was verified with the "
                "real weights before stripping")
SCRIPT = "experiments/transformer_speedup.py"


# ---- prepare (CPU) --------------------------------------------------------------------------------------------
def _verify(original: onnx.ModelProto, candidate: onnx.ModelProto, fp16: bool) -> dict:
    from xrlflow.verify import Tolerance, verify_models

    tolerance = Tolerance(rtol=2e-2, atol=2e-2) if fp16 else Tolerance()
    check = verify_models(original, candidate, tolerance=tolerance)
    worst_abs = max((float(o.max_abs_error) for o in check.outputs), default=None)
    worst_rel = max((float(o.max_rel_error) for o in check.outputs), default=None)
    return {"ok": bool(check.ok), "reason": check.reason, "rtol": tolerance.rtol, "atol": tolerance.atol,
            "outputs": len(check.outputs), "max_abs": worst_abs, "max_rel": worst_rel}


def produce(name: str, method: str, original: onnx.ModelProto, args: argparse.Namespace,
            ort_cache: dict) -> tuple[onnx.ModelProto, dict]:
    """One method's model for zoo model `name` and what to record about it."""
    import xrlflow
    from xrlflow import ort_stages

    info: dict = {}
    if method in ("ort-opt", "ort-opt-fp16"):
        if "ort-opt" not in ort_cache:
            heads, hidden = ort_stages.infer_attention_dims(original)
            stage = ort_stages.ort_transformer_fusions(original, ort_stages.OrtFusionOptions(
                model_type=MODELS[name][1], num_heads=heads, hidden_size=hidden, use_gpu=True))
            ort_cache["ort-opt"] = (stage.model, f"model_type {MODELS[name][1]}, heads {heads}, hidden {hidden}: {stage.note}")
        model, info["note"] = ort_cache["ort-opt"]
        if method == "ort-opt-fp16":
            model = ort_stages.float16_stage(model).model
        return model, info
    # xrlflow's searches, priced by the bundled H200 table; the search columns leave onnxruntime's fusions out
    kwargs: dict = dict(latency="cost", device="cuda", seed=args.seed)
    if method == "greedy":
        kwargs.update(search="greedy", ort_fusions="off")
    elif method == "taso":
        kwargs.update(search="backtrack", budget=args.taso_budget, time_limit=args.taso_seconds, ort_fusions="off")
    elif method == "rl":
        kwargs.update(policy=args.policy, ort_fusions="off")
    elif method == "pipeline-fp16":
        kwargs.update(float16=True)
    result = xrlflow.optimize(original, **kwargs)
    report = result.report
    info["rewrites"] = len(report.get("rewrites", []))
    info["rewrites_by_rule"] = report.get("rewrites_by_rule")
    latency = report.get("latency") or {}
    info["cost_model_ms"] = {k: (latency.get(k) or {}).get("ms") for k in ("before", "after")}
    info["stages"] = report.get("stages")
    info["search_seconds"] = report.get("time_s", {})
    if method == "taso":
        info.update(budget=args.taso_budget, expansions=report.get("expansions"), stopped_by=report.get("stopped_by"),
                    time_limit_s=args.taso_seconds or None, graphs_seen=report.get("graphs_seen"), alpha=report["config"]["alpha"])
    if method == "rl":
        info["policy"] = report["config"]["policy"]
    return result.model, info


def _atomic_json(path: Path, data: dict) -> None:
    write_bytes(path, json.dumps(data, indent=1, default=str).encode())


def _set_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix == ".onnx")


def write_manifest(folder: Path) -> dict:
    """manifest.json: the per-model entries under models/ merged (several prepare runs may share a folder)."""
    entries = {}
    for path in sorted((folder / "models").glob("*.json")):
        entry = json.loads(path.read_text())
        entries[entry["model"]] = entry
    ordered = {n: entries[n] for n in [*MODELS, *sorted(entries)] if n in entries}
    size = _set_size(folder) + sum(p.stat().st_size for p in (folder / "models").glob("*.json"))
    manifest = {
        "experiment": "X-RLflow transformer comparison: ORT alone vs ORT optimizer (fp32/fp16), greedy, TASO "
                      "backtracking, RL, xrlflow pipeline (fp32/fp16)",
        "search_latency": "cost model, bundled H200 table (--latency cost --device cuda)",
        "verification": "every output against the original on onnxruntime's CPU EP (fp32 rtol 1e-4 atol 1e-5; fp16 2e-2)",
        "weights": WEIGHTS_NOTE,
        "size_mb": round(size / 1e6, 2),
        "left_out": {n: f"not prepared ({MODELS[n][0]} shape)" for n in MODELS if n not in ordered},
        "models": ordered,
    }
    if size / 1e6 > MAX_SET_MB:
        manifest["warning"] = f"the set is {size / 1e6:.1f} MB, over the {MAX_SET_MB:g} MB it should travel in"
    _atomic_json(folder / "manifest.json", manifest)
    return manifest


def prepare(args: argparse.Namespace) -> int:
    import numpy
    import onnxruntime
    import torch

    import xrlflow
    from xrlflow.zoo import export_model

    folder = Path(args.dir)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", SCRIPT, *(args.argv or [])])
    for name in args.models:
        entry_path = folder / "models" / f"{name}.json"
        entry = json.loads(entry_path.read_text()) if entry_path.is_file() else {"model": name, "methods": {}}
        original = export_model(name, batch=args.batch, small=args.small)
        entry.update(shape=MODELS[name][0] + (" (small variant)" if args.small else ""), nodes=len(original.graph.node), batch=args.batch,
                     inputs={i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in original.graph.input},
                     file=f"{name}.onnx")
        onnx.save(strip_weights(original), folder / f"{name}.onnx")
        # a model may be prepared in several runs (one method re-done): every run's command is kept
        commands = [c for c in _prepare_commands({name: entry}) if c != command] + [command]
        entry["prepared"] = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commands": commands,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "versions": {"xrlflow": xrlflow.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                         "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()},
        }
        print(f"[{name}] {entry['nodes']} nodes", flush=True)
        ort_cache: dict = {}
        for method in args.methods:
            started = time.perf_counter()
            try:
                model, info = produce(name, method, original, args, ort_cache)
                info["seconds"] = round(time.perf_counter() - started, 2)
                info["verify"] = _verify(original, model, fp16=method.endswith("fp16"))
            except Exception as exc:  # a method failing is a result of the experiment
                traceback.print_exc()
                model, info = None, {"note": f"failed: {type(exc).__name__}: {str(exc)[:200]}",
                                     "seconds": round(time.perf_counter() - started, 2)}
            if model is not None and info["verify"]["ok"]:
                file = f"{name}.{method}.onnx"
                onnx.save(strip_weights(model), folder / file)
                info.update(file=file, nodes=len(model.graph.node))
            elif model is not None:
                info["note"] = f"does not verify ({info['verify']['reason'][:160]}): left out of the timing"
            entry["methods"][method] = info
            print(f"[{name}] {method}: {_summary(info)}", flush=True)
            _atomic_json(entry_path, entry)
            write_manifest(folder)
    manifest = write_manifest(folder)
    print(f"{folder}: {manifest['size_mb']} MB, models {', '.join(manifest['models'])}")
    return 0


def _summary(info: dict) -> str:
    keys = ("nodes", "rewrites", "expansions", "stopped_by", "seconds", "note")
    parts = [f"{k} {info[k]}" for k in keys if info.get(k) is not None]
    verify = info.get("verify")
    if verify:
        parts.append("verified" if verify["ok"] else "NOT verified")
    return ", ".join(parts)


# ---- time (the GPU machine) ---------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    if device == "cuda":
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            return out[0] if out else "cuda"
        except Exception:
            return "cuda"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def time_all(args: argparse.Namespace) -> int:
    import numpy
    import onnxruntime

    import xrlflow

    folder = Path(args.dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    setting = TimingSetting(device=args.device, cuda_graph=not args.no_cuda_graph, threads=args.threads,
                            warmup=args.warmup, runs=args.runs, cycles=args.cycles)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def filled(file: str) -> str:
        return refilled_copy(folder, file, work)

    results = {
        "setting": setting.label, "cuda_graph": setting.device == "cuda" and setting.cuda_graph,
        "timing": {"warmup": setting.warmup, "runs": setting.runs, "cycles": setting.cycles, "threads": setting.threads},
        "device": _device_name(args.device), "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(), "onnx": onnx.__version__, "numpy": numpy.__version__,
        "xrlflow": xrlflow.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", SCRIPT, *(args.argv or [])]), "models": {},
    }
    deadline = time.monotonic() + args.max_seconds
    names = [n for n in (args.models or list(manifest["models"])) if n in manifest["models"]]
    skipped = []
    for method in args.methods:  # methods outer: a run cut by the deadline keeps every model of the first methods
        for name in names:
            info = manifest["models"][name]["methods"].get(method, {})
            if "file" not in info:
                continue
            if time.monotonic() > deadline:
                skipped.append(f"{name}/{method}")
                continue
            row = results["models"].setdefault(name, {})
            try:
                timing = paired_timing(filled(manifest["models"][name]["file"]), filled(info["file"]), setting, seed=args.seed)
                row[method] = timing.as_dict()
            except Exception as exc:
                row[method] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"[{name}] {method}: {row[method]}", flush=True)
            results["not_timed"] = skipped
            Path(args.json).write_text(json.dumps(results, indent=1))
    results["not_timed"] = skipped
    Path(args.json).write_text(json.dumps(results, indent=1))
    if skipped:
        print(f"deadline (--max-seconds {args.max_seconds:g}) reached: not timed {', '.join(skipped)}")
    print(f"wrote {args.json}")
    return 0


# ---- report -----------------------------------------------------------------------------------------------------
def _taso_label(info: dict) -> str:
    if info.get("expansions") is None:
        return ""
    spent, budget = info["expansions"], info.get("budget")
    if spent == budget:
        return f"budget {budget} spent"
    return f"{spent} of {budget} expansions ({info.get('stopped_by')})"


def _cell(timing: dict | None, info: dict, method: str) -> str:
    if not info:
        return "not prepared"
    if "file" not in info:
        return (info.get("note") or "-").replace("|", "/")[:80]
    if timing is None:
        return "not timed"
    if "error" in timing:
        return f"error ({timing['error'][:60]})".replace("|", "/")
    text = f"**{timing['speedup']:.3f}x** [{timing['speedup_low']:.3f}, {timing['speedup_high']:.3f}] {timing['b_ms']:.3f} ms"
    if "speedup_p25" in timing:
        text += f", IQR {timing['speedup_p25']:.3f}-{timing['speedup_p75']:.3f}"
    if method == "taso":
        text += f"; {_taso_label(info)}"
    return text


def _prepare_commands(models: dict) -> list[str]:
    """Every prepare command of the set, in the order first run (a set from before `commands`: its one `command`)."""
    out: list[str] = []
    for entry in models.values():
        prepared = entry.get("prepared", {})
        for command in prepared.get("commands", [prepared["command"]] if "command" in prepared else []):
            if command not in out:
                out.append(command)
    return out


def report(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    models = manifest["models"]
    first = next(iter(models.values()), {}).get("prepared", {})
    taso_budgets = sorted({m["methods"].get("taso", {}).get("budget") for m in models.values()} - {None})
    lines = [
        "# X-RLflow's transformer comparison: speedups over onnxruntime alone", "",
        f"- prepared ({first.get('date', '?')}, {first.get('machine', '?')}): "
        + "; ".join(f"`{c}`" for c in _prepare_commands(models)),
        f"- prepare versions: {', '.join(f'{k} {v}' for k, v in first.get('versions', {}).items())}",
        f"- searches priced by {manifest['search_latency']}; TASO = xrlflow's TASO-style cost-based backtracking "
        f"(alpha 1.05, budget {', '.join(map(str, taso_budgets)) or '-'}; the budget each model actually spent is in its cell); "
        "RL = the shipped policy (`checkpoints/xrlflow-h200`); greedy / TASO / RL: xrlflow's rewrites alone "
        "(`--ort-fusions off`); pipeline = xrlflow's default for `--device cuda` (rewrites, then onnxruntime's "
        "transformers fusions), fp16 with `--float16`; ORT optimizer = onnxruntime.transformers optimize_model "
        "(opt_level 0, use_gpu), fp16 = its convert_float_to_float16 (keep_io_types)",
        f"- verification: {manifest['verification']}; a method whose output did not verify is not timed",
        f"- weights: {manifest['weights']}",
        f"- set: {manifest.get('size_mb')} MB" + (f"; left out: {json.dumps(manifest['left_out'])}" if manifest.get("left_out") else ""),
    ]
    for path in args.json:
        timing = json.loads(Path(path).read_text())
        mode = "CUDA graph" if timing.get("cuda_graph") else "plain runs"
        lines += [
            "", f"## {mode}: {timing['device']}, {timing['setting']}", "",
            f"- timed {timing['date']}: `{timing['command']}`",
            f"- versions: onnxruntime {timing['onnxruntime']} ({', '.join(timing.get('providers', []))}), "
            f"onnx {timing.get('onnx')}, numpy {timing.get('numpy')}, xrlflow {timing.get('xrlflow')}, python {timing.get('python')}",
            f"- paired interleaved ABBA timing against ORT alone (ORT_ENABLE_ALL, IO binding), "
            f"{timing['timing']['cycles']} cycles of {timing['timing']['runs']} runs per quarter after "
            f"{timing['timing']['warmup']} warm-up runs: speedup = median of per-cycle ratios, [bootstrap 95% "
            "interval], the method's median ms, IQR of the per-cycle speedups; 'ORT alone' = the original's median",
        ]
        if timing.get("not_timed"):
            lines.append(f"- not timed (deadline): {', '.join(timing['not_timed'])}")
        lines.append("")
        header = ["model", "shape", "nodes", f"ORT alone ({mode})"] + [TITLES[m] for m in METHODS]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name, entry in models.items():
            row = timing["models"].get(name, {})
            base = [t["a_ms"] for t in row.values() if "a_ms" in t]
            base_text = f"{sorted(base)[len(base) // 2]:.3f} ms" + (f" ({min(base):.3f}-{max(base):.3f})" if len(base) > 1 else "") if base else "-"
            cells = [name, entry.get("shape", ""), str(entry.get("nodes", "")), base_text]
            cells += [_cell(row.get(m), entry["methods"].get(m, {}), m) for m in METHODS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per model: what each method did (prepare)", ""]
    for name, entry in models.items():
        for method in METHODS:
            info = entry["methods"].get(method)
            if info is None:
                continue
            verify = info.get("verify") or {}
            extra = [f"{info.get('seconds', '?')} s"]
            if info.get("rewrites") is not None:
                extra.append(f"{info['rewrites']} rewrites")
            if method == "taso" and info.get("expansions") is not None:
                extra.append(f"{info['expansions']} expansions of budget {info['budget']} (stopped by {info['stopped_by']}"
                             + (f", time limit {info['time_limit_s']:g} s" if info.get("time_limit_s") else "") + ")")
            if info.get("cost_model_ms") and info["cost_model_ms"].get("after") is not None:
                extra.append(f"cost model {info['cost_model_ms']['before']:.4f} -> {info['cost_model_ms']['after']:.4f} ms")
            if verify:
                extra.append(("verified" if verify.get("ok") else "NOT verified")
                             + (f", max abs err {verify['max_abs']:.2e}" if verify.get("max_abs") is not None else ""))
            if info.get("note"):
                extra.append(info["note"].replace("|", "/")[:200])
            lines.append(f"- {name} / {TITLES[method]}: " + "; ".join(extra))
    lines += ["", "Commands:", "", "```bash",
              *_prepare_commands(models),
              *[json.loads(Path(p).read_text())["command"] for p in args.json],
              " ".join(["python", SCRIPT, *(args.argv or [])]), "```", ""]
    Path(args.output).write_text("\n".join(lines))
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="phase", required=True)
    pp = sub.add_parser("prepare", help="export, optimise, verify and write the set (CPU)")
    pp.add_argument("--dir", required=True)
    pp.add_argument("--models", nargs="+", default=list(MODELS), help=f"zoo models (default: {' '.join(MODELS)})")
    pp.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    pp.add_argument("--batch", type=int, default=1)
    pp.add_argument("--small", action="store_true", help="the zoo's small variants (a smoke run, the tests)")
    pp.add_argument("--taso-budget", type=int, default=1000, help="backtracking expansions (TASO's budget)")
    pp.add_argument("--taso-seconds", type=float, default=0.0,
                    help="stop the backtracking after this many seconds (0: none); the expansions spent are recorded")
    pp.add_argument("--policy", default="checkpoints/xrlflow-h200", help="the RL column's policy")
    pp.add_argument("--seed", type=int, default=0)
    pt = sub.add_parser("time", help="paired A/B timing of every prepared method against ORT alone (GPU)")
    pt.add_argument("--dir", required=True)
    pt.add_argument("--json", required=True)
    pt.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run on the CPU EP")
    pt.add_argument("--no-cuda-graph", action="store_true", help="plain CUDA runs instead of replayed CUDA graphs")
    pt.add_argument("--work", default="/tmp/xrlflow_experiment_models", help="where the refilled models are written")
    pt.add_argument("--models", nargs="*")
    pt.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    pt.add_argument("--cycles", type=int, default=15)
    pt.add_argument("--runs", type=int, default=20)
    pt.add_argument("--warmup", type=int, default=20)
    pt.add_argument("--threads", type=int, default=0, help="CPU EP intra-op threads (0: onnxruntime's default)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--max-seconds", type=float, default=540.0, help="start no new pair after this")
    pr = sub.add_parser("report", help="the markdown table")
    pr.add_argument("--dir", required=True)
    pr.add_argument("--json", nargs="+", required=True)
    pr.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    args.argv = argv
    if args.phase == "prepare":
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return {"prepare": prepare, "time": time_all, "report": report}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
