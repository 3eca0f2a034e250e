"""hoist-const-binary-above-split / sink-const-binary-below-split, and the Concat analogue
hoist-const-binary-over-concat / sink-const-binary-into-concat.

Split(x) -> piece_i + c_i (or * c_i) with constant c_i equals Split(x + Concat(c_i)): the per-branch bias adds
behind a merged MatMul, or the per-channel scale/shift behind a merged Conv, become one op on the merged
output, where onnxruntime folds it (MatMul+Add -> Gemm, Conv+Add/Mul folding). The Concat of the constants is
weight-side work that onnxruntime folds at session creation. Likewise Concat(a + c1, b + c2) equals
Concat(a, b) + Concat(c1, c2).

Constants are aligned to the activation's rank from the right (numpy broadcasting); a constant must span the
split/concat axis with exactly the piece's size and must not broadcast the activation to a larger shape.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import broadcast_shape, concat, normalize_axis, rewritable, sole_reader, split, split_sizes

BINARY_OPS = ("Add", "Mul")


def _operands(g: Graph, node: Node, activation: str | None = None) -> tuple[str, str, int] | None:
    """(activation, constant, position of the constant) for a rewritable Add/Mul with one constant operand.

    With `activation` given, that value must be one operand (exactly once) and the other must be constant.
    """
    if node.op_type not in BINARY_OPS or not rewritable(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if not a or not b or a == b:
        return None
    if activation is not None:
        if activation == a and g.is_constant(b):
            return a, b, 1
        if activation == b and g.is_constant(a):
            return b, a, 0
        return None
    if g.is_constant(b) and not g.is_constant(a):
        return a, b, 1
    if g.is_constant(a) and not g.is_constant(b):
        return b, a, 0
    return None


def _aligned_axis(constant_shape: tuple[int, ...], rank: int, axis: int) -> int | None:
    """The constant's own axis that lines up with `axis` of a rank-`rank` activation, or None if it has none."""
    if len(constant_shape) > rank:
        return None
    aligned = axis - (rank - len(constant_shape))
    return aligned if aligned >= 0 else None


def _constant_binaries(g: Graph) -> Iterator[tuple[Node, str, str]]:
    """(node, activation, constant) for every rewritable Add/Mul of an activation with a constant."""
    for op in BINARY_OPS:
        for node in g.by_op(op):
            ops = _operands(g, node)
            if ops is not None:
                yield node, ops[0], ops[1]


def _constant_fits(
    g: Graph, constant: str, activation_shape: tuple[int, ...], dtype: int, axis: int, size: int
) -> int | None:
    """The aligned axis when `constant` can be moved through a split/concat along `axis` (None otherwise)."""
    c_shape = g.static_shape(constant)
    if c_shape is None or g.dtype(constant) != dtype:
        return None
    aligned = _aligned_axis(c_shape, len(activation_shape), axis)
    if aligned is None or c_shape[aligned] != size:
        return None
    if broadcast_shape(activation_shape, c_shape) != activation_shape:
        return None
    return aligned


def _agree_off_axis(shapes: list[tuple[int, ...]], aligned: int) -> bool:
    """All constant shapes have one rank and equal sizes on every axis except the aligned one."""
    first = shapes[0]
    return all(
        len(s) == len(first) and all(d == f for i, (d, f) in enumerate(zip(s, first)) if i != aligned) for s in shapes
    )


def _binary(e, op_type: str, activation: str, constant: str, position: int, out_type: TensorType) -> str:
    inputs = [activation, constant] if position == 1 else [constant, activation]
    return e.add1(op_type, inputs, out_type)


class HoistConstBinaryAboveSplit(Rule):
    name = "hoist-const-binary-above-split"
    description = (
        "Split whose every output i is read only by Add (or Mul, the same op for all) with a constant c_i that "
        "spans the split axis with the piece's size -> one Add/Mul of the Split's input with Concat(c_i), then "
        "the Split. After merge-parallel-matmul/-conv the merged op's bias/scale is next to it again, where "
        "onnxruntime fuses it (MatMul+Add -> Gemm, Conv+Add/Mul folding); n kernels become one."
    )
    reverse = "sink-const-binary-below-split"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Split"):
            if not rewritable(node) or not node.outputs or not all(node.outputs):
                continue
            x = node.inputs[0]
            x_shape = g.static_shape(x)
            if x_shape is None or not x_shape:
                continue
            axis = normalize_axis(node.attr("axis", 0), len(x_shape))
            sizes = split_sizes(g, node)
            if sizes is None or len(sizes) != len(node.outputs) or min(sizes) <= 0 or sum(sizes) != x_shape[axis]:
                continue
            readers: list[Node] = []
            reader_names: set[str] = set()
            constants: list[str] = []
            aligned_axes: set[int] = set()
            for out, size in zip(node.outputs, sizes):
                reader = sole_reader(g, out)
                if reader is None or (readers and reader.op_type != readers[0].op_type):
                    break
                ops = _operands(g, reader, out)
                piece_shape = g.static_shape(out)
                if ops is None or piece_shape is None or g.static_shape(reader.outputs[0]) != piece_shape:
                    break
                # Add(piece_0, piece_1) of a constant Split: one reader for two pieces, the "constant" is a piece
                if ops[1] in node.outputs or reader.name in reader_names:
                    break
                reader_names.add(reader.name)
                aligned = _constant_fits(g, ops[1], piece_shape, g.dtype(x), axis, size)  # type: ignore[arg-type]
                if aligned is None:
                    break
                readers.append(reader)
                constants.append(ops[1])
                aligned_axes.add(aligned)
            else:
                if len(aligned_axes) != 1:
                    continue
                (aligned,) = aligned_axes
                if not _agree_off_axis([g.static_shape(c) for c in constants], aligned):  # type: ignore[misc]
                    continue
                yield (node.name,) + tuple(r.name for r in readers), (aligned,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        (aligned,) = params
        split_node = g.nodes[nodes[0]]
        readers = [g.nodes[n] for n in nodes[1:]]
        x = split_node.inputs[0]
        operands = [_operands(g, r, out) for r, out in zip(readers, split_node.outputs)]
        e = GraphEdit(g, self.name)
        e.remove(*nodes)
        joined = concat(e, g, [ops[1] for ops in operands], aligned)  # type: ignore[index]
        y = _binary(e, readers[0].op_type, x, joined, operands[0][2], g.types[x])  # type: ignore[index]
        pieces = e.add("Split", (y,) + split_node.inputs[1:], [g.types[r.outputs[0]] for r in readers], split_node.attributes)
        for r, piece in zip(readers, pieces):
            e.replace_value(r.outputs[0], piece)
        return e.commit()


class SinkConstBinaryBelowSplit(Rule):
    name = "sink-const-binary-below-split"
    description = (
        "Add/Mul of x with a constant C spanning the whole split axis, read only by a Split -> Split(x) and a "
        "Split of C, the op on each piece. Reverse of hoist-const-binary-above-split; pays when the pieces "
        "feed producers that fold the op (split-merged-matmul gets its per-branch bias back)."
    )
    reverse = "hoist-const-binary-above-split"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node, x, constant in _constant_binaries(g):
            split_node = sole_reader(g, node.outputs[0])
            if split_node is None or split_node.op_type != "Split" or not rewritable(split_node):
                continue
            if split_node.inputs[0] != node.outputs[0] or not split_node.outputs or not all(split_node.outputs):
                continue
            x_shape = g.static_shape(x)
            if x_shape is None or not x_shape or g.static_shape(node.outputs[0]) != x_shape:
                continue
            if not all(out in g.types for out in split_node.outputs):
                continue
            axis = normalize_axis(split_node.attr("axis", 0), len(x_shape))
            sizes = split_sizes(g, split_node)
            if sizes is None or len(sizes) != len(split_node.outputs) or min(sizes) <= 0 or sum(sizes) != x_shape[axis]:
                continue
            aligned = _constant_fits(g, constant, x_shape, g.dtype(x), axis, x_shape[axis])  # type: ignore[arg-type]
            if aligned is None:
                continue
            yield (node.name, split_node.name), (aligned, tuple(sizes))

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        aligned, sizes = params
        node, split_node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x, constant, position = _operands(g, node)  # type: ignore[misc]
        e = GraphEdit(g, self.name)
        e.remove(*nodes)
        x_dtype = g.types[x].dtype
        pieces = e.add(
            "Split", (x,) + split_node.inputs[1:],
            [TensorType(x_dtype, g.types[out].shape) for out in split_node.outputs], split_node.attributes,
        )
        constant_pieces = split(e, constant, g.types[constant], aligned, sizes)
        for out, piece, c in zip(split_node.outputs, pieces, constant_pieces):
            e.replace_value(out, _binary(e, node.op_type, piece, c, position, g.types[out]))
        return e.commit()


class HoistConstBinaryOverConcat(Rule):
    name = "hoist-const-binary-over-concat"
    description = (
        "Concat whose every input is Add (or Mul, the same op for all) of an activation with a constant spanning "
        "the concat axis, each read only by the Concat -> Concat of the activations, then one Add/Mul with the "
        "Concat of the constants. n kernels become one; the constants' Concat is folded by onnxruntime."
    )
    reverse = "sink-const-binary-into-concat"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Concat"):
            if not rewritable(node) or not node.inputs or not all(node.inputs) or len(node.outputs) != 1:
                continue
            out_shape = g.static_shape(node.outputs[0])
            if out_shape is None or not out_shape:
                continue
            axis = normalize_axis(node.attr("axis", 0), len(out_shape))
            producers: list[Node] = []
            constants: list[str] = []
            aligned_axes: set[int] = set()
            dtypes: set[int | None] = set()
            for v in node.inputs:
                producer = g.producer_of(v)
                reader = sole_reader(g, v)
                if producer is None or reader is None or reader.name != node.name:
                    break
                if producers and producer.op_type != producers[0].op_type:
                    break
                ops = _operands(g, producer)
                if ops is None:
                    break
                activation, constant, _ = ops
                a_shape = g.static_shape(activation)
                if a_shape is None or a_shape != g.static_shape(v) or a_shape[axis] <= 0:
                    break
                aligned = _constant_fits(g, constant, a_shape, g.dtype(activation), axis, a_shape[axis])  # type: ignore[arg-type]
                if aligned is None:
                    break
                producers.append(producer)
                constants.append(constant)
                aligned_axes.add(aligned)
                dtypes.add(g.dtype(activation))
            else:
                if len(aligned_axes) != 1 or len(dtypes) != 1:
                    continue
                (aligned,) = aligned_axes
                if not _agree_off_axis([g.static_shape(c) for c in constants], aligned):  # type: ignore[misc]
                    continue
                yield (node.name,) + tuple(p.name for p in producers), (aligned,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        (aligned,) = params
        concat_node = g.nodes[nodes[0]]
        producers = [g.nodes[n] for n in nodes[1:]]
        operands = [_operands(g, p) for p in producers]
        out_type = g.types[concat_node.outputs[0]]
        e = GraphEdit(g, self.name)
        e.remove(*nodes)
        activations = e.add("Concat", [ops[0] for ops in operands], [out_type], concat_node.attributes)[0]  # type: ignore[index]
        constants = concat(e, g, [ops[1] for ops in operands], aligned)  # type: ignore[index]
        y = _binary(e, producers[0].op_type, activations, constants, operands[0][2], out_type)  # type: ignore[index]
        e.replace_value(concat_node.outputs[0], y)
        return e.commit()


class SinkConstBinaryIntoConcat(Rule):
    name = "sink-const-binary-into-concat"
    description = (
        "Add/Mul of a Concat (read only by it) with a constant spanning the whole concat axis -> the op on every "
        "Concat input with its slice of the constant, then the Concat. Reverse of hoist-const-binary-over-concat; "
        "pays when the inputs' producers fold the op (Conv/Gemm bias) or the Concat cancels against a Split."
    )
    reverse = "hoist-const-binary-over-concat"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node, joined, constant in _constant_binaries(g):
            concat_node = g.producer_of(joined)
            if concat_node is None or concat_node.op_type != "Concat" or not rewritable(concat_node):
                continue
            reader = sole_reader(g, joined)
            if reader is None or reader.name != node.name or not all(concat_node.inputs):
                continue
            shape = g.static_shape(joined)
            if shape is None or not shape or g.static_shape(node.outputs[0]) != shape:
                continue
            axis = normalize_axis(concat_node.attr("axis", 0), len(shape))
            input_shapes = [g.static_shape(v) for v in concat_node.inputs]
            if any(s is None or len(s) != len(shape) or s[axis] <= 0 for s in input_shapes):
                continue
            aligned = _constant_fits(g, constant, shape, g.dtype(joined), axis, shape[axis])  # type: ignore[arg-type]
            if aligned is None:
                continue
            sizes = tuple(s[axis] for s in input_shapes)  # type: ignore[index]
            yield (node.name, concat_node.name), (aligned, sizes)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        aligned, sizes = params
        node, concat_node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        _, constant, position = _operands(g, node)  # type: ignore[misc]
        e = GraphEdit(g, self.name)
        e.remove(*nodes)
        constant_pieces = split(e, constant, g.types[constant], aligned, sizes)
        results = [
            _binary(e, node.op_type, v, c, position, g.types[v]) for v, c in zip(concat_node.inputs, constant_pieces)
        ]
        joined = e.add("Concat", results, [g.types[node.outputs[0]]], concat_node.attributes)[0]
        e.replace_value(node.outputs[0], joined)
        return e.commit()
