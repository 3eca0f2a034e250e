"""ONNX export of the IR: `to_model` (constant subgraphs that rewrites create folded), `save_model` (atomic,
external data streamed past protobuf's 2 GB), and the payload sizes that decide how a model is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
from onnx import numpy_helper

from xrlflow.atomic import replacing_with_companion
from xrlflow.errors import BadInputError, GraphError
from xrlflow.ir import PURE_OPS, Graph, Node, OpaqueAttribute, tensor_array

# Constant subgraphs that rewrites create are folded on export, except ops that can blow a tiny input up into
# a large tensor (the artifact must never grow by more than what was merged).
NEVER_FOLD = frozenset({"Tile", "Expand", "ConstantOfShape", "Range"})
CONTRIB_OPSET_VERSIONS = {"com.microsoft": 1}  # opset version imported when a rewrite adds an op of that domain
# Protobuf cannot serialise a message of 2 GiB or more; past this estimate a model is only written with its
# weights in external data, and onnxruntime is handed a file path, never bytes.
PROTOBUF_SAFE_BYTES = (1 << 31) - (256 << 20)
_EXTERNAL_INLINE_BYTES = 1024  # smaller tensors stay in the .onnx file when writing external data
_EXTERNAL_ALIGN = 1 << 16  # large tensors start at 64 KiB offsets so onnxruntime can map them


def all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_tensors(g)


def tensor_nbytes(t: onnx.TensorProto) -> int | None:
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


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the proto itself (external data excluded): what limits serialisation."""
    total = 0
    for t in all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            total += tensor_nbytes(t) or 0
    return total


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer and Constant payloads, inline or external."""
    return sum(tensor_nbytes(t) or 0 for t in all_tensors(model.graph))


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model.graph))


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return payload_bytes(model) < PROTOBUF_SAFE_BYTES and not has_external_data(model)


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
    """Write atomically (`atomic.replacing_with_companion`: the data file, then the model): never half-written.

    With `external_data` (automatic when the model cannot be one protobuf: past 2 GB, or weights still in
    external files) the weights go to `<name>.data` beside it, streamed tensor by tensor; the model is never
    serialised whole. The caller's ModelProto is not modified.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInputError(f"{path}: the output folder {path.parent} does not exist")
    data_name = f"{path.name}.data"
    with replacing_with_companion(path, data_name) as tmp:
        if external_data or not fits_in_protobuf(model):
            write_with_external_data(model, tmp, data_name)
        else:
            onnx.save_model(model, str(tmp))


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write `path` plus `path.parent/data_name`: every tensor of 1 KiB or more goes to the data file.

    Builds a skeleton proto (no payloads) and streams each payload: tensors still in external files are
    copied in chunks, in-memory ones one at a time, so memory never holds a second copy of the weights."""
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    graph = model.graph
    copy_fields(graph, skeleton.graph, skip="initializer")
    with open(path.parent / data_name, "wb") as data:
        for tensor in graph.initializer:
            stub = skeleton.graph.initializer.add()
            nbytes = tensor_nbytes(tensor)
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


def copy_fields(source, target, skip: str) -> None:
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
    return info["location"], int(info.get("offset", 0)), length if length >= 0 else (tensor_nbytes(tensor) or 0)


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
