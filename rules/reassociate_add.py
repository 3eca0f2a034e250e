"""reassociate-add / reassociate-add-left (associativity and commutativity of Add and Mul).

(a op b) op c -> a op (b op c) and back, for op in Add, Mul, where the inner op is read once. Regrouping by
itself changes nothing onnxruntime runs faster, and every Add/Mul chain has such regroupings, so the rules are
offered ONLY when the regrouping exposes another rule; otherwise they would bloat the action space:
  - Add: the new inner pair is two MatMuls sharing their input (factor-matmul-add) or two Muls sharing a
    factor (factor-mul-add);
  - Mul: the factor left outside becomes a direct operand shared with a sibling Mul of the Add that reads the
    result (factor-mul-add).
Pairs of constants are left to fold-const-chain / unfold-const-chain, which already perform exactly that
regrouping. Both directions are commutative-aware (either operand of the inner op may stay outside); the
forward rule rewrites left-nested chains into right-nested ones, the reverse right-nested into left-nested.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.ir import Graph, Node
from xrlflow.rules.common import (
    CHAIN_OPS, broadcast_shape, computed, matmul_pair_shares_input, other_operand, producer_op, read_once_producer,
    regroup, rewritable, shape_of, shared_factors, sole_reader,
)


def exposes_rule(g: Graph, outer: Node, grouped: tuple[str, str], outside: str) -> bool:
    """Whether op(outside, op(*grouped)) in place of `outer` lets factor-matmul-add or factor-mul-add apply."""
    if outer.op_type == "Add":
        return matmul_pair_shares_input(g, *grouped) is not None or bool(shared_factors(g, *grouped))
    reader = sole_reader(g, outer.outputs[0])
    if reader is None or reader.op_type != "Add" or not rewritable(reader):
        return False
    sibling_value = other_operand(reader, outer.outputs[0])
    sibling = producer_op(g, sibling_value, "Mul")
    return sibling is not None and sole_reader(g, sibling_value) is reader and outside in sibling.inputs


def regrouped_shape_ok(g: Graph, outer: Node, grouped: tuple[str, str], outside: str) -> bool:
    inner = shape_of(g, *grouped)
    outside_shape = g.static_shape(outside)
    if inner is None or outside_shape is None or len({g.dtype(v) for v in (outside, *grouped)}) != 1:
        return False
    return broadcast_shape(outside_shape, inner) == g.static_shape(outer.outputs[0])


class ReassociateAdd(Rule):
    name = "reassociate-add"
    description = (
        "(a op b) op c -> a op (b op c) for Add/Mul (inner read once, either inner operand may stay outside). "
        "Offered only when the regrouping exposes factor-matmul-add or factor-mul-add (two MatMuls sharing an "
        "input, or two Muls sharing a factor, come together); otherwise it would only bloat the action space. "
        "Constant pairs are fold-const-chain's job."
    )
    reverse = "reassociate-add-left"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op in CHAIN_OPS:
            for outer in g.by_op(op):
                if not rewritable(outer) or not computed(g, outer.outputs[0]):
                    continue
                inner_out, c = outer.inputs
                inner = read_once_producer(g, inner_out, op, outer)
                if inner is None:
                    continue
                for position in (0, 1) if inner.inputs[0] != inner.inputs[1] else (0,):
                    a, b = inner.inputs[position], inner.inputs[1 - position]
                    if regrouped_shape_ok(g, outer, (b, c), a) and exposes_rule(g, outer, (b, c), a):
                        yield (outer.name, inner.name), (position,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (position,) = params
        a, b, c = inner.inputs[position], inner.inputs[1 - position], outer.inputs[1]
        return regroup(g, self.name, outer, (b, c), a, grouped_first=False)


class ReassociateAddLeft(Rule):
    name = "reassociate-add-left"
    description = (
        "a op (b op c) -> (a op b) op c for Add/Mul (inner read once, either inner operand may join a). Reverse "
        "of reassociate-add, under the same condition: offered only when the new pair exposes factor-matmul-add "
        "or factor-mul-add."
    )
    reverse = "reassociate-add"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op in CHAIN_OPS:
            for outer in g.by_op(op):
                if not rewritable(outer) or not computed(g, outer.outputs[0]):
                    continue
                a, inner_out = outer.inputs
                inner = read_once_producer(g, inner_out, op, outer)
                if inner is None:
                    continue
                for position in (0, 1) if inner.inputs[0] != inner.inputs[1] else (0,):
                    joins, stays = inner.inputs[position], inner.inputs[1 - position]
                    if regrouped_shape_ok(g, outer, (a, joins), stays) and exposes_rule(g, outer, (a, joins), stays):
                        yield (outer.name, inner.name), (position,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (position,) = params
        a, joins, stays = outer.inputs[0], inner.inputs[position], inner.inputs[1 - position]
        return regroup(g, self.name, outer, (a, joins), stays, grouped_first=True)
