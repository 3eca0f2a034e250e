"""Small shared pieces of the rule library: graph queries and replacement builders."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx

from xrlflow.ir import Graph, GraphEdit, Node, TensorType

INT64 = onnx.TensorProto.INT64
UNARY_ELEMENTWISE = frozenset({"Relu", "Gelu", "Sigmoid", "Tanh", "LeakyRelu", "Erf", "Neg", "Abs", "Exp", "Sqrt"})


def sole_reader(g: Graph, value: str) -> Node | None:
    """The only node that reads `value`, when it is read exactly once and is not pinned (graph output etc.)."""
    readers = g.consumers.get(value, ())
    if len(readers) != 1 or value in g.pinned_values():
        return None
    return g.nodes[readers[0]]


def plain(node: Node) -> bool:
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
    from xrlflow.ir import make_attributes

    return edit.add("Split", [value, ints_constant(edit, sizes)], pieces, make_attributes(axis=axis))


def type_of(edit: GraphEdit, g: Graph, value: str) -> TensorType:
    return edit.new_types.get(value) or g.types[value]


def static(g: Graph, *values: str) -> bool:
    return all(g.static_shape(v) is not None for v in values)


def same_dtype(g: Graph, *values: str) -> bool:
    return len({g.dtype(v) for v in values}) == 1


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
