"""A fast latency estimate over the IR: onnxruntime's kernels, each costed from a table or analytically.

The graph is first grouped into the kernels onnxruntime would run (after its own rewrites): constant-only
nodes are folded away at session creation, Identity/Dropout vanish, Reshape-like nodes only re-label memory,
MatMul + bias Add becomes one Gemm, MatMul absorbs a following scalar Mul/Div (FusedMatMul), the exported
exact GELU (Div, Erf, Add, Mul, Mul) is one Gelu kernel, Conv absorbs a constant Add (bias) and a following
Relu, on the CPU also a residual Add + Relu, and Add + LayerNormalization becomes SkipLayerNormalization
(checked against the optimised model onnxruntime writes at ORT_ENABLE_EXTENDED). Each kernel then costs

    measured table entry  (TASO-style: the kernel as a tiny ONNX model, timed once per device), or
    launch overhead + FLOPs / peak + bytes / bandwidth  (the analytic fallback, per device profile).

Counting launches is the point at small batch (REFERENCE.md: a batch-1 BERT on the H200 waits on kernel
launches more than it computes), so two graphs with the same FLOPs and more kernels cost more.

An optional `LinearCorrection` maps graph features (the plain sum, kernel count, FLOP and byte terms) to a
calibrated latency; bench/calibrate_costmodel.py fits it on measured pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xrlflow.errors import BadInputError
from xrlflow.ir import PURE_OPS, Graph, Node, OpaqueAttribute, TensorType
from xrlflow.latency import Latency

FREE_OPS = frozenset({"Identity", "Dropout", "Constant"})
ALIAS_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size"})
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid"})
# FLOPs per output element of ops that do more than one operation per element
ELEMENT_FLOPS = {
    "Softmax": 5.0, "LogSoftmax": 5.0, "LayerNormalization": 8.0, "SkipLayerNormalization": 9.0,
    "Erf": 8.0, "Gelu": 10.0, "Exp": 4.0, "Tanh": 4.0, "Sigmoid": 4.0, "Pow": 4.0, "Sqrt": 2.0, "Div": 2.0,
}


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
    # TF32 tensor cores on fp32 GEMMs (ORT's CUDA EP default); launch cost from REFERENCE.md's CUDA-graph
    # comparison (~4 us of the plain run per node at batch 1)
    name="h200", peak_flops=200e12, bandwidth=4.0e12, launch_ms=0.004, alias_ms=0.001, min_kernel_ms=0.002,
    fusions=frozenset({"matmul_add", "matmul_scale", "gelu", "conv_bias", "conv_activation", "skip_layernorm"}),
)
PROFILES = {"cpu": CPU_PROFILE, "h200": H200_PROFILE}
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
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)

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


@dataclass(frozen=True, slots=True)
class Kernel:
    """One onnxruntime kernel: the IR nodes it covers (anchor first), the values it reads and writes."""

    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    inputs: tuple[str, ...]  # read from outside the kernel
    outputs: tuple[str, ...]  # read outside the kernel or graph outputs
    alias: bool  # only re-labels memory (no launch, no traffic)
    signature: Any  # process-local hashable key of (ops, attributes, input types, constness, output types)


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
            table = OpTable.load(Path(__file__).parent / "data" / BUNDLED_TABLES[profile])
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

    def node_costs(self, graph: Graph) -> dict[str, float]:
        """Per-node cost in ms: each kernel's cost (before any correction) spread evenly over its nodes."""
        costs: dict[str, float] = {}
        for kernel in self.estimate(graph).kernels:
            share = self._terms(graph, kernel)[0] / len(kernel.nodes)
            for name in kernel.nodes:
                costs[name] = share
        return costs


# ---- kernel grouping --------------------------------------------------------------------------------------
def _sole_reader(graph: Graph, value: str) -> Node | None:
    readers = graph.consumers.get(value, ())
    if len(readers) != 1 or graph.is_graph_output(value):
        return None
    return graph.nodes[readers[0]]


def _other_input(node: Node, value: str) -> str:
    return node.inputs[1] if node.inputs[0] == value else node.inputs[0]


def _scalar(graph: Graph, value: str, const) -> float | None:
    """The value of a one-element float constant, else None."""
    t = graph.types.get(value)
    if not value or not const(value) or t is None or t.numel() != 1:
        return None
    arr = graph.constant_array(value)
    if arr is None or arr.dtype.kind != "f":
        return None
    return float(arr.reshape(-1)[0])


def _scales_by_scalar(graph: Graph, node: Node, value: str, const) -> bool:
    """`node` multiplies `value` by a scalar constant, or divides it by one (what MatMulScaleFusion absorbs)."""
    if node.op_type == "Mul":
        return _scalar(graph, _other_input(node, value), const) is not None
    return node.op_type == "Div" and node.inputs[0] == value and _scalar(graph, node.inputs[1], const) is not None


def _gelu_nodes(graph: Graph, first: Node, const) -> list[Node] | None:
    """x / sqrt(2) (or x * 1/sqrt(2)) -> Erf -> + 1 -> * x -> * 0.5: the exact GELU onnxruntime's GeluFusion
    turns into one kernel (the exported form of torch.nn.functional.gelu)."""
    x = first.inputs[0]
    if first.op_type == "Div":
        scale = _scalar(graph, first.inputs[1], const)
        if scale is None or abs(scale - 2 ** 0.5) > 1e-3:
            return None
    else:
        x = next((v for v in first.inputs if _scalar(graph, v, const) is None), "")
        scale = _scalar(graph, _other_input(first, x), const) if x else None
        if scale is None or abs(scale - 2 ** -0.5) > 1e-3:
            return None
    erf = _sole_reader(graph, first.outputs[0])
    if erf is None or erf.op_type != "Erf":
        return None
    one = _sole_reader(graph, erf.outputs[0])
    if one is None or one.op_type != "Add" or _scalar(graph, _other_input(one, erf.outputs[0]), const) != 1.0:
        return None
    times_x = _sole_reader(graph, one.outputs[0])
    if times_x is None or times_x.op_type != "Mul" or _other_input(times_x, one.outputs[0]) != x:
        return None
    half = _sole_reader(graph, times_x.outputs[0])
    if half is None or half.op_type != "Mul" or _scalar(graph, _other_input(half, times_x.outputs[0]), const) != 0.5:
        return None
    return [first, erf, one, times_x, half]


def group_kernels(graph: Graph, profile: DeviceProfile) -> list[Kernel]:
    """The kernels onnxruntime would run for this graph on the profile's execution provider."""
    fusions = profile.fusions
    constants = graph.constants
    folded: set[str] = set()  # values onnxruntime computes at session creation beyond graph.constants

    def const(v: str) -> bool:
        return (not v) or v in constants or v in folded

    absorbed: set[str] = set()
    kernels: list[Kernel] = []
    for name in graph.topological_order():
        if name in absorbed:
            continue
        node = graph.nodes[name]
        op = node.op_type
        if op in FREE_OPS:
            if op != "Constant" and all(const(v) for v in node.inputs):
                folded.update(node.outputs)
            continue
        if node.outputs and all((not v) or v in constants for v in node.outputs):
            continue  # constant-folded at session creation
        if op == "Shape" and graph.static_shape(node.inputs[0]) is not None:
            folded.update(node.outputs)
            continue
        if op in PURE_OPS and not node.is_opaque and all(const(v) for v in node.inputs):
            folded.update(v for v in node.outputs if v)
            continue
        members = [node]
        out = node.outputs[0] if node.outputs else ""
        gelu = _gelu_nodes(graph, node, const) if "gelu" in fusions and op in ("Div", "Mul") else None
        if gelu is not None:
            members = gelu
        elif op in ("MatMul", "Gemm"):
            nxt = _sole_reader(graph, out)
            if nxt is not None and nxt.op_type == "Add" and "matmul_add" in fusions and const(_other_input(nxt, out)):
                members.append(nxt)  # Gemm (onnxruntime's MatMulAddFusion runs first, at the basic level)
            elif op == "MatMul" and nxt is not None and "matmul_scale" in fusions and _scales_by_scalar(graph, nxt, out, const):
                members.append(nxt)  # FusedMatMul with alpha
        elif op == "Conv":
            nxt = _sole_reader(graph, out)
            if nxt is not None and nxt.op_type in ("Add", "Mul") and "conv_bias" in fusions and const(_other_input(nxt, out)):
                members.append(nxt)
                out = nxt.outputs[0]
                nxt = _sole_reader(graph, out)
            if nxt is not None and nxt.op_type in ACTIVATIONS and "conv_activation" in fusions:
                members.append(nxt)
            elif nxt is not None and nxt.op_type == "Add" and "conv_add_activation" in fusions:
                act = _sole_reader(graph, nxt.outputs[0])
                if act is not None and act.op_type == "Relu":
                    members.extend((nxt, act))
        elif op == "Add" and "skip_layernorm" in fusions and not any(const(v) for v in node.inputs):
            # a residual Add; onnxruntime leaves Add(x, constant) + LayerNormalization (BERT's position
            # embedding) as two kernels
            ln = _sole_reader(graph, out)
            if ln is not None and ln.op_type == "LayerNormalization" and ln.inputs[0] == out:
                members.append(ln)
        absorbed.update(m.name for m in members[1:])
        kernels.append(_kernel(graph, members, const))
    return kernels


def _bytes_of(t: TensorType | None) -> float:
    if t is None:
        return 0.0
    n = t.numel()
    if n is None:
        return 0.0
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(t.dtype).itemsize
    except (KeyError, TypeError, ValueError):
        size = 4
    return float(n * size)


def _kernel(graph: Graph, members: list[Node], const) -> Kernel:
    types = graph.types
    consumers = graph.consumers
    anchor = members[0]
    if len(members) == 1:
        ext_inputs = tuple(dict.fromkeys(v for v in anchor.inputs if v))
        outputs = tuple(v for v in anchor.outputs if v and (v in consumers or graph.is_graph_output(v)))
    else:
        names = {m.name for m in members}
        produced = {v for m in members for v in m.outputs}
        ext_inputs = tuple(dict.fromkeys(v for m in members for v in m.inputs if v and v not in produced))
        outputs = tuple(
            v for m in members for v in m.outputs
            if v and (graph.is_graph_output(v) or any(r not in names for r in consumers.get(v, ())))
        )
    signature = (
        tuple(m.signature for m in members),
        tuple(types.get(v) for v in ext_inputs),
        tuple(const(v) for v in ext_inputs),
        tuple(types.get(v) for v in outputs),
    )
    alias = len(members) == 1 and anchor.op_type in ALIAS_OPS
    return Kernel(tuple(m.name for m in members), tuple(m.op_type for m in members), ext_inputs, outputs, alias, signature)


def kernel_work(graph: Graph, kernel: Kernel) -> tuple[float, float]:
    """(FLOPs, bytes moved) of a kernel: its external inputs and outputs are read or written once."""
    if kernel.alias:
        return 0.0, 0.0
    types = graph.types
    nbytes = sum(_bytes_of(types.get(v)) for v in kernel.inputs) + sum(_bytes_of(types.get(v)) for v in kernel.outputs)
    flops = sum(_node_flops(graph, graph.nodes[n]) for n in kernel.nodes)
    return flops, nbytes


def _node_flops(graph: Graph, node: Node) -> float:
    out_type = graph.types.get(node.outputs[0]) if node.outputs else None
    out_n = out_type.numel() if out_type is not None else None
    if out_n is None:
        return 0.0
    op = node.op_type
    if op == "MatMul":
        a = graph.static_shape(node.inputs[0])
        return 2.0 * out_n * (a[-1] if a else 1)
    if op == "Gemm":
        a = graph.static_shape(node.inputs[0])
        k = (a[0] if node.attr("transA", 0) else a[-1]) if a else 1
        return 2.0 * out_n * k
    if op in ("Conv", "ConvTranspose"):
        w = graph.static_shape(node.inputs[1])
        if not w:
            return 2.0 * out_n
        per_output = float(np.prod(w[1:]))
        if op == "ConvTranspose":
            x = graph.types[node.inputs[0]].numel() or out_n
            return 2.0 * x * w[1] * float(np.prod(w[2:]))
        return 2.0 * out_n * per_output
    if op.startswith("Reduce") or op in ("GlobalAveragePool", "GlobalMaxPool"):
        t = graph.types.get(node.inputs[0])
        return float((t.numel() if t else None) or out_n)
    if op in ("MaxPool", "AveragePool"):
        kernel = node.attr("kernel_shape", (1,))
        return float(out_n * np.prod(kernel))
    return ELEMENT_FLOPS.get(op, 1.0) * out_n


# ---- per-kernel tables ----------------------------------------------------------------------------------------
def _type_text(t: TensorType | None) -> str:
    if t is None or t.shape is None:
        return "?"
    return f"{t.dtype}:" + "x".join(str(d) for d in t.shape)


def _attr_text(value: Any) -> str:
    if isinstance(value, OpaqueAttribute):
        return value.digest
    return repr(value)


SMALL_INT_CONSTANT = 64


def kernel_key(graph: Graph, kernel: Kernel) -> str:
    """A process-independent text key for a kernel: ops, attributes, input and output types, which inputs are
    constant, and the values of small integer constants (shapes, axes, split sizes) which change the work."""
    memo = graph.memo().setdefault("costmodel:kernel_keys", {})
    cached = memo.get(kernel.signature)
    if cached is not None:
        return cached
    members = [graph.nodes[n] for n in kernel.nodes]
    produced = {v for m in members for v in m.outputs}
    parts = []
    for m in members:
        attrs = ",".join(f"{k}={_attr_text(v)}" for k, v in m.attributes)
        ins = []
        for v in m.inputs:
            if not v:
                ins.append("-")
            elif v in produced:
                ins.append("@")
            else:
                t = graph.types.get(v)
                text = _type_text(t)
                if graph.is_constant(v):
                    arr = _small_int_constant(graph, v)
                    text += ":c" if arr is None else ":c" + ",".join(str(int(x)) for x in arr.reshape(-1))
                ins.append(text)
        parts.append(f"{m.domain}:{m.op_type}[{attrs}]({';'.join(ins)})")
    key = " + ".join(parts)
    memo[kernel.signature] = key
    return key


def _small_int_constant(graph: Graph, value: str) -> np.ndarray | None:
    t = graph.types.get(value)
    if t is None or (t.numel() or 0) > SMALL_INT_CONSTANT:
        return None
    arr = graph.constant_array(value)
    if arr is None or arr.dtype.kind not in "iub":
        return None
    return arr


def kernel_model(graph: Graph, kernel: Kernel, seed: int = 0) -> tuple[onnx.ModelProto, list[tuple[str, int, tuple[int, ...]]]] | None:
    """The kernel as a standalone ONNX model (constants as initializers with their real values where known,
    random otherwise), plus its runtime inputs; None when a shape is not static."""
    rng = np.random.default_rng(seed)
    members = [graph.nodes[n] for n in kernel.nodes]
    names = {m.name for m in members}
    produced = {v for m in members for v in m.outputs}
    inputs, initializers, runtime = [], [], []
    seen: set[str] = set()
    for m in members:
        for v in m.inputs:
            if not v or v in produced or v in seen:
                continue
            seen.add(v)
            t = graph.types.get(v)
            if t is None or not t.is_static:
                return None
            shape = tuple(int(d) for d in t.shape)  # type: ignore[union-attr]
            if graph.is_constant(v):
                arr = graph.constant_array(v)
                if arr is None:
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.dtype)
                    arr = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype)
                initializers.append(numpy_helper.from_array(np.asarray(arr), v))
            else:
                inputs.append(helper.make_tensor_value_info(v, t.dtype, list(shape)))
                runtime.append((v, t.dtype, shape))
    outputs = []
    for m in members:
        for v in m.outputs:
            if v and (graph.is_graph_output(v) or any(r not in names for r in graph.consumers.get(v, ()))):
                t = graph.types.get(v)
                if t is None or not t.is_static:
                    return None
                outputs.append(helper.make_tensor_value_info(v, t.dtype, list(t.shape)))  # type: ignore[arg-type]
    nodes = []
    for m in members:
        proto = helper.make_node(m.op_type, list(m.inputs), list(m.outputs), name=m.name, domain=m.domain)
        for k, val in m.attributes:
            proto.attribute.append(val.proto if isinstance(val, OpaqueAttribute) else helper.make_attribute(k, list(val) if isinstance(val, tuple) else val))
        nodes.append(proto)
    model = helper.make_model(
        helper.make_graph(nodes, "kernel", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid(d, v) for d, v in graph.context.opset_imports],
    )
    model.ir_version = graph.context.ir_version
    return model, runtime


def baseline_model() -> tuple[onnx.ModelProto, list[tuple[str, int, tuple[int, ...]]]]:
    """One Relu on one float: what every table entry pays for the session run itself."""
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "baseline",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8  # onnx's newest IR version can be newer than the onnxruntime measuring it supports
    return model, [("x", onnx.TensorProto.FLOAT, (1,))]


def distinct_kernel_models(graphs: Iterable[Graph], profile: DeviceProfile, known: Iterable[str] = ()):
    """(key, standalone model, runtime inputs) of each launched kernel of `graphs` once, skipping `known`
    keys and kernels without static shapes."""
    seen = set(known)
    for graph in graphs:
        for kernel in group_kernels(graph, profile):
            if kernel.alias:
                continue
            key = kernel_key(graph, kernel)
            if key in seen:
                continue
            seen.add(key)
            built = kernel_model(graph, kernel)
            if built is not None:
                yield key, built[0], built[1]


def build_op_table(graphs: Iterable[Graph], measurer: Any, profile: DeviceProfile | str = "cpu",
                   progress: Any = None) -> OpTable:
    """Measure every distinct kernel of `graphs` once (through `measurer`, a MeasuredLatency whose cache holds
    the per-device table) and return the table. Kernels already in the cache are not measured again."""
    from xrlflow.measure_worker import InputSpec

    prof = PROFILES[profile] if isinstance(profile, str) else profile
    cache = measurer.cache
    device = measurer.device

    def measure(model: onnx.ModelProto, runtime, key: str) -> float | None:
        if cache is not None:
            hit = cache.get_op(device, key)
            if hit is not None:
                return hit
        specs = tuple(InputSpec(n, t, s) for n, t, s in runtime)
        result = measurer.measure_model(model.SerializeToString(), specs)
        if not result.ok:
            return None
        if cache is not None:
            cache.put_op(device, key, measurer.config.provider, measurer.ort_version, result)
        return result.ms

    base_model, base_inputs = baseline_model()
    baseline = measure(base_model, base_inputs, "__baseline__")
    if baseline is None:
        raise RuntimeError("cannot measure the baseline model")
    entries: dict[str, float] = {}
    for key, model, runtime in distinct_kernel_models(graphs, prof):
        ms = measure(model, runtime, key)
        if ms is not None:
            entries[key] = ms
        if progress is not None:
            progress(len(entries))
    return OpTable(device, measurer.config.provider, measurer.ort_version, baseline, entries)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    values = x[order]
    i = 0
    while i < len(x):  # average the ranks of ties
        j = i
        while j + 1 < len(x) and values[j + 1] == values[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


__all__ = [
    "CostModel", "DeviceProfile", "CPU_PROFILE", "H200_PROFILE", "PROFILES", "OpTable", "InGraphMapping", "LinearCorrection",
    "Kernel", "group_kernels", "kernel_work", "kernel_key", "kernel_model", "build_op_table", "spearman", "FEATURE_NAMES",
]


def fit_fallback_scale(table: OpTable, graphs: Iterable[Graph], profile: DeviceProfile | str) -> OpTable:
    """The table with `fallback_scale` fitted: per anchor op (and "*" over all), the median ratio of the
    measured kernel time to the analytic estimate, over the kernels of `graphs` that the table holds."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    analytic = CostModel(prof)
    ratios: dict[str, list[float]] = {}
    seen: set[str] = set()
    for graph in graphs:
        for kernel in group_kernels(graph, prof):
            if kernel.alias:
                continue
            key = kernel_key(graph, kernel)
            if key in seen or key not in table.entries:
                continue
            seen.add(key)
            measured = table.kernel_cost(table.entries[key], prof.launch_ms)
            estimate = analytic.kernel_ms(graph, kernel)
            if estimate > 0:
                op = graph.nodes[kernel.nodes[0]].op_type
                ratios.setdefault(op, []).append(measured / estimate)
                ratios.setdefault("*", []).append(measured / estimate)
    scale = {op: float(np.median(r)) for op, r in ratios.items() if len(r) >= 3 or op == "*"}
    return dataclasses.replace(table, fallback_scale=scale)


def fit_in_graph(
    table: OpTable, graphs: Sequence[Graph], measured_ms: Sequence[float], groups: Sequence[str],
    profile: DeviceProfile | str,
    floors_ms: Sequence[float] = tuple(np.arange(0.0, 3.01, 0.25) * 1e-3),
    offsets_ms: Sequence[float] = tuple(np.arange(-5.0, 0.01, 0.5) * 1e-3),
) -> InGraphMapping:
    """The table's `in_graph` mapping that ranks measured graphs best within each group (model): a grid over
    floor and offset, the scale by least squares against the measured latencies (with a free constant, which
    does not change a ranking and is not kept), chosen by the mean within-group Spearman correlation and,
    among equal ones, the smaller squared error.
    Kernels missing from the table enter with their current estimate, unchanged by the mapping."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    current = CostModel(prof, table)
    isolated: list[np.ndarray] = []
    rest = np.zeros(len(graphs))
    for i, graph in enumerate(graphs):
        times = []
        for kernel in group_kernels(graph, prof):
            entry = None if kernel.alias else table.entries.get(kernel_key(graph, kernel))
            if entry is None:
                rest[i] += current.kernel_ms(graph, kernel)
            else:
                times.append(max(entry - table.baseline_ms, 0.0))
        isolated.append(np.asarray(times))
    y = np.asarray(measured_ms, dtype=np.float64)
    group_arr = np.asarray(groups)
    members = [group_arr == g for g in dict.fromkeys(groups)]
    best: tuple[float, float, InGraphMapping] | None = None
    for floor in floors_ms:
        for offset in offsets_ms:
            scale = 1.0
            for _ in range(8):  # which kernels sit on the floor depends on the scale: iterate to a fixed point
                above = [scale * e + offset > floor for e in isolated]
                linear = np.array([e[m].sum() for e, m in zip(isolated, above)])
                fixed = np.array([np.where(m, offset, floor).sum() for m in above]) + rest
                design = np.column_stack([linear, np.ones(len(y))])
                new_scale = float(np.linalg.lstsq(design, y - fixed, rcond=None)[0][0])
                if new_scale <= 0 or abs(new_scale - scale) < 1e-6:
                    scale = max(new_scale, 1e-3)
                    break
                scale = new_scale
            mapping = InGraphMapping(scale, float(offset), float(floor))
            estimate = np.array([mapping.cost(e).sum() for e in isolated]) + rest
            score = float(np.mean([spearman(estimate[m], y[m]) for m in members if m.sum() > 2]))
            residual = y - estimate
            sse = float(((residual - residual.mean()) ** 2).sum())
            # rank first; among equal rankings (ties are common on few graphs) the closest fit
            if best is None or score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and sse < best[1]):
                best = (score, sse, mapping)
    assert best is not None
    return best[2]
