"""Human- and machine-readable output of an optimisation run: the summary table, the JSON report, the chart.

The report is a plain dict, built here (`build_report`) from what `xrlflow.optimize` did. Charts use
matplotlib's Agg backend (no display needed) and are written atomically like every other artifact.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from xrlflow.atomic import replacing, write_bytes

if TYPE_CHECKING:
    import onnx

    from xrlflow.engine import Match
    from xrlflow.ir import Graph
    from xrlflow.latency import LatencyService
    from xrlflow.search import SearchResult


def _fmt_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}" if value < 1000 else f"{value:.0f}"


def is_estimate(entry: Mapping[str, Any] | None) -> bool:
    """A deterministic latency (the cost model's): one number, no interval to show."""
    return bool(entry) and entry.get("source") == "cost-model"


def format_latency(entry: Mapping[str, Any] | None) -> str:
    """'1.234 ms [1.200, 1.260]' from a latency dict (ms, low_ms, high_ms); an estimate, or an interval of width
    0, is the number alone ('0.159 ms')."""
    if not entry or not entry.get("ok", True):
        return "failed" + (f" ({entry.get('reason')})" if entry and entry.get("reason") else "")
    if is_estimate(entry) or entry["low_ms"] == entry["high_ms"]:
        return f"{_fmt_ms(entry['ms'])} ms"
    return f"{_fmt_ms(entry['ms'])} ms [{_fmt_ms(entry['low_ms'])}, {_fmt_ms(entry['high_ms'])}]"


def _latency_label(lat: Mapping[str, Any]) -> str:
    return "cost-model estimate" if is_estimate(lat["before"]) and is_estimate(lat["after"]) else "median, 95% CI"


def _rows_to_text(rows: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def _format_speedup(lat: Mapping[str, Any]) -> str:
    speedup = lat.get("speedup")
    if speedup is None or not math.isfinite(speedup):
        return "-"
    text = f"{speedup:.3f}x"
    if lat.get("speedup_low") is not None:
        text += f" [{lat['speedup_low']:.3f}, {lat['speedup_high']:.3f}]"
    elif is_estimate(lat["before"]) and is_estimate(lat["after"]):
        return text + " (ratio of the two estimates)"
    return text + f" ({lat.get('speedup_method', '')})"


def format_summary(report: Mapping[str, Any]) -> str:
    """The table `xrlflow optimize` prints: latency, speedup, rewrites by rule, op counts, time split."""
    lat = report["latency"]
    lines = [f"xrlflow optimize: {report['input']} ({report['method']}, latency: {report['latency_service']})"]
    label = lat.get("interval_label")
    if label:  # the final A/B in the deployment setting: medians, the interval is the speedup's
        rows = [
            ("latency before (input file)", f"{_fmt_ms(lat['before']['ms'])} ms ({label})"),
            ("latency after", f"{_fmt_ms(lat['after']['ms'])} ms"),
        ]
    else:
        rows = [
            (f"latency before ({_latency_label(lat)})", format_latency(lat["before"])),
            (f"latency after  ({_latency_label(lat)})", format_latency(lat["after"])),
        ]
    rows += [
        ("speedup", _format_speedup(lat)),
        ("rewrites applied", str(len(report["rewrites"]))),
    ]
    guarantee = report.get("guarantee") or {}
    if lat.get("deployment_setting"):
        search = lat.get("search") or {}
        rows.append(("measured in", f"search: {search.get('setting') or '-'}; final A/B: {lat['deployment_setting']}"))
    if guarantee:
        rows.append(("never slower", ("FELL BACK: " if guarantee.get("fallback") else "") + guarantee.get("message", "")))
    if report.get("canonicalised"):
        rows.append(("canonicalised first", ", ".join(report["canonical_rules"]) + " (applied exhaustively)"))
    times = report["time_s"]
    rows += [
        ("time in decisions", f"{times['decision']:.2f} s"),
        ("time in latency service", f"{times['latency']:.2f} s ({report['latency_calls']} graphs)"),
        ("time verifying", f"{times['verify']:.2f} s"),
    ]
    ver = report["verification"]
    worst_abs = max((o["max_abs_error"] for o in ver["outputs"]), default=0.0)
    worst_rel = max((o["max_rel_error"] for o in ver["outputs"]), default=0.0)
    rows.append((
        "verification",
        ("passed" if ver["ok"] else f"NOT POSSIBLE: {ver['reason']}" if ver.get("skipped") else f"FAILED: {ver['reason']}")
        + f" (max abs {worst_abs:.2e}, max rel {worst_rel:.2e}; rtol {ver['rtol']:g}, atol {ver['atol']:g})",
    ))
    size = report.get("size")
    if size:
        rows.append(("size on disk (before -> after)", f"{size['input_bytes']:,} -> {size['output_bytes']:,} bytes "
                     f"({size['merged_bytes']:,} bytes of merged weights)"))
    lines += _rows_to_text(rows)
    for warning in report.get("warnings") or ():
        lines.append(f"  WARNING: {warning}")
    stages = report.get("stages") or []
    if stages:
        lines.append("  stages:")
        for stage in stages:
            lines.append(f"    {stage['name']:<22} {_stage_text(stage)}")
    advice = report.get("advice")
    if advice:
        lines.append("  CUDA graph:")
        for which in ("input", "output"):
            entry = (advice.get("latency") or {}).get(which) or {}
            lines.append(f"    {which:<8} plain {format_latency(entry.get('plain'))}; replayed "
                         f"{format_latency(entry.get('cuda_graph'))}")
        lines.append(f"    {advice.get('message', '')}")
        if advice.get("snippet"):
            lines.append("    snippet (also in the report):")
            lines += ["      " + ln for ln in advice["snippet"].rstrip().splitlines()]
    by_rule = report.get("rewrites_by_rule") or {}
    if by_rule:
        lines.append("  rewrites by rule:")
        lines += _rows_to_text([(f"  {rule}", str(n)) for rule, n in by_rule.items()])
    before, after = report["op_counts"]["before"], report["op_counts"]["after"]
    ops = sorted(set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op))
    changed = [op for op in ops if before.get(op, 0) != after.get(op, 0)]
    lines.append(f"  op counts (before -> after): {sum(before.values())} -> {sum(after.values())} nodes")
    for op in changed or ops[:8]:
        lines.append(f"    {op:<24} {before.get(op, 0):>6} -> {after.get(op, 0)}")
    broken = report.get("broken_rewrite")
    if broken:
        lines.append(
            f"  broken by rewrite #{broken['index']} {broken['rule']} on {', '.join(broken['bound_nodes'])}: "
            f"{broken['reason']}"
        )
    return "\n".join(lines)


def _stage_text(stage: Mapping[str, Any]) -> str:
    if not stage.get("applied"):
        state = f"DROPPED ({stage['dropped']})" if stage.get("dropped") else (stage.get("note") or "not applied")
        return state
    fused = stage.get("fused") or stage.get("rewrites") or {}
    what = ", ".join(f"{n} {op}" for op, n in fused.items()) or stage.get("note", "")
    nodes = stage.get("nodes")
    text = f"verified; {what}" + (f"; nodes {nodes[0]} -> {nodes[1]}" if nodes else "")
    lat = stage.get("latency_ms")
    if lat:
        before = _fmt_ms(lat["before"]) if lat.get("before") is not None else "-"
        text += f"; {before} -> {_fmt_ms(lat['after'])} ms ({lat['source']})"
        if "speedup_over_input" in lat:
            low, high = lat["interval"]
            text += f", {lat['speedup_over_input']:.3f}x [{low:.3f}, {high:.3f}] over the input"
    return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    text = json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"
    write_bytes(path, text.encode())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode())


def plot_format(path: str | os.PathLike[str]) -> str:
    """The format a chart at `path` is written in, from its extension (no extension: PNG); BadInputError for an
    extension matplotlib cannot write, so a command can refuse it before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    from xrlflow.errors import BadInputError

    suffix = Path(path).suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise BadInputError(f"--plot {path}: matplotlib cannot write .{suffix} charts; use one of "
                            f"{', '.join('.' + f for f in sorted(formats))}")
    return suffix or "png"


def latency_figure(chart: "LatencyChart", title: str = "latency per step") -> Any:
    """The chart as a matplotlib Figure (Agg): latency (ms) against step, one line per series; a dashed line
    marks the input model's latency, a dotted one the graph kept; the note is written on the chart."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    many = len(chart.series) > _MAX_LEGEND_LINES  # one legend entry for all of them, one colour
    for i, (label, points) in enumerate(chart.series.items()):
        finite = [(s, v) for s, v in points if math.isfinite(v)]
        if not finite:
            continue
        style: dict[str, Any] = {"marker": "." if len(finite) < 60 else None, "label": label}
        if many:
            style.update(color="tab:blue", alpha=0.5, label=f"rollouts ({len(chart.series)})" if i == 0 else None)
        ax.plot([s for s, _ in finite], [v for _, v in finite], **style)
    if chart.baseline_ms is not None and math.isfinite(chart.baseline_ms):
        ax.axhline(chart.baseline_ms, color="gray", linestyle="--", linewidth=1, label="input model")
    if chart.best_ms is not None and math.isfinite(chart.best_ms):
        ax.axhline(chart.best_ms, color="black", linestyle=":", linewidth=1, label="graph kept")
    if chart.note:
        ax.text(0.5, 0.5, chart.note, transform=ax.transAxes, ha="center", va="bottom", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_latency_history(path: str | os.PathLike[str], chart: "LatencyChart", title: str = "latency per step") -> None:
    """Write `latency_figure(chart, title)` to `path` (its format from the extension), atomically."""
    fig = latency_figure(chart, title)
    with replacing(path) as tmp:
        fig.savefig(tmp, format=plot_format(path), dpi=120)


def plot_speedup_bars(
    path: str | os.PathLike[str],
    models: Sequence[str],
    speedups: Mapping[str, Sequence[float | None]],
    title: str,
) -> None:
    """Grouped bars: one group per model, one bar per method (missing values leave a gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(speedups)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models) + 2), 4))
    for i, method in enumerate(methods):
        xs = [m + (i - (len(methods) - 1) / 2) * width for m in range(len(models))]
        values = [v if v is not None and math.isfinite(v) else 0.0 for v in speedups[method]]
        ax.bar(xs, values, width=width, label=method)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=20, ha="right")
    ax.set_ylabel("speedup over original (x)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format=plot_format(path), dpi=120)
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = [
    "format_summary", "format_latency", "write_json", "write_text", "plot_latency_history", "latency_figure",
    "latency_chart", "LatencyChart", "plot_speedup_bars",
    "markdown_table",
]


# ---- the report dict -------------------------------------------------------------------------------------------
def op_counts(model: "onnx.ModelProto") -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def rewrite_entries(path: Sequence["Graph"], applied: Sequence["Match"]) -> list[dict[str, Any]]:
    entries = []
    for i, (match, before, after) in enumerate(zip(applied, path, path[1:]), start=1):
        removed = [n for n in before.nodes if n not in after.nodes]
        added = [n for n in after.nodes if n not in before.nodes]
        entries.append({
            "index": i,
            "rule": match.rule,
            "bound_nodes": list(match.nodes),
            "nodes_before": [f"{n} ({before.nodes[n].op_type})" for n in removed],
            "nodes_after": [f"{n} ({after.nodes[n].op_type})" for n in added],
            "graph_nodes": [len(before), len(after)],
        })
    return entries


def input_size(model_or_path: "str | os.PathLike[str] | onnx.ModelProto", model: "onnx.ModelProto") -> int:
    """Bytes on disk of the input (the .onnx file plus its external data files), or its serialised size."""
    import onnx

    from xrlflow.onnx_io import weight_bytes

    if isinstance(model_or_path, onnx.ModelProto):
        return weight_bytes(model) + skeleton_bytes(model)
    path = Path(model_or_path)
    files = {path.resolve()}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in t.external_data if e.key == "location")
            files.add((path.resolve().parent / location).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())


def skeleton_bytes(model: "onnx.ModelProto") -> int:
    """Serialised size of the model without its weight payloads (what is not counted in weight_bytes)."""
    return sum(n.ByteSize() for n in model.graph.node) + sum(v.ByteSize() for v in model.graph.input) + \
        sum(v.ByteSize() for v in model.graph.output)


def merged_bytes(model: "onnx.ModelProto", optimised: "onnx.ModelProto") -> int:
    """Bytes of what the rewrites created: weights the input does not have (folded merges: concatenated,
    padded, ...) and the new nodes themselves."""
    import onnx

    from xrlflow.onnx_io import weight_bytes

    known_weights = {t.name for t in model.graph.initializer}
    known_nodes = {n.name for n in model.graph.node}
    fresh = onnx.ModelProto()
    fresh.graph.initializer.extend(t for t in optimised.graph.initializer if t.name not in known_weights)
    return weight_bytes(fresh) + sum(n.ByteSize() for n in optimised.graph.node if n.name not in known_nodes)


def latency_section(result: "SearchResult", service: "LatencyService", paired_timing: bool) -> dict[str, Any]:
    """Latency before and after; with `paired_timing` (a measured result that verified and changed the graph)
    from interleaved A/B pairs: separate medians drift with the machine's load, the pairs cancel that drift."""
    from xrlflow.latency import ComparesGraphs

    before, after = result.initial_latency, result.best_latency
    measure = getattr(service, "config", None)
    section: dict[str, Any] = {
        "setting": getattr(measure, "setting", None) or service.name,
        "before": asdict(before),
        "after": asdict(after),
        "speedup": before.ms / after.ms if after.ok and after.ms > 0 else None,
        "speedup_method": "ratio of the two medians",
    }
    if paired_timing and result.applied and isinstance(service, ComparesGraphs):
        paired = service.compare(result.initial, result.best)
        if paired.ok:
            section.update(
                before=asdict(paired.a), after=asdict(paired.b), speedup=paired.speedup,
                speedup_low=1.0 / paired.high, speedup_high=1.0 / paired.low,
                speedup_method=f"interleaved A/B pairs ({paired.runs} runs), median of per-pair ratios",
            )
    return section


def build_report(**parts: Any) -> dict[str, Any]:
    """The JSON report of one `xrlflow.optimize` run, from its parts (see the keys read below)."""
    import datetime

    from xrlflow.version import __version__
    from xrlflow.onnx_io import weight_bytes

    config, result, model, optimised = parts["config"], parts["result"], parts["model"], parts["optimised"]
    engine, verification, tolerance = parts["engine"], parts["verification"], parts["tolerance"]
    search = config.search_config
    return {
        "xrlflow_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": parts["source"],
        "output": None,
        "written": False,
        "method": config.method,
        "latency_service": parts["service"].name,
        "device": config.device,
        "rules": [r.name for r in engine.rules],
        "canonicalised": parts["canonicalised"],
        "canonical_rules": parts["canonical_rules"],
        "rule_fingerprint": engine.fingerprint,
        "registry_fingerprint": parts["registry_fingerprint"],
        "config": {
            "search": config.search if config.policy is None else None, "policy": config.policy,
            "steps": search.steps, "rollouts": search.rollouts, "budget": search.budget, "alpha": search.alpha,
            "time_limit": search.time_limit,
            "seed": search.seed, "input_shapes": {k: list(v) for k, v in config.input_shapes.items()},
            "ort_fusions": config.uses_ort_fusions, "float16": config.float16, "threads": config.threads,
            "cuda_graph": config.cuda_graph, "ab_repeats": config.ab_repeats, "upgrade_opset": config.upgrade_opset,
            "deployment_setting": config.deployment_setting,
        },
        "latency": parts["latency"],
        "rewrites": rewrite_entries(parts["path"], result.applied),
        "rewrites_by_rule": dict(Counter(m.rule for m in result.applied).most_common()),
        "op_counts": {"before": op_counts(model), "after": op_counts(optimised)},  # as ONNX files
        "size": {
            "input_bytes": input_size(parts["model_or_path"], model),
            "output_bytes": weight_bytes(optimised) + skeleton_bytes(optimised),  # estimate; the file size once written
            "merged_bytes": merged_bytes(model, optimised),
            "weight_bytes_before": weight_bytes(model),
            "weight_bytes_after": weight_bytes(optimised),
        },
        "warnings": parts["warnings"],
        "latency_calls": result.latency_calls,
        "graphs_seen": result.graphs_seen,
        "expansions": result.expansions,  # backtracking only: graphs expanded, and why it stopped
        "stopped_by": result.stopped_by or None,
        "time_s": {"decision": result.decision_seconds, "latency": result.latency_seconds, **parts["times"]},
        "history": [asdict(r) for r in result.history],
        "verification": {
            **verification.to_dict(), "rtol": config.tolerance.rtol, "atol": config.tolerance.atol,
            "tolerances": {k: [v.rtol, v.atol] for k, v in tolerance.items()},
            "inputs": parts["feeds_source"], "provider": "CPUExecutionProvider", "other_shapes": parts["other_check"],
        },
        "broken_rewrite": parts["broken"],
        "stages": parts.get("stages") or [],
        "guarantee": parts.get("guarantee") or {},
        "advice": parts.get("advice"),
        "notes": parts.get("notes") or [],
        "opset_upgrade": parts.get("opset_upgrade"),
    }


_MAX_LEGEND_LINES = 10


@dataclass(frozen=True)
class LatencyChart:
    """What `--plot` draws: lines of (step, ms) by label, the x axis' meaning, the input's latency, the latency
    of the graph kept (when the lines are rollouts), and a note (when nothing was rewritten)."""

    series: Mapping[str, Sequence[tuple[int, float]]]
    xlabel: str = "step"
    baseline_ms: float | None = None
    best_ms: float | None = None
    note: str = ""


def latency_chart(report: Mapping[str, Any]) -> LatencyChart:
    """The chart of a run: one line per rollout (random, policy: each from the input at step 0, against the step
    within its rollout); for one path (greedy, backtrack) the best latency so far and the current graph's when
    it differs; with no step at all a flat line at the input's latency, and a note."""
    history = report["history"]
    start = report["latency"]["before"]["ms"]
    note = "" if report["rewrites"] else "no rewrite kept: the output is the input's graph"
    if not history:
        return LatencyChart({"input model": [(0, start), (1, start)]}, note=note or "no step taken")
    rollouts: dict[int, list[Mapping[str, Any]]] = {}
    for record in history:
        rollouts.setdefault(record["rollout"], []).append(record)
    if len(rollouts) > 1:
        policy = str(report.get("method", "")).startswith("policy")

        def label(rollout: int) -> str:
            return f"rollout {rollout}" + ((" (deterministic)" if rollout == 0 else " (sampled)") if policy else "")

        series = {label(r): [(0, start)] + [(i, rec["current_ms"]) for i, rec in enumerate(records, start=1)]
                  for r, records in rollouts.items()}
        best = min(rec["best_ms"] for rec in history)
        return LatencyChart(series, "step within the rollout", start, best, note)
    series = {"best so far": [(0, start)] + [(r["step"], r["best_ms"]) for r in history]}
    if any(r["current_ms"] != r["best_ms"] for r in history):
        series["current graph"] = [(0, start)] + [(r["step"], r["current_ms"]) for r in history]
    return LatencyChart(series, "step", start, None, note)
