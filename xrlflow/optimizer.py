"""`xrlflow optimize`: rewrite an ONNX model for lower latency, verify it, write it and a report.

    xrlflow optimize MODEL.onnx -o OUT.onnx --search greedy --latency cost
    xrlflow optimize MODEL.onnx -o OUT.onnx --policy checkpoints/RUN --rollouts 8 --report r.json --plot p.png

The Python API is `optimize(model_or_path, OptimizeConfig(...)) -> OptimizeResult(model, report)`. It never
writes files; it raises `VerificationError` (carrying the report) when the optimised graph does not compute
what the input computes, after bisecting the applied rewrites to name the first one that broke it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from xrlflow.engine import Match, RewriteEngine
from xrlflow.errors import BadInputError, GraphError, XrlflowError
from xrlflow.ir import Graph
from xrlflow.latency import Latency, LatencyService
from xrlflow.onnx_io import fits_in_protobuf, load_graph, parse_input_shapes, read_model, save_model, to_model, weight_bytes
from xrlflow.search import SEARCH_METHODS, SearchConfig, SearchResult, StepRecord, run_search
from xrlflow.verify import (
    Tolerance, VerifyReport, first_line, load_feeds, random_inputs, run_model, verify_against, verify_models,
)

LATENCY_KINDS = ("measured", "cost")
DEVICES = ("cpu", "cuda")


class VerificationError(XrlflowError):
    """The optimised graph does not match the input numerically; `report` says which rewrite broke it."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class OptimizeConfig:
    search: str | None = "greedy"  # greedy | backtrack | random; ignored when `policy` is set
    policy: str | None = None  # a checkpoint folder or file written by `xrlflow train`
    device: str = "cpu"
    latency: str = "measured"  # measured | cost
    rollouts: int = 4  # policy: sampled rollouts besides the greedy one; random search: rollouts
    steps: int = 50  # most rewrites on one path
    budget: int = 100  # backtrack: expansions
    alpha: float = 1.05  # backtrack: relaxation factor
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    rules: tuple[str, ...] | None = None
    disable_rules: tuple[str, ...] | None = None
    inputs: str | None = None  # an .npz of feeds for verification (random feeds otherwise)
    tolerance: Tolerance = Tolerance()
    output_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)  # per output name, else `tolerance`
    check_other_shapes: bool = True  # verify again with every bound symbolic dim changed
    progress: bool = False  # a tqdm bar on stderr

    def validate(self) -> None:
        if self.policy is None and self.search not in SEARCH_METHODS:
            raise BadInputError(f"unknown search {self.search!r}; choose from {', '.join(SEARCH_METHODS)}")
        if self.device not in DEVICES:
            raise BadInputError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if self.latency not in LATENCY_KINDS:
            raise BadInputError(f"unknown latency service {self.latency!r}; choose from {', '.join(LATENCY_KINDS)}")
        if self.steps < 0:
            raise BadInputError("--steps must be >= 0")
        if self.rollouts < 0 or (self.policy is None and self.search == "random" and self.rollouts < 1):
            raise BadInputError("--rollouts must be >= 1 for the random search (>= 0 with a policy)")
        if self.budget < 1:
            raise BadInputError("--budget must be >= 1")
        if self.alpha < 1.0:
            raise BadInputError("--alpha must be >= 1")
        for tol in (self.tolerance, *self.output_tolerances.values()):
            if not (tol.rtol >= 0 and tol.atol >= 0):
                raise BadInputError("tolerances (--rtol, --atol, --tolerance) must be >= 0")

    @property
    def method(self) -> str:
        return f"policy {self.policy}" if self.policy else f"{self.search} search"


@dataclass
class OptimizeResult:
    model: onnx.ModelProto  # the verified, constant-folded optimised model
    report: dict[str, Any]
    graph: Graph
    search: SearchResult


def make_latency_service(kind: str, device: str, input_shapes: Mapping[str, tuple[int, ...]]) -> LatencyService:
    """The measured service (onnxruntime, cached) or the cost model, for one device."""
    if kind == "measured":
        from xrlflow.measure import MeasureConfig, MeasuredLatency

        return MeasuredLatency(MeasureConfig(device=device))
    from xrlflow.costmodel import CostModel

    return CostModel.for_device("h200" if device == "cuda" else "cpu")  # h200: bundled measured table


def plain_cuda_if_uncapturable(service: LatencyService, graph: Graph, make_plain) -> tuple[LatencyService, str | None]:
    """Measured CUDA latency replays a captured CUDA graph; a model onnxruntime cannot capture (a node off
    the GPU) is timed with plain runs instead, and the report says so."""
    from xrlflow.measure_worker import CUDA_GRAPH_IMPOSSIBLE

    first = service.latency(graph)
    if first.ok or CUDA_GRAPH_IMPOSSIBLE not in first.reason:
        return service, None
    close = getattr(service, "close", None)
    if callable(close):
        close()
    return make_plain(), ("onnxruntime cannot capture this model as a CUDA graph: latencies are plain CUDA runs, "
                          "which include the host's kernel launches and vary more between sessions")


def _plain_cuda_service(service: Any) -> LatencyService:
    import dataclasses

    from xrlflow.measure import MeasuredLatency

    return MeasuredLatency(dataclasses.replace(service.config, cuda_graph=False))


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _latency_dict(latency: Latency) -> dict[str, Any]:
    return asdict(latency)


def _replay(engine: RewriteEngine, graph: Graph, applied: Sequence[Match]) -> list[Graph]:
    """Every graph on the applied path, the input first."""
    graphs = [graph]
    for match in applied:
        graphs.append(engine.apply(graphs[-1], match))
    return graphs


def _rewrite_entries(path: Sequence[Graph], applied: Sequence[Match]) -> list[dict[str, Any]]:
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


def _feeds(config: OptimizeConfig, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], str]:
    if config.inputs is None:
        return random_inputs(model, config.input_shapes, config.seed), f"random (seed {config.seed})"
    if not Path(config.inputs).is_file():
        raise BadInputError(f"{config.inputs}: no such inputs file")
    feeds = load_feeds(config.inputs)
    init_names = {t.name for t in model.graph.initializer}
    wanted = [v.name for v in model.graph.input if v.name not in init_names]
    missing = sorted(set(wanted) - set(feeds))
    extra = sorted(set(feeds) - set(wanted))
    if missing or extra:
        raise BadInputError(
            f"{config.inputs}: inputs do not match the model (missing: {', '.join(missing) or '-'}; "
            f"unknown: {', '.join(extra) or '-'})"
        )
    return {name: feeds[name] for name in wanted}, str(config.inputs)


def other_binding(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """The bound input shapes with every dim that is symbolic in the model doubled (equal bound dims stay equal
    and divisibility is kept); None when no symbolic dim was bound."""
    changed = False
    other: dict[str, tuple[int, ...]] = {}
    for vi in model.graph.input:
        if vi.name not in input_shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = []
        for d, size in zip(dims, input_shapes[vi.name]):
            symbolic = not d.HasField("dim_value")
            changed |= symbolic
            shape.append(2 * size if symbolic else size)
        other[vi.name] = tuple(shape)
    return other if changed else None


def tolerances_by_output(config: OptimizeConfig, model: onnx.ModelProto) -> dict[str, Tolerance]:
    names = [o.name for o in model.graph.output]
    unknown = sorted(set(config.output_tolerances) - set(names))
    if unknown:
        raise BadInputError(f"--tolerance names unknown output(s) {', '.join(unknown)}; outputs are {', '.join(names)}")
    return {name: config.output_tolerances.get(name, config.tolerance) for name in names}


def _input_size(model_or_path: str | Path | onnx.ModelProto, model: onnx.ModelProto) -> int:
    """Bytes on disk of the input (the .onnx file plus its external data files), or its serialised size."""
    if isinstance(model_or_path, onnx.ModelProto):
        return weight_bytes(model) + _skeleton_bytes(model)
    path = Path(model_or_path)
    files = {path.resolve()}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in t.external_data if e.key == "location")
            files.add((path.resolve().parent / location).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())


def _skeleton_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of the model without its weight payloads (what is not counted in weight_bytes)."""
    return sum(n.ByteSize() for n in model.graph.node) + sum(v.ByteSize() for v in model.graph.input) + \
        sum(v.ByteSize() for v in model.graph.output)


def find_breaking_rewrite(
    reference: onnx.ModelProto,
    path: Sequence[Graph],
    applied: Sequence[Match],
    feeds: Mapping[str, np.ndarray],
    tolerance: Tolerance,
) -> tuple[int, VerifyReport] | None:
    """The first rewrite (1-based) after which the graph stops verifying, found prefix by prefix."""
    for i in range(1, len(applied) + 1):
        report = verify_models(reference, to_model(path[i], fold_constants=True), feeds, tolerance)
        if not report.ok:
            return i, report
    return None


def _progress_bar(config: OptimizeConfig, total: int, description: str):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


def _search(
    config: OptimizeConfig, graph: Graph, engine: RewriteEngine, service: LatencyService,
) -> SearchResult:
    search_config = SearchConfig(
        steps=config.steps, rollouts=max(1, config.rollouts), budget=config.budget, alpha=config.alpha, seed=config.seed,
    )
    if config.policy is not None:
        bar = _progress_bar(config, config.steps * (config.rollouts + 1), "policy")
        try:
            return policy_search(config.policy, graph, engine, service, config, bar)
        finally:
            if bar is not None:
                bar.close()
    total = {"greedy": config.steps, "backtrack": config.budget, "random": config.steps * search_config.rollouts}
    bar = _progress_bar(config, total[config.search], config.search)
    on_step: Callable[[StepRecord], None] | None = None
    if bar is not None:
        def on_step(record: StepRecord) -> None:
            bar.update(1)
            bar.set_postfix(best_ms=f"{record.best_ms:.3f}")
    try:
        return run_search(config.search, graph, engine, service, search_config, on_step)
    finally:
        if bar is not None:
            bar.close()


class RuleFilteredEngine(RewriteEngine):
    """The full registry's action layout (what a policy was trained on) offering only the allowed rules' matches."""

    def __init__(self, rules, allowed: set[str]) -> None:
        super().__init__(rules)
        self.allowed = frozenset(allowed)

    def matches(self, graph: Graph) -> list[Match]:
        return [m for m in super().matches(graph) if m.rule in self.allowed]


def _policy_env_config(trained, graph: Graph, engine: RewriteEngine, steps: int):
    """The trained env config (its op vocabulary fixes the feature layout) padded to fit this model.

    The policy scores each candidate on its own, so any padding works; room is left for rewrites that add
    nodes (Concat/Split of merges)."""
    import dataclasses

    edges = sum(1 for n in graph.nodes.values() for v in n.inputs if v and v in graph.producer)
    return dataclasses.replace(
        trained,
        max_nodes=max(trained.max_nodes, 2 * len(graph) + 64),
        max_edges=max(trained.max_edges, 2 * edges + 128),
        max_candidates=max(trained.max_candidates, len(engine.matches(graph))),
        max_steps=max(1, steps),
    )


def policy_search(
    policy_path: str, graph: Graph, engine: RewriteEngine, service: LatencyService, config: OptimizeConfig, bar=None,
) -> SearchResult:
    """The policy's greedy (deterministic) rollout plus `config.rollouts` sampled ones; the fastest graph on any
    rollout wins (the input included, so the result is never slower than it under the latency service)."""
    import torch

    from xrlflow.agents import load_policy
    from xrlflow.envs import GraphRewriteEnv
    from xrlflow.rules import RULES
    from xrlflow.search import TimedLatency, finish_result

    policy_device = "cuda" if config.device == "cuda" and torch.cuda.is_available() else "cpu"
    policy = load_policy(policy_path, device=policy_device)
    started = time.perf_counter()  # decision time starts after loading the checkpoint
    if engine.fingerprint != policy.rule_fingerprint:
        # --rules/--disable-rules: keep the trained action layout, offer only the selected rules' matches
        engine = RuleFilteredEngine(RULES, {r.name for r in engine.rules})
    if engine.fingerprint != policy.rule_fingerprint:
        raise BadInputError(f"--policy {policy_path}: trained on another rule registry")
    timed = TimedLatency(service)
    env = GraphRewriteEnv([("model", graph)], timed, _policy_env_config(policy.env_config, graph, engine, config.steps), engine)
    initial_latency = timed.latency(graph)
    best, best_latency, best_path = graph, initial_latency, []
    history: list[StepRecord] = []
    step_count = 0
    seen = {graph.structural_hash()}
    for rollout in range(config.rollouts + 1):
        deterministic = rollout == 0
        rng = np.random.default_rng([config.seed, rollout])
        obs, info = env.reset(seed=config.seed, options={"model": 0})
        done = False
        while not done:
            action = policy.act(obs, env.action_masks(), deterministic=deterministic, rng=rng)
            candidates = len(env.candidates)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if info["rule"] is None or info.get("measurement_failed") or info.get("graph_too_large"):
                continue  # stop, or a rewrite the env did not take
            step_count += 1
            seen.add(env.graph.structural_hash())
            if env.current_latency.ms < best_latency.ms:
                best, best_latency, best_path = env.graph, env.current_latency, env.applied
            record = StepRecord(step_count, env.current_latency.ms, best_latency.ms, candidates, rollout)
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best_ms=f"{best_latency.ms:.3f}")
    return finish_result("policy", graph, best, initial_latency, best_latency, best_path, history, timed, started, len(seen))


def optimize(
    model_or_path: str | Path | onnx.ModelProto,
    config: OptimizeConfig = OptimizeConfig(),
    latency_service: LatencyService | None = None,
    engine: RewriteEngine | None = None,
) -> OptimizeResult:
    """Search for a faster equivalent graph, export it (constants folded) and verify it on the CPU EP."""
    started = time.perf_counter()
    config.validate()
    from xrlflow.rules import RULE_FINGERPRINT, select_rules

    if engine is None:
        engine = RewriteEngine(select_rules(config.rules, config.disable_rules))
    source = str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else "<ModelProto>"
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else read_model(model_or_path)
    loaded = load_graph(model, config.input_shapes)
    from xrlflow.engine import prepare_for_search
    from xrlflow.rules import CANONICAL_RULES

    canonical_rules = [r for r in CANONICAL_RULES if r in engine.rule_index]
    graph = prepare_for_search(loaded, engine, canonical_rules)  # e.g. BatchNorm folded, as training sees it
    feeds, feeds_source = _feeds(config, model)
    tolerance = tolerances_by_output(config, model)
    warnings: list[str] = []
    output_names = [o.name for o in model.graph.output]
    try:
        expected: list[np.ndarray] | None = run_model(model, feeds)
        cannot_run = ""
    except Exception as exc:  # an op onnxruntime lacks (custom domain), or a model it refuses
        expected, cannot_run = None, first_line(exc)
        if "ShapeInferenceError" in cannot_run or "TypeInferenceError" in cannot_run:
            # not a missing kernel: the model's own shapes or types contradict each other
            raise BadInputError(f"the model is inconsistent: {cannot_run}") from None
        warnings.append(f"onnxruntime cannot run the input model ({cannot_run}): the output is NOT verified")
    kind = config.latency
    if latency_service is None and kind == "measured" and (cannot_run or not fits_in_protobuf(model)):
        kind = "cost"
        why = "onnxruntime cannot run the input" if cannot_run else "the model is over 2 GB (the measured service takes bytes)"
        warnings.append(f"latency could not be measured ({why}): rewrites were chosen by the cost model")
    service = latency_service or make_latency_service(kind, config.device, config.input_shapes)
    if latency_service is None and kind == "measured" and config.device == "cuda":
        service, note = plain_cuda_if_uncapturable(service, graph, lambda: _plain_cuda_service(service))
        if note:
            warnings.append(note)

    result = _search(config, graph, engine, service)
    path = _replay(engine, graph, result.applied)
    if path[-1].structural_hash() != result.best.structural_hash():
        raise GraphError("replaying the applied rewrites did not reproduce the graph the search found")

    export_started = time.perf_counter()
    optimised = to_model(result.best, fold_constants=True)
    verify_started = time.perf_counter()
    if expected is None:
        verification = VerifyReport(False, reason=f"onnxruntime cannot run the original: {cannot_run}", skipped=True)
    else:
        verification = verify_against(output_names, expected, optimised, feeds, tolerance)
    other_shapes = other_binding(model, config.input_shapes) if config.check_other_shapes else None
    other_check: dict[str, Any] | None = None
    if verification.ok and other_shapes is not None:
        # The search saw one binding of the symbolic dims; the output must compute the same at any other.
        other_feeds = random_inputs(model, other_shapes, config.seed + 1)
        try:
            other_expected = run_model(model, other_feeds)
        except Exception as exc:
            warnings.append(f"the input model cannot run at the second binding {other_shapes} ({first_line(exc)})")
        else:
            checked = verify_against(output_names, other_expected, optimised, other_feeds, tolerance)
            other_check = {"input_shapes": {k: list(v) for k, v in other_shapes.items()}, **checked.to_dict()}
            if not checked.ok:
                verification, feeds = checked, other_feeds
                verification.reason = f"at other input shapes {other_shapes}: {checked.reason}"
    broken = None
    verified = time.perf_counter()
    failed = not verification.ok and not verification.skipped
    if failed:
        start_check = verify_models(model, to_model(graph, fold_constants=True), feeds, tolerance) if graph is not loaded else None
        found = None if start_check is not None and not start_check.ok else find_breaking_rewrite(
            model, path, result.applied, feeds, tolerance)
        if start_check is not None and not start_check.ok:
            broken = {"index": 0, "rule": "canonicalisation (" + ", ".join(canonical_rules) + ")", "bound_nodes": [], "reason": start_check.reason}
        elif found is not None:
            index, failing = found
            match = result.applied[index - 1]
            broken = {"index": index, "rule": match.rule, "bound_nodes": list(match.nodes), "reason": failing.reason}
        else:
            broken = {"index": 0, "rule": "(export)", "bound_nodes": [], "reason": verification.reason}

    before, after = result.initial_latency, result.best_latency
    latency_summary: dict[str, Any] = {
        "before": _latency_dict(before),
        "after": _latency_dict(after),
        "speedup": before.ms / after.ms if after.ok and after.ms > 0 else None,
        "speedup_method": "ratio of the two medians",
    }
    compare = getattr(service, "compare", None)
    if verification.ok and result.applied and callable(compare) and kind == "measured":
        # Separate medians drift with the machine's load; interleaved A/B pairs cancel that drift.
        paired = compare(graph, result.best)
        if paired.ok:
            latency_summary.update(
                before=_latency_dict(paired.a), after=_latency_dict(paired.b), speedup=paired.speedup,
                speedup_low=1.0 / paired.high, speedup_high=1.0 / paired.low,
                speedup_method=f"interleaved A/B pairs ({paired.runs} runs), median of per-pair ratios",
            )
    finished = time.perf_counter()
    report: dict[str, Any] = {
        "xrlflow_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": source,
        "output": None,
        "written": False,
        "method": config.method,
        "latency_service": getattr(service, "name", type(service).__name__),
        "device": config.device,
        "rules": [r.name for r in engine.rules],
        "canonicalised": graph is not loaded,
        "canonical_rules": canonical_rules,
        "rule_fingerprint": engine.fingerprint,
        "registry_fingerprint": RULE_FINGERPRINT,
        "config": {
            "search": config.search if config.policy is None else None, "policy": config.policy,
            "steps": config.steps, "rollouts": config.rollouts, "budget": config.budget, "alpha": config.alpha,
            "seed": config.seed, "input_shapes": {k: list(v) for k, v in config.input_shapes.items()},
        },
        "latency": latency_summary,
        "rewrites": _rewrite_entries(path, result.applied),
        "rewrites_by_rule": dict(Counter(m.rule for m in result.applied).most_common()),
        "op_counts": {"before": _op_counts(model), "after": _op_counts(optimised)},  # as ONNX files
        "size": {
            "input_bytes": _input_size(model_or_path, model),
            "output_bytes": weight_bytes(optimised) + _skeleton_bytes(optimised),  # estimate; the file size once written
            "merged_bytes": _merged_bytes(model, optimised),
            "weight_bytes_before": weight_bytes(model),
            "weight_bytes_after": weight_bytes(optimised),
        },
        "warnings": warnings,
        "latency_calls": result.latency_calls,
        "graphs_seen": result.graphs_seen,
        "time_s": {
            "decision": result.decision_seconds,
            "latency": result.latency_seconds,
            "export": verify_started - export_started,
            "verify": verified - verify_started,
            "final_measurement": finished - verified,
            "total": finished - started,
        },
        "history": [asdict(r) for r in result.history],
        "verification": {
            **verification.to_dict(), "rtol": config.tolerance.rtol, "atol": config.tolerance.atol,
            "tolerances": {k: [v.rtol, v.atol] for k, v in tolerance.items()},
            "inputs": feeds_source, "provider": "CPUExecutionProvider", "other_shapes": other_check,
        },
        "broken_rewrite": broken,
    }
    if failed:
        where = f"rewrite #{broken['index']} ({broken['rule']} on {', '.join(broken['bound_nodes'])})" if broken["index"] else broken["rule"]
        raise VerificationError(f"the optimised model does not verify: {verification.reason}; first broken by {where}", report)
    return OptimizeResult(optimised, report, result.best, result)


def _merged_bytes(model: onnx.ModelProto, optimised: onnx.ModelProto) -> int:
    """Bytes of what the rewrites created: weights the input does not have (folded merges: concatenated,
    padded, ...) and the new nodes themselves."""
    known_weights = {t.name for t in model.graph.initializer}
    known_nodes = {n.name for n in model.graph.node}
    fresh = onnx.ModelProto()
    fresh.graph.initializer.extend(t for t in optimised.graph.initializer if t.name not in known_weights)
    return weight_bytes(fresh) + sum(n.ByteSize() for n in optimised.graph.node if n.name not in known_nodes)


def _version() -> str:
    from xrlflow import __version__

    return __version__


# ---- command line ---------------------------------------------------------------------------------------------
def _rule_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise BadInputError("an empty rule list")
    return names


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize", help="optimise an ONNX model (policy or search), verify it and write it",
        description="Rewrite an ONNX model for lower latency with a trained policy or a search baseline; "
        "the result is verified against the input on the CPU EP before anything is written.",
    )
    add_optimize_arguments(p)
    p.set_defaults(handler=run_optimize)


def add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX file")
    p.add_argument("-o", "--output", required=True, help="where to write the optimised ONNX file")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--policy", help="a trained policy checkpoint (checkpoints/RUN)")
    how.add_argument("--search", choices=SEARCH_METHODS, help="a search baseline instead of a policy")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="device to optimise for (default cpu)")
    p.add_argument("--latency", choices=LATENCY_KINDS, default="measured", help="latency service (default measured)")
    p.add_argument("--rollouts", type=int, default=4, help="policy: sampled rollouts besides the greedy one; random search: rollouts (default 4)")
    p.add_argument("--steps", type=int, default=50, help="most rewrites on one path (default 50)")
    p.add_argument("--budget", type=int, default=100, help="backtrack search: graphs expanded (default 100)")
    p.add_argument("--alpha", type=float, default=1.05, help="backtrack search: relaxation factor (default 1.05)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="bind an input's shape, e.g. input_ids=1x128")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--plot", help="write a latency-per-step chart here (PNG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", help="only these rules (comma-separated)")
    p.add_argument("--disable-rules", help="leave these rules out (comma-separated)")
    p.add_argument("--inputs", help="an .npz of inputs for verification (random inputs otherwise)")
    p.add_argument("--rtol", type=float, default=Tolerance.rtol, help=f"verification rtol (default {Tolerance.rtol:g})")
    p.add_argument("--atol", type=float, default=Tolerance.atol, help=f"verification atol (default {Tolerance.atol:g})")
    p.add_argument("--tolerance", action="append", metavar="NAME=RTOL,ATOL",
                   help="verification tolerance of one output (repeatable), e.g. logits=1e-3,1e-4")
    p.add_argument("--no-shape-check", action="store_true",
                   help="skip the second verification with the bound symbolic dims changed")
    p.add_argument("--external-data", action="store_true", help="write the weights to OUT.onnx.data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def parse_tolerances(specs: Sequence[str] | None) -> dict[str, Tolerance]:
    """Parse `NAME=RTOL,ATOL` flags."""
    tolerances: dict[str, Tolerance] = {}
    for spec in specs or []:
        name, sep, values = spec.rpartition("=")
        try:
            rtol, atol = (float(v) for v in values.split(","))
            if not sep or not name or not (rtol >= 0 and atol >= 0):
                raise ValueError
        except ValueError:
            raise BadInputError(f"bad --tolerance {spec!r}: expected NAME=RTOL,ATOL with non-negative numbers, e.g. logits=1e-3,1e-4") from None
        tolerances[name] = Tolerance(rtol=rtol, atol=atol)
    return tolerances


def config_from_args(args: argparse.Namespace) -> OptimizeConfig:
    return OptimizeConfig(
        search=args.search, policy=args.policy, device=args.device, latency=args.latency, rollouts=args.rollouts,
        steps=args.steps, budget=args.budget, alpha=args.alpha, input_shapes=parse_input_shapes(args.input_shape),
        seed=args.seed, rules=_rule_list(args.rules), disable_rules=_rule_list(args.disable_rules),
        inputs=args.inputs, tolerance=Tolerance(rtol=args.rtol, atol=args.atol),
        output_tolerances=parse_tolerances(args.tolerance), check_other_shapes=not args.no_shape_check,
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that would overwrite the input or cannot be files."""
    model = Path(args.model)
    for flag, target in (("-o", args.output), ("--report", args.report), ("--plot", args.plot)):
        if target is None:
            continue
        if _same_file(target, model):
            raise BadInputError(f"{flag} {target} is the input model; choose another path")
        if Path(target).is_dir():
            raise BadInputError(f"{flag} {target} is a folder; give a file path")
        folder = Path(target).expanduser().absolute().parent
        if not folder.is_dir():
            raise BadInputError(f"{flag} {target}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadInputError(f"{flag} {target}: the folder {folder} is not writable")
    if args.external_data and _same_file(f"{args.output}.data", model):
        raise BadInputError(f"-o {args.output}: its external data file would overwrite the input")
    if args.policy is not None and not Path(args.policy).exists():
        raise BadInputError(f"--policy {args.policy}: no such checkpoint")


def run_optimize(args: argparse.Namespace) -> int:
    from xrlflow.report import format_summary, plot_latency_history, write_json

    check_output_paths(args)
    config = config_from_args(args)
    try:
        result = optimize(args.model, config)
    except VerificationError as failure:
        report = failure.report
        report["command"] = _command_line()
        if args.report:
            write_json(args.report, report)
        print(format_summary(report), file=sys.stderr)
        print(f"xrlflow: {failure}; nothing written to {args.output}", file=sys.stderr)
        return 1
    report = result.report
    report["command"] = _command_line()
    report["output"] = str(args.output)
    save_model(result.model, args.output, external_data=args.external_data)
    report["written"] = True
    written = [Path(args.output), Path(f"{args.output}.data")]
    report["size"]["output_bytes"] = sum(p.stat().st_size for p in written if p.is_file())
    if args.report:
        write_json(args.report, report)
    if args.plot:
        plot_latency_history(
            args.plot, _plot_series(report), baseline_ms=report["latency"]["before"]["ms"],
            title=f"{Path(args.model).name}: {report['method']}",
        )
    print(format_summary(report))
    for warning in report["warnings"]:
        print(f"xrlflow: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.output}" + (f", report {args.report}" if args.report else "") + (f", chart {args.plot}" if args.plot else ""))
    return 0


def _plot_series(report: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    history = report["history"]
    series: dict[str, list[tuple[int, float]]] = {}
    start = report["latency"]["before"]["ms"]
    series["best so far"] = [(0, start)] + [(r["step"], r["best_ms"]) for r in history]
    if any(r["current_ms"] != r["best_ms"] for r in history):
        series["current graph"] = [(0, start)] + [(r["step"], r["current_ms"]) for r in history]
    return series


def _command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in ["xrlflow", *sys.argv[1:]]) if sys.argv else "xrlflow optimize"


__all__ = ["OptimizeConfig", "OptimizeResult", "VerificationError", "optimize", "add_cli", "make_latency_service"]
