"""The cost-model latency service: onnxruntime's kernels of a graph, each costed from a measured table or
analytically.

    profiles     what a device sustains (peak FLOP/s, bandwidth, launch cost) and which fusions its EP does
    kernels      grouping a graph into onnxruntime's kernels; each kernel's FLOPs, bytes and table key
    model        `CostModel` (the service), `OpTable` (measured kernels), `InGraphMapping`, `LinearCorrection`
    calibration  building tables from measurements and fitting their fallback scale and in-graph mapping
"""

from xrlflow.costmodel.calibration import (
    baseline_model, build_op_table, distinct_kernel_models, fit_fallback_scale, fit_in_graph, kernel_model, spearman,
)
from xrlflow.costmodel.kernels import Kernel, group_kernels, kernel_key, kernel_work, node_flops, tensor_bytes
from xrlflow.costmodel.model import (
    BUNDLED_TABLES, FEATURE_NAMES, CostModel, GraphCost, InGraphMapping, LinearCorrection, OpTable,
)
from xrlflow.costmodel.profiles import CPU_PROFILE, H200_PROFILE, PROFILES, DeviceProfile

__all__ = [
    "CostModel", "DeviceProfile", "CPU_PROFILE", "H200_PROFILE", "PROFILES", "BUNDLED_TABLES", "OpTable",
    "InGraphMapping", "LinearCorrection", "GraphCost", "FEATURE_NAMES", "Kernel", "group_kernels", "kernel_work",
    "node_flops", "tensor_bytes", "kernel_key", "kernel_model", "baseline_model", "distinct_kernel_models",
    "build_op_table", "fit_fallback_scale", "fit_in_graph", "spearman",
]
