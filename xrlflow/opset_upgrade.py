"""The opset upgrade of an input below MIN_OPSET: onnx.version_converter on a weight-free skeleton of the
model (model-local functions converted one by one), the weights handed back without a copy."""

from __future__ import annotations

import re

import onnx

from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.onnx_export import copy_fields, tensor_nbytes

MIN_OPSET = 13
LARGE_TENSOR_BYTES = 1 << 16  # initializers past this are stubbed in the copies handed to onnx (converter, shape inference)


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def copy_without_weights(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Copy a model, replacing large initializer payloads by external-data stubs (shape inference reads dims only).

    The caller's proto is only read: its initializers stay the same objects (no copy of the weights)."""
    out.Clear()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        stub = out.graph.initializer.add()
        if t.data_location == onnx.TensorProto.EXTERNAL or (tensor_nbytes(t) or 0) > LARGE_TENSOR_BYTES:
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "__xrlflow_stub__"
        else:
            stub.CopyFrom(t)


def _converter_reason(exc: BaseException) -> str:
    """The converter's message without its C++ source location: `.../scan_8_9.h:26: adapt_scan_8_9: ...`."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return re.sub(r"^\S+\.(h|cc|cpp):\d+:\s*", "", line)[:200]


def convert_skeleton(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """Run onnx.version_converter on the model with its large weights replaced by payload-free stubs.

    The converter serialises the whole model (which fails past 2 GB) and never reads a weight it did not
    create when going up, so it gets the stubs; the returned dict maps each stubbed initializer to the
    caller's tensor, which stays where it is (no copy of the weights is made)."""
    import onnx.version_converter

    originals = {t.name: t for t in model.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL or (tensor_nbytes(t) or 0) > LARGE_TENSOR_BYTES}
    skeleton = onnx.ModelProto()
    copy_without_weights(model, skeleton)
    opset = default_opset(model)
    try:
        converted = onnx.version_converter.convert_version(skeleton, target)
    except Exception as exc:  # the converter raises RuntimeError/IndexError/... with a C++ assertion text
        raise BadInputError(
            f"opset {opset} could not be upgraded to {target} by onnx.version_converter: {_converter_reason(exc)}"
        ) from None
    # The converter drops model-local functions; their bodies are converted one by one (same target opset).
    del converted.functions[:]
    converted.functions.extend(_convert_function(f, target, opset) for f in model.functions)
    kept = {t.name for t in converted.graph.initializer}
    if not set(originals) <= kept:
        missing = sorted(set(originals) - kept)[0]
        raise BadInputError(f"opset {opset} could not be upgraded to {target}: the converter dropped weight {missing!r}")
    # ONNX ties each opset to a minimum IR version (opset 13 needs IR 7); the converter leaves ir_version alone.
    converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)]))
    return converted, originals


def _convert_function(function: onnx.FunctionProto, target: int, model_opset: int | None) -> onnx.FunctionProto:
    """A model-local function with its body converted to default-domain opset `target` (the model's imports
    and each function's must agree, so the bodies move with the graph)."""
    import onnx.version_converter

    own = next((o.version for o in function.opset_import if o.domain in ("", "ai.onnx")), None)
    if own is None or own >= target:
        return function
    body = onnx.helper.make_graph(
        list(function.node), function.name, [onnx.helper.make_empty_tensor_value_info(v) for v in function.input],
        [onnx.helper.make_empty_tensor_value_info(v) for v in function.output],
    )
    try:
        converted = onnx.version_converter.convert_version(
            onnx.helper.make_model(body, opset_imports=list(function.opset_import)), target)
    except Exception as exc:
        raise BadInputError(
            f"opset {model_opset} could not be upgraded to {target} by onnx.version_converter: "
            f"function {function.domain}.{function.name}: {_converter_reason(exc)}"
        ) from None
    out = onnx.FunctionProto()
    out.CopyFrom(function)
    del out.node[:]
    out.node.extend(converted.graph.node)
    del out.opset_import[:]
    out.opset_import.extend(converted.opset_import)
    return out


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    """The model converted to default-domain opset `target` by onnx.version_converter, weights included.

    Custom-domain nodes and opset imports pass through unchanged. Raises BadInputError with one line naming
    the opset and the converter's reason when it cannot convert. The input proto is not modified."""
    converted, originals = convert_skeleton(model, target)
    for tensor in converted.graph.initializer:
        if tensor.name in originals:
            tensor.CopyFrom(originals[tensor.name])
    return converted


def opset_upgrade_note(graph: Graph) -> str | None:
    """One line for stderr and the report when load_graph upgraded the model's opset, else None."""
    old = graph.context.upgraded_from_opset
    if not old:
        return None
    return (f"opset {old} upgraded to {graph.context.opset} with onnx.version_converter "
            f"(the output carries opset {graph.context.opset})")
