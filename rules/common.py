"""What several rule families share: graph queries, replacement builders, the MatMul shape rule and the
normalised Conv description (`ConvSpec`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType, make_attributes

INT64 = onnx.TensorProto.INT64
CHAIN_OPS = ("Add", "Mul")  # the associative, commutative binary ops the chain rules regroup
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})
UNARY_ELEMENTWISE = frozenset({"Relu", "Gelu", "Sigmoid", "Tanh", "LeakyRelu", "Erf", "Neg", "Abs", "Exp", "Sqrt"})


def sole_reader(g: Graph, value: str) -> Node | None:
    """The only node that reads `value`, when it is read exactly once and is not pinned (graph output etc.)."""
    readers = g.consumers.get(value, ())
    if len(readers) != 1 or value in g.pinned_values():
        return None
    return g.nodes[readers[0]]


def rewritable(node: Node) -> bool:
    """A node in the default domain that rules may rewrite."""
    return not node.is_opaque


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        return None


def constant_ints(g: Graph, value: str) -> tuple[int, ...] | None:
    if not value:
        return None
    arr = g.constant_array(value)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return tuple(int(v) for v in arr.reshape(-1))


def split_sizes(g: Graph, split: Node) -> tuple[int, ...] | None:
    """The sizes of a Split's outputs along its axis, when static."""
    shape = g.static_shape(split.inputs[0])
    if shape is None:
        return None
    axis = normalize_axis(split.attr("axis", 0), len(shape))
    if len(split.inputs) > 1 and split.inputs[1]:
        return constant_ints(g, split.inputs[1])
    sizes = split.attr("split")
    if sizes is not None:
        return tuple(sizes)
    if g.dim_is_bound(split.inputs[0], axis):
        return None  # equal pieces of a dim bound only by --input-shape: the sizes differ at other shapes
    n = len(split.outputs)
    total = shape[axis]
    if n == 0:
        return None
    chunk = -(-total // n)
    return tuple(min(chunk, total - i * chunk) for i in range(n))


def ints_constant(edit: GraphEdit, values: Iterable[int]) -> str:
    values = tuple(int(v) for v in values)
    return edit.add1("Constant", [], TensorType(INT64, (len(values),)), value_ints=values)


def concat(edit: GraphEdit, g: Graph, values: Sequence[str], axis: int) -> str:
    """Concat(values) along `axis`; shapes must be static."""
    shapes = [g.static_shape(v) or edit.new_types[v].shape for v in values]
    rank = len(shapes[0])
    axis = normalize_axis(axis, rank)
    out_shape = list(shapes[0])
    out_shape[axis] = sum(s[axis] for s in shapes)
    dtype = g.dtype(values[0]) or edit.new_types[values[0]].dtype
    return edit.add1("Concat", values, TensorType(dtype, tuple(out_shape)), axis=axis)


def split(edit: GraphEdit, value: str, value_type: TensorType, axis: int, sizes: Sequence[int]) -> list[str]:
    """Split(value) along `axis` into pieces of `sizes`."""
    shape = value_type.shape
    assert shape is not None
    axis = normalize_axis(axis, len(shape))
    pieces = []
    for size in sizes:
        s = list(shape)
        s[axis] = size
        pieces.append(TensorType(value_type.dtype, tuple(s)))
    return edit.add("Split", [value, ints_constant(edit, sizes)], pieces, make_attributes(axis=axis))


def concat_order(g: Graph, values: Sequence[str]) -> list[int] | None:
    """Positions of `values` among the inputs of the one Concat that reads them all (each read only there),
    so a merge can emit its Split in the Concat's order and cancel-split-concat can then remove both."""
    readers = [g.consumers.get(v, ()) for v in values]
    if not all(len(r) == 1 for r in readers) or len({r[0] for r in readers}) != 1:
        return None
    node = g.nodes[readers[0][0]]
    if node.op_type != "Concat":
        return None
    try:
        return [node.inputs.index(v) for v in values]
    except ValueError:
        return None


def merge_order(g: Graph, names: Sequence[str], outputs: Sequence[str]) -> tuple[str, ...]:
    """Member nodes of a merge in a stable order: a shared Concat's order when there is one, else by name."""
    positions = concat_order(g, outputs)
    if positions is not None:
        return tuple(n for _, n in sorted(zip(positions, names)))
    return tuple(sorted(names))


def unary_elementwise(node: Node | None) -> bool:
    """A rewritable one-input, one-output node of an op in UNARY_ELEMENTWISE."""
    return (
        node is not None and node.op_type in UNARY_ELEMENTWISE and rewritable(node)
        and len(node.inputs) == 1 and len(node.outputs) == 1
    )


def computed(g: Graph, value: str) -> bool:
    """A value known only at run time (rewriting constant subgraphs is pointless: they are folded anyway)."""
    return not g.is_constant(value)


def producer_op(g: Graph, value: str, op_type: str) -> Node | None:
    """The rewritable producer of `value` when it is an `op_type` node."""
    node = g.producer_of(value)
    if node is None or node.op_type != op_type or not rewritable(node):
        return None
    return node


def read_once_producer(g: Graph, value: str, op: str, reader: Node) -> Node | None:
    """The `op` node that computes `value`, when `reader` is the only node that reads it."""
    if sole_reader(g, value) is not reader:
        return None
    return producer_op(g, value, op)


def other_operand(node: Node, value: str) -> str:
    """The operand of a binary node that is not `value` (the second if both are)."""
    return node.inputs[1] if node.inputs[0] == value else node.inputs[0]


def shape_of(g: Graph, *values: str) -> tuple[int, ...] | None:
    """The broadcast shape of `values` (None when a shape is unknown or they do not broadcast)."""
    shapes = [g.static_shape(v) for v in values]
    if any(s is None for s in shapes):
        return None
    return broadcast_shape(*shapes)  # type: ignore[arg-type]


def regroup(g: Graph, origin: str, outer: Node, grouped: tuple[str, str], outside: str, grouped_first: bool) -> Graph:
    """`outer`'s output recomputed as op(outside, op(*grouped)), or op(op(*grouped), outside) when `grouped_first`."""
    e = GraphEdit(g, origin)
    inner = e.add1(outer.op_type, list(grouped), TensorType(g.dtype(grouped[0]), shape_of(g, *grouped)))  # type: ignore[arg-type]
    operands = [inner, outside] if grouped_first else [outside, inner]
    e.replace_value(outer.outputs[0], e.add1(outer.op_type, operands, g.types[outer.outputs[0]]))
    return e.commit()


# ---- MatMul ----------------------------------------------------------------------------------------------------
def matmul_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
    """numpy's MatMul output shape (batch dims broadcast, rank-1 operands promoted then dropped); None if invalid."""
    if not a or not b:
        return None
    a_vec, b_vec = len(a) == 1, len(b) == 1
    a2 = (1, *a) if a_vec else tuple(a)
    b2 = (*b, 1) if b_vec else tuple(b)
    if a2[-1] != b2[-2]:
        return None
    batch = broadcast_shape(a2[:-2], b2[:-2])
    if batch is None:
        return None
    out = batch + (a2[-2], b2[-1])
    if b_vec:
        out = out[:-1]
    if a_vec:
        out = out[:-2] + out[-1:] if not b_vec else out[:-1]
    return tuple(int(d) for d in out)


def matmul_pair_shares_input(g: Graph, left: str, right: str) -> tuple[Node, Node] | None:
    """The MatMuls X@A and X@B producing `left` and `right` (same X, same-shape weights, each read once)."""
    m1, m2 = producer_op(g, left, "MatMul"), producer_op(g, right, "MatMul")
    if m1 is None or m2 is None or m1 is m2 or m1.inputs[0] != m2.inputs[0]:
        return None
    a, b = m1.inputs[1], m2.inputs[1]
    shape = g.static_shape(a)
    if shape is None or shape != g.static_shape(b) or g.dtype(a) != g.dtype(b):
        return None
    if sole_reader(g, left) is None or sole_reader(g, right) is None:
        return None
    return m1, m2


def shared_factors(g: Graph, left: str, right: str) -> list[tuple[Node, Node, str]]:
    """(Mul producing left, Mul producing right, a factor both read) for every factor they share."""
    m1, m2 = producer_op(g, left, "Mul"), producer_op(g, right, "Mul")
    if m1 is None or m2 is None or m1 is m2:
        return []
    if sole_reader(g, left) is None or sole_reader(g, right) is None:
        return []
    return [(m1, m2, f) for f in dict.fromkeys(m1.inputs) if f in m2.inputs]


# ---- Conv ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """A Conv with explicit pads (auto_pad NOTSET), every attribute spelled out with ONNX defaults filled in."""

    x: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]  # (out channels, in channels / group, *kernel)
    out_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begins of every spatial axis, then ends
    dilations: tuple[int, ...]
    group: int

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def geometry(self) -> tuple[Any, ...]:
        """What two convs must share to be merged or batched: kernel, strides, pads, dilations, group."""
        return (self.kernel, self.strides, self.pads, self.dilations, self.group)


def conv_spec(g: Graph, node: Node) -> ConvSpec | None:
    """The ConvSpec of a rewritable Conv with static shapes and explicit padding; None for anything else."""
    if node.op_type != "Conv" or not rewritable(node) or len(node.outputs) != 1:
        return None
    if node.attr("auto_pad", "NOTSET") != "NOTSET" or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    x_shape, w_shape, out_shape = g.static_shape(x), g.static_shape(w), g.static_shape(node.outputs[0])
    if x_shape is None or w_shape is None or out_shape is None or len(w_shape) < 3 or len(x_shape) != len(w_shape):
        return None
    if len({g.dtype(v) for v in (x, w, node.outputs[0]) + ((bias,) if bias else ())}) != 1:
        return None
    if bias is not None and g.static_shape(bias) != (w_shape[0],):
        return None
    spatial = len(w_shape) - 2
    kernel_attr = node.attr("kernel_shape")
    if kernel_attr is not None and tuple(kernel_attr) != tuple(w_shape[2:]):
        return None
    strides = tuple(node.attr("strides", (1,) * spatial))
    pads = tuple(node.attr("pads", (0,) * (2 * spatial)))
    dilations = tuple(node.attr("dilations", (1,) * spatial))
    if len(strides) != spatial or len(pads) != 2 * spatial or len(dilations) != spatial:
        return None
    return ConvSpec(x, w, bias, tuple(w_shape), tuple(out_shape), strides, pads, dilations, int(node.attr("group", 1)))


def resized_conv_attributes(node: Node, kernel: tuple[int, ...], pads: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    """The node's attributes with new pads (and kernel_shape, where the node spells it out)."""
    attrs = dict(node.attributes)
    attrs["pads"] = tuple(pads)
    if "kernel_shape" in attrs:
        attrs["kernel_shape"] = tuple(kernel)
    return make_attributes(**attrs)


def with_dim(t: TensorType, axis: int, size: int) -> TensorType:
    shape = list(t.shape)  # type: ignore[arg-type]
    shape[axis] = size
    return t.with_shape(shape)


def is_scalar_constant(g: Graph, value: str) -> bool:
    t = g.types.get(value)
    return g.is_constant(value) and t is not None and t.numel() == 1
