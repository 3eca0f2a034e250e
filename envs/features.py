"""Node and edge features of a graph, as fixed-width float rows (the env pads them into its observation).

Node row (`node_feature_size(vocabulary)` wide):
    op-type one-hot over `vocabulary` plus a final "other" bucket,
    log2(1 + d) / 12 of the last `SHAPE_DIMS` dims of the node's first output (right-aligned, 0 when unknown),
    rank / 8, log1p(FLOPs) / 24, log1p(bytes read + written) / 24 (FLOPs and bytes counted as the cost model
    counts them: `xrlflow.costmodel.kernels.node_flops` and `tensor_bytes`),
    log1p(per-op cost in microseconds) / 12 when the latency service offers per-op costs (else 0),
    constness (1 when the node's outputs are known before run time), rewritten (1 for nodes a rule created).
Edge row (`EDGE_FEATURES` wide): log1p(numel of the tensor) / 24, dtype one-hot (float32, float16/bfloat16,
    int64/int32, other), constness of the tensor.

Scales keep every feature roughly in [0, 2] for the sizes real models have (FLOPs up to ~1e10).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import onnx

from xrlflow.costmodel.kernels import node_flops, tensor_bytes
from xrlflow.ir import Graph, Node

DEFAULT_OP_VOCABULARY: tuple[str, ...] = tuple(
    """Conv MatMul Gemm Add Sub Mul Div Relu Gelu Erf Sigmoid Tanh Softmax LayerNormalization BatchNormalization
    Concat Split Slice Reshape Transpose Gather Unsqueeze Squeeze Flatten MaxPool AveragePool GlobalAveragePool
    ReduceMean Pow Sqrt Cast Shape Constant Identity Pad Where Expand Clip""".split()
)
SHAPE_DIMS = 4
_SCALAR_NODE_FEATURES = 7  # rank, flops, bytes, cost, constness, rewritten (+ the "other" op bucket)
EDGE_FEATURES = 6

_DTYPE_BUCKET = {
    onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 1, onnx.TensorProto.BFLOAT16: 1,
    onnx.TensorProto.INT64: 2, onnx.TensorProto.INT32: 2,
}


def node_feature_size(vocabulary: Sequence[str]) -> int:
    return len(vocabulary) + SHAPE_DIMS + _SCALAR_NODE_FEATURES


def _numel(graph: Graph, value: str) -> int:
    t = graph.types.get(value)
    n = t.numel() if t is not None else None
    return n or 0


def node_bytes(graph: Graph, node: Node) -> float:
    """Bytes the node reads and writes (each input and output once; 0 for values of unknown shape)."""
    return float(sum(tensor_bytes(graph.types.get(v)) for v in node.inputs + node.outputs if v))


class GraphFeaturizer:
    """Computes node/edge feature rows. A node's row depends only on the node and the types of its values, which
    never change for a value name within the graphs derived from one model (they share one initializer store),
    so rows are cached per (model lineage, Node value) across steps and episodes."""

    def __init__(self, vocabulary: Sequence[str] = DEFAULT_OP_VOCABULARY, cache_limit: int = 200_000) -> None:
        self.vocabulary = tuple(vocabulary)
        self.op_index = {op: i for i, op in enumerate(self.vocabulary)}
        self.width = node_feature_size(self.vocabulary)
        self.cache_limit = cache_limit
        self._rows: dict[tuple[int, Node], np.ndarray] = {}

    def node_row(self, graph: Graph, node: Node) -> np.ndarray:
        key = (id(graph.initializers), node)
        row = self._rows.get(key)
        if row is not None:
            return row
        row = np.zeros(self.width, dtype=np.float32)
        row[self.op_index.get(node.op_type, len(self.vocabulary))] = 1.0
        base = len(self.vocabulary) + 1
        shape = graph.shape(node.outputs[0]) if node.outputs and node.outputs[0] else None
        if shape is not None:
            for i, d in enumerate(reversed(shape[-SHAPE_DIMS:])):
                if isinstance(d, int):
                    row[base + SHAPE_DIMS - 1 - i] = math.log2(1 + d) / 12.0
            row[base + SHAPE_DIMS] = len(shape) / 8.0
        row[base + SHAPE_DIMS + 1] = math.log1p(node_flops(graph, node)) / 24.0
        row[base + SHAPE_DIMS + 2] = math.log1p(node_bytes(graph, node)) / 24.0
        # base + SHAPE_DIMS + 3 is the per-op cost, filled per graph (it is not a property of the node alone)
        row[base + SHAPE_DIMS + 4] = float(bool(node.outputs) and all(graph.is_constant(v) for v in node.outputs if v))
        row[base + SHAPE_DIMS + 5] = float(node.origin != "")
        if len(self._rows) >= self.cache_limit:
            self._rows.clear()
        self._rows[key] = row
        return row

    @property
    def cost_column(self) -> int:
        return len(self.vocabulary) + 1 + SHAPE_DIMS + 3

    def node_matrix(self, graph: Graph, order: Sequence[str], costs_ms: Mapping[str, float] | None) -> np.ndarray:
        rows = np.stack([self.node_row(graph, graph.nodes[n]) for n in order]) if order else np.zeros((0, self.width), np.float32)
        if costs_ms:
            col = self.cost_column
            rows = rows.copy()
            rows[:, col] = [math.log1p(max(costs_ms.get(n, 0.0), 0.0) * 1000.0) / 12.0 for n in order]
        return rows

    @staticmethod
    def edge_row(graph: Graph, value: str) -> np.ndarray:
        row = np.zeros(EDGE_FEATURES, dtype=np.float32)
        row[0] = math.log1p(_numel(graph, value)) / 24.0
        row[1 + _DTYPE_BUCKET.get(graph.dtype(value) or 0, 3)] = 1.0
        row[5] = float(graph.is_constant(value))
        return row


def edge_count(graph: Graph) -> int:
    """The edges an observation holds: node inputs produced by another node (graph inputs and initializers
    are no edges)."""
    return sum(1 for node in graph.nodes.values() for value in node.inputs if value and value in graph.producer)
