"""The graph IR: an immutable, structure-sharing view of an ONNX graph.

A `Graph` is a value. Rewrites go through `GraphEdit` (graph_edit.py), which returns a new `Graph` and leaves the old one
usable. Nodes (`Node`) and the weight store are shared between graphs; each graph owns only a few dicts
(node table, value types, producer/consumer maps), which are shallow-copied on edit, so applying a rewrite
costs in proportion to the number of nodes (dict copies, microseconds) plus the size of the change, never a
copy of the weights.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from xrlflow.errors import GraphError

Dim = int | str  # a static size, or the name of a symbolic dimension
Shape = tuple[Dim, ...]

# Ops whose output depends only on their inputs and attributes: a node of one of these whose inputs are all
# constant produces a constant. Random generators and anything outside the default domain are left out.
PURE_OPS = frozenset(
    """Abs Add And BitShift Cast CastLike Ceil Clip Concat Constant ConstantOfShape Cos Div Equal Erf Exp Expand
    Flatten Floor Gather GatherElements Gemm Greater Identity Less Log MatMul Max Min Mod Mul Neg Not Or Pad Pow
    Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Shape Sigmoid Sign Sin Size
    Slice Softmax Split Sqrt Squeeze Sub Tanh Tile Transpose Unsqueeze Where Xor""".split()
)
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


@lru_cache(maxsize=1 << 16)
def stable_int(text: str) -> int:
    """A process-independent 63-bit integer for a string (Python's own str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") >> 1


def _stable_key(value: Any) -> Any:
    """Turn an attribute value into nested tuples of ints/floats whose built-in hash is process-independent."""
    if isinstance(value, str):
        return stable_int(value)
    if isinstance(value, tuple):
        return tuple(_stable_key(v) for v in value)
    if isinstance(value, OpaqueAttribute):
        return stable_int(value.digest)
    return value


@dataclass(frozen=True, slots=True)
class OpaqueAttribute:
    """An attribute kept verbatim (tensor, graph, sparse tensor, type proto); compared by content digest."""

    proto: onnx.AttributeProto = field(compare=False, hash=False)
    digest: str


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: int  # onnx.TensorProto elem type
    shape: Shape | None  # None when shape inference could not tell the rank

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def numel(self) -> int | None:
        if not self.is_static:
            return None
        n = 1
        for d in self.shape:  # type: ignore[union-attr]
            n *= d  # type: ignore[operator]
        return n

    def with_shape(self, shape: Iterable[Dim]) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))


@dataclass(frozen=True, slots=True)
class Node:
    """One operator. Immutable; shared between graphs."""

    name: str
    op_type: str
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]
    attributes: tuple[tuple[str, Any], ...] = ()  # sorted by name
    domain: str = ""
    origin: str = ""  # the rule that created the node; "" for nodes of the input model
    doc_string: str = ""
    implicit_inputs: tuple[str, ...] = ()  # outer-scope values read inside subgraph attributes
    signature: int = field(default=0, compare=False)  # stable hash of op, domain and attributes

    def __post_init__(self) -> None:
        sig = hash((stable_int(self.domain), stable_int(self.op_type), _stable_key(self.attributes)))
        object.__setattr__(self, "signature", sig)

    @property
    def all_inputs(self) -> tuple[str, ...]:
        return self.inputs + self.implicit_inputs if self.implicit_inputs else self.inputs

    def with_inputs(self, inputs: tuple[str, ...]) -> "Node":
        return Node(
            self.name, self.op_type, inputs, self.outputs, self.attributes, self.domain, self.origin,
            self.doc_string, self.implicit_inputs,
        )

    def attr(self, name: str, default: Any = None) -> Any:
        for key, value in self.attributes:
            if key == name:
                return value
        return default

    @property
    def is_opaque(self) -> bool:
        """Nodes no rule may look inside: custom domains, control flow, anything with subgraph attributes."""
        return (
            self.domain not in ("", "ai.onnx")
            or self.op_type in CONTROL_FLOW_OPS
            or (self.op_type != "Constant" and any(isinstance(v, OpaqueAttribute) for _, v in self.attributes))
        )


def make_attributes(**attrs: Any) -> tuple[tuple[str, Any], ...]:
    """Normalise keyword attributes (lists become tuples) into the sorted tuple form `Node` stores."""
    out = []
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        out.append((key, value))
    return tuple(sorted(out))


@dataclass(frozen=True)
class ModelContext:
    """Everything of the input model that is not the main graph's structure; shared by all graphs."""

    ir_version: int
    opset_imports: tuple[tuple[str, int], ...]
    producer_name: str
    producer_version: str
    domain: str
    model_version: int
    doc_string: str
    graph_name: str
    graph_doc_string: str
    metadata_props: tuple[tuple[str, str], ...]
    functions: tuple[onnx.FunctionProto, ...]
    input_protos: tuple[onnx.ValueInfoProto, ...]  # the model's own declarations, symbolic dims included
    output_protos: tuple[onnx.ValueInfoProto, ...]
    upgraded_from_opset: int = 0  # the default-domain opset the file had before onnx_io upgraded it (0: not upgraded)

    @property
    def opset(self) -> int:
        for domain, version in self.opset_imports:
            if domain in ("", "ai.onnx"):
                return version
        return 0


class Graph:
    """An immutable dataflow graph. Build new graphs with `edit()`."""

    __slots__ = (
        "nodes", "types", "initializers", "inputs", "outputs", "context",
        "producer", "consumers", "constants", "next_id", "bound_dims", "_cache",
    )

    def __init__(
        self,
        nodes: dict[str, Node],
        types: dict[str, TensorType],
        initializers: Mapping[str, onnx.TensorProto],
        inputs: tuple[str, ...],
        outputs: tuple[str, ...],
        context: ModelContext,
        producer: dict[str, str],
        consumers: dict[str, tuple[str, ...]],
        constants: frozenset[str] | set[str],
        next_id: int,
        bound_dims: "BoundDims | None" = None,
    ) -> None:
        self.nodes = nodes  # name -> Node, in a stable order (the input model's, new nodes appended)
        self.types = types  # value name -> TensorType
        self.initializers = initializers  # shared between all graphs derived from one model; never mutated
        self.inputs = inputs
        self.outputs = outputs
        self.context = context
        self.producer = producer  # value -> name of the node that produces it
        self.consumers = consumers  # value -> names of the nodes that read it (one entry per use)
        self.constants = constants  # values whose content is known before run time
        self.next_id = next_id  # counter for readable unique names of new nodes and values
        self.bound_dims = bound_dims or BoundDims()  # which dims the user bound (symbolic in the model)
        self._cache: dict[str, Any] = {}  # per-graph memo (hash, topological order, matches)

    # ---- queries -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def producer_of(self, value: str) -> Node | None:
        name = self.producer.get(value)
        return None if name is None else self.nodes[name]

    def consumer_nodes(self, value: str) -> list[Node]:
        return [self.nodes[n] for n in self.consumers.get(value, ())]

    def use_count(self, value: str) -> int:
        """Uses of a value by nodes, plus one if it is a graph output."""
        return len(self.consumers.get(value, ())) + (value in self._output_set())

    def is_graph_output(self, value: str) -> bool:
        return value in self._output_set()

    def _output_set(self) -> frozenset[str]:
        cached = self._cache.get("outputs")
        if cached is None:
            cached = self._cache["outputs"] = frozenset(self.outputs)
        return cached

    def is_constant(self, value: str) -> bool:
        return value in self.constants

    def shape(self, value: str) -> Shape | None:
        t = self.types.get(value)
        return None if t is None else t.shape

    def static_shape(self, value: str) -> tuple[int, ...] | None:
        t = self.types.get(value)
        if t is None or not t.is_static:
            return None
        return t.shape  # type: ignore[return-value]

    def dtype(self, value: str) -> int | None:
        t = self.types.get(value)
        return None if t is None else t.dtype

    def constant_source(self, value: str) -> str:
        """Follow Identity nodes back to the value they alias (exporters alias shared weights that way)."""
        seen = 0
        while True:
            node = self.producer_of(value)
            if node is None or node.op_type != "Identity" or seen > 64:
                return value
            value = node.inputs[0]
            seen += 1

    def constant_array(self, value: str) -> np.ndarray | None:
        """The content of an initializer or Constant node (seen through Identity); None for computed values."""
        source = self.constant_source(value)
        if source in self.initializers and source not in self.inputs:
            return tensor_array(self.initializers[source])
        node = self.producer_of(source)
        if node is not None and node.op_type == "Constant" and not node.is_opaque:
            for key in ("value_float", "value_int", "value_floats", "value_ints"):
                v = node.attr(key)
                if v is not None:
                    return np.asarray(v, dtype=np.float32 if "float" in key else np.int64)
        if node is not None and node.op_type == "Constant":
            attr = node.attr("value")
            if isinstance(attr, OpaqueAttribute):
                return numpy_helper.to_array(attr.proto.t)
        return None

    def by_op(self, op_type: str) -> list[Node]:
        """Nodes of one op type in stable order (indexed once per graph)."""
        index = self._cache.get("by_op")
        if index is None:
            index = {}
            for node in self.nodes.values():
                index.setdefault(node.op_type, []).append(node)
            self._cache["by_op"] = index
        return index.get(op_type, [])

    def topological_order(self) -> list[str]:
        """Node names in a deterministic topological order; raises GraphError on a cycle."""
        cached = self._cache.get("topo")
        if cached is not None:
            return cached
        position = {name: i for i, name in enumerate(self.nodes)}
        indegree: dict[str, int] = {}
        for name, node in self.nodes.items():
            indegree[name] = sum(1 for v in node.all_inputs if v in self.producer)

        ready = [(position[n], n) for n, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, name = heapq.heappop(ready)
            order.append(name)
            for value in self.nodes[name].outputs:
                for consumer in self.consumers.get(value, ()):
                    indegree[consumer] -= 1
                    if indegree[consumer] == 0:
                        heapq.heappush(ready, (position[consumer], consumer))
        if len(order) != len(self.nodes):
            raise GraphError("the graph has a cycle")
        self._cache["topo"] = order
        return order

    def reaches(self, sources: Iterable[str], targets: Iterable[str]) -> bool:
        """True when a path leads from any of the source nodes to any of the target nodes (sources excluded)."""
        target_set = set(targets)
        stack = []
        for s in sources:
            for v in self.nodes[s].outputs:
                stack.extend(self.consumers.get(v, ()))
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in target_set:
                return True
            if name in seen:
                continue
            seen.add(name)
            for v in self.nodes[name].outputs:
                stack.extend(self.consumers.get(v, ()))
        return False

    def structural_hash(self) -> str:
        """Canonical hash: independent of node names, value names of intermediates and node order.

        Each value gets a 64-bit key from the op, attributes and the keys of its inputs (graph inputs and
        initializers by name and type); the graph's hash is a 128-bit digest of its outputs' keys.
        """
        cached = self._cache.get("hash")
        if cached is not None:
            return cached
        keys: dict[str, int] = {"": 0}
        for name in self.inputs:
            t = self.types.get(name)
            keys[name] = hash((1, stable_int(name), _type_key(t)))
        for name, init in self.initializers.items():
            if name not in keys:
                keys[name] = hash((2, stable_int(name), init.data_type, tuple(init.dims)))
        for name in self.topological_order():
            node = self.nodes[name]
            node_key = hash((node.signature, tuple(keys.get(v, stable_int(v)) for v in node.all_inputs)))
            for i, out in enumerate(node.outputs):
                if out:
                    keys[out] = hash((node_key, i))
        outputs = tuple(keys.get(v, 0) for v in self.outputs)
        digest = hashlib.blake2b(repr((outputs, len(self.nodes))).encode(), digest_size=16).hexdigest()
        self._cache["hash"] = digest
        return digest

    def dim_is_bound(self, value: str, axis: int) -> bool:
        """True when this dim of `value` is symbolic in the model and only fixed by the user's --input-shape
        binding: a rewrite must not bake such a dim into a constant (split sizes, reshapes)."""
        return self.bound_dims.is_bound(value, axis)

    def memo(self) -> dict[str, Any]:
        """A per-graph memo table for derived data (lives and dies with this graph value)."""
        return self._cache

    def pinned_values(self) -> frozenset[str]:
        """Values whose names must survive every rewrite: graph outputs and values read by subgraphs."""
        cached = self._cache.get("pinned")
        if cached is None:
            implicit = {v for n in self.nodes.values() for v in n.implicit_inputs}
            cached = self._cache["pinned"] = frozenset(self.outputs) | implicit
        return cached

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return dict(sorted(counts.items()))


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's content. Tensors of very large models stay in their external file (onnx_io.read_model gives
    them an absolute location) and are read here on demand."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    with open(info["location"], "rb") as source:
        source.seek(int(info.get("offset", 0)))
        flat = np.fromfile(source, dtype=dtype, count=count)
    return flat.reshape(tuple(tensor.dims))


def _type_key(t: TensorType | None) -> Any:
    if t is None:
        return 0
    return (t.dtype, _stable_key(t.shape) if t.shape is not None else -1)


@dataclass(frozen=True)
class BoundDims:
    """Dims that are symbolic in the model but bound for search and measurement.

    `per_value` (values of the input model) maps a value to a flag per dim; values that rewrites create from
    any such value are in `derived` and count as bound on every axis (conservative).
    """

    per_value: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    derived: frozenset[str] = frozenset()

    def is_bound(self, value: str, axis: int) -> bool:
        if value in self.derived:
            return True
        flags = self.per_value.get(value)
        if not flags:
            return False
        return flags[axis] if -len(flags) <= axis < len(flags) else True

    def touches(self, value: str) -> bool:
        return value in self.derived or any(self.per_value.get(value, ()))

    def extended(self, added: list["Node"], graph: "Graph") -> "BoundDims":
        if not self.per_value:
            return self
        new = {out for n in added if any(self.touches(v) for v in n.inputs if v) for out in n.outputs}
        return self if not new else BoundDims(self.per_value, self.derived | new)

