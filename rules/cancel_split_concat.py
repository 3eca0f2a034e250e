"""cancel-split-concat, cancel-concat-split, cancel-slice-concat.

Split and Concat along the same axis undo each other; a Slice that cuts exactly one input back out of a Concat
is that input. onnxruntime does not cancel these (it only cancels Transpose pairs), and they are what the
merge and hoist/sink families leave behind: e.g. sink-unary-into-concat followed by a Concat of a Split's
outputs. Each cancellation removes one or two memory-bound copy kernels. None has a useful reverse (the
inverse would only insert copies), so reverse = None.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node
from xrlflow.rules.common import constant_ints, normalize_axis, rewritable, split_sizes


def _axis(g: Graph, node: Node, value: str, default: int | None) -> int | None:
    """`node`'s axis attribute normalised against the rank of `value` (None when the rank is unknown)."""
    t = g.types.get(value)
    axis = node.attr("axis", default)
    if t is None or t.rank is None or axis is None or not -t.rank <= axis < t.rank:
        return None
    return normalize_axis(axis, t.rank)


class CancelSplitConcat(Rule):
    name = "cancel-split-concat"
    description = (
        "Concat of all outputs of one Split, in order, along the Split's axis -> the Split's input. Removes two "
        "copy kernels; appears after hoist/sink moves leave a Split feeding a Concat. No useful reverse "
        "(reverse = None): the inverse would only insert copies."
    )
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for concat in g.by_op("Concat"):
            if not rewritable(concat) or not concat.inputs or not all(concat.inputs):
                continue
            split = g.producer_of(concat.inputs[0])
            if split is None or split.op_type != "Split" or not rewritable(split) or concat.inputs != split.outputs:
                continue
            x = split.inputs[0]
            axis = _axis(g, split, x, 0)
            if axis is None or axis != _axis(g, concat, concat.outputs[0], None):
                continue
            if g.dtype(x) != g.dtype(concat.outputs[0]):
                continue
            yield (concat.name, split.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        concat, split = g.nodes[nodes[0]], g.nodes[nodes[1]]
        e = GraphEdit(g, self.name)
        e.remove(concat.name)
        e.replace_value(concat.outputs[0], split.inputs[0])
        return e.commit()


class CancelConcatSplit(Rule):
    name = "cancel-concat-split"
    description = (
        "Split of a Concat along the Concat's axis into pieces of the Concat inputs' sizes -> the pieces are the "
        "Concat's inputs. Removes the Split (and the Concat when nothing else reads it): two copy kernels. "
        "No useful reverse (reverse = None)."
    )
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for split in g.by_op("Split"):
            if not rewritable(split) or not split.outputs or not all(split.outputs):
                continue
            concat = g.producer_of(split.inputs[0])
            if concat is None or concat.op_type != "Concat" or not rewritable(concat) or not all(concat.inputs):
                continue
            if len(concat.inputs) != len(split.outputs):
                continue
            axis = _axis(g, split, split.inputs[0], 0)
            if axis is None or axis != _axis(g, concat, concat.outputs[0], None):
                continue
            input_shapes = [g.static_shape(v) for v in concat.inputs]
            if any(s is None or len(s) <= axis for s in input_shapes):
                continue
            sizes = split_sizes(g, split)
            if sizes is None or tuple(sizes) != tuple(s[axis] for s in input_shapes):  # type: ignore[index]
                continue
            yield (split.name, concat.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        split, concat = g.nodes[nodes[0]], g.nodes[nodes[1]]
        e = GraphEdit(g, self.name)
        e.remove(split.name)
        for out, source in zip(split.outputs, concat.inputs):
            e.replace_value(out, source)
        return e.commit()


def _slice_window(g: Graph, node: Node, shape: tuple[int, ...]) -> dict[int, tuple[int, int]] | None:
    """{axis: (start, end)} after ONNX clamping for a Slice with constant arguments and unit steps."""
    inputs = node.inputs + ("",) * (5 - len(node.inputs))
    starts, ends = constant_ints(g, inputs[1]), constant_ints(g, inputs[2])
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = constant_ints(g, inputs[3]) if inputs[3] else tuple(range(len(starts)))
    steps = constant_ints(g, inputs[4]) if inputs[4] else (1,) * len(starts)
    if axes is None or steps is None or len(axes) != len(starts) or len(steps) != len(starts):
        return None
    if any(step != 1 for step in steps):
        return None
    window: dict[int, tuple[int, int]] = {}
    rank = len(shape)
    for start, end, axis in zip(starts, ends, axes):
        if not -rank <= axis < rank:
            return None
        axis = normalize_axis(axis, rank)
        if axis in window:
            return None
        dim = shape[axis]
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        window[axis] = (start, end)
    return window


class CancelSliceConcat(Rule):
    name = "cancel-slice-concat"
    description = (
        "Slice of a Concat (constant starts/ends, unit steps) that selects exactly one Concat input along the "
        "concat axis and everything along other axes -> that input. Removes a copy kernel and often the Concat. "
        "No useful reverse (reverse = None)."
    )
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Slice"):
            if not rewritable(node) or len(node.inputs) < 3 or len(node.outputs) != 1:
                continue
            concat = g.producer_of(node.inputs[0])
            if concat is None or concat.op_type != "Concat" or not rewritable(concat) or not all(concat.inputs):
                continue
            shape = g.static_shape(node.inputs[0])
            if shape is None or not shape:
                continue
            axis = _axis(g, concat, node.inputs[0], None)
            window = _slice_window(g, node, shape)
            if axis is None or window is None or axis not in window:
                continue
            if any(window[a] != (0, shape[a]) for a in window if a != axis):
                continue
            input_shapes = [g.static_shape(v) for v in concat.inputs]
            if any(s is None or len(s) != len(shape) for s in input_shapes):
                continue
            offset = 0
            for index, s in enumerate(input_shapes):
                size = s[axis]  # type: ignore[index]
                if size > 0 and window[axis] == (offset, offset + size):
                    yield (node.name, concat.name), (index,)
                    break
                offset += size

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        (index,) = params
        node, concat = g.nodes[nodes[0]], g.nodes[nodes[1]]
        e = GraphEdit(g, self.name)
        e.remove(node.name)
        e.replace_value(node.outputs[0], concat.inputs[index])
        return e.commit()
