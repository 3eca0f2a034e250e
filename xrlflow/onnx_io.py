"""ONNX import and export for the IR (`load_graph`, `to_model`, `save_model`)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnx.external_data_helper
from onnx import numpy_helper

from xrlflow.errors import BadInputError, GraphError
from xrlflow.ir import PURE_OPS, BoundDims, tensor_array, Graph, ModelContext, Node, OpaqueAttribute, TensorType, make_attributes

MIN_OPSET = 13
# Constant subgraphs that rewrites create are folded on export, except ops that can blow a tiny input up into
# a large tensor (the artifact must never grow by more than what was merged).
NEVER_FOLD = frozenset({"Tile", "Expand", "ConstantOfShape", "Range"})
CONTRIB_OPSET_VERSIONS = {"com.microsoft": 1}  # opset version imported when a rewrite adds an op of that domain
_LARGE_TENSOR_BYTES = 1 << 16
# Protobuf cannot serialise a message of 2 GiB or more; past this estimate a model is only written with its
# weights in external data, and onnxruntime is handed a file path, never bytes.
PROTOBUF_SAFE_BYTES = (1 << 31) - (256 << 20)
# External data beyond this stays on disk after reading (tensors refer to the source file by absolute path and
# are read on demand or streamed when written), so memory holds the weights at most once.
KEEP_EXTERNAL_BYTES = 1 << 30
_EXTERNAL_INLINE_BYTES = 1024  # smaller tensors stay in the .onnx file when writing external data
_EXTERNAL_ALIGN = 1 << 16  # large tensors start at 64 KiB offsets so onnxruntime can map them
_MAX_DIM = 1 << 31


_SHAPE_EXAMPLE = "input_ids=1x128 (or the onnxsim/onnxslim spelling input_ids:1,128)"


def _dims(text: str) -> tuple[int, ...]:
    """'1x128' or '1,128' -> (1, 128); ValueError for anything else (a dim that is not a positive integer)."""
    text = text.strip().lower()
    if not text:
        return ()
    shape = tuple(int(d) for d in re.split(r"[x,]", text))
    if any(d <= 0 for d in shape):
        raise ValueError
    return shape


def _api_dims(name: Any, dims: Any) -> tuple[int, ...]:
    """A mapping entry from the Python API: dims as '1x3x32x32' / '1,3,32,32' or a sequence of positive ints."""
    if not isinstance(name, str) or not name:
        raise BadInputError(f"input_shape: the key {name!r} is not an input name")
    try:
        if isinstance(dims, str):
            return _dims(dims)
        if isinstance(dims, (bool, bytes)) or not hasattr(dims, "__iter__"):
            raise TypeError
        shape = tuple(_positive_dim(d) for d in dims)
    except (TypeError, ValueError):
        raise BadInputError(f"input_shape[{name!r}] = {dims!r}: expected positive integer dims such as (1, 3, 32, 32) "
                            f"or '1x3x32x32'") from None
    return shape


def _positive_dim(value: Any) -> int:
    import operator

    if isinstance(value, bool):
        raise TypeError
    dim = operator.index(value)  # int or a numpy integer; 1.0 or '1' are refused
    if dim <= 0:
        raise ValueError
    return dim


def parse_input_shapes(specs: list[str] | Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """`--input-shape` flags `name=1x128` or `name:1,128` (onnxsim's spelling; its last colon separates, so a name
    like `input:0` works) into {name: (1, 128)}; or the Python API's mapping name -> '1x128' / (1, 128)."""
    if isinstance(specs, Mapping):
        return {name: _api_dims(name, dims) for name, dims in specs.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=") if "=" in spec else spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = _dims(dims)
        except ValueError:
            raise BadInputError(f"bad --input-shape {spec!r}: expected NAME=DIMS, e.g. {_SHAPE_EXAMPLE}") from None
        shapes[name] = shape
    return shapes


def check_model_file(path: str | os.PathLike[str]) -> None:
    """BadInputError unless `path` is an existing file; a folder is named as one, with the ONNX files it holds."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.onnx"))[:3]
        hint = f" (it holds {', '.join(inside)}: give one of those)" if inside else ""
        raise BadInputError(f"{path} is a folder, not an ONNX file{hint}")
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")


def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or raise BadInputError with a one-line reason."""
    path = Path(path)
    check_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BadInputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise BadInputError(f"{path}: not an ONNX model (no graph)")
    base = path.resolve().parent
    external: list[tuple[onnx.TensorProto, Path]] = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location")
        if not location:
            raise BadInputError(f"{path}: tensor {tensor.name!r} has external data without a location")
        target = (base / location).resolve()
        if base not in target.parents or Path(location).is_absolute():
            raise BadInputError(f"{path}: external data path {location!r} escapes the model's folder")
        if not target.is_file():
            raise BadInputError(f"{path}: external data file {location!r} is missing")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise BadInputError(f"{path}: tensor {tensor.name!r} has a non-numeric external data offset/length") from None
        expected = _tensor_nbytes(tensor)
        if length < 0:
            length = expected
        if expected is not None and length != expected:
            raise BadInputError(f"{path}: tensor {tensor.name!r} declares {length} bytes of external data, its dims need {expected}")
        if offset < 0 or offset + length > target.stat().st_size:
            raise BadInputError(f"{path}: external data of tensor {tensor.name!r} lies past the end of {location!r}")
        external.append((tensor, target))
    if sum(_tensor_nbytes(t) or 0 for t, _ in external) > KEEP_EXTERNAL_BYTES:
        for tensor, target in external:  # read on demand (ir.tensor_array) or streamed by save_model
            _set_external_location(tensor, str(target))
        return model
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read external data ({exc})") from None
    return model


def _set_external_location(tensor: onnx.TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _parse_attribute(attr: onnx.AttributeProto) -> Any:
    kind = attr.type
    if kind == onnx.AttributeProto.INT:
        return int(attr.i)
    if kind == onnx.AttributeProto.FLOAT:
        return float(attr.f)
    if kind == onnx.AttributeProto.STRING:
        return attr.s.decode("utf-8", "surrogateescape")
    if kind == onnx.AttributeProto.INTS:
        return tuple(int(v) for v in attr.ints)
    if kind == onnx.AttributeProto.FLOATS:
        return tuple(float(v) for v in attr.floats)
    if kind == onnx.AttributeProto.STRINGS:
        return tuple(s.decode("utf-8", "surrogateescape") for s in attr.strings)
    import hashlib

    return OpaqueAttribute(attr, hashlib.blake2b(attr.SerializeToString(deterministic=True), digest_size=16).hexdigest())


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(v for v in node.input if v)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= _outer_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    used |= _outer_names(g)
        defined.update(node.output)
    used.update(v.name for v in graph.output)
    return used - defined


def _tensor_type(type_proto: onnx.TypeProto) -> TensorType | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return TensorType(tt.elem_type, None)
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"?{i}")
    return TensorType(tt.elem_type, tuple(dims))


def _bind_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in init_names]
    names = {v.name for v in graph_inputs}
    unknown = sorted(set(input_shapes) - names)
    if unknown:
        raise BadInputError(f"--input-shape names unknown input(s) {', '.join(unknown)}; inputs are {', '.join(sorted(names))}")
    unbound: list[str] = []
    bound = onnx.ModelProto()
    bound.CopyFrom(model) if len(model.graph.initializer) == 0 else _copy_without_weights(model, bound)
    for v in bound.graph.input:
        if v.name in init_names or not v.type.HasField("tensor_type"):
            continue
        shape = v.type.tensor_type.shape
        if v.name in input_shapes:
            want = input_shapes[v.name]
            if len(want) != len(shape.dim):
                raise BadInputError(f"--input-shape {v.name}: rank {len(want)} given, the model's input has rank {len(shape.dim)}")
            for d, size in zip(shape.dim, want):
                if d.HasField("dim_value") and d.dim_value != size:
                    raise BadInputError(f"--input-shape {v.name}: dim {d.dim_value} is fixed by the model, {size} given")
                d.Clear()
                d.dim_value = size
        for i, d in enumerate(shape.dim):
            if not d.HasField("dim_value"):
                unbound.append(f"{v.name}[{i}]" + (f"={d.dim_param}" if d.dim_param else ""))
            elif d.dim_value > (1 << 31):
                raise BadInputError(f"input {v.name} declares an unreasonably large dim {d.dim_value}")
    if unbound:
        example = next(iter(v.name for v in graph_inputs), "input")
        raise BadInputError(
            f"unbound symbolic dims {', '.join(unbound)}: bind them with --input-shape, e.g. {example}=1x128"
        )
    return bound


def _copy_without_weights(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Copy a model, replacing large initializer payloads by external-data stubs (shape inference reads dims only).

    The caller's proto is only read: its initializers stay the same objects (no copy of the weights)."""
    out.Clear()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        stub = out.graph.initializer.add()
        if t.data_location == onnx.TensorProto.EXTERNAL or (_tensor_nbytes(t) or 0) > _LARGE_TENSOR_BYTES:
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "__xrlflow_stub__"
        else:
            stub.CopyFrom(t)


def _tensor_nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's payload from its dims and type (None for strings and unknown types)."""
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        return None
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * itemsize


_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data", onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.UINT64: "uint64_data", onnx.TensorProto.INT32: "int32_data", onnx.TensorProto.INT16: "int32_data",
    onnx.TensorProto.INT8: "int32_data", onnx.TensorProto.UINT8: "int32_data", onnx.TensorProto.UINT16: "int32_data",
    onnx.TensorProto.BOOL: "int32_data", onnx.TensorProto.FLOAT16: "int32_data", onnx.TensorProto.BFLOAT16: "int32_data",
}


def check_tensor_payload(t: onnx.TensorProto) -> None:
    """Refuse a tensor whose stored data does not fit its dims (onnxruntime would read past it or crash)."""
    if t.data_type == onnx.TensorProto.UNDEFINED:
        raise BadInputError(f"tensor {t.name!r} has no data type")
    if any(d < 0 for d in t.dims):
        raise BadInputError(f"tensor {t.name!r} has a negative dim")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return  # checked against the file by read_model
    n = 1
    for d in t.dims:
        n *= d
    if t.HasField("raw_data"):
        expected = _tensor_nbytes(t)
        if expected is not None and len(t.raw_data) != expected:
            raise BadInputError(f"tensor {t.name!r} holds {len(t.raw_data)} bytes, its dims {list(t.dims)} need {expected}")
        return
    field_name = _TYPED_FIELDS.get(t.data_type)
    if field_name is None:
        return
    stored = len(getattr(t, field_name))
    if stored != n:
        raise BadInputError(f"tensor {t.name!r} holds {stored} values, its dims {list(t.dims)} need {n}")


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the proto itself (external data excluded): what limits serialisation."""
    total = 0
    for t in _all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            total += _tensor_nbytes(t) or 0
    return total


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer and Constant payloads, inline or external."""
    return sum(_tensor_nbytes(t) or 0 for t in _all_tensors(model.graph))


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return payload_bytes(model) < PROTOBUF_SAFE_BYTES and not has_external_data(model)


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _converter_reason(exc: BaseException) -> str:
    """The converter's message without its C++ source location: `.../scan_8_9.h:26: adapt_scan_8_9: ...`."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return re.sub(r"^\S+\.(h|cc|cpp):\d+:\s*", "", line)[:200]


def _convert_skeleton(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """Run onnx.version_converter on the model with its large weights replaced by payload-free stubs.

    The converter serialises the whole model (which fails past 2 GB) and never reads a weight it did not
    create when going up, so it gets the stubs; the returned dict maps each stubbed initializer to the
    caller's tensor, which stays where it is (no copy of the weights is made)."""
    import onnx.version_converter

    originals = {t.name: t for t in model.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL or (_tensor_nbytes(t) or 0) > _LARGE_TENSOR_BYTES}
    skeleton = onnx.ModelProto()
    _copy_without_weights(model, skeleton)
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
    converted, originals = _convert_skeleton(model, target)
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


def load_graph(
    source: str | os.PathLike[str] | onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    upgrade: bool = True,
) -> Graph:
    """Load an ONNX model into the IR; symbolic input dims must be bound by `input_shapes`.

    A model below MIN_OPSET is converted to MIN_OPSET with onnx.version_converter (the graph's context
    records the original opset, see opset_upgrade_note); with `upgrade=False` it is refused instead."""
    model = source if isinstance(source, onnx.ModelProto) else read_model(source)
    opset = default_opset(model)
    if opset is None:
        raise BadInputError("the model imports no default-domain opset")
    weights: dict[str, onnx.TensorProto] = {}
    upgraded_from = 0
    if opset < MIN_OPSET:
        if not upgrade:
            raise BadInputError(f"opset {opset} is older than {MIN_OPSET}; convert it first (onnx.version_converter)")
        model, weights = _convert_skeleton(model, MIN_OPSET)
        upgraded_from = opset
    bound = _bind_inputs(model, input_shapes or {})
    try:
        inferred = onnx.shape_inference.infer_shapes(bound, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise BadInputError(f"shape inference failed: {str(exc).splitlines()[0][:200]}") from None

    graph = model.graph
    types: dict[str, TensorType] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = _tensor_type(vi.type)
        if t is not None:
            types[vi.name] = t
    initializers: dict[str, onnx.TensorProto] = {}
    for t in graph.initializer:
        t = weights.get(t.name, t)  # after an upgrade: the caller's tensor, not the converter's stub
        if t.name in initializers:
            raise BadInputError(f"duplicate initializer name {t.name!r}")
        initializers[t.name] = t
        check_tensor_payload(t)
        types[t.name] = TensorType(t.data_type, tuple(int(d) for d in t.dims))

    inputs = tuple(v.name for v in graph.input if v.name not in initializers)
    outputs = tuple(v.name for v in graph.output)
    if len(set(outputs)) != len(outputs):
        raise BadInputError("the graph lists an output twice")
    nodes: dict[str, Node] = {}
    producer: dict[str, str] = {}
    used_names: set[str] = set()
    for i, proto in enumerate(graph.node):
        name = proto.name or f"{proto.op_type}_{i}"
        if name in used_names:
            name = f"{name}__{i}"
        used_names.add(name)
        attrs = tuple(sorted((a.name, _parse_attribute(a)) for a in proto.attribute))
        implicit: set[str] = set()
        for a in proto.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                implicit |= _outer_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    implicit |= _outer_names(g)
        node = Node(
            name, proto.op_type, tuple(proto.input), tuple(proto.output), attrs, proto.domain,
            doc_string=proto.doc_string, implicit_inputs=tuple(sorted(implicit)),
        )
        for out in node.outputs:
            if not out:
                continue
            if out in producer or out in initializers or out in inputs:
                raise BadInputError(f"value {out!r} is produced more than once")
            producer[out] = name
        nodes[name] = node
    known = set(producer) | set(initializers) | set(inputs)
    consumers: dict[str, tuple[str, ...]] = {}
    for node in nodes.values():
        for v in node.all_inputs:
            if not v:
                continue
            if v not in known:
                raise BadInputError(f"node {node.name!r} reads {v!r}, which nothing produces")
            consumers[v] = consumers.get(v, ()) + (node.name,)
    for v in outputs:
        if v not in known:
            raise BadInputError(f"graph output {v!r} is produced by nothing")
    for v in outputs:
        if v not in types:
            out_vi = next(o for o in graph.output if o.name == v)
            t = _tensor_type(out_vi.type)
            if t is not None:
                types[v] = t

    context = ModelContext(
        ir_version=model.ir_version,
        opset_imports=tuple((o.domain, o.version) for o in model.opset_import),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        graph_name=graph.name,
        graph_doc_string=graph.doc_string,
        metadata_props=tuple((p.key, p.value) for p in model.metadata_props),
        functions=tuple(model.functions),
        input_protos=tuple(v for v in graph.input if v.name not in initializers),
        output_protos=tuple(graph.output),
        upgraded_from_opset=upgraded_from,
    )
    g = Graph(
        nodes, types, initializers, inputs, outputs, context, producer, consumers, frozenset(), 0,
        _bound_dims(model, input_shapes or {}, types),
    )
    try:
        order = g.topological_order()
    except GraphError:
        raise BadInputError("the graph has a cycle") from None
    constants = {name for name in initializers if name not in inputs}
    for name in order:
        node = nodes[name]
        if node.op_type in PURE_OPS and not node.is_opaque and all((not v) or v in constants for v in node.inputs):
            constants.update(v for v in node.outputs if v)
    g.constants = frozenset(constants)
    return g


def _bound_dims(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], types: dict[str, TensorType]) -> BoundDims:
    """Which dims of which values follow from a symbolic input dim the user bound (see BoundDims)."""
    if not input_shapes:
        return BoundDims()
    unbound = onnx.ModelProto()
    _copy_without_weights(model, unbound)
    try:
        inferred = onnx.shape_inference.infer_shapes(unbound, strict_mode=False, data_prop=True)
    except Exception:
        inferred = unbound
    per_value: dict[str, tuple[bool, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = _tensor_type(vi.type)
        bound = types.get(vi.name)
        if t is None or t.shape is None or bound is None or bound.shape is None:
            continue
        flags = tuple(not isinstance(d, int) for d in t.shape)
        if len(flags) == len(bound.shape) and any(flags):
            per_value[vi.name] = flags
    # Values whose symbolic shape inference could not tell at all are treated as bound on every dim.
    known = {i.name for i in model.graph.initializer}
    known |= {vi.name for vi in inferred.graph.value_info} | {vi.name for vi in inferred.graph.input}
    for name, t in types.items():
        if name not in per_value and name not in known and t.shape is not None:
            per_value[name] = tuple(True for _ in t.shape)
    return BoundDims(per_value, frozenset())


def _attribute_proto(name: str, value: Any) -> onnx.AttributeProto:
    if isinstance(value, OpaqueAttribute):
        return value.proto
    return onnx.helper.make_attribute(name, list(value) if isinstance(value, tuple) else value)


def _node_proto(node: Node) -> onnx.NodeProto:
    proto = onnx.helper.make_node(node.op_type, list(node.inputs), list(node.outputs), name=node.name, domain=node.domain)
    proto.attribute.extend(_attribute_proto(k, v) for k, v in node.attributes)
    if node.doc_string:
        proto.doc_string = node.doc_string
    return proto


def to_model(graph: Graph, fold_constants: bool = False) -> onnx.ModelProto:
    """Export to an ONNX ModelProto.

    With `fold_constants`, constant subgraphs created by rewrites (weight concatenations, paddings, ...) are
    evaluated once, so the artifact holds the folded weights and none of the originals they replaced.
    """
    ctx = graph.context
    order = graph.topological_order()
    folded: dict[str, np.ndarray] = {}
    if fold_constants:
        folded = _fold_rewrite_constants(graph, order)
    node_protos = []
    used: set[str] = set()
    for name in order:
        node = graph.nodes[name]
        if node.outputs and all((not v) or v in folded for v in node.outputs):
            continue
        node_protos.append(_node_proto(node))
        used.update(node.all_inputs)
    used.update(graph.outputs)
    initializers = [t for n, t in graph.initializers.items() if n in used and n not in folded]
    live_folded = [numpy_helper.from_array(a, n) for n, a in folded.items() if n in used]

    outputs = []
    for proto in ctx.output_protos:
        t = graph.types.get(proto.name)
        if not proto.type.tensor_type.HasField("shape") and t is not None and t.shape is not None:
            # dims bound only by --input-shape stay symbolic: the output must run at any binding
            dims = [f"{proto.name}_dim{i}" if graph.dim_is_bound(proto.name, i) else d for i, d in enumerate(t.shape)]
            proto = onnx.helper.make_tensor_value_info(proto.name, t.dtype, dims)
        outputs.append(proto)
    g = onnx.helper.make_graph(
        node_protos, ctx.graph_name or "xrlflow", list(ctx.input_protos), outputs,
        initializer=initializers + live_folded, doc_string=ctx.graph_doc_string or None,
        value_info=_contrib_value_info(graph, set(graph.outputs)),
    )
    imports = dict(ctx.opset_imports)
    for node in graph.nodes.values():
        # a rewrite that introduced an operator of another domain (com.microsoft contrib ops) imports it
        if node.domain not in ("", "ai.onnx"):
            imports.setdefault(node.domain, CONTRIB_OPSET_VERSIONS.get(node.domain, 1))
    model = onnx.helper.make_model(
        g, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in imports.items()],
        producer_name=ctx.producer_name, producer_version=ctx.producer_version,
    )
    model.ir_version = ctx.ir_version
    if ctx.domain:
        model.domain = ctx.domain
    model.model_version = ctx.model_version
    if ctx.doc_string:
        model.doc_string = ctx.doc_string
    for key, value in ctx.metadata_props:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.functions.extend(ctx.functions)
    return model


def _contrib_value_info(graph: Graph, skip: set[str]) -> list[onnx.ValueInfoProto]:
    """Types of the outputs of ops outside the default domain: onnx's shape inference has no schema for
    them, so without these a re-loaded model would lose every shape downstream of a contrib op."""
    infos = []
    for node in graph.nodes.values():
        if node.domain in ("", "ai.onnx"):
            continue
        for v in node.outputs:
            t = graph.types.get(v)
            if not v or v in skip or t is None or t.shape is None:
                continue
            dims = [f"{v}_dim{i}" if graph.dim_is_bound(v, i) else d for i, d in enumerate(t.shape)]
            infos.append(onnx.helper.make_tensor_value_info(v, t.dtype, dims))
    return infos


def _fold_rewrite_constants(graph: Graph, order: list[str]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    values: dict[str, np.ndarray] = {}
    folded: dict[str, np.ndarray] = {}

    def array(v: str) -> np.ndarray | None:
        if v in values:
            return values[v]
        a = graph.constant_array(v)
        if a is not None:
            values[v] = a
        return a

    for name in order:
        node = graph.nodes[name]
        if not node.origin or node.op_type in NEVER_FOLD or node.op_type not in PURE_OPS:
            continue
        if not all((not v) or graph.is_constant(v) for v in node.inputs):
            continue
        args = [array(v) if v else None for v in node.inputs]
        if any(a is None for v, a in zip(node.inputs, args) if v):
            continue
        proto = _node_proto(node)
        in_infos = [
            onnx.helper.make_tensor_value_info(v, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for v, a in zip(node.inputs, args) if v
        ]
        out_infos = [onnx.helper.make_empty_tensor_value_info(v) for v in node.outputs if v]
        model = onnx.helper.make_model(
            onnx.helper.make_graph([proto], "fold", in_infos, out_infos),
            opset_imports=[onnx.helper.make_opsetid("", graph.context.opset)],
        )
        results = ReferenceEvaluator(model).run(None, {v: a for v, a in zip(node.inputs, args) if v})
        for v, r in zip([v for v in node.outputs if v], results):
            values[v] = folded[v] = np.asarray(r)
    return folded


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool = False) -> None:
    """Write atomically (temporary files beside the target, then rename): never half-written.

    With `external_data` (automatic when the model cannot be one protobuf: past 2 GB, or weights still in
    external files) the weights go to `<name>.data` beside it, streamed tensor by tensor; the model is never
    serialised whole. The caller's ModelProto is not modified.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInputError(f"{path}: the output folder {path.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmpdir:
        tmp = Path(tmpdir) / path.name
        if external_data or not fits_in_protobuf(model):
            data_name = f"{path.name}.data"
            write_with_external_data(model, tmp, data_name)
            os.replace(Path(tmpdir) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp))
        os.replace(tmp, path)


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write `path` plus `path.parent/data_name`: every tensor of 1 KiB or more goes to the data file.

    Builds a skeleton proto (no payloads) and streams each payload: tensors still in external files are
    copied in chunks, in-memory ones one at a time, so memory never holds a second copy of the weights."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    graph = model.graph
    _copy_fields(graph, skeleton.graph, skip="initializer")
    with open(path.parent / data_name, "wb") as data:
        for tensor in graph.initializer:
            stub = skeleton.graph.initializer.add()
            nbytes = _tensor_nbytes(tensor)
            if nbytes is None or (tensor.data_location != onnx.TensorProto.EXTERNAL and nbytes < _EXTERNAL_INLINE_BYTES):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    stub.CopyFrom(numpy_helper.from_array(tensor_array(tensor), tensor.name))
                else:
                    stub.CopyFrom(tensor)
                continue
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            if tensor.doc_string:
                stub.doc_string = tensor.doc_string
            if nbytes >= (1 << 20):
                data.write(b"\0" * (-data.tell() % _EXTERNAL_ALIGN))
            offset = data.tell()
            _write_payload(tensor, data)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
    with open(path, "wb") as out:
        out.write(skeleton.SerializeToString())


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of a proto message except `skip` (no copy of what `skip` holds is ever made)."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    length = int(info.get("length", -1))
    return info["location"], int(info.get("offset", 0)), length if length >= 0 else (_tensor_nbytes(tensor) or 0)


def _write_payload(tensor: onnx.TensorProto, out) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        location, offset, length = _external_info(tensor)
        with open(location, "rb") as source:
            source.seek(offset)
            while length > 0:
                chunk = source.read(min(length, 64 << 20))
                if not chunk:
                    raise GraphError(f"external data of {tensor.name!r} ends early in {location}")
                out.write(chunk)
                length -= len(chunk)
    elif tensor.HasField("raw_data"):
        out.write(tensor.raw_data)
    else:
        out.write(numpy_helper.to_array(tensor).tobytes())


def graph_to_bytes(graph: Graph) -> bytes:
    """The unfolded export, serialised (what the latency service measures; ORT folds weight concats itself)."""
    return to_model(graph).SerializeToString()


__all__ = ["load_graph", "upgrade_opset", "opset_upgrade_note", "MIN_OPSET", "read_model", "to_model", "save_model", "tensor_array", "weight_bytes", "fits_in_protobuf", "parse_input_shapes", "graph_to_bytes", "GraphError", "make_attributes"]
