"""compose-transposes / split-transpose, cancel-identity-transpose.

Transpose(Transpose(x, p1), p2) = Transpose(x, p1[p2]): two layout copies become one, and one whose
permutation is the identity is no copy at all. The reverse splits a Transpose into a swap of the last two
axes and the rest, in either order: the swap is the part onnxruntime folds into a neighbouring MatMul
(FusedMatMul transA/transB) or Gemm, and the rest is what commutes with a Reshape that splits or merges heads
(move-transpose-before-reshape), which is how head-major attention layouts are reached.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import rewritable
from xrlflow.rules.common import computed, producer_op


def transpose_perm(g: Graph, node: Node) -> tuple[int, ...] | None:
    """The full permutation of a Transpose whose input rank is known (None otherwise or when malformed)."""
    shape = g.shape(node.inputs[0])
    if shape is None:
        return None
    rank = len(shape)
    perm = node.attr("perm")
    perm = tuple(reversed(range(rank))) if perm is None else tuple(int(p) for p in perm)
    return perm if sorted(perm) == list(range(rank)) else None


def compose(p1: tuple[int, ...], p2: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation of Transpose(Transpose(x, p1), p2)."""
    return tuple(p1[j] for j in p2)


def invert(p: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(p)
    for i, j in enumerate(p):
        inverse[j] = i
    return tuple(inverse)


def permuted(shape, perm: tuple[int, ...]) -> tuple:
    return tuple(shape[p] for p in perm)


def is_identity(perm: tuple[int, ...]) -> bool:
    return perm == tuple(range(len(perm)))


def last_two_swap(rank: int) -> tuple[int, ...]:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def add_transpose(e, g: Graph, value: str, value_type: TensorType, perm: tuple[int, ...]) -> str:
    shape = value_type.shape
    return e.add1("Transpose", [value], TensorType(value_type.dtype, permuted(shape, perm)), perm=perm)


class ComposeTransposes(Rule):
    name = "compose-transposes"
    description = (
        "Transpose(Transpose(x, p1), p2) -> Transpose(x, p1[p2]). Pays directly (one layout copy fewer; the "
        "inner Transpose stays only if something else reads it) and by enabling cancel-identity-transpose."
    )
    reverse = "split-transpose"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for outer in g.by_op("Transpose"):
            if not rewritable(outer) or not computed(g, outer.outputs[0]):
                continue
            inner = producer_op(g, outer.inputs[0], "Transpose")
            if inner is None or transpose_perm(g, inner) is None or transpose_perm(g, outer) is None:
                continue
            yield (outer.name, inner.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        perm = compose(transpose_perm(g, inner), transpose_perm(g, outer))  # type: ignore[arg-type]
        e = GraphEdit(g, self.name)
        e.replace_value(outer.outputs[0], e.add1("Transpose", [inner.inputs[0]], g.types[outer.outputs[0]], perm=perm))
        return e.commit()


class SplitTranspose(Rule):
    name = "split-transpose"
    description = (
        "Transpose(x, p) -> Transpose(Transpose(x, q), swap) or Transpose(Transpose(x, swap), r), swap exchanging "
        "the last two axes (p neither the identity nor the swap). Reverse of compose-transposes; pays by "
        "enabling: the swap folds into a MatMul or Gemm (transpose-matmul, absorb-transpose-into-gemm) and the "
        "rest commutes with a head-splitting Reshape."
    )
    reverse = "compose-transposes"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]):
                continue
            perm = transpose_perm(g, tr)
            if perm is None or len(perm) < 2 or g.shape(tr.inputs[0]) is None:
                continue
            if is_identity(perm) or perm == last_two_swap(len(perm)):
                continue
            yield (tr.name,), ("swap-last",)
            yield (tr.name,), ("swap-first",)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr = g.nodes[nodes[0]]
        perm = transpose_perm(g, tr)
        swap = last_two_swap(len(perm))  # type: ignore[arg-type]
        x = tr.inputs[0]
        if params[0] == "swap-last":  # p = q[swap]  =>  q = p[swap] (swap is its own inverse)
            first, second = compose(perm, swap), swap  # type: ignore[arg-type]
        else:  # p = swap[r]  =>  r = swap[p]
            first, second = swap, compose(swap, perm)  # type: ignore[arg-type]
        e = GraphEdit(g, self.name)
        mid = add_transpose(e, g, x, g.types[x], first)
        e.replace_value(tr.outputs[0], e.add1("Transpose", [mid], g.types[tr.outputs[0]], perm=second))
        return e.commit()


class CancelIdentityTranspose(Rule):
    name = "cancel-identity-transpose"
    description = (
        "Transpose(x, identity) -> x. Pays directly (a copy kernel fewer); compose-transposes leaves such "
        "Transposes behind when a pair cancels."
    )
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]):
                continue
            perm = transpose_perm(g, tr)
            if perm is not None and is_identity(perm) and g.types.get(tr.inputs[0]) == g.types.get(tr.outputs[0]):
                yield (tr.name,), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr = g.nodes[nodes[0]]
        e = GraphEdit(g, self.name)
        e.replace_value(tr.outputs[0], tr.inputs[0])
        return e.commit()
