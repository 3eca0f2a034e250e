"""hoist-unary-over-concat / sink-unary-into-concat.

Concat(f(a), f(b), ...) = f(Concat(a, b, ...)) for a unary element-wise f. onnxruntime does not move
element-wise ops through Concat. Hoisting replaces n activation kernels by one; sinking puts the activation
next to the producers of a, b, ... where it can fuse (Conv+Relu, Gemm+activation) or lets
cancel-split-concat see a Split directly under the Concat.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import UNARY_ELEMENTWISE, rewritable, sole_reader, unary_elementwise


def _concat_ok(g: Graph, concat: Node) -> bool:
    values = concat.inputs + concat.outputs
    return rewritable(concat) and bool(concat.inputs) and all(values) and all(v in g.types for v in values)


class HoistUnaryOverConcat(Rule):
    name = "hoist-unary-over-concat"
    description = (
        "Concat whose every input is produced by the same unary element-wise op (equal attributes) and read only "
        "by the Concat -> the op once on the Concat of their inputs. One kernel instead of n; after a merge it "
        "brings the activation next to the merged producer or the Split it cancels against."
    )
    reverse = "sink-unary-into-concat"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for concat in g.by_op("Concat"):
            if not _concat_ok(g, concat):
                continue
            producers = [g.producer_of(v) for v in concat.inputs]
            first = producers[0]
            if not unary_elementwise(first):
                continue
            ok = True
            for v, p in zip(concat.inputs, producers):
                if not unary_elementwise(p) or p.op_type != first.op_type or p.attributes != first.attributes:  # type: ignore[union-attr]
                    ok = False
                    break
                reader = sole_reader(g, v)
                if reader is None or reader.name != concat.name or p.inputs[0] not in g.types:  # type: ignore[union-attr]
                    ok = False
                    break
            if ok:
                yield (concat.name,) + tuple(p.name for p in producers), ()  # type: ignore[union-attr]

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        concat = g.nodes[nodes[0]]
        unaries = [g.nodes[n] for n in nodes[1:]]
        f = unaries[0]
        sources = [u.inputs[0] for u in unaries]
        out_type = g.types[concat.outputs[0]]
        e = GraphEdit(g, self.name)
        e.remove(*nodes)
        joined = e.add("Concat", sources, [TensorType(g.types[sources[0]].dtype, out_type.shape)], concat.attributes)[0]
        e.replace_value(concat.outputs[0], e.add(f.op_type, [joined], [out_type], f.attributes)[0])
        return e.commit()


class SinkUnaryIntoConcat(Rule):
    name = "sink-unary-into-concat"
    description = (
        "Unary element-wise op whose input is a Concat read only by it -> the op on every Concat input, then the "
        "Concat. Reverse of hoist-unary-over-concat; pays when the inputs' producers fuse the activation "
        "(Conv+Relu on the CPU EP) or when the Concat then cancels against a Split (cancel-split-concat)."
    )
    reverse = "hoist-unary-over-concat"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op in sorted(UNARY_ELEMENTWISE):
            for f in g.by_op(op):
                if not unary_elementwise(f) or f.outputs[0] not in g.types:
                    continue
                concat = g.producer_of(f.inputs[0])
                if concat is None or concat.op_type != "Concat" or not _concat_ok(g, concat):
                    continue
                reader = sole_reader(g, concat.outputs[0])
                if reader is None or reader.name != f.name:
                    continue
                yield (f.name, concat.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        f, concat = g.nodes[nodes[0]], g.nodes[nodes[1]]
        dtype = g.types[f.outputs[0]].dtype
        e = GraphEdit(g, self.name)
        e.remove(f.name, concat.name)
        activated = [e.add(f.op_type, [v], [TensorType(dtype, g.types[v].shape)], f.attributes)[0] for v in concat.inputs]
        joined = e.add("Concat", activated, [g.types[f.outputs[0]]], concat.attributes)[0]
        e.replace_value(f.outputs[0], joined)
        return e.commit()
