"""ONNX import into the IR: reading a file (external data checked against its folder), validation, the
binding of symbolic input dims (`--input-shape`), shape inference, and `load_graph` (which upgrades an opset
below MIN_OPSET, opset_upgrade.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import onnx

from xrlflow.errors import BadInputError, GraphError
from xrlflow.ir import PURE_OPS, BoundDims, Graph, ModelContext, Node, OpaqueAttribute, TensorType
from xrlflow.onnx_export import all_tensors, tensor_nbytes
from xrlflow.opset_upgrade import MIN_OPSET, convert_skeleton, copy_without_weights, default_opset

# External data beyond this stays on disk after reading (tensors refer to the source file by absolute path and
# are read on demand or streamed when written), so memory holds the weights at most once.
KEEP_EXTERNAL_BYTES = 1 << 30
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
    for tensor in all_tensors(model.graph):
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
        expected = tensor_nbytes(tensor)
        if length < 0:
            length = expected
        if expected is not None and length != expected:
            raise BadInputError(f"{path}: tensor {tensor.name!r} declares {length} bytes of external data, its dims need {expected}")
        if offset < 0 or offset + length > target.stat().st_size:
            raise BadInputError(f"{path}: external data of tensor {tensor.name!r} lies past the end of {location!r}")
        external.append((tensor, target))
    if sum(tensor_nbytes(t) or 0 for t, _ in external) > KEEP_EXTERNAL_BYTES:
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
    bound.CopyFrom(model) if len(model.graph.initializer) == 0 else copy_without_weights(model, bound)
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
        expected = tensor_nbytes(t)
        if expected is not None and len(t.raw_data) != expected:
            raise BadInputError(f"tensor {t.name!r} holds {len(t.raw_data)} bytes, its dims {list(t.dims)} need {expected}")
        return
    field_name = _TYPED_FIELDS.get(t.data_type)
    if field_name is None:
        return
    stored = len(getattr(t, field_name))
    if stored != n:
        raise BadInputError(f"tensor {t.name!r} holds {stored} values, its dims {list(t.dims)} need {n}")


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
        model, weights = convert_skeleton(model, MIN_OPSET)
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
    copy_without_weights(model, unbound)
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
