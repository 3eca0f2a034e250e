"""The latency service interface the environment and the searches are handed.

Implementations: `xrlflow.measure.MeasuredLatency` (onnxruntime, cached), `xrlflow.costmodel.CostModel`
(per-op tables or an analytic FLOP/byte estimate), `xrlflow.measure_pool.MeasurementPool` (a Ray pool).
Callers never import onnxruntime themselves; `xrlflow.services.make_latency_service` builds one.

Every service has `name`, `deterministic` and `latency(graph)`. What a service can do besides is a small
capability protocol, checked with `isinstance`: `ComparesGraphs` (interleaved A/B timing), `ComparesModels`
(the same of two serialised models), `Closable`
(holds a worker or a cache), `NodeCosts` (per-node cost, the env's cost feature column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

from xrlflow.ir import Graph

if TYPE_CHECKING:
    from xrlflow.measure import Comparison

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
    """Latency of a graph on one device. `deterministic`: the same graph always gets the same number (a cost
    model); a measurement is noisy (and cached by graph hash)."""

    name: str
    deterministic: bool

    def latency(self, graph: Graph) -> Latency: ...


@runtime_checkable
class ComparesGraphs(Protocol):
    """Interleaved A/B timing of two graphs: the ratio B/A with its CI (cancels the machine's drift)."""

    def compare(self, graph_a: Graph, graph_b: Graph) -> "Comparison": ...


@runtime_checkable
class ComparesModels(Protocol):
    """Interleaved A/B timing of two serialised models with their input specs (the final A/B of `xrlflow
    optimize`: the user's file against a candidate); the ratio is B/A."""

    def compare_models(self, model_a: bytes, specs_a: Any, model_b: bytes, specs_b: Any) -> "Comparison": ...


@runtime_checkable
class Closable(Protocol):
    """A service holding a worker process, a connection or a cache, released by `close()`."""

    def close(self) -> None: ...


@runtime_checkable
class NodeCosts(Protocol):
    """Per-node cost in ms (a kernel's cost over the nodes it covers); missing nodes cost 0."""

    def node_costs(self, graph: Graph) -> Mapping[str, float]: ...


@runtime_checkable
class PricesRewrites(Protocol):
    """A deterministic service whose latency is a sum over kernels, so the latency change a rewrite makes
    (child minus parent, ms) is priced on the changed region alone, equal to the whole-graph difference."""

    def rewrite_delta(self, parent: Graph, child: Graph) -> float: ...


def close_service(service: Any) -> None:
    """Release what a service holds (nothing for a cost model)."""
    if isinstance(service, Closable):
        service.close()
