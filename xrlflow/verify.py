"""Numeric verification: does a rewritten model compute what the original computes?

Runs both models in onnxruntime on the CPU EP (the CUDA EP's TF32 GEMMs legitimately move merged MatMul
results by ~2e-4 relative) on the same inputs and compares every output with explicit tolerances.
NaN in both outputs at the same place counts as equal.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx

from xrlflow.cli_options import option
from xrlflow.errors import BadInputError
from xrlflow.runtime import OnnxRuntimeMissingError

if TYPE_CHECKING:
    from xrlflow.engine import Match
    from xrlflow.ir import Graph


@dataclass(frozen=True)
class Tolerance:
    rtol: float = option("verification rtol", 1e-4, kind=float)
    atol: float = option("verification atol", 1e-5, kind=float)


@dataclass
class OutputComparison:
    name: str
    max_abs_error: float
    max_rel_error: float
    ok: bool


@dataclass
class VerifyReport:
    ok: bool
    outputs: list[OutputComparison] = field(default_factory=list)
    reason: str = ""
    skipped: bool = False  # the original itself cannot run in onnxruntime: nothing to compare against

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "skipped": self.skipped,
            "reason": self.reason,
            "outputs": [vars(o) for o in self.outputs],
        }


def random_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for the model's inputs (symbolic dims from `shapes`, else 1), drawn as the measurement
    worker draws them (`measure_worker.random_feeds`)."""
    from xrlflow.measure_worker import InputSpec, random_feeds

    init_names = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        if shapes and vi.name in shapes:
            shape = tuple(shapes[vi.name])
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, tt.elem_type, shape))
    return random_feeds(specs, seed)


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run on the CPU EP. A model that cannot be one protobuf (over 2 GB, or weights left in external files)
    is written to a temporary folder with external data and onnxruntime is handed the path."""
    from xrlflow.onnx_io import fits_in_protobuf, write_with_external_data
    from xrlflow.runtime import import_onnxruntime

    ort = import_onnxruntime()  # none installed: OnnxRuntimeMissingError, which no caller turns into "unverified"

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if fits_in_protobuf(model):
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, dict(feeds))
    with tempfile.TemporaryDirectory(prefix="xrlflow-verify-") as folder:
        path = Path(folder) / "model.onnx"
        write_with_external_data(model, path, "model.onnx.data")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, dict(feeds))
        del session
        return outputs


def compare_outputs(
    names: list[str],
    expected: list[np.ndarray],
    actual: list[np.ndarray],
    tolerance: Tolerance | Mapping[str, Tolerance] = Tolerance(),
) -> VerifyReport:
    comparisons = []
    for name, a, b in zip(names, expected, actual):
        tol = tolerance.get(name, Tolerance()) if isinstance(tolerance, Mapping) else tolerance
        a = np.asarray(a)
        b = np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            comparisons.append(OutputComparison(name, float("inf"), float("inf"), False))
            continue
        if a.dtype.kind in "fc":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            both_nan = np.isnan(a64) & np.isnan(b64)
            diff = np.where(both_nan, 0.0, np.abs(a64 - b64))
            diff = np.where(np.isnan(diff), np.inf, diff)
            rel = diff / np.maximum(np.abs(a64), 1e-12)
            ok = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(np.where(both_nan, 0, a64))))
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float(np.where(diff > 0, rel, 0).max()) if diff.size else 0.0
        else:
            ok = bool(np.array_equal(a, b))
            max_abs = float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.size else 0.0
            max_rel = 0.0 if ok else float("inf")
        comparisons.append(OutputComparison(name, max_abs, max_rel, ok))
    return VerifyReport(all(c.ok for c in comparisons), comparisons)


def verify_models(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance | Mapping[str, Tolerance] = Tolerance(),
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run both models on the same inputs (given, or random) and compare their outputs."""
    if feeds is None:
        feeds = random_inputs(reference, input_shapes, seed)
    expected, failure = run_reference(reference, feeds)
    if failure is not None:
        return failure
    return verify_against([o.name for o in reference.graph.output], expected, candidate, feeds, tolerance)


def run_reference(reference: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[list | None, VerifyReport | None]:
    """(the original's outputs, None), or (None, a skipped report saying why onnxruntime cannot run it)."""
    try:
        return run_model(reference, feeds), None
    except OnnxRuntimeMissingError:
        raise
    except Exception as exc:
        return None, VerifyReport(False, reason=f"onnxruntime cannot run the original: {first_line(exc)}", skipped=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def verify_against(
    names: list[str],
    expected: list[np.ndarray],
    candidate: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    tolerance: Tolerance | Mapping[str, Tolerance] = Tolerance(),
) -> VerifyReport:
    """Compare the candidate's outputs on `feeds` with the original's outputs computed once before."""
    if names != [o.name for o in candidate.graph.output]:
        return VerifyReport(False, reason="output names differ")
    try:
        actual = run_model(candidate, feeds)
    except OnnxRuntimeMissingError:
        raise
    except Exception as exc:
        return VerifyReport(False, reason=f"onnxruntime cannot run the rewritten model: {first_line(exc)}")
    report = compare_outputs(names, expected, actual, tolerance)
    if not report.ok:
        bad = [o.name for o in report.outputs if not o.ok]
        report.reason = f"outputs differ beyond tolerance: {', '.join(bad)}"
    return report


def load_feeds(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read inputs ({type(exc).__name__})") from None


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


def verify_at_other_shapes(
    model: onnx.ModelProto, optimised: onnx.ModelProto, other_shapes: Mapping[str, tuple[int, ...]],
    tolerance: Mapping[str, Tolerance], seed: int,
) -> tuple[VerifyReport, dict[str, np.ndarray], dict[str, Any]] | str:
    """The search saw one binding of the symbolic dims; the output must compute the same at another. Returns
    the report, the feeds and the report entry, or why the input itself cannot run at those shapes."""
    feeds = random_inputs(model, other_shapes, seed)
    try:
        expected = run_model(model, feeds)
    except OnnxRuntimeMissingError:
        raise
    except Exception as exc:
        return f"the input model cannot run at the second binding {dict(other_shapes)} ({first_line(exc)})"
    checked = verify_against([o.name for o in model.graph.output], expected, optimised, feeds, tolerance)
    entry = {"input_shapes": {k: list(v) for k, v in other_shapes.items()}, **checked.to_dict()}
    if not checked.ok:
        checked.reason = f"at other input shapes {dict(other_shapes)}: {checked.reason}"
    return checked, feeds, entry


def find_breaking_rewrite(
    reference: onnx.ModelProto,
    path: Sequence["Graph"],
    applied: Sequence["Match"],
    feeds: Mapping[str, np.ndarray],
    tolerance: Tolerance | Mapping[str, Tolerance],
) -> tuple[int, VerifyReport] | None:
    """The first rewrite (1-based) after which the graph stops verifying, found prefix by prefix."""
    from xrlflow.onnx_io import to_model

    for i in range(1, len(applied) + 1):
        report = verify_models(reference, to_model(path[i], fold_constants=True), feeds, tolerance)
        if not report.ok:
            return i, report
    return None


def name_breaking_rewrite(
    reference: onnx.ModelProto, start: "Graph", canonicalised: bool, canonical_rules: Sequence[str],
    path: Sequence["Graph"], applied: Sequence["Match"], feeds: Mapping[str, np.ndarray],
    tolerance: Mapping[str, Tolerance], reason: str,
) -> dict[str, Any]:
    """Which step broke a result that does not verify: the canonicalisation before the search, the first
    rewrite that breaks it, or (when every prefix verifies) the export."""
    from xrlflow.onnx_io import to_model

    if canonicalised:
        start_check = verify_models(reference, to_model(start, fold_constants=True), feeds, tolerance)
        if not start_check.ok:
            return {"index": 0, "rule": "canonicalisation (" + ", ".join(canonical_rules) + ")", "bound_nodes": [],
                    "reason": start_check.reason}
    found = find_breaking_rewrite(reference, path, applied, feeds, tolerance)
    if found is None:
        return {"index": 0, "rule": "(export)", "bound_nodes": [], "reason": reason}
    index, failing = found
    match = applied[index - 1]
    return {"index": index, "rule": match.rule, "bound_nodes": list(match.nodes), "reason": failing.reason}
