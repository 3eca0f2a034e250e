"""A fast latency estimate over the IR: onnxruntime's kernels (`kernels.group_kernels`), each costed as

    measured table entry  (TASO-style: the kernel as a tiny ONNX model, timed once per device), or
    launch overhead + FLOPs / peak + bytes / bandwidth  (the analytic fallback, per device profile).

Counting launches is the point at small batch: a batch-1 BERT on the H200 spends more than half its plain
run on kernel launches (see `profiles.H200_PROFILE`), so two graphs with the same FLOPs and more kernels cost
more.

An optional `LinearCorrection` maps graph features (the plain sum, kernel count, FLOP and byte terms) to a
calibrated latency; bench/calibrate_costmodel.py fits it on measured pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrlflow.costmodel.kernels import Kernel, group_kernels, kernel_key, kernel_work
from xrlflow.costmodel.profiles import PROFILES, DeviceProfile
from xrlflow.atomic import write_bytes
from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import Latency

# Per-kernel tables measured on real devices and shipped with the package (bench/gpu.sh makes them).
# h200: kernels timed as replayed CUDA graphs (MeasureConfig's CUDA default), with the in-graph mapping and
# fallback scale fitted on measured graphs (bench/results/costmodel_calibration_cuda.md).
BUNDLED_TABLES = {"h200": "h200_cudagraph_ort1.31.1.json"}


@dataclass(frozen=True)
class InGraphMapping:
    """A kernel's cost inside a whole graph from its isolated time (both in ms)."""

    scale: float
    offset_ms: float
    floor_ms: float

    def cost(self, isolated_ms):
        """Of one time (float) or of many at once (numpy array)."""
        return np.maximum(self.scale * isolated_ms + self.offset_ms, self.floor_ms)

    def as_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "offset_ms": self.offset_ms, "floor_ms": self.floor_ms}


@dataclass(frozen=True)
class OpTable:
    """Measured per-kernel latencies (ms) of one device, keyed by `kernel_key`."""

    device: str
    provider: str
    ort_version: str
    baseline_ms: float  # a trivial one-kernel model's run time: the session overhead each entry contains
    entries: dict[str, float] = field(default_factory=dict)
    # Per anchor op: median of (measured / analytic) over the table's kernels. Kernels the table lacks are
    # estimated analytically times this factor, so a search cannot "win" by producing unmeasured kernels
    # that the (optimistic) analytic model underprices. Filled by `fit_fallback_scale`.
    fallback_scale: dict[str, float] = field(default_factory=dict)
    # How a kernel's isolated time maps to its share of a whole graph's run, fitted on measured graphs
    # (bench/calibrate_costmodel.py --fit-in-graph): max(scale * (entry - baseline) + offset_ms, floor_ms).
    # In a replayed CUDA graph a kernel costs less than alone (no per-run launch and sync), and no kernel
    # costs less than the floor. None: entry - baseline + the profile's launch cost.
    in_graph: "InGraphMapping | None" = None

    def kernel_cost(self, entry_ms: float, launch_ms: float) -> float:
        isolated = max(entry_ms - self.baseline_ms, 0.0)
        if self.in_graph is None:
            return isolated + launch_ms
        return float(self.in_graph.cost(isolated))

    def save(self, path: str | os.PathLike[str]) -> None:
        data = {
            "device": self.device, "provider": self.provider, "ort_version": self.ort_version,
            "baseline_ms": self.baseline_ms, "fallback_scale": dict(sorted(self.fallback_scale.items())),
            **({"in_graph": self.in_graph.as_dict()} if self.in_graph is not None else {}),
            "entries": dict(sorted(self.entries.items())),
        }
        write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "OpTable":
        try:
            data = json.loads(Path(path).read_text())
            return OpTable(
                str(data["device"]), str(data["provider"]), str(data["ort_version"]), float(data["baseline_ms"]),
                {str(k): float(v) for k, v in data["entries"].items()},
                {str(k): float(v) for k, v in data.get("fallback_scale", {}).items()},
                InGraphMapping(**{k: float(v) for k, v in data["in_graph"].items()}) if "in_graph" in data else None,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(f"{path}: not a cost-model table ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class LinearCorrection:
    """latency_ms = coefficients . features(graph); fitted by least squares on measured graphs."""

    coefficients: tuple[float, ...]

    @staticmethod
    def fit(features: np.ndarray, measured_ms: np.ndarray) -> "LinearCorrection":
        coef, *_ = np.linalg.lstsq(np.asarray(features, dtype=np.float64), np.asarray(measured_ms, dtype=np.float64), rcond=None)
        return LinearCorrection(tuple(float(c) for c in coef))


FEATURE_NAMES = ("plain_sum_ms", "kernels", "flop_ms", "byte_ms", "alias_nodes", "one")


@dataclass
class GraphCost:
    ms: float
    kernels: list[Kernel]
    features: np.ndarray


class CostModel:
    """The cost-model `LatencyService`: deterministic, microseconds per node, no export, no onnxruntime."""

    def __init__(
        self,
        profile: DeviceProfile | str = "cpu",
        table: OpTable | None = None,
        correction: LinearCorrection | None = None,
    ) -> None:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise BadInputError(f"unknown cost-model profile {profile!r}: use one of {', '.join(PROFILES)}")
            profile = PROFILES[profile]
        self.profile = profile
        self.table = table
        self.correction = correction
        self.name = f"cost-model:{profile.name}" + (":table" if table else "") + (":corrected" if correction else "")
        self._kernel_ms: dict[Any, float] = {}
        self._memo_key = f"costmodel:{id(self)}"

    @classmethod
    def for_device(cls, profile: str) -> "CostModel":
        """The profile's cost model with its bundled measured table, when one ships (h200)."""
        table = None
        if profile in BUNDLED_TABLES:
            table = OpTable.load(Path(__file__).parents[1] / "data" / BUNDLED_TABLES[profile])
        return cls(profile, table)

    deterministic = True

    def table_coverage(self, graph: Graph) -> float:
        """Fraction of the graph's launched kernels the table has measured (1.0 without a table: n/a)."""
        if self.table is None:
            return 1.0
        kernels = [k for k in group_kernels(graph, self.profile) if not k.alias]
        if not kernels:
            return 1.0
        return sum(kernel_key(graph, k) in self.table.entries for k in kernels) / len(kernels)

    # ---- the service --------------------------------------------------------------------------------------
    def latency(self, graph: Graph) -> Latency:
        ms = self.estimate(graph).ms
        return Latency(ms, ms, ms, 0, "cost-model")

    def estimate(self, graph: Graph) -> GraphCost:
        memo = graph.memo()
        cached = memo.get(self._memo_key)
        if cached is not None:
            return cached
        kernels = group_kernels(graph, self.profile)
        plain = flop_ms = byte_ms = 0.0
        launches = aliases = 0
        for k in kernels:
            ms, f_ms, b_ms = self._terms(graph, k)
            plain += ms
            flop_ms += f_ms
            byte_ms += b_ms
            if k.alias:
                aliases += 1
            else:
                launches += 1
        features = np.array([plain, launches, flop_ms, byte_ms, aliases, 1.0])
        ms = plain if self.correction is None else max(float(np.dot(self.correction.coefficients, features)), 1e-6)
        result = GraphCost(ms, kernels, features)
        memo[self._memo_key] = result
        return result

    def features(self, graph: Graph) -> np.ndarray:
        return self.estimate(graph).features

    def kernel_ms(self, graph: Graph, kernel: Kernel) -> float:
        return self._terms(graph, kernel)[0]

    def _terms(self, graph: Graph, kernel: Kernel) -> tuple[float, float, float]:
        """(cost, FLOP term, byte term) in ms, cached by kernel signature."""
        cached = self._kernel_ms.get(kernel.signature)
        if cached is not None:
            return cached
        p = self.profile
        if kernel.alias:
            terms = (p.alias_ms, 0.0, 0.0)
        else:
            flops, nbytes = kernel_work(graph, kernel)
            flop_ms, byte_ms = flops / p.peak_flops * 1e3, nbytes / p.bandwidth * 1e3
            ms = None
            if self.table is not None:
                measured = self.table.entries.get(kernel_key(graph, kernel))
                if measured is not None:
                    ms = self.table.kernel_cost(measured, p.launch_ms)
            if ms is None:
                ms = p.launch_ms + max(p.min_kernel_ms, flop_ms + byte_ms)
                if self.table is not None and self.table.fallback_scale:
                    anchor = graph.nodes[kernel.nodes[0]].op_type
                    scales = self.table.fallback_scale
                    ms *= scales.get(anchor, scales.get("*", 1.0))
            terms = (ms, flop_ms, byte_ms)
        self._kernel_ms[kernel.signature] = terms
        return terms

    def rewrite_delta(self, parent: Graph, child: Graph) -> float:
        """`latency(child) - latency(parent)` in ms, priced on the rewrite's changed region when the estimate
        is a plain sum over kernels (no correction); a corrected estimate prices both whole graphs."""
        if self.correction is not None:
            return self.latency(child).ms - self.latency(parent).ms
        from xrlflow.sites import local_cost_delta

        return local_cost_delta(self, parent, child)

    def node_costs(self, graph: Graph) -> dict[str, float]:
        """Per-node cost in ms: each kernel's cost (before any correction) spread evenly over its nodes."""
        costs: dict[str, float] = {}
        for kernel in self.estimate(graph).kernels:
            share = self._terms(graph, kernel)[0] / len(kernel.nodes)
            for name in kernel.nodes:
                costs[name] = share
        return costs

