"""The CUDA-graph advice of `xrlflow optimize --device cuda`: the input's and the output's latency with and
without CUDA-graph replay (`CudaGraphProbe`), the nodes that block capture, and a session snippet
(`guarantee.cuda_graph_advice` words it)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import onnx

from xrlflow.guarantee import AB_SECONDS, cuda_graph_advice, with_bound_shapes
from xrlflow.ir import Graph

if TYPE_CHECKING:
    from xrlflow.optimizer import OptimizeConfig


class CudaGraphProbe:
    """Latency of a serialised model with and without CUDA-graph replay, and its node placement (measured
    services in the deployment setting's threads, uncached)."""

    def __init__(self, config: OptimizeConfig) -> None:
        from xrlflow.measure import MeasureConfig, MeasuredLatency

        def make(cuda_graph: bool) -> Any:
            return MeasuredLatency(MeasureConfig.create(device="cuda", cuda_graph=cuda_graph, cache_path="",
                                                        max_seconds=AB_SECONDS, seed=config.search_config.seed))

        self.services = {False: make(False), True: make(True)}

    def latency(self, model: bytes, specs: Any, cuda_graph: bool) -> Any:
        return self.services[cuda_graph].measure_model(model, specs)

    def placement(self, model: bytes, specs: Any) -> Any:
        return self.services[False].node_placement(model, specs)

    def close(self) -> None:
        for service in self.services.values():
            service.close()


SNIPPET_MODEL = "model.opt.onnx"  # the snippet's model path until the CLI knows the output's


def cuda_advice(config: OptimizeConfig, model: onnx.ModelProto, written: onnx.ModelProto, graph: Graph,
                 probe: Any, output_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    from xrlflow.measure import input_specs

    own = probe is None
    probe = probe or CudaGraphProbe(config)
    try:
        specs = input_specs(graph)
        models = {"input": with_bound_shapes(model, specs, output_shapes),
                  "output": with_bound_shapes(written, specs, output_shapes)}
        latencies = {}
        for name, proto in models.items():
            data = proto.SerializeToString()
            latencies[name] = {mode: dataclasses.asdict(probe.latency(data, specs, mode == "cuda_graph"))
                               for mode in ("plain", "cuda_graph")}
        placement = probe.placement(models["output"].SerializeToString(), specs)
    finally:
        if own:
            probe.close()
    np_name = lambda elem: onnx.helper.tensor_dtype_to_np_dtype(elem).name  # noqa: E731
    inputs = [(s.name, np_name(s.elem_type), s.shape) for s in specs]
    outputs = []
    for vi in models["output"].graph.output:
        tt = vi.type.tensor_type
        outputs.append((vi.name, np_name(tt.elem_type), tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)))
    advice = cuda_graph_advice(latencies, placement, SNIPPET_MODEL, inputs, outputs, 0)
    if advice["snippet"] is not None and any(d < 0 for _, _, shape in outputs for d in shape):
        advice["snippet"] = None
        advice["message"] += " (not shown: an output's shape is not static at the bound input shapes)"
    return advice

