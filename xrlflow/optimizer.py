"""`xrlflow optimize`: rewrite an ONNX model for lower latency, verify it, write it and a report.

    xrlflow optimize MODEL.onnx -o OUT.onnx --search greedy --latency cost
    xrlflow optimize MODEL.onnx -o OUT.onnx --policy checkpoints/RUN --rollouts 8 --report r.json --plot p.png

The Python API is `optimize(model_or_path, OptimizeConfig(...)) -> OptimizeResult(model, report)`. It never
writes files; it raises `VerificationError` (carrying the report) when the optimised graph does not compute
what the input computes, after bisecting the applied rewrites to name the first one that broke it.
The command line (flags generated from `OptimizeConfig`) is `xrlflow.optimize_cli`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from xrlflow.cli_options import option
from xrlflow.engine import RewriteEngine, prepare_for_search
from xrlflow.errors import BadInputError, GraphError, XrlflowError
from xrlflow.runtime import OnnxRuntimeMissingError
from xrlflow.ir import Graph
from xrlflow.latency import ComparesModels, LatencyService, close_service
from xrlflow.services import DEVICES, LATENCY_KINDS, make_latency_service
from xrlflow.onnx_io import fits_in_protobuf, load_graph, opset_upgrade_note, parse_input_shapes, read_model, to_model
from xrlflow.report import build_report, latency_section
from xrlflow.advice import cuda_advice
from xrlflow.guarantee import (
    Candidate, bound_output_shapes, deployment_latency, make_deployment_service, run_guarantee, stage_gains,
)
from xrlflow.stages import onnxruntime_stages, verify_output, without_contrib_rules, xrlflow_stage_entry
from xrlflow.search import SEARCH_METHODS, SearchConfig, SearchResult, run_search
from xrlflow.trajectory import StepCallback, StepRecord
from xrlflow.verify import Tolerance, first_line, load_feeds, name_breaking_rewrite, random_inputs, run_model


# `optimize`'s search when `config.policy` is set: (policy path, graph, engine, latency service, search config,
# device, on_step) -> the result. `xrlflow.agents.policy_search.search_with_policy`, handed in by the entry
# points, so that the optimizer never imports the agent (nor torch).
PolicySearcher = Callable[[str, Graph, RewriteEngine, LatencyService, SearchConfig, str, "StepCallback | None"], SearchResult]


class VerificationError(XrlflowError):
    """The optimised graph does not match the input numerically; `report` says which rewrite broke it."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _rule_list(value: str | Any | None) -> tuple[str, ...] | None:
    """A comma-separated flag (or a sequence from the Python API) -> rule names."""
    if value is None:
        return None
    names = tuple(n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip())
    if not names:
        raise BadInputError("an empty rule list")
    return names


def _input_shapes(value: Any) -> dict[str, tuple[int, ...]]:
    """`NAME=DIMS` / `NAME:DIMS` flags (or a mapping NAME -> "1x128" or (1, 128) from the Python API) -> bound
    input shapes."""
    return parse_input_shapes(value)


def parse_tolerances(specs: Any) -> dict[str, Tolerance]:
    """`NAME=RTOL,ATOL` flags (or a mapping name -> (rtol, atol) from the Python API) -> per-output tolerances."""
    if isinstance(specs, Mapping):
        return {k: Tolerance(rtol=r, atol=a) for k, (r, a) in specs.items()}
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


@dataclass(frozen=True)
class OptimizeConfig:
    policy: str | None = option("a trained policy checkpoint (checkpoints/RUN)", None, group="how")
    search: str | None = option("a search baseline instead of a policy", "greedy", choices=SEARCH_METHODS, group="how")
    device: str = option("device to optimise for", "cpu", choices=DEVICES)
    latency: str = option("latency service", "measured", choices=LATENCY_KINDS)
    search_config: SearchConfig = SearchConfig()  # steps, rollouts, budget, alpha, seed
    input_shapes: Mapping[str, tuple[int, ...]] = option(
        "bind an input's shape, e.g. input_ids=1x128", default_factory=dict, flag="--input-shape",
        metavar="NAME=DIMS", repeat=True, read=_input_shapes)
    rules: tuple[str, ...] | None = option("only these rules (comma-separated)", None, read=_rule_list)
    disable_rules: tuple[str, ...] | None = option("leave these rules out (comma-separated)", None, read=_rule_list)
    inputs: str | None = option("an .npz of inputs for verification (random inputs otherwise)", None)
    tolerance: Tolerance = Tolerance()  # rtol, atol: every output without its own
    output_tolerances: Mapping[str, Tolerance] = option(
        "verification tolerance of one output (repeatable), e.g. logits=1e-3,1e-4", default_factory=dict,
        flag="--tolerance", metavar="NAME=RTOL,ATOL", repeat=True, read=parse_tolerances)
    check_other_shapes: bool = option("skip the second verification with the bound symbolic dims changed", True,
                                      flag="--no-shape-check", negate=True)
    progress: bool = option("no progress bar", False, flag="--no-progress", negate=True)  # a tqdm bar on stderr
    upgrade_opset: bool = option("refuse a model below opset 13 instead of converting it with onnx.version_converter",
                                 True, flag="--no-upgrade", negate=True)
    # onnxruntime.transformers' fusions after xrlflow's rewrites. auto: on for CUDA; off on the CPU, where they
    # measured no gain over what onnxruntime's CPU session fuses itself (bench/results/ort_fusions_cpu.md).
    ort_fusions: str = option("onnxruntime's transformers fusions after xrlflow's rewrites (auto: on for "
                              "--device cuda, off on the CPU; off keeps xrlflow's own contrib-op rules)", "auto",
                              choices=("auto", "on", "off"))
    no_ort_fusions: bool = option("no onnxruntime fusions and none of xrlflow's com.microsoft rules: the output "
                                  "has no contrib op", False, switch=True)
    float16: bool = option("convert to float16 last (inputs/outputs stay float32), verified at fp16 tolerances "
                           "against the fp32 input", False, switch=True)
    # The deployment setting: the final A/B and the never-slower guarantee run in it (searches may measure
    # in a stabler one: one thread on the CPU, CUDA-graph replay on CUDA).
    threads: int = option("intra-op threads of the deployment setting the final A/B is measured in "
                          "(0: onnxruntime's default, all cores)", 0, kind=int, metavar="N")
    cuda_graph: bool = option("on CUDA, the deployment setting replays the model as a CUDA graph "
                              "(default: plain runs, onnxruntime's default)", False, switch=True)
    ab_repeats: int = option("independent A/B compares in the final comparison, the models' slots alternating "
                             "(its interval spans them)", 6,
                             kind=int, metavar="N")

    def validate(self) -> None:
        search = self.search_config
        if self.policy is None and self.search not in SEARCH_METHODS:
            raise BadInputError(f"unknown search {self.search!r}; choose from {', '.join(SEARCH_METHODS)}")
        if self.device not in DEVICES:
            raise BadInputError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if self.latency not in LATENCY_KINDS:
            raise BadInputError(f"unknown latency service {self.latency!r}; choose from {', '.join(LATENCY_KINDS)}")
        if self.policy is None and self.search == "random" and search.rollouts < 1:
            raise BadInputError("--rollouts must be >= 1 for the random search (>= 0 with a policy)")
        if self.ort_fusions not in ("auto", "on", "off"):
            raise BadInputError(f"--ort-fusions takes auto, on or off, not {self.ort_fusions!r}")
        if self.no_ort_fusions and self.ort_fusions == "on":
            raise BadInputError("--no-ort-fusions contradicts --ort-fusions on")
        if self.threads < 0:
            raise BadInputError(f"--threads must be >= 0 (0: onnxruntime's default), not {self.threads}")
        if self.ab_repeats < 2:
            raise BadInputError(f"--ab-repeats must be >= 2 (the interval spans independent compares), not {self.ab_repeats}")
        if self.cuda_graph and self.device != "cuda":
            raise BadInputError("--cuda-graph needs --device cuda")
        for tol in (self.tolerance, *self.output_tolerances.values()):
            if not (tol.rtol >= 0 and tol.atol >= 0):
                raise BadInputError("tolerances (--rtol, --atol, --tolerance) must be >= 0")

    @property
    def allows_contrib_ops(self) -> bool:
        """False with --no-ort-fusions: no com.microsoft op in the output."""
        return not self.no_ort_fusions

    @property
    def uses_ort_fusions(self) -> bool:
        if self.no_ort_fusions or self.ort_fusions == "off":
            return False
        return self.ort_fusions == "on" or self.device == "cuda"

    @property
    def deployment_setting(self) -> str:
        if self.device == "cuda":
            return "cuda, " + ("CUDA-graph replay" if self.cuda_graph else "plain runs (no CUDA graph)")
        return f"cpu, {self.threads} intra-op thread{'s' if self.threads != 1 else ''}" if self.threads else \
            "cpu, onnxruntime's default threads"

    @property
    def method(self) -> str:
        return f"policy {self.policy}" if self.policy else f"{self.search} search"


@dataclass
class OptimizeResult:
    model: onnx.ModelProto  # what is written: the chosen verified candidate, or the input unchanged (fallback)
    report: dict[str, Any]
    graph: Graph  # the search's best graph (before onnxruntime's stages)
    search: SearchResult

    @property
    def unchanged(self) -> bool:
        """The never-slower guarantee fell back: the model is the input, unchanged."""
        return bool(self.report.get("guarantee", {}).get("fallback"))


def optimize(
    model_or_path: str | Path | onnx.ModelProto,
    config: OptimizeConfig = OptimizeConfig(),
    latency_service: LatencyService | None = None,
    engine: RewriteEngine | None = None,
    deployment_service: Any = None,
    cuda_probe: Any = None,
    policy_searcher: PolicySearcher | None = None,
) -> OptimizeResult:
    """The pipeline: xrlflow's rewrites (search), then onnxruntime's transformers fusions, then float16 if asked;
    each stage's output verified against the input (a stage whose output does not verify is dropped with a
    warning); then the final A/B of each verified candidate against the user's file in the deployment setting,
    which writes the fastest one measured faster, or the input unchanged (never slower).

    `deployment_service` (anything with `compare_models`, see `guarantee.ComparesModels`) runs the final A/B;
    by default the measured service in `config`'s deployment setting, or `latency_service` when it can
    compare models. `cuda_probe` measures the CUDA-graph advice (`advice.CudaGraphProbe`). `policy_searcher`
    runs the search when `config.policy` is set (`xrlflow.agents.policy_search.search_with_policy`)."""
    from xrlflow.rules import CANONICAL_RULES, RULE_FINGERPRINT, select_rules

    started = time.perf_counter()
    config.validate()
    if config.policy is not None and policy_searcher is None:
        raise ValueError("optimize with config.policy needs a policy_searcher "
                         "(xrlflow.agents.policy_search.search_with_policy)")
    engine = engine or RewriteEngine(select_rules(config.rules, config.disable_rules))
    if not config.allows_contrib_ops:
        engine = without_contrib_rules(engine)
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else read_model(model_or_path)
    loaded = load_graph(model, config.input_shapes, upgrade=config.upgrade_opset)
    warnings: list[str] = []
    notes: list[str] = []
    upgrade_note = opset_upgrade_note(loaded)
    if upgrade_note:
        notes.append(upgrade_note)
    canonical_rules = [r for r in CANONICAL_RULES if r in engine.rule_index]
    graph = prepare_for_search(loaded, engine, canonical_rules)  # e.g. BatchNorm folded, as training sees it
    feeds, feeds_source = _feeds(config, model)
    tolerance = tolerances_by_output(config, model)
    expected, cannot_run = _reference_outputs(model, feeds, warnings)
    reference_feeds = feeds  # `feeds` becomes the deciding verification's (maybe at a second binding)
    kind, service = config.latency, latency_service
    own_service = service is None
    if service is None:
        kind, service = _latency_service(config, model, graph, cannot_run, warnings)

    result = _search(config, graph, engine, service, policy_searcher)
    path = [graph]
    for match in result.applied:
        path.append(engine.apply(path[-1], match))
    if path[-1].structural_hash() != result.best.structural_hash():
        raise GraphError("replaying the applied rewrites did not reproduce the graph the search found")

    export_started = time.perf_counter()
    optimised = to_model(result.best, fold_constants=True)
    verify_started = time.perf_counter()
    verification, feeds, other_check = verify_output(config, model, optimised, expected, cannot_run, feeds, tolerance, warnings)
    verified = time.perf_counter()
    failed = not verification.ok and not verification.skipped
    broken = name_breaking_rewrite(model, graph, graph is not loaded, canonical_rules, path, result.applied, feeds,
                                   tolerance, verification.reason) if failed else None

    stages: list[dict[str, Any]] = [xrlflow_stage_entry(model, optimised, result, verification)]
    candidates: list[Candidate] = [Candidate("xrlflow rewrites", optimised)] if broken is None else []
    if broken is None:
        candidates += onnxruntime_stages(config, model, optimised, verification, expected, cannot_run, feeds,
                                          tolerance, warnings, stages)
    stages_done = time.perf_counter()

    if deployment_service is None and own_service and kind == "measured" and broken is None and verification.ok:
        deployment_service = make_deployment_service(config)
    elif deployment_service is None and isinstance(service, ComparesModels):
        deployment_service = service
    shapes = bound_output_shapes(graph, reference_feeds, model, expected) \
        if verification.ok and (deployment_service is not None or config.device == "cuda") else None
    try:
        chosen, guarantee = run_guarantee(config, model, graph, candidates, deployment_service, verification, kind, shapes)
        stage_gains(stages, candidates, service, config, result.initial_latency)
        advice = None
        if config.device == "cuda" and broken is None and (cuda_probe is not None or (own_service and kind == "measured")):
            advice = cuda_advice(config, model, chosen.model if chosen else model, graph, cuda_probe, shapes)
    finally:
        if own_service and deployment_service is not None and deployment_service is not service:
            close_service(deployment_service)
    written = chosen.model if chosen is not None else (model if guarantee.get("fallback") else optimised)
    latency = latency_section(result, service, paired_timing=verification.ok and kind == "measured"
                              and not guarantee.get("checked"))
    if guarantee.get("checked"):
        latency = deployment_latency(latency, chosen, guarantee, config)
    if own_service:
        close_service(service)  # its worker process and cache connection
    finished = time.perf_counter()
    report = build_report(
        source=str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else "<ModelProto>",
        model_or_path=model_or_path, model=model, optimised=written, config=config, engine=engine,
        service=service, result=result, path=path, canonicalised=graph is not loaded,
        canonical_rules=canonical_rules, registry_fingerprint=RULE_FINGERPRINT, latency=latency, warnings=warnings,
        verification=verification, tolerance=tolerance, feeds_source=feeds_source, other_check=other_check,
        broken=broken, stages=stages, guarantee=guarantee, advice=advice, notes=notes,
        opset_upgrade=({"from": loaded.context.upgraded_from_opset, "to": loaded.context.opset}
                       if upgrade_note else None),
        times={
            "export": verify_started - export_started, "verify": verified - verify_started,
            "stages": stages_done - verified, "final_measurement": finished - stages_done, "total": finished - started,
        },
    )
    if broken is not None:
        where = f"rewrite #{broken['index']} ({broken['rule']} on {', '.join(broken['bound_nodes'])})" if broken["index"] else broken["rule"]
        raise VerificationError(f"the optimised model does not verify: {verification.reason}; first broken by {where}", report)
    return OptimizeResult(written, report, result.best, result)



# ---- the pipeline's steps ------------------------------------------------------------------------------------
def _feeds(config: OptimizeConfig, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], str]:
    seed = config.search_config.seed
    if config.inputs is None:
        return random_inputs(model, config.input_shapes, seed), f"random (seed {seed})"
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


def tolerances_by_output(config: OptimizeConfig, model: onnx.ModelProto) -> dict[str, Tolerance]:
    names = [o.name for o in model.graph.output]
    unknown = sorted(set(config.output_tolerances) - set(names))
    if unknown:
        raise BadInputError(f"--tolerance names unknown output(s) {', '.join(unknown)}; outputs are {', '.join(names)}")
    return {name: config.output_tolerances.get(name, config.tolerance) for name in names}


def _reference_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                       warnings: list[str]) -> tuple[list[np.ndarray] | None, str]:
    """The input's outputs on the verification feeds, or (None, why) when onnxruntime cannot run it."""
    try:
        return run_model(model, feeds), ""
    except OnnxRuntimeMissingError:
        raise  # no onnxruntime at all: one line, exit 2, not an "unverified" output
    except Exception as exc:  # an op onnxruntime lacks (custom domain), or a model it refuses
        cannot_run = first_line(exc)
        if "ShapeInferenceError" in cannot_run or "TypeInferenceError" in cannot_run:
            # not a missing kernel: the model's own shapes or types contradict each other
            raise BadInputError(f"the model is inconsistent: {cannot_run}") from None
        warnings.append(f"onnxruntime cannot run the input model ({cannot_run}): the output is NOT verified")
        return None, cannot_run


def _latency_service(config: OptimizeConfig, model: onnx.ModelProto, graph: Graph, cannot_run: str,
                     warnings: list[str]) -> tuple[str, LatencyService]:
    """The configured latency kind and service; the cost model when the input cannot be measured."""
    kind = config.latency
    if kind == "measured" and (cannot_run or not fits_in_protobuf(model)):
        kind = "cost"
        why = "onnxruntime cannot run the input" if cannot_run else "the model is over 2 GB (the measured service takes bytes)"
        warnings.append(f"latency could not be measured ({why}): rewrites were chosen by the cost model")
    service = make_latency_service(kind, config.device)
    if kind == "measured" and config.device == "cuda":
        service, note = plain_cuda_if_uncapturable(service, graph, lambda: _plain_cuda_service(service))
        if note:
            warnings.append(note)
    return kind, service


def plain_cuda_if_uncapturable(service: LatencyService, graph: Graph, make_plain) -> tuple[LatencyService, str | None]:
    """Measured CUDA latency replays a captured CUDA graph; a model onnxruntime cannot capture (a node off
    the GPU) is timed with plain runs instead, and the report says so."""
    from xrlflow.measure_worker import CUDA_GRAPH_IMPOSSIBLE

    first = service.latency(graph)
    if first.ok or CUDA_GRAPH_IMPOSSIBLE not in first.reason:
        return service, None
    close_service(service)
    return make_plain(), ("onnxruntime cannot capture this model as a CUDA graph: latencies are plain CUDA runs, "
                          "which include the host's kernel launches and vary more between sessions")


def _plain_cuda_service(service: Any) -> LatencyService:
    from xrlflow.measure import MeasuredLatency

    config = service.config
    return MeasuredLatency(dataclasses.replace(config, session=dataclasses.replace(config.session, cuda_graph=False)))



def _search(config: OptimizeConfig, graph: Graph, engine: RewriteEngine, service: LatencyService,
            policy_searcher: PolicySearcher | None) -> SearchResult:
    search = config.search_config
    if config.policy is not None:
        total, description = search.rollout_steps * (search.rollouts + 1), "policy"
    else:
        total = {"greedy": search.steps or None, "backtrack": search.budget, "random": search.rollout_steps * search.rollouts}[config.search]
        description = config.search
    bar = None
    on_step: StepCallback | None = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)

        def on_step(record: StepRecord) -> None:
            bar.update(1)
            bar.set_postfix(best_ms=f"{record.best_ms:.3f}")
    try:
        if config.policy is not None:
            return policy_searcher(config.policy, graph, engine, service, search, config.device, on_step)
        return run_search(config.search, graph, engine, service, search, on_step)
    finally:
        if bar is not None:
            bar.close()


__all__ = ["OptimizeConfig", "OptimizeResult", "PolicySearcher", "SearchConfig", "VerificationError", "optimize"]
