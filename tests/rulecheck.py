"""Shared checks for rule tests: build a model, apply a rule's matches, compare numerically with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xrlflow.ir import Graph
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.rules import default_engine
from xrlflow.verify import Tolerance, verify_models

FP32 = Tolerance(rtol=1e-4, atol=1e-5)
ENGINE = default_engine()


class ModelBuilder:
    """A tiny ONNX graph builder for tests: constants from numpy, nodes by op name."""

    def __init__(self, seed: int = 0, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.opset = opset
        self.count = 0

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def const(self, shape, scale: float = 1.0, dtype=np.float32, value=None) -> str:
        self.count += 1
        name = f"c{self.count}"
        arr = np.asarray(value, dtype=dtype) if value is not None else (self.rng.standard_normal(shape) * scale).astype(dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        self.count += 1
        outs = [f"v{self.count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self.count}_{op_type}", **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, *values: str) -> None:
        self.outputs.extend(values)

    def model(self) -> onnx.ModelProto:
        outs = [helper.make_empty_tensor_value_info(v) for v in self.outputs]
        graph = helper.make_graph(self.nodes, "test", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model = onnx.shape_inference.infer_shapes(model)
        # declare output types so the exported model is fully typed
        inferred = {vi.name: vi for vi in model.graph.value_info}
        for o in model.graph.output:
            if o.name in inferred:
                o.type.CopyFrom(inferred[o.name].type)
        del model.graph.value_info[:]
        return model


def matches_of(graph: Graph, rule: str):
    return [m for m in ENGINE.matches(graph) if m.rule == rule]


def assert_rule_preserves(model: onnx.ModelProto, rule: str, tolerance: Tolerance = FP32, min_matches: int = 1) -> list[Graph]:
    """Apply every match of `rule` (one at a time) and check each result numerically; returns the results."""
    graph = load_graph(model)
    found = matches_of(graph, rule)
    assert len(found) >= min_matches, f"{rule}: expected a match, found {len(found)}"
    results = []
    for match in found:
        new = ENGINE.apply(graph, match)
        assert new.structural_hash() != graph.structural_hash()
        for fold in (False, True):
            exported = to_model(new, fold_constants=fold)
            onnx.checker.check_model(exported, full_check=True)
            report = verify_models(model, exported, tolerance=tolerance, seed=len(results))
            assert report.ok, f"{rule} at {match.nodes} (fold={fold}): {report.reason} {report.to_dict()}"
        results.append(new)
    # the original graph value is untouched
    assert to_model(graph).SerializeToString() == to_model(load_graph(model)).SerializeToString()
    return results


def assert_no_match(model: onnx.ModelProto, rule: str) -> None:
    graph = load_graph(model)
    assert matches_of(graph, rule) == [], f"{rule} matched a near miss"


def round_trip(model: onnx.ModelProto, forward: str, reverse: str, tolerance: Tolerance = FP32) -> tuple[list[Graph], list[Graph]]:
    """Apply every `forward` match, then every `reverse` match of each result; all must equal the original."""
    results = assert_rule_preserves(model, forward, tolerance)
    backs = []
    for result in results:
        for back in assert_rule_preserves(to_model(result), reverse, tolerance):
            report = verify_models(model, to_model(back, fold_constants=True), tolerance=tolerance)
            assert report.ok, report.to_dict()
            backs.append(back)
    return results, backs


def dims(rng: np.random.Generator, n: int, low: int = 1, high: int = 5) -> list[int]:
    """`n` random dimensions in [low, high)."""
    return [int(d) for d in rng.integers(low, high, size=n)]
