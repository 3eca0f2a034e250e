"""The pipeline's stages after xrlflow's search: the report entry of xrlflow's rewrites, onnxruntime's
transformers fusions and float16 (each verified against the input, kept as a candidate for the final A/B or
dropped), the verification of a stage's output (at the search's binding and a second one), and the engine
without the com.microsoft rules (--no-ort-fusions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from xrlflow.engine import RewriteEngine
from xrlflow.guarantee import Candidate
from xrlflow.search import SearchResult
from xrlflow.verify import Tolerance, VerifyReport, other_binding, verify_against, verify_at_other_shapes

if TYPE_CHECKING:
    from xrlflow.optimizer import OptimizeConfig


CONTRIB_RULES = ("fuse-multihead-attention", "fuse-packed-qkv-attention")
AB_SECONDS = 2.0  # per compare of the final A/B; `ab_repeats` of them per candidate


def without_contrib_rules(engine: RewriteEngine) -> RewriteEngine:
    kept = tuple(r for r in engine.rules if r.name not in CONTRIB_RULES)
    if len(kept) == len(engine.rules):
        return engine
    allowed = None if engine.allowed is None else [n for n in engine.allowed if n not in CONTRIB_RULES]
    return RewriteEngine(kept, allowed)


def xrlflow_stage_entry(model: onnx.ModelProto, optimised: onnx.ModelProto, result: SearchResult,
                         verification: VerifyReport) -> dict[str, Any]:
    from collections import Counter

    return {
        "name": "xrlflow rewrites", "applied": True, "verified": verification.ok,
        "rewrites": dict(Counter(m.rule for m in result.applied).most_common()),
        "nodes": [len(model.graph.node), len(optimised.graph.node)],
        "note": f"{len(result.applied)} rewrite(s) by the {result.method} search",
    }


def onnxruntime_stages(
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
            check, _, _ = verify_output(config, model, stage.model, expected, cannot_run, feeds, tolerance, warnings)
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



def verify_output(
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

