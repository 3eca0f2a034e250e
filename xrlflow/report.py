"""Human- and machine-readable output of an optimisation run: the summary table, the JSON report, the chart.

The report is a plain dict (built by `xrlflow.optimize`); this module only renders it. Charts use
matplotlib's Agg backend (no display needed) and are written atomically like every other artifact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def _fmt_ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}" if value < 1000 else f"{value:.0f}"


def format_latency(entry: Mapping[str, Any] | None) -> str:
    """'1.234 ms [1.200, 1.260]' from a latency dict (ms, low_ms, high_ms)."""
    if not entry or not entry.get("ok", True):
        return "failed" + (f" ({entry.get('reason')})" if entry and entry.get("reason") else "")
    return f"{_fmt_ms(entry['ms'])} ms [{_fmt_ms(entry['low_ms'])}, {_fmt_ms(entry['high_ms'])}]"


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
    return text + f" ({lat.get('speedup_method', '')})"


def format_summary(report: Mapping[str, Any]) -> str:
    """The table `xrlflow optimize` prints: latency, speedup, rewrites by rule, op counts, time split."""
    lat = report["latency"]
    lines = [f"xrlflow optimize: {report['input']} ({report['method']}, latency: {report['latency_service']})"]
    rows = [
        ("latency before (median, 95% CI)", format_latency(lat["before"])),
        ("latency after  (median, 95% CI)", format_latency(lat["after"])),
        ("speedup", _format_speedup(lat)),
        ("rewrites applied", str(len(report["rewrites"]))),
    ]
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


def _atomic_write(path: str | os.PathLike[str], write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def plot_latency_history(
    path: str | os.PathLike[str],
    series: Mapping[str, Sequence[tuple[int, float]]],
    baseline_ms: float | None = None,
    title: str = "latency per step",
) -> None:
    """Latency (ms) against step, one line per series; a dashed line marks the input model's latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        finite = [(s, v) for s, v in points if math.isfinite(v)]
        if finite:
            ax.plot([s for s, _ in finite], [v for _, v in finite], marker="." if len(finite) < 60 else None, label=label)
    if baseline_ms is not None and math.isfinite(baseline_ms):
        ax.axhline(baseline_ms, color="gray", linestyle="--", linewidth=1, label="input model")
    ax.set_xlabel("step")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda handle: fig.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)


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
    _atomic_write(path, lambda handle: fig.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = [
    "format_summary", "format_latency", "write_json", "write_text", "plot_latency_history", "plot_speedup_bars",
    "markdown_table",
]
