"""fold-batchnorm-into-conv.

Conv -> BatchNormalization (inference mode, constant statistics) becomes one Conv whose weight and bias carry
the BatchNorm's per-channel scale and shift (computed by constant nodes onnxruntime folds). onnxruntime folds
a BatchNorm into the Conv right before it by itself, so alone this pays nothing; it pays by enabling the conv
families: after merge-parallel-conv the BatchNorms sit behind a Split, where onnxruntime can no longer fold
them, so real CNN exports (BatchNorm kept as a node) need them folded first. No reverse: a BatchNorm cannot be
recovered from a folded weight, and keeping it separate never helps under onnxruntime.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, TensorType
from xrlflow.rules.common import conv_spec, rewritable, sole_reader


class FoldBatchNormIntoConv(Rule):
    name = "fold-batchnorm-into-conv"
    description = (
        "Conv -> BatchNormalization (inference, constant stats) -> one Conv with scaled weight and shifted bias. "
        "ORT does this itself only when the BN directly follows the Conv; folding first lets the conv merges "
        "pay on exports that keep BN nodes."
    )
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for bn in g.by_op("BatchNormalization"):
            if not rewritable(bn) or bn.attr("training_mode", 0) != 0 or len(bn.outputs) != 1 or len(bn.inputs) != 5:
                continue
            conv = g.producer_of(bn.inputs[0])
            if conv is None or sole_reader(g, conv.outputs[0]) is not bn:
                continue
            spec = conv_spec(g, conv)
            if spec is None or not g.is_constant(spec.weight) or (spec.bias and not g.is_constant(spec.bias)):
                continue
            channels = spec.out_channels
            params = bn.inputs[1:]
            if not all(g.is_constant(p) and g.static_shape(p) == (channels,) for p in params):
                continue
            if len({g.dtype(v) for v in (spec.weight, *params)}) != 1:
                continue
            yield (conv.name, bn.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        conv, bn = g.nodes[nodes[0]], g.nodes[nodes[1]]
        spec = conv_spec(g, conv)
        assert spec is not None
        gamma, beta, mean, var = bn.inputs[1:]
        dtype = g.dtype(spec.weight)
        channels = spec.out_channels
        vec = TensorType(dtype, (channels,))
        e = GraphEdit(g, self.name)
        eps = e.add1("Cast", [e.add1("Constant", [], TensorType(1, ()), value_float=float(bn.attr("epsilon", 1e-5)))],
                     TensorType(dtype, ()), to=dtype)
        scale = e.add1("Div", [gamma, e.add1("Sqrt", [e.add1("Add", [var, eps], vec)], vec)], vec)
        shape = (channels,) + (1,) * (len(spec.weight_shape) - 1)
        target = e.add1("Constant", [], TensorType(7, (len(shape),)), value_ints=shape)
        weight = e.add1("Mul", [spec.weight, e.add1("Reshape", [scale, target], TensorType(dtype, shape))],
                        TensorType(dtype, spec.weight_shape))
        centred = e.add1("Sub", [spec.bias, mean], vec) if spec.bias else e.add1("Neg", [mean], vec)
        bias = e.add1("Add", [e.add1("Mul", [centred, scale], vec), beta], vec)
        out = e.add1("Conv", [spec.x, weight, bias], g.types[bn.outputs[0]], **dict(conv.attributes))
        e.replace_value(bn.outputs[0], out)
        return e.commit()
