"""Pipeline stages that hand a model to onnxruntime's own tooling after xrlflow's rewrites.

`ort_transformer_fusions`: onnxruntime.transformers' fusions (SkipLayerNormalization, BiasGelu, Attention
where it recognises the export, ...) for a detected or given model type. Graph-level optimisations stay
onnxruntime's session job, so its optimizer runs at opt_level 0 (its Python fusions only) unless asked.
onnxruntime's optimizer crashes on some exports (IndexError on torch dynamo GPT-2): a crash is a warning,
bert's generic fusions are tried instead, and if those crash too the model comes back unchanged.

`float16_stage`: onnxruntime.transformers.float16.convert_float_to_float16 with keep_io_types, and
`verify_float16` to check it against the fp32 model at fp16 tolerances.

Core room: onnx, numpy and onnxruntime only.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from xrlflow.onnx_io import fits_in_protobuf
from xrlflow.verify import Tolerance, VerifyReport, first_line, random_inputs, run_reference, verify_models

CONTRIB_DOMAIN = "com.microsoft"
# Model types whose fusion onnxruntime's optimizer offers for the transformer families xrlflow sees.
SUPPORTED_MODEL_TYPES = ("bert", "gpt2", "vit")
# The zoo records its model name in the metadata; these are their onnxruntime model types.
ZOO_MODEL_TYPES = {
    "bert-base": "bert", "vit-base": "vit", "gpt2": "gpt2", "mini-dalle": "gpt2", "transformer-transducer": "bert",
}
# fp16 against fp32 on transformer outputs (the H200 measurement saw 1.4e-3 max relative error on BERT-base).
FLOAT16_TOLERANCE = Tolerance(rtol=1e-2, atol=1e-2)


@dataclass(frozen=True)
class OrtFusionOptions:
    model_type: str | None = None  # None: detect from the graph (metadata, attention shape, inputs)
    num_heads: int = 0  # 0: infer from the graph (head-split Reshapes or fused attention), else let ORT detect
    hidden_size: int = 0
    opt_level: int = 0  # 0: onnxruntime's Python fusions only; 1: also its basic session optimisations
    # Retried when the model type's optimizer crashes: bert's fusions (LayerNorm, SkipLayerNorm, Gelu) are
    # generic, and its attention fusion finds nothing it does not recognise (GPT-2 dynamo exports: FastGelu
    # and SkipLayerNormalization, where the gpt2 optimizer raises IndexError). None: no retry.
    fallback_model_type: str | None = "bert"
    use_gpu: bool = False


@dataclass
class StageResult:
    model: onnx.ModelProto
    changed: bool
    note: str
    warning: str = ""
    fused: dict[str, int] = field(default_factory=dict)  # op type -> how many the stage added


def _op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def infer_attention_dims(model: onnx.ModelProto) -> tuple[int, int]:
    """(num_heads, hidden_size) from fused attention ops or the head-splitting Reshape [B,S,N,H] ->
    Transpose (0,2,1,3) that attention layers have; (0, 0) when the graph shows neither."""
    votes: collections.Counter = collections.Counter()
    shapes = None
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in model.graph.node:
        for v in node.input:
            readers[v].append(node)
    for node in model.graph.node:
        if node.domain == CONTRIB_DOMAIN and node.op_type in ("MultiHeadAttention", "Attention"):
            heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
            shapes = shapes or _value_shapes(model)
            out = shapes.get(node.output[0])
            if heads and out and out[-1]:
                votes[(heads, out[-1])] += 1
        elif node.op_type == "Reshape":
            if not any(r.op_type == "Transpose" and _perm(r) == (0, 2, 1, 3) for r in readers[node.output[0]]):
                continue
            shapes = shapes or _value_shapes(model)
            out = shapes.get(node.output[0])
            if out and len(out) == 4 and out[2] and out[3]:
                votes[(out[2], out[2] * out[3])] += 1
    if not votes:
        return 0, 0
    return votes.most_common(1)[0][0]


def _perm(node: onnx.NodeProto) -> tuple[int, ...]:
    return tuple(next((a.ints for a in node.attribute if a.name == "perm"), ()))


def detect_model_type(model: onnx.ModelProto) -> str | None:
    """bert / gpt2 / vit from the zoo's metadata or the graph; None when it looks like none of them."""
    for prop in model.metadata_props:
        if prop.key == "xrlflow.zoo.model" and prop.value in ZOO_MODEL_TYPES:
            return ZOO_MODEL_TYPES[prop.value]
    ops = _op_counts(model)
    has_attention = bool(ops.get("Softmax") or ops.get("MultiHeadAttention") or ops.get("Attention"))
    has_norm = bool(ops.get("LayerNormalization") or ops.get("SkipLayerNormalization") or ops.get("ReduceMean"))
    if not (has_attention and has_norm):
        return None
    if any(n.domain == CONTRIB_DOMAIN and any(a.name == "unidirectional" and a.i == 1 for a in n.attribute)
           for n in model.graph.node) or _has_causal_mask(model):
        return "gpt2"
    init_names = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    image = any(vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(vi.type.tensor_type.shape.dim) == 4
                for vi in inputs)
    if image and ops.get("Conv"):
        return "vit"
    return "bert"


def _has_causal_mask(model: onnx.ModelProto) -> bool:
    """A constant [..., S, S] tensor that is 0 on and below the diagonal and hugely negative above it."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if len(t.dims) < 2 or t.dims[-1] != t.dims[-2] or t.dims[-1] < 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        arr = onnx.numpy_helper.to_array(t).astype(np.float64)
        seq = arr.shape[-1]
        below = np.tril(np.ones((seq, seq), dtype=bool))
        if np.all(arr[..., below] == 0) and np.all(arr[..., ~below] <= -1e30):
            return True
    return False


def ensure_contrib_import(model: onnx.ModelProto) -> None:
    """Import com.microsoft when a node uses it (onnxruntime's optimizer does not always add it)."""
    if any(n.domain == CONTRIB_DOMAIN for n in model.graph.node) and \
            all(o.domain != CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))


@contextlib.contextmanager
def _quiet_onnxruntime_transformers():
    """onnxruntime.transformers logs and prints its progress; keep it out of xrlflow's output."""
    logger = logging.getLogger("onnxruntime.transformers")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(previous)


def ort_transformer_fusions(model: onnx.ModelProto, options: OrtFusionOptions = OrtFusionOptions()) -> StageResult:
    """onnxruntime's transformer fusions on a copy of `model`; the input is never modified."""
    model_type = options.model_type or detect_model_type(model)
    if model_type is None:
        return StageResult(model, False, "onnxruntime fusions skipped: model type not recognised")
    try:
        from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model
    except ImportError as exc:
        return StageResult(model, False, "onnxruntime fusions skipped", f"onnxruntime.transformers: {first_line(exc)}")
    if model_type not in MODEL_TYPES:
        return StageResult(model, False, "onnxruntime fusions skipped", f"unknown model type {model_type!r}")
    heads, hidden = options.num_heads, options.hidden_size
    if not heads or not hidden:
        heads, hidden = infer_attention_dims(model)
    outcome = _run_optimizer(optimize_model, model, model_type, heads, hidden, options)
    if isinstance(outcome, str):
        warning = f"onnxruntime's {model_type} optimizer failed ({outcome})"
        fallback = options.fallback_model_type
        if not fallback or fallback == model_type:
            return StageResult(model, False, "onnxruntime fusions not applied", warning + "; model unchanged")
        retried = _run_optimizer(optimize_model, model, fallback, heads, hidden, options)
        if isinstance(retried, str):
            warning += f"; its {fallback} optimizer failed too ({retried}); model unchanged"
            return StageResult(model, False, "onnxruntime fusions not applied", warning)
        result, stats = retried
        warning += f"; its {fallback} fusions were applied instead"
        model_type = fallback
    else:
        result, stats = outcome
        warning = ""
    before, after = _op_counts(model), _op_counts(result)
    fused = {op: after[op] - before.get(op, 0) for op, count in sorted(stats.items())
             if count and after[op] > before.get(op, 0)}
    summary = ", ".join(f"{n} {op}" for op, n in fused.items()) or "nothing fused"
    note = f"onnxruntime {model_type} fusions (heads {heads or 'auto'}): {summary}; nodes {len(model.graph.node)} -> " \
           f"{len(result.graph.node)}"
    changed = bool(fused) or len(result.graph.node) != len(model.graph.node)
    return StageResult(result, changed, note, warning, fused)


def _run_optimizer(optimize_model, model: onnx.ModelProto, model_type: str, heads: int, hidden: int,
                   options: OrtFusionOptions) -> tuple[onnx.ModelProto, dict[str, int]] | str:
    """(optimized copy, fused-op statistics), or the one-line reason onnxruntime's optimizer failed."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    try:
        with _quiet_onnxruntime_transformers(), tempfile.TemporaryDirectory(prefix="xrlflow-ort-") as folder:
            source: onnx.ModelProto | str = work
            if options.opt_level > 0:
                # Its session pass re-reads a ModelProto through external data it cannot resolve; a file works.
                if not fits_in_protobuf(work):
                    raise ValueError("opt_level > 0 needs a model under the protobuf limit")
                source = str(Path(folder) / "model.onnx")
                onnx.save(work, source)
            optimized = optimize_model(
                source, model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=options.opt_level,
                use_gpu=options.use_gpu,
            )
            stats = optimized.get_fused_operator_statistics()
            result = optimized.model
    except Exception as exc:  # onnxruntime's optimizer is third-party code: any crash means "no fusions"
        return f"{type(exc).__name__}: {first_line(exc)}"
    ensure_contrib_import(result)
    return result, stats


def float16_stage(model: onnx.ModelProto, keep_io_types: bool = True) -> StageResult:
    """onnxruntime's float16 converter on a copy of `model` (inputs and outputs stay float32)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        return StageResult(model, False, "float16 conversion skipped", f"onnxruntime.transformers: {first_line(exc)}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    ensure_contrib_import(work)
    try:
        with _quiet_onnxruntime_transformers():
            result = convert_float_to_float16(work, keep_io_types=keep_io_types)
    except Exception as exc:
        warning = f"float16 conversion failed ({type(exc).__name__}: {first_line(exc)}); model kept in float32"
        return StageResult(model, False, "float16 conversion not applied", warning)
    halves = sum(1 for t in result.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    return StageResult(result, True, f"float16: {halves} initializers in float16, inputs/outputs kept "
                                     f"{'float32' if keep_io_types else 'float16'}")


def verify_float16(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    tolerance: Tolerance = FLOAT16_TOLERANCE,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> VerifyReport:
    """The fp16 model against the fp32 original at fp16 tolerances (outputs compared in float32)."""
    if tuple(providers) == ("CPUExecutionProvider",):
        return verify_models(reference, candidate, tolerance=tolerance, input_shapes=input_shapes, seed=seed)
    feeds = random_inputs(reference, input_shapes, seed)
    expected, failure = run_reference(reference, feeds)
    if failure is not None:
        return failure
    return _verify_on([o.name for o in reference.graph.output], expected, candidate, feeds, tolerance, providers)


def _verify_on(names, expected, candidate, feeds, tolerance, providers) -> VerifyReport:
    from xrlflow.runtime import import_onnxruntime

    ort = import_onnxruntime()

    from xrlflow.verify import compare_outputs

    try:
        session = ort.InferenceSession(candidate.SerializeToString(), providers=list(providers))
        actual = session.run(None, dict(feeds))
    except Exception as exc:
        return VerifyReport(False, reason=f"onnxruntime cannot run the float16 model: {first_line(exc)}")
    report = compare_outputs(names, expected, [np.asarray(a, dtype=np.float32) for a in actual], tolerance)
    if not report.ok:
        report.reason = "float16 outputs differ beyond fp16 tolerance"
    return report
