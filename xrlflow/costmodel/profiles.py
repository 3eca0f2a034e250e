"""What a device sustains under onnxruntime, for the cost model's analytic fallback and its kernel grouping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    """What a device sustains under onnxruntime, for the analytic fallback (order-of-magnitude numbers)."""

    name: str
    peak_flops: float  # FLOP/s a mid-size fp32 GEMM reaches
    bandwidth: float  # bytes/s a streaming element-wise kernel reaches
    launch_ms: float  # per kernel: dispatch (CPU) or launch + under-filled tail (GPU)
    alias_ms: float  # per node that only re-labels memory (Reshape, Squeeze, ...)
    min_kernel_ms: float  # no kernel finishes faster than this once launched
    fusions: frozenset[str]  # which onnxruntime fusions the execution provider performs



CPU_PROFILE = DeviceProfile(
    # one intra-op thread of an AVX2/AVX-512 core under MLAS; launch cost from the calibration's smallest
    # graphs (a 138-node Inception-v3 of width 1/8 ran in 0.097 ms: well under a microsecond per kernel)
    name="cpu", peak_flops=60e9, bandwidth=10e9, launch_ms=0.0007, alias_ms=0.0002, min_kernel_ms=0.0,
    fusions=frozenset({"matmul_add", "matmul_scale", "gelu", "conv_bias", "conv_activation", "conv_add_activation", "skip_layernorm"}),
)
H200_PROFILE = DeviceProfile(
    # TF32 tensor cores on fp32 GEMMs (ORT's CUDA EP default). Launch cost: a 4-layer BERT export (171 nodes,
    # batch 1, IO binding) ran in 1.23 ms on the plain CUDA EP and 0.53 ms as a replayed CUDA graph, which
    # removes launch overhead: ~4 us per node, against a ~30 us roofline floor for the whole model.
    name="h200", peak_flops=200e12, bandwidth=4.0e12, launch_ms=0.004, alias_ms=0.001, min_kernel_ms=0.002,
    fusions=frozenset({"matmul_add", "matmul_scale", "gelu", "conv_bias", "conv_activation", "skip_layernorm"}),
)
PROFILES = {"cpu": CPU_PROFILE, "h200": H200_PROFILE}
