"""Building and calibrating the cost model's per-kernel tables from measurements.

`build_op_table` times each distinct kernel as a standalone model; `fit_fallback_scale` and `fit_in_graph`
fit how table entries and analytic estimates map onto whole measured graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xrlflow.costmodel.kernels import Kernel, group_kernels, kernel_key
from xrlflow.costmodel.model import CostModel, InGraphMapping, OpTable
from xrlflow.costmodel.profiles import PROFILES, DeviceProfile
from xrlflow.ir import Graph, OpaqueAttribute


# onnxruntime 1.31 (the bundled H200 table's) loads models up to IR version 10; onnx 1.23's helper writes 14
MAX_IR_VERSION = 10


def kernel_model(graph: Graph, kernel: Kernel, seed: int = 0) -> tuple[onnx.ModelProto, list[tuple[str, int, tuple[int, ...]]]] | None:
    """The kernel as a standalone ONNX model (constants as initializers with their real values where known,
    random otherwise), plus its runtime inputs; None when a shape is not static."""
    rng = np.random.default_rng(seed)
    position = {n: i for i, n in enumerate(graph.topological_order())}
    members = sorted((graph.nodes[n] for n in kernel.nodes), key=lambda m: position[m.name])
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
    opsets = dict(graph.context.opset_imports)
    for m in members:
        if m.domain not in ("", "ai.onnx"):
            opsets.setdefault(m.domain, 1)
    model = helper.make_model(
        helper.make_graph(nodes, "kernel", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
    )
    model.ir_version = min(graph.context.ir_version, MAX_IR_VERSION)
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
