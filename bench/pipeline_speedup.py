"""Speedups of the whole pipeline against its peers, on real exports and on the zoo.

Three phases, because the GPU machine has little time and no `transformers`:

    python -m bench.pipeline_speedup prepare --dir bench/out/pipeline [--models hf-bert-base zoo-bert-base-b8 ...]
    python bench/pipeline_speedup.py time --dir bench/out/pipeline --json $OUT/timing.json [--no-cuda-graph] [--device cpu]
    python bench/pipeline_speedup.py report --dir bench/out/pipeline --json timing.json ... -o bench/results/pipeline_speedup_h200.md

`prepare` of the Hugging Face models imports bench/hf_models.py: run it from the repository root as a module.
`time` imports numpy, onnx, onnxruntime and torch-free xrlflow modules only (on the GPU machine xrlflow comes
from PYTHONPATH).

`prepare` (any CPU) exports each model, produces every method's model, verifies each against the original on
onnxruntime's CPU EP (fp32 tolerances; fp16 ones at fp16 tolerances), and writes them with their large
weights stripped (shape and dtype kept) so the set travels in a few MB. `time` (the GPU machine) refills the
stripped weights with seeded random values (latency does not depend on them) and times each method against
the original as paired, interleaved A/B runs (xrlflow/paired_timing.py). `report` writes the table.

Methods (every ratio is over the original under onnxruntime alone, ORT_ENABLE_ALL):
- `ort-opt`: onnxruntime's transformers optimizer alone (fp32); `ort-opt-fp16`: then its float16 converter;
- `xrlflow`: xrlflow's rewrites alone (`--no-ort-fusions`), default search;
- `backtrack`: xrlflow's rewrites alone with TASO-style backtracking, budget 1000;
- `pipeline`: xrlflow's default pipeline (rewrites, then onnxruntime's fusions); `pipeline-fp16`: with --float16;
- `legacy+ort-opt(-fp16)` (HF BERT only): the strongest onnxruntime-only path a user has: the legacy
  TorchScript export (eager attention), whose attention onnxruntime's optimizer recognises.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import onnx

from xrlflow.paired_timing import TimingSetting, paired_timing, refilled_copy, strip_weights



@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "hf" or "zoo"
    arch: str
    layers: int | None = None
    batch: int = 1
    seq: int = 128
    hidden: int | None = None  # HF only: a narrower model for smoke runs


MODELS = {
    s.name: s for s in [
        ModelSpec("hf-bert-base", "hf", "bert-base"),
        ModelSpec("hf-vit-4l", "hf", "vit-base", layers=4),
        ModelSpec("hf-gpt2", "hf", "gpt2"),
        ModelSpec("hf-bert-tiny", "hf", "bert-base", layers=2, seq=32, hidden=128),  # smoke runs
        ModelSpec("zoo-bert-base-b1", "zoo", "bert-base"),
        ModelSpec("zoo-bert-base-b8", "zoo", "bert-base", batch=8),
        ModelSpec("zoo-vit-base-b1", "zoo", "vit-base"),
        ModelSpec("zoo-vit-base-b8", "zoo", "vit-base", batch=8),
        ModelSpec("zoo-gpt2-b1", "zoo", "gpt2"),
        ModelSpec("zoo-gpt2-b8", "zoo", "gpt2", batch=8),
        ModelSpec("zoo-mini-dalle-b1", "zoo", "mini-dalle"),
        ModelSpec("zoo-mini-dalle-b8", "zoo", "mini-dalle", batch=8),
        ModelSpec("zoo-transformer-transducer-b1", "zoo", "transformer-transducer"),
        ModelSpec("zoo-squeezenet-b1", "zoo", "squeezenet"),
        ModelSpec("zoo-inception-v3-b1", "zoo", "inception-v3"),
        ModelSpec("zoo-nasnet-a-b1", "zoo", "nasnet-a"),
    ]
}
METHODS = ("pipeline", "ort-opt", "xrlflow", "pipeline-fp16", "ort-opt-fp16", "legacy+ort-opt", "legacy+ort-opt-fp16",
           "backtrack", "policy")


def export_original(spec: ModelSpec, path: Path, legacy: bool = False) -> Path:
    if spec.source == "hf":
        from bench.hf_models import HFExport, export

        hf = HFExport(spec.arch, spec.layers, spec.batch, spec.seq, legacy=legacy, attn="eager" if legacy else "sdpa",
                      opset=17 if legacy else 18, hidden=spec.hidden)
        return export(hf, path)
    from xrlflow.zoo import export_model

    onnx.save(export_model(spec.arch, batch=spec.batch), path)
    return path


def _verify(original: onnx.ModelProto, candidate: onnx.ModelProto, fp16: bool) -> str:
    from xrlflow.verify import Tolerance, verify_models

    tolerance = Tolerance(rtol=2e-2, atol=2e-2) if fp16 else Tolerance()
    check = verify_models(original, candidate, tolerance=tolerance)
    return "verified" if check.ok else f"does not verify: {check.reason[:120]}"


def _ort_type(spec: ModelSpec) -> str:
    return {"bert-base": "bert", "vit-base": "vit", "gpt2": "gpt2", "mini-dalle": "gpt2", "transformer-transducer": "bert"}.get(spec.arch, "")


def produce(spec: ModelSpec, method: str, original: onnx.ModelProto, folder: Path) -> tuple[onnx.ModelProto | None, dict]:
    """One method's model for `spec` and what to say about it."""
    import xrlflow
    from xrlflow import ort_stages

    started = time.perf_counter()
    info: dict = {}
    if method in ("ort-opt", "ort-opt-fp16", "legacy+ort-opt", "legacy+ort-opt-fp16"):
        source = original
        if not _ort_type(spec):
            return None, {"note": "not a transformer"}
        if method.startswith("legacy"):
            if spec.source != "hf" or spec.arch != "bert-base":
                return None, {"note": "only for HF BERT"}
            legacy_path = folder / f"{spec.name}.legacy.onnx"
            if not legacy_path.is_file():
                export_original(spec, legacy_path, legacy=True)
            source = onnx.load(legacy_path)
        # what a GPU user runs: the optimizer told the model type, the head count, the width and the target
        heads, hidden = ort_stages.infer_attention_dims(original)
        if spec.source == "hf":
            hidden = spec.hidden or 768
            heads = hidden // 64
        stage = ort_stages.ort_transformer_fusions(source, ort_stages.OrtFusionOptions(
            model_type=_ort_type(spec), num_heads=heads, hidden_size=hidden, use_gpu=True))
        model, info["note"] = stage.model, ("legacy export; " if method.startswith("legacy") else "") + stage.note
        if method.endswith("fp16"):
            model = ort_stages.float16_stage(model).model
    else:
        # searches priced by the bundled H200 table; "xrlflow alone" leaves onnxruntime's own fusion stage out
        kwargs = dict(latency="cost", device="cuda")
        if method == "xrlflow":
            kwargs.update(ort_fusions="off")
        elif method == "backtrack":
            kwargs.update(ort_fusions="off", search="backtrack", budget=1000)
        elif method == "pipeline-fp16":
            kwargs.update(float16=True)
        elif method == "policy":  # the shipped policy, against "xrlflow" (greedy) with the same stages
            kwargs.update(ort_fusions="off", policy="")
        result = xrlflow.optimize(original, **kwargs)
        model = result.model
        info["stages"] = result.report.get("stages")
        info["rewrites"] = len(result.report.get("rewrites", []))
    info["seconds"] = round(time.perf_counter() - started, 2)
    info["verify"] = _verify(original, model, fp16="fp16" in method)
    return model, info


def prepare(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    for name in args.models:
        spec = MODELS[name]
        path = folder / f"{name}.full.onnx"  # kept (git-ignored) so a later run for other methods reuses it
        if not path.is_file():
            export_original(spec, path)
        original = onnx.load(path)
        entry = manifest["models"].get(name, {"methods": {}})
        entry["nodes"] = len(original.graph.node)
        onnx.save(strip_weights(original), folder / f"{name}.onnx")
        print(f"[{name}] {entry['nodes']} nodes", flush=True)
        for method in args.methods:
            if method.startswith("legacy") and not (spec.source == "hf" and spec.arch == "bert-base"):
                continue
            try:
                model, info = produce(spec, method, original, folder)
            except Exception as exc:  # a method failing is a result of this benchmark
                traceback.print_exc()
                model, info = None, {"note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"}
            peer = method.startswith(("ort-opt", "legacy"))  # a peer's output is timed as the peer gives it
            if model is not None and (info.get("verify") == "verified" or peer):
                onnx.save(strip_weights(model), folder / f"{name}.{method}.onnx")
                info["file"] = f"{name}.{method}.onnx"
                info["nodes"] = len(model.graph.node)
            entry["methods"][method] = info
            print(f"[{name}] {method}: {info}", flush=True)
        manifest["models"][name] = entry
        manifest["prepared"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "command": " ".join(["python", "bench/pipeline_speedup.py", *sys.argv[1:]])}
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return 0


def time_all(args: argparse.Namespace) -> int:
    import onnxruntime

    folder = Path(args.dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    setting = TimingSetting(device=args.device, cuda_graph=not args.no_cuda_graph, cycles=args.cycles, runs=args.runs)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def filled(file: str) -> str:
        return refilled_copy(folder, file, work)

    results = {"setting": setting.label, "onnxruntime": onnxruntime.__version__, "device": _device_name(args.device),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "models": {}}
    deadline = time.monotonic() + args.max_seconds
    names = [n for n in (args.models or list(manifest["models"])) if n in manifest["models"]]
    # methods outer: when the deadline cuts the run, the first methods have every model
    for method in args.methods:
        for name in names:
            info = manifest["models"][name]["methods"].get(method, {})
            if "file" not in info or time.monotonic() > deadline:
                continue
            row = results["models"].setdefault(name, {})
            try:
                row[method] = paired_timing(filled(f"{name}.onnx"), filled(info["file"]), setting).as_dict()
            except Exception as exc:
                row[method] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"[{name}] {method}: {row[method]}", flush=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _device_name(device: str) -> str:
    if device == "cuda":
        import subprocess

        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.strip().splitlines()[0]
        except Exception:
            return "cuda"
    return platform.processor() or platform.machine()


def _cell(timing: dict | None, info: dict) -> str:
    if timing is None:
        note = info.get("note") or info.get("verify") or "-"
        return note.replace("|", "/")[:60] if "file" not in info else "not timed"
    if "error" in timing:
        return f"error ({timing['error'][:40]})"
    return f"{timing['speedup']:.3f}x [{timing['speedup_low']:.3f}, {timing['speedup_high']:.3f}]"


def report(args: argparse.Namespace) -> int:
    manifest = json.loads((Path(args.dir) / "manifest.json").read_text())
    lines = ["# Pipeline speedups over onnxruntime alone", ""]
    lines.append(f"- models prepared {manifest.get('prepared', {}).get('date', '?')}: "
                 f"`{manifest.get('prepared', {}).get('command', '?')}`; every model verified against the original on "
                 "onnxruntime's CPU EP before timing (fp32: rtol 1e-4, atol 1e-5; fp16: 2e-2)")
    for path in args.json:
        timing = json.loads(Path(path).read_text())
        lines += ["", f"## {timing['device']}: {timing['setting']} (onnxruntime {timing['onnxruntime']}, {timing['date']})", "",
                  "Speedup over the original (median of per-cycle ratios, ABBA cycles, [bootstrap 95% interval]); "
                  "the original's median time in the first column.", ""]
        header = ["model", "nodes", "ORT alone"] + list(args.methods)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name, entry in manifest["models"].items():
            row = timing["models"].get(name, {})
            base = next((t["a_ms"] for t in row.values() if "a_ms" in t), None)
            cells = [name, str(entry["nodes"]), f"{base:.3f} ms" if base else "-"]
            cells += [_cell(row.get(m), entry["methods"].get(m, {})) for m in args.methods]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Notes per model (stages, rewrites, seconds to produce):", ""]
    for name, entry in manifest["models"].items():
        for method, info in entry["methods"].items():
            extra = {k: v for k, v in info.items() if k in ("note", "rewrites", "seconds", "stages", "verify")}
            lines.append(f"- {name} / {method}: {json.dumps(extra)[:400]}")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="phase", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--dir", required=True)
    pp.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "hf-bert-tiny"], choices=list(MODELS))
    pp.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    pt = sub.add_parser("time")
    pt.add_argument("--dir", required=True)
    pt.add_argument("--json", required=True)
    pt.add_argument("--work", default="/tmp/pipeline_models")
    pt.add_argument("--models", nargs="*")
    pt.add_argument("--methods", nargs="+", default=list(METHODS))
    pt.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    pt.add_argument("--no-cuda-graph", action="store_true")
    pt.add_argument("--cycles", type=int, default=15)
    pt.add_argument("--runs", type=int, default=20)
    pt.add_argument("--max-seconds", type=float, default=480.0, help="stop starting new pairs after this")
    pr = sub.add_parser("report")
    pr.add_argument("--dir", required=True)
    pr.add_argument("--json", nargs="+", required=True)
    pr.add_argument("--methods", nargs="+", default=list(METHODS))
    pr.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    return {"prepare": prepare, "time": time_all, "report": report}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
