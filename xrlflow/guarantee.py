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

Also here: the pipeline's side of it (the models bound to the search's shapes, the deployment setting's
measured service, the guarantee's report entry, each stage's latency), and the wording of the CUDA-graph
advice (with and without replay, the nodes that block capture, a session snippet; measured in advice.py).
Core room: numpy and onnx; the services are handed in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import ComparesModels
from xrlflow.onnx_io import fits_in_protobuf, load_graph

if TYPE_CHECKING:
    from xrlflow.optimizer import OptimizeConfig
    from xrlflow.verify import VerifyReport

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


# ---- the final A/B in the pipeline ------------------------------------------------------------------------
AB_SECONDS = 2.0  # per compare of the final A/B; `ab_repeats` of them per candidate


def with_bound_shapes(model: onnx.ModelProto, specs: Any,
                      output_shapes: Mapping[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy whose graph inputs carry the bound shapes and whose outputs carry static shapes (a CUDA-graph
    session binds its outputs once): `output_shapes` where known (the input's outputs at this binding, which
    every verified candidate reproduces), else what onnx's shape inference finds."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    shapes = {s.name: s.shape for s in specs}
    for vi in bound.graph.input:
        if vi.name in shapes:
            _set_dims(vi, shapes[vi.name])
    if output_shapes is not None and all(vi.name in output_shapes for vi in bound.graph.output):
        for vi in bound.graph.output:
            _set_dims(vi, output_shapes[vi.name])
        return bound
    if not fits_in_protobuf(bound):
        return bound
    try:
        inferred = onnx.shape_inference.infer_shapes(bound, strict_mode=False)
    except Exception:  # a model onnx cannot infer: outputs as they were
        return bound
    by_name = {vi.name: vi for vi in inferred.graph.output}
    for vi in bound.graph.output:
        dims = by_name[vi.name].type.tensor_type.shape.dim if vi.name in by_name else ()
        if dims and all(d.HasField("dim_value") for d in dims):
            vi.type.tensor_type.shape.CopyFrom(by_name[vi.name].type.tensor_type.shape)
    return bound


def _set_dims(vi: onnx.ValueInfoProto, shape: Sequence[int]) -> None:
    dims = vi.type.tensor_type.shape.dim
    del dims[:]
    for d in shape:
        dims.add().dim_value = int(d)


def bound_output_shapes(graph: Graph, feeds: Mapping[str, np.ndarray], model: onnx.ModelProto,
                   expected: Sequence[np.ndarray] | None) -> dict[str, tuple[int, ...]] | None:
    from xrlflow.measure import input_specs

    try:
        specs = input_specs(graph)
    except BadInputError:  # an unbound dim: nothing is measured at a binding
        return None
    return output_shapes_at(specs, feeds, [o.name for o in model.graph.output], expected)


def output_shapes_at(specs: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str],
                     outputs: Sequence[np.ndarray] | None) -> dict[str, tuple[int, ...]] | None:
    """The input model's output shapes at the search's binding, when the verification feeds were at it."""
    if outputs is None or any(s.name not in feeds or tuple(feeds[s.name].shape) != tuple(s.shape) for s in specs):
        return None
    return {name: tuple(np.shape(out)) for name, out in zip(names, outputs)}


def make_deployment_service(config: OptimizeConfig) -> Any:
    """The measured service in the user's deployment setting, uncached: the final A/B never reads an old entry."""
    from xrlflow.measure import MeasureConfig, MeasuredLatency

    return MeasuredLatency(MeasureConfig.create(
        device=config.device, intra_op_threads=config.threads, cuda_graph=config.cuda_graph, cache_path="",
        max_seconds=AB_SECONDS, seed=config.search_config.seed,
    ))


def _search_setting(service: Any) -> str:
    measure = getattr(service, "config", None)
    return getattr(measure, "setting", None) or getattr(service, "name", "?")


def run_guarantee(config: OptimizeConfig, model: onnx.ModelProto, graph: Graph, candidates: list[Candidate],
               ab_service: Any, verification: VerifyReport, kind: str,
               output_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[Candidate | None, dict[str, Any]]:
    """The candidate to write and the report's guarantee entry. With a service that can compare models, each
    verified candidate is A/B-timed against the user's file (bound to the search's shapes) in the deployment
    setting; the fastest measured faster wins, else the input is written unchanged."""
    from xrlflow.measure import input_specs

    last = candidates[-1] if candidates else None
    # a caller's measured service states its own setting; a fake one stands in for the configured setting
    setting = getattr(getattr(ab_service, "config", None), "setting", None) or config.deployment_setting
    entry: dict[str, Any] = {"deployment_setting": setting, "checked": False, "fallback": False}
    if not verification.ok:
        entry["message"] = "not checked: the output is not verified"
        return last, entry
    if ab_service is None or not isinstance(ab_service, ComparesModels):
        entry["message"] = ("not checked: latencies come from the cost model (--latency measured checks it)"
                            if kind != "measured" else "not checked: the latency service cannot compare models")
        return last, entry
    specs = input_specs(graph)
    before = with_bound_shapes(model, specs, output_shapes).SerializeToString()

    def measure(candidate: Candidate):
        after = with_bound_shapes(candidate.model, specs, output_shapes).SerializeToString()
        return repeated_ab(lambda swapped: ab_service.compare_models(*((after, specs, before, specs) if swapped
                                                                       else (before, specs, after, specs))),
                           config.ab_repeats)

    choice = choose_candidate(candidates, measure)
    entry.update(
        checked=True, fallback=choice.chosen is None, chosen=choice.chosen.name if choice.chosen else "the input",
        message=choice.message(),
        candidates=[{"name": c.name, **(c.ab.to_dict() if c.ab else {})} for c in choice.candidates],
        rule="a candidate is written only when the 95% interval of its speedup over the input lies above 1; "
             "the fastest such candidate wins, else the input is written unchanged",
    )
    return choice.chosen, entry


def stage_gains(stages: list[dict[str, Any]], candidates: list[Candidate], service: Any, config: OptimizeConfig,
                 initial: Any) -> None:
    """Each kept stage's latency before/after: measured speedups over the input (final A/B) when there are,
    else the cost model's estimates (a deterministic service) where it can price the stage's output."""
    kept = [s for s in stages if s.get("applied")]
    by_name = {"xrlflow rewrites": "xrlflow rewrites", "onnxruntime fusions": "+ onnxruntime fusions", "float16": "+ float16"}
    measured = {c.name: c.ab for c in candidates if c.ab is not None and c.ab.ok}
    previous_ms: float | None = None
    for stage in kept:
        ab = measured.get(by_name.get(stage["name"], ""))
        if ab is not None:
            # the input's median over the compares, over the paired speedup: what this stage's output runs in
            after = ab.before_ms / ab.speedup
            stage["latency_ms"] = {"before": previous_ms if previous_ms is not None else ab.before_ms, "after": after,
                                   "source": "final A/B (deployment setting)", "speedup_over_input": ab.speedup,
                                   "interval": [ab.low, ab.high], "measured_faster": ab.faster}
            previous_ms = after
    if measured or not getattr(service, "deterministic", False):
        return
    models = {c.name: c.model for c in candidates}
    previous: float | None = initial.ms if initial.ok else None
    for stage in kept:
        candidate = models.get(by_name.get(stage["name"], ""))
        estimate = _estimate(service, candidate, config) if candidate is not None else None
        if estimate is not None:
            stage["latency_ms"] = {"before": previous, "after": estimate, "source": f"estimate ({service.name})"}
        previous = estimate


def _estimate(service: Any, model: onnx.ModelProto, config: OptimizeConfig) -> float | None:
    try:
        latency = service.latency(load_graph(model, config.input_shapes))
    except Exception:  # an op the IR or the cost model cannot take (contrib, float16): a report line, never a failure
        return None
    return latency.ms if latency.ok else None


def deployment_latency(section: dict[str, Any], chosen: Candidate | None, guarantee: dict[str, Any],
                        config: OptimizeConfig) -> dict[str, Any]:
    """The latency section from the final A/B: before is the user's file, after what is written."""
    search = {"setting": section.get("setting"), "before": section["before"], "after": section["after"],
              "speedup": section["speedup"], "speedup_method": section["speedup_method"]}
    measured = [c for c in guarantee.get("candidates", ()) if c.get("ok")]
    base = measured[0]["before_ms"] if measured else float("nan")
    ab = chosen.ab if chosen is not None else None

    def point(ms: float) -> dict[str, Any]:
        return {"ms": ms, "low_ms": ms, "high_ms": ms, "runs": 0, "source": "final A/B", "ok": ms == ms}

    before = point(ab.before_ms if ab else base)
    after = point(ab.before_ms / ab.speedup) if ab else before
    return {
        "before": before, "after": after, "interval_label": "median over the A/B compares",
        "speedup": ab.speedup if ab else 1.0, "speedup_low": ab.low if ab else None,
        "speedup_high": ab.high if ab else None,
        "speedup_method": (f"{config.ab_repeats} independent interleaved A/B compares against the input file "
                           f"({guarantee['deployment_setting']}), 95% t-interval" if ab else
                           "the input written unchanged (no candidate measured faster)"),
        "deployment_setting": guarantee["deployment_setting"], "search": search,
    }

