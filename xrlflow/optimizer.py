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
from typing import Any, Mapping, Sequence

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
from xrlflow.guarantee import Candidate, choose_candidate, cuda_graph_advice, repeated_ab
from xrlflow.search import SEARCH_METHODS, SearchConfig, SearchResult, policy_search, run_search
from xrlflow.trajectory import StepCallback, StepRecord
from xrlflow.verify import (
    Tolerance, VerifyReport, first_line, load_feeds, name_breaking_rewrite, other_binding, random_inputs, run_model,
    verify_against, verify_at_other_shapes,
)


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


# Rules whose output holds com.microsoft ops; --no-ort-fusions keeps them out of the engine.
CONTRIB_RULES = ("fuse-multihead-attention", "fuse-packed-qkv-attention")
AB_SECONDS = 2.0  # per compare of the final A/B; `ab_repeats` of them per candidate


def without_contrib_rules(engine: RewriteEngine) -> RewriteEngine:
    kept = tuple(r for r in engine.rules if r.name not in CONTRIB_RULES)
    if len(kept) == len(engine.rules):
        return engine
    allowed = None if engine.allowed is None else [n for n in engine.allowed if n not in CONTRIB_RULES]
    return RewriteEngine(kept, allowed)


def optimize(
    model_or_path: str | Path | onnx.ModelProto,
    config: OptimizeConfig = OptimizeConfig(),
    latency_service: LatencyService | None = None,
    engine: RewriteEngine | None = None,
    deployment_service: Any = None,
    cuda_probe: Any = None,
) -> OptimizeResult:
    """The pipeline: xrlflow's rewrites (search), then onnxruntime's transformers fusions, then float16 if asked;
    each stage's output verified against the input (a stage whose output does not verify is dropped with a
    warning); then the final A/B of each verified candidate against the user's file in the deployment setting,
    which writes the fastest one measured faster, or the input unchanged (never slower).

    `deployment_service` (anything with `compare_models`, see `guarantee.ComparesModels`) runs the final A/B;
    by default the measured service in `config`'s deployment setting, or `latency_service` when it can
    compare models. `cuda_probe` measures the CUDA-graph advice (`CudaGraphProbe`)."""
    from xrlflow.rules import CANONICAL_RULES, RULE_FINGERPRINT, select_rules

    started = time.perf_counter()
    config.validate()
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

    result = _search(config, graph, engine, service)
    path = [graph]
    for match in result.applied:
        path.append(engine.apply(path[-1], match))
    if path[-1].structural_hash() != result.best.structural_hash():
        raise GraphError("replaying the applied rewrites did not reproduce the graph the search found")

    export_started = time.perf_counter()
    optimised = to_model(result.best, fold_constants=True)
    verify_started = time.perf_counter()
    verification, feeds, other_check = _verify(config, model, optimised, expected, cannot_run, feeds, tolerance, warnings)
    verified = time.perf_counter()
    failed = not verification.ok and not verification.skipped
    broken = name_breaking_rewrite(model, graph, graph is not loaded, canonical_rules, path, result.applied, feeds,
                                   tolerance, verification.reason) if failed else None

    stages: list[dict[str, Any]] = [_xrlflow_stage_entry(model, optimised, result, verification)]
    candidates: list[Candidate] = [Candidate("xrlflow rewrites", optimised)] if broken is None else []
    if broken is None:
        candidates += _onnxruntime_stages(config, model, optimised, verification, expected, cannot_run, feeds,
                                          tolerance, warnings, stages)
    stages_done = time.perf_counter()

    if deployment_service is None and own_service and kind == "measured" and broken is None and verification.ok:
        deployment_service = _deployment_service(config)
    elif deployment_service is None and isinstance(service, ComparesModels):
        deployment_service = service
    shapes = _output_shapes(graph, reference_feeds, model, expected) \
        if verification.ok and (deployment_service is not None or config.device == "cuda") else None
    try:
        chosen, guarantee = _guarantee(config, model, graph, candidates, deployment_service, verification, kind, shapes)
        _stage_gains(stages, candidates, service, config, result.initial_latency)
        advice = None
        if config.device == "cuda" and broken is None and (cuda_probe is not None or (own_service and kind == "measured")):
            advice = _cuda_advice(config, model, chosen.model if chosen else model, graph, cuda_probe, shapes)
    finally:
        if own_service and deployment_service is not None and deployment_service is not service:
            close_service(deployment_service)
    written = chosen.model if chosen is not None else (model if guarantee.get("fallback") else optimised)
    latency = latency_section(result, service, paired_timing=verification.ok and kind == "measured"
                              and not guarantee.get("checked"))
    if guarantee.get("checked"):
        latency = _deployment_latency(latency, chosen, guarantee, config)
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


# ---- the stages after the search ------------------------------------------------------------------------------
def _xrlflow_stage_entry(model: onnx.ModelProto, optimised: onnx.ModelProto, result: SearchResult,
                         verification: VerifyReport) -> dict[str, Any]:
    from collections import Counter

    return {
        "name": "xrlflow rewrites", "applied": True, "verified": verification.ok,
        "rewrites": dict(Counter(m.rule for m in result.applied).most_common()),
        "nodes": [len(model.graph.node), len(optimised.graph.node)],
        "note": f"{len(result.applied)} rewrite(s) by the {result.method} search",
    }


def _onnxruntime_stages(
    config: OptimizeConfig, model: onnx.ModelProto, optimised: onnx.ModelProto, verification: VerifyReport,
    expected: list[np.ndarray] | None, cannot_run: str, feeds: dict[str, np.ndarray],
    tolerance: dict[str, Tolerance], warnings: list[str], stages: list[dict[str, Any]],
) -> list[Candidate]:
    """onnxruntime's transformers fusions, then float16: each stage verified, kept (a candidate) or dropped."""
    from xrlflow.ort_stages import FLOAT16_TOLERANCE, OrtFusionOptions, float16_stage, ort_transformer_fusions, verify_float16

    candidates: list[Candidate] = []
    current = optimised
    if not verification.ok:
        why = "the input could not be verified" if verification.skipped else "xrlflow's output did not verify"
        for name, wanted in (("onnxruntime fusions", config.uses_ort_fusions), ("float16", config.float16)):
            if wanted:
                stages.append({"name": name, "applied": False, "verified": None, "note": f"skipped: {why}"})
        return candidates
    if config.uses_ort_fusions:
        stage = ort_transformer_fusions(current, OrtFusionOptions(use_gpu=config.device == "cuda"))
        entry: dict[str, Any] = {"name": "onnxruntime fusions", "applied": False, "verified": None,
                                 "fused": dict(stage.fused), "note": stage.note,
                                 "nodes": [len(current.graph.node), len(stage.model.graph.node)]}
        if stage.warning:
            warnings.append(stage.warning)
            entry["warning"] = stage.warning
        if stage.changed:
            check, _, _ = _verify(config, model, stage.model, expected, cannot_run, feeds, tolerance, warnings)
            entry["verified"] = check.ok
            if check.ok:
                entry["applied"] = True
                current = stage.model
                candidates.append(Candidate("+ onnxruntime fusions", current))
            else:
                entry["dropped"] = check.reason
                warnings.append(f"onnxruntime's fusions were dropped: their output does not verify ({check.reason})")
        stages.append(entry)
    if config.float16:
        stage = float16_stage(current)
        entry = {"name": "float16", "applied": False, "verified": None, "note": stage.note,
                 "tolerance": [FLOAT16_TOLERANCE.rtol, FLOAT16_TOLERANCE.atol]}
        if stage.warning:
            warnings.append(stage.warning)
            entry["warning"] = stage.warning
        if stage.changed:
            providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if config.device == "cuda" else ("CPUExecutionProvider",)
            # against the fp32 ORIGINAL, not the previous stage: the tolerance is spent once
            check = verify_float16(model, stage.model, FLOAT16_TOLERANCE, config.input_shapes,
                                   config.search_config.seed, providers)
            entry["verified"] = check.ok
            entry["verification"] = check.to_dict()
            if check.ok:
                entry["applied"] = True
                candidates.append(Candidate("+ float16", stage.model))
            else:
                entry["dropped"] = check.reason
                warnings.append(f"the float16 stage was dropped: it does not verify at fp16 tolerances ({check.reason})")
        stages.append(entry)
    return candidates


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


def _output_shapes(graph: Graph, feeds: Mapping[str, np.ndarray], model: onnx.ModelProto,
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


def _deployment_service(config: OptimizeConfig) -> Any:
    """The measured service in the user's deployment setting, uncached: the final A/B never reads an old entry."""
    from xrlflow.measure import MeasureConfig, MeasuredLatency

    return MeasuredLatency(MeasureConfig.create(
        device=config.device, intra_op_threads=config.threads, cuda_graph=config.cuda_graph, cache_path="",
        max_seconds=AB_SECONDS, seed=config.search_config.seed,
    ))


def _search_setting(service: Any) -> str:
    measure = getattr(service, "config", None)
    return getattr(measure, "setting", None) or getattr(service, "name", "?")


def _guarantee(config: OptimizeConfig, model: onnx.ModelProto, graph: Graph, candidates: list[Candidate],
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


def _stage_gains(stages: list[dict[str, Any]], candidates: list[Candidate], service: Any, config: OptimizeConfig,
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


def _deployment_latency(section: dict[str, Any], chosen: Candidate | None, guarantee: dict[str, Any],
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


# ---- CUDA-graph advice ---------------------------------------------------------------------------------------
class CudaGraphProbe:
    """Latency of a serialised model with and without CUDA-graph replay, and its node placement (measured
    services in the deployment setting's threads, uncached)."""

    def __init__(self, config: OptimizeConfig) -> None:
        from xrlflow.measure import MeasureConfig, MeasuredLatency

        def make(cuda_graph: bool) -> Any:
            return MeasuredLatency(MeasureConfig.create(device="cuda", cuda_graph=cuda_graph, cache_path="",
                                                        max_seconds=AB_SECONDS, seed=config.search_config.seed))

        self.services = {False: make(False), True: make(True)}

    def latency(self, model: bytes, specs: Any, cuda_graph: bool) -> Any:
        return self.services[cuda_graph].measure_model(model, specs)

    def placement(self, model: bytes, specs: Any) -> Any:
        return self.services[False].node_placement(model, specs)

    def close(self) -> None:
        for service in self.services.values():
            service.close()


SNIPPET_MODEL = "model.opt.onnx"  # the snippet's model path until the CLI knows the output's


def _cuda_advice(config: OptimizeConfig, model: onnx.ModelProto, written: onnx.ModelProto, graph: Graph,
                 probe: Any, output_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    from xrlflow.measure import input_specs

    own = probe is None
    probe = probe or CudaGraphProbe(config)
    try:
        specs = input_specs(graph)
        models = {"input": with_bound_shapes(model, specs, output_shapes),
                  "output": with_bound_shapes(written, specs, output_shapes)}
        latencies = {}
        for name, proto in models.items():
            data = proto.SerializeToString()
            latencies[name] = {mode: dataclasses.asdict(probe.latency(data, specs, mode == "cuda_graph"))
                               for mode in ("plain", "cuda_graph")}
        placement = probe.placement(models["output"].SerializeToString(), specs)
    finally:
        if own:
            probe.close()
    np_name = lambda elem: onnx.helper.tensor_dtype_to_np_dtype(elem).name  # noqa: E731
    inputs = [(s.name, np_name(s.elem_type), s.shape) for s in specs]
    outputs = []
    for vi in models["output"].graph.output:
        tt = vi.type.tensor_type
        outputs.append((vi.name, np_name(tt.elem_type), tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)))
    advice = cuda_graph_advice(latencies, placement, SNIPPET_MODEL, inputs, outputs, 0)
    if advice["snippet"] is not None and any(d < 0 for _, _, shape in outputs for d in shape):
        advice["snippet"] = None
        advice["message"] += " (not shown: an output's shape is not static at the bound input shapes)"
    return advice


def _search(config: OptimizeConfig, graph: Graph, engine: RewriteEngine, service: LatencyService) -> SearchResult:
    search = config.search_config
    if config.policy is not None:
        total, description = search.steps * (search.rollouts + 1), "policy"
    else:
        total = {"greedy": search.steps, "backtrack": search.budget, "random": search.steps * search.rollouts}[config.search]
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
            return search_with_policy(config.policy, graph, engine, service, search, config.device, on_step)
        return run_search(config.search, graph, engine, service, search, on_step)
    finally:
        if bar is not None:
            bar.close()


def search_with_policy(policy_path: str, graph: Graph, engine: RewriteEngine, service: LatencyService,
                       config: SearchConfig, device: str = "cpu", on_step: StepCallback | None = None) -> SearchResult:
    """The policy's deterministic rollout plus `config.rollouts` sampled ones (`search.policy_search`); with
    --rules/--disable-rules the trained action layout stays and only the selected rules' matches are offered.
    The rollouts walk on the device's cost model; `service` (when it is not that cost model) is asked only
    about each rollout's final and best graph, each distinct graph once. With `on_step` (progress on) a
    second bar counts rollouts, then measurements."""
    from xrlflow.agents import load_policy, policy_device
    from xrlflow.rules import default_engine
    from xrlflow.services import make_latency_service

    policy = load_policy(policy_path, device=policy_device(device))
    if engine.fingerprint != policy.rule_fingerprint:
        engine = default_engine().restricted(r.name for r in engine.rules)
    if engine.fingerprint != policy.rule_fingerprint:
        raise BadInputError(f"--policy {policy_path}: trained on another rule registry")
    make_env = policy.env_maker(graph, engine, config.steps)
    predictor = service if service.deterministic else make_latency_service("cost", device)
    bar = None
    progress = None
    if on_step is not None:
        from tqdm import tqdm

        bar = tqdm(total=config.rollouts + 1, desc="rollouts", unit="rollout", leave=False, file=sys.stderr,
                   dynamic_ncols=True, position=1)

        def progress(phase: str, done: int, total: int) -> None:
            if phase == "measure" and bar.desc != "measuring":
                bar.reset(total=total)
                bar.set_description_str("measuring")
            bar.n = done
            bar.refresh()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the GNN on one graph: a thread pool costs more than it brings (2x on 2 cores)
    try:
        return policy_search(graph, service, make_env, policy.choose, config, on_step, predictor=predictor,
                             progress=progress)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def _verify(
    config: OptimizeConfig, model: onnx.ModelProto, optimised: onnx.ModelProto, expected: list[np.ndarray] | None,
    cannot_run: str, feeds: dict[str, np.ndarray], tolerance: dict[str, Tolerance], warnings: list[str],
) -> tuple[VerifyReport, dict[str, np.ndarray], dict[str, Any] | None]:
    """The verification of the output at the search's binding and, when it passes, at a second one; returns the
    report that decides, its feeds, and the second check's report entry."""
    if expected is None:
        return VerifyReport(False, reason=f"onnxruntime cannot run the original: {cannot_run}", skipped=True), feeds, None
    verification = verify_against([o.name for o in model.graph.output], expected, optimised, feeds, tolerance)
    other_shapes = other_binding(model, config.input_shapes) if config.check_other_shapes else None
    if not verification.ok or other_shapes is None:
        return verification, feeds, None
    checked = verify_at_other_shapes(model, optimised, other_shapes, tolerance, config.search_config.seed + 1)
    if isinstance(checked, str):
        warnings.append(checked)
        return verification, feeds, None
    other, other_feeds, entry = checked
    return (verification, feeds, entry) if other.ok else (other, other_feeds, entry)


__all__ = ["OptimizeConfig", "OptimizeResult", "SearchConfig", "VerificationError", "optimize", "search_with_policy"]
