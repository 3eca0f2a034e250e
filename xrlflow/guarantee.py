"""The never-slower guarantee: the final A/B of the user's file against each verified candidate, in the setting
the user deploys, and the choice of what is written (or the input unchanged).

One `compare` (measure.py) times both models interleaved in four sessions; its interval covers run-to-run
noise only, and where each session's buffers land is a fixed effect per session that it cannot see (A/A
compares held 1.0 in only 55-75% of them). So the final A/B repeats `compare` `repeats` times, each with
freshly created sessions and the two models in alternating slots, and the interval is a Student-t interval
over the repeats' log ratios: the between-session variance and the slots' bias are in it, and an A/A check
contains 1 at its stated 95% rate (tests/test_guarantee.py checks the rate on a simulated service with a
session effect and a slot bias).

A candidate passes when the whole interval of its speedup lies above 1. Of those that pass, the fastest is
written; when none does, the input is written unchanged.

Also here: the CUDA-graph advice (with and without replay, the nodes that block capture, a session snippet).
Core room: numpy only; the services are handed in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from xrlflow.latency import ComparesModels

# Student-t 97.5% quantiles by degrees of freedom (two-sided 95%).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    if df > 30:
        return 1.96 + 2.4 / df  # within 0.3% of the exact quantile past 30
    return _T975[max(k for k in _T975 if k < df)]  # the next lower tabulated df: a slightly wider interval


@dataclass(frozen=True)
class ABResult:
    """Speedup of B over A (A's time / B's time) from `repeats` independent compares, with its 95% interval."""

    speedup: float
    low: float
    high: float
    compares: tuple[float, ...]  # each compare's speedup
    before_ms: float  # medians of A's and B's runs over all compares
    after_ms: float
    ok: bool = True
    reason: str = ""

    @property
    def faster(self) -> bool:
        """The interval lies wholly above 1: B is faster beyond the noise of repeated sessions."""
        return self.ok and self.low > 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "faster": self.faster, "interval": "95% Student-t over independent compares"}


def ab_interval(speedups: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of the speedups and its 95% t-interval (on the log scale); one value gives no interval."""
    logs = np.log(np.asarray(speedups, dtype=np.float64))
    centre = float(np.exp(logs.mean()))
    if len(logs) < 2:
        return centre, 0.0, math.inf
    half = t975(len(logs) - 1) * float(logs.std(ddof=1)) / math.sqrt(len(logs))
    return centre, float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))


def repeated_ab(compare: Callable[[bool], Any], repeats: int) -> ABResult:
    """`repeats` independent compares of B against A; `compare(swapped)` returns a `measure.Comparison` of B/A,
    or with `swapped` of A/B (B timed in A's place). The roles alternate: an A/A run on the CPU read B 0.3%
    faster in every one of 20 repeated A/Bs (a residual bias of the session slots), so half the compares put
    the candidate in the other slot and the bias cancels instead of passing as a speedup. Any failed compare
    fails the A/B."""
    speedups, before, after = [], [], []
    for i in range(max(2, repeats)):
        swapped = i % 2 == 1
        comparison = compare(swapped)
        if not comparison.ok or not (comparison.ratio > 0 and math.isfinite(comparison.ratio)):
            reason = comparison.reason or "the comparison gave no ratio"
            return ABResult(math.nan, math.nan, math.nan, tuple(speedups), math.nan, math.nan, False, reason)
        a, b = (comparison.b, comparison.a) if swapped else (comparison.a, comparison.b)
        speedups.append(comparison.ratio if swapped else 1.0 / comparison.ratio)
        before.append(a.ms)
        after.append(b.ms)
    centre, low, high = ab_interval(speedups)
    return ABResult(centre, low, high, tuple(speedups), float(np.median(before)), float(np.median(after)))


@dataclass
class Candidate:
    """A verified model the pipeline could write: the output of one stage (or of all stages so far)."""

    name: str  # e.g. "xrlflow rewrites", "+ onnxruntime fusions", "+ float16"
    model: Any  # onnx.ModelProto
    ab: ABResult | None = None


@dataclass
class Choice:
    chosen: Candidate | None  # None: the input unchanged
    candidates: list[Candidate] = field(default_factory=list)

    def message(self) -> str:
        measured = [c for c in self.candidates if c.ab is not None]
        if self.chosen is not None:
            ab = self.chosen.ab
            assert ab is not None
            tail = f"; {len(measured) - 1} other candidate(s) measured" if len(measured) > 1 else ""
            return f"{self.chosen.name}: {ab.speedup:.3f}x [{ab.low:.3f}, {ab.high:.3f}] over the input{tail}"
        if not measured:
            return "no candidate to measure: the input is written unchanged"
        parts = [f"{c.name} {c.ab.speedup:.3f}x [{c.ab.low:.3f}, {c.ab.high:.3f}]" if c.ab.ok
                 else f"{c.name} not measured ({c.ab.reason})" for c in measured]
        return ("no candidate was measured faster than the input (" + "; ".join(parts) +
                "): the input is written unchanged")


def choose_candidate(candidates: Sequence[Candidate], measure: Callable[[Candidate], ABResult]) -> Choice:
    """A/B every candidate against the input; the fastest that passes is chosen, else none (the input)."""
    for candidate in candidates:
        candidate.ab = measure(candidate)
    passing = [c for c in candidates if c.ab is not None and c.ab.faster]
    best = max(passing, key=lambda c: c.ab.speedup, default=None)  # type: ignore[union-attr]
    return Choice(best, list(candidates))


# ---- CUDA-graph advice -----------------------------------------------------------------------------------------
def replay_pays(plain: Mapping[str, Any] | None, replayed: Mapping[str, Any] | None) -> bool:
    """Replay pays when its whole interval lies below the plain run's."""
    if not plain or not replayed or not plain.get("ok") or not replayed.get("ok"):
        return False
    return replayed["high_ms"] < plain["low_ms"]


def cpu_nodes(placement: Sequence[Sequence[str]]) -> list[str]:
    """The nodes a CUDA session placed on the CPU EP (they block CUDA-graph capture)."""
    return [f"{name} ({op})" for name, op, provider in placement if provider == "CPUExecutionProvider"]


def cuda_graph_snippet(model_path: str, inputs: Sequence[tuple[str, str, Sequence[int]]],
                       outputs: Sequence[tuple[str, str, Sequence[int]]], device_id: int = 0) -> str:
    """Python that runs `model_path` as a replayed CUDA graph: session options with enable_cuda_graph, inputs
    and outputs bound once as device OrtValues (fixed shapes and addresses), new data copied into them."""
    lines = [
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        "# CUDA-graph replay: every input and output keeps the shape and the device address it was captured with;",
        "# copy new data into the bound OrtValues (update_inplace) instead of binding new ones.",
        f"providers = [(\"CUDAExecutionProvider\", {{\"device_id\": {device_id}, \"enable_cuda_graph\": \"1\"}})]",
        f"session = ort.InferenceSession({model_path!r}, ort.SessionOptions(), providers=providers)",
        "binding = session.io_binding()",
    ]
    for name, dtype, shape in inputs:
        var = _identifier(name)
        lines.append(f"{var} = ort.OrtValue.ortvalue_from_numpy(np.zeros({tuple(shape)!r}, dtype=np.{dtype}), "
                     f"\"cuda\", {device_id})  # {name}: shape fixed at {list(shape)}")
        lines.append(f"binding.bind_ortvalue_input({name!r}, {var})")
    for name, dtype, shape in outputs:
        var = _identifier(name) + "_out"
        lines.append(f"{var} = ort.OrtValue.ortvalue_from_shape_and_type({tuple(shape)!r}, np.{dtype}, \"cuda\", "
                     f"{device_id})")
        lines.append(f"binding.bind_ortvalue_output({name!r}, {var})")
    lines += [
        "",
        "session.run_with_iobinding(binding)  # the first run captures the graph",
        "",
        "def infer(" + ", ".join(_identifier(n) + "_host" for n, _, _ in inputs) + "):",
    ]
    lines += [f"    {_identifier(n)}.update_inplace({_identifier(n)}_host)" for n, _, _ in inputs] or ["    pass"]
    lines.append("    session.run_with_iobinding(binding)  # replays the captured graph")
    lines.append("    return " + (", ".join(f"{_identifier(n)}_out.numpy()" for n, _, _ in outputs) or "None"))
    return "\n".join(lines) + "\n"


def _identifier(name: str) -> str:
    text = "".join(ch if ch.isalnum() else "_" for ch in name)
    return ("v_" + text) if not text or text[0].isdigit() or not text.isidentifier() else text


def cuda_graph_advice(
    latencies: Mapping[str, Mapping[str, Mapping[str, Any]]],
    placement: Sequence[Sequence[str]] | str | None,
    model_path: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    device_id: int = 0,
) -> dict[str, Any]:
    """The report's advice entry from measured latencies {"input"|"output": {"plain"|"cuda_graph": latency}},
    the output's node placement (or why it is unknown) and its inputs/outputs (name, numpy dtype, shape)."""
    output = latencies.get("output", {})
    blocked = cpu_nodes(placement) if isinstance(placement, (list, tuple)) else []
    replayed = output.get("cuda_graph")
    possible = bool(replayed and replayed.get("ok")) and not blocked
    pays = possible and replay_pays(output.get("plain"), replayed)
    advice: dict[str, Any] = {"latency": {k: dict(v) for k, v in latencies.items()}, "capture_possible": possible,
                              "replay_pays": pays, "cpu_nodes": blocked, "snippet": None}
    if blocked:
        advice["message"] = (f"{len(blocked)} node(s) fall back to the CPU and block CUDA-graph capture: "
                             + ", ".join(blocked[:8]) + (" ..." if len(blocked) > 8 else ""))
    elif not possible:
        why = (replayed or {}).get("reason") or (placement if isinstance(placement, str) else "") or "not measured"
        advice["message"] = f"CUDA-graph capture is not possible for the output ({why})"
    elif pays:
        plain = output["plain"]
        advice["message"] = (f"CUDA-graph replay runs the output in {replayed['ms']:.4g} ms against "
                             f"{plain['ms']:.4g} ms plainly: use the snippet")
        advice["snippet"] = cuda_graph_snippet(model_path, inputs, outputs, device_id)
    else:
        advice["message"] = "CUDA-graph replay is possible but was not measured faster for the output"
    return advice


__all__ = [
    "ABResult", "Candidate", "Choice", "ab_interval", "choose_candidate", "cuda_graph_advice",
    "cuda_graph_snippet", "repeated_ab", "replay_pays", "t975",
]
