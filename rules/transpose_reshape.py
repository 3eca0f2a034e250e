"""move-reshape-before-transpose / move-transpose-before-reshape.

A Reshape that only splits or merges axes commutes with a Transpose that keeps each merged (or split) group
of axes together and in order: Reshape(Transpose(x, p), S) = Transpose(Reshape(x, S'), p') and back. This is
the step that moves attention's head split ([seq, heads*dh] -> [seq, heads, dh]) across the layout
Transposes, so that a projection can be computed transposed and Split per head with no layout copy left.
Shapes must be static and none of their dims may be bound only by --input-shape (the new Reshape bakes them).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import ints_constant, rewritable, sole_reader
from xrlflow.rules.compose_transposes import invert, transpose_perm
from xrlflow.rules.common import computed, producer_op

Group = tuple[tuple[int, ...], tuple[int, ...]]  # (axes of the Reshape's input, axes of its output)


def reshape_groups(before: Sequence[int], after: Sequence[int]) -> list[Group] | None:
    """The finest partition of two shapes into consecutive axis groups of equal size, each group a split
    (one axis before) or a merge (one axis after); a size-1 axis met at a group boundary is a group of its
    own with nothing on the other side (it is dropped or inserted). None when the Reshape is anything else."""
    if 0 in before or 0 in after:
        return None
    groups: list[Group] = []
    i = j = 0
    while i < len(before) or j < len(after):
        if i < len(before) and before[i] == 1:
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(after) and after[j] == 1:
            groups.append(((), (j,)))
            j += 1
            continue
        if i == len(before) or j == len(after):
            return None
        ga, gb = [i], [j]
        pa, pb = before[i], after[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(before):
                    return None
                ga.append(i)
                pa *= before[i]
                i += 1
            else:
                if j == len(after):
                    return None
                gb.append(j)
                pb *= after[j]
                j += 1
        if len(ga) > 1 and len(gb) > 1:
            return None
        groups.append((tuple(ga), tuple(gb)))
    return groups


def placement(spans: Sequence[tuple[int, ...]]) -> list[int]:
    """Group indices sorted by where each group's axes are; a group with no axes there (a size-1 axis that
    the Reshape drops or inserts) stays right after the group before it, so a leading batch of 1 stays put."""
    keys: list[tuple[float, int]] = []
    last = -0.5
    for k, span in enumerate(spans):
        if span:
            last = float(span[0])
            keys.append((last, k))
        else:
            keys.append((last + 0.5, k))
    return [k for _, k in sorted(keys)]


def consecutive(axes: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(axes, axes[1:]))


def free_dims(g: Graph, *values: str) -> bool:
    """Static shapes none of whose dims is bound only by --input-shape (a rewrite may bake them)."""
    for v in values:
        shape = g.static_shape(v)
        if shape is None or any(g.dim_is_bound(v, a) for a in range(len(shape))):
            return False
    return True


def reshape_first(g: Graph, tr: Node, out: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """For out = Reshape(Transpose(x, p)): (S', p') with out = Transpose(Reshape(x, S'), p'), or None."""
    perm = transpose_perm(g, tr)
    mid_shape, out_shape = g.static_shape(tr.outputs[0]), g.static_shape(out)
    if perm is None or mid_shape is None or out_shape is None:
        return None
    groups = reshape_groups(mid_shape, out_shape)
    if groups is None:
        return None
    blocks = [tuple(perm[t] for t in ga) for ga, _ in groups]  # each group's axes of x
    if not all(consecutive(b) for b in blocks):
        return None
    order = placement(blocks)  # groups in x's axis order
    new_shape: list[int] = []
    offset: dict[int, int] = {}
    for k in order:
        offset[k] = len(new_shape)
        new_shape.extend(out_shape[a] for a in groups[k][1])
    new_perm = tuple(offset[k] + n for k in range(len(groups)) for n in range(len(groups[k][1])))
    return tuple(new_shape), new_perm


def transpose_first(g: Graph, reshape: Node, tr: Node) -> tuple[int, ...] | None:
    """For y = Transpose(Reshape(x), p): p' with y = Reshape(Transpose(x, p'), shape of y), or None."""
    perm = transpose_perm(g, tr)
    x_shape, mid_shape = g.static_shape(reshape.inputs[0]), g.static_shape(reshape.outputs[0])
    if perm is None or x_shape is None or mid_shape is None:
        return None
    groups = reshape_groups(x_shape, mid_shape)
    if groups is None:
        return None
    position = invert(perm)  # where each axis of the Reshape's output lands in y
    places = [tuple(position[a] for a in gb) for _, gb in groups]
    if not all(consecutive(p) for p in places):
        return None
    order = placement(places)
    return tuple(a for k in order for a in groups[k][0])


class MoveReshapeBeforeTranspose(Rule):
    name = "move-reshape-before-transpose"
    description = (
        "Reshape(Transpose(x, p), S) -> Transpose(Reshape(x, S'), p') when the Reshape only splits or merges "
        "axes that p keeps together and in order. Pays by enabling: the Transpose meets a MatMul/Gemm that "
        "absorbs it (transA/transB) or another Transpose it composes with."
    )
    reverse = "move-transpose-before-reshape"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for reshape in g.by_op("Reshape"):
            if not rewritable(reshape) or not computed(g, reshape.outputs[0]):
                continue
            tr = producer_op(g, reshape.inputs[0], "Transpose")
            if tr is None or sole_reader(g, tr.outputs[0]) is not reshape:
                continue
            if not free_dims(g, tr.inputs[0], tr.outputs[0], reshape.outputs[0]):
                continue
            if reshape_first(g, tr, reshape.outputs[0]) is not None:
                yield (reshape.name, tr.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        reshape, tr = g.nodes[nodes[0]], g.nodes[nodes[1]]
        new_shape, new_perm = reshape_first(g, tr, reshape.outputs[0])  # type: ignore[misc]
        x = tr.inputs[0]
        e = GraphEdit(g, self.name)
        r = e.add1("Reshape", [x, ints_constant(e, new_shape)], TensorType(g.dtype(x), new_shape))
        e.replace_value(reshape.outputs[0], e.add1("Transpose", [r], g.types[reshape.outputs[0]], perm=new_perm))
        return e.commit()


class MoveTransposeBeforeReshape(Rule):
    name = "move-transpose-before-reshape"
    description = (
        "Transpose(Reshape(x), p) -> Reshape(Transpose(x, p')) when the Reshape only splits or merges axes and "
        "p keeps each split group together and in order. Reverse of move-reshape-before-transpose; pays by "
        "enabling: the Transpose moves up to a Split, a bias Add or a MatMul that computes it transposed."
    )
    reverse = "move-reshape-before-transpose"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]):
                continue
            reshape = producer_op(g, tr.inputs[0], "Reshape")
            if reshape is None or sole_reader(g, reshape.outputs[0]) is not tr:
                continue
            if not free_dims(g, reshape.inputs[0], reshape.outputs[0], tr.outputs[0]):
                continue
            if transpose_first(g, reshape, tr) is not None:
                yield (tr.name, reshape.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr, reshape = g.nodes[nodes[0]], g.nodes[nodes[1]]
        new_perm = transpose_first(g, reshape, tr)
        x = reshape.inputs[0]
        x_shape = g.static_shape(x)
        out = tr.outputs[0]
        e = GraphEdit(g, self.name)
        t = e.add1("Transpose", [x], TensorType(g.dtype(x), tuple(x_shape[a] for a in new_perm)), perm=new_perm)  # type: ignore[index, union-attr]
        e.replace_value(out, e.add1("Reshape", [t, ints_constant(e, g.static_shape(out))], g.types[out]))  # type: ignore[arg-type]
        return e.commit()
