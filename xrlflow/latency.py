"""The latency service interface the environment and the searches are handed.

Implementations: `xrlflow.measure.MeasuredLatency` (onnxruntime, cached), `xrlflow.costmodel.CostModel`
(per-op tables or an analytic FLOP/byte estimate). Callers never import onnxruntime themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from xrlflow.ir import Graph


@dataclass(frozen=True)
class Latency:
    """A latency estimate in milliseconds: median and its 95% confidence interval."""

    ms: float
    low_ms: float
    high_ms: float
    runs: int
    source: str  # "measured", "cache" or "cost-model"
    ok: bool = True
    reason: str = ""  # why a measurement failed (ok=False)
    session_ms: tuple[float, ...] = ()  # measured with several sessions: each one's median (not cached)

    @staticmethod
    def failed(reason: str, source: str = "measured") -> "Latency":
        return Latency(float("inf"), float("inf"), float("inf"), 0, source, ok=False, reason=reason)


@runtime_checkable
class LatencyService(Protocol):
    """Latency of a graph on one device. Must be deterministic for a cost model, cached for measurement."""

    name: str

    def latency(self, graph: Graph) -> Latency: ...
