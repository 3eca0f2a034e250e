"""The latency services by the names the command line uses, and the one factory of them (`xrlflow optimize`,
`xrlflow train` and the experiments build their service here)."""

from __future__ import annotations

from xrlflow.latency import LatencyService

LATENCY_KINDS = ("measured", "cost")  # `--latency`: onnxruntime timing, or the cost model
DEVICES = ("cpu", "cuda")


def make_latency_service(kind: str, device: str) -> LatencyService:
    """The measured service (onnxruntime, cached) or the cost model, for one device."""
    if kind == "measured":
        from xrlflow.measure import MeasureConfig, MeasuredLatency

        return MeasuredLatency(MeasureConfig.create(device=device))
    from xrlflow.costmodel import CostModel

    # The GPU profile is the H200, with its per-kernel table measured by bench/gpu.sh (bundled).
    return CostModel.for_device("h200" if device == "cuda" else "cpu")
