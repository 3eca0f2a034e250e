"""Paired, interleaved A/B timing of ONNX files on onnxruntime, written apart from xrlflow's own measurement
service, so that the published speedups do not rest on the code they judge. Needs only numpy, onnx and
onnxruntime (the GPU machine has no torch); `bench/` and `experiments/` time with it.

Each model gets its own session (ORT_ENABLE_ALL); inputs and outputs live on the device (IO binding). On CUDA
a model is either replayed as one captured CUDA graph (`enable_cuda_graph`, outputs bound to fixed device
buffers) or run plainly. One cycle times `runs` calls of A, `runs` of B, `runs` of B and `runs` of A (ABBA,
so drift within a cycle cancels); the cycle's ratio is median(B) / median(A). The result is the median of the
cycle ratios with the 2.5th-97.5th percentile of a bootstrap of that median, plus each model's median time.

`strip_weights` / `fill_weights`: a prepared model set travels without its large weights (dims and dtype
kept, marked) and gets seeded random values back on the timing machine; latency does not depend on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

STRIP_MIN_ELEMENTS = 4096  # smaller tensors (shapes, masks, scales, LayerNorm of tiny models) travel as they are
STRIP_MARK = "xrlflow-bench:random-weights"
ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 9: np.bool_, 11: np.float64}


@dataclass(frozen=True)
class TimingSetting:
    device: str = "cuda"  # "cuda" or "cpu"
    cuda_graph: bool = True  # CUDA only: replay one captured graph
    threads: int = 0  # CPU intra-op threads; 0 = onnxruntime's default (all cores)
    warmup: int = 20
    runs: int = 20  # calls of each model per quarter cycle
    cycles: int = 15

    @property
    def label(self) -> str:
        if self.device == "cuda":
            return "CUDA EP, replayed CUDA graph" if self.cuda_graph else "CUDA EP, plain runs"
        return f"CPU EP, {self.threads or 'default'} threads"


def random_feeds(model_path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a model's inputs: token ids in [0, 100), masks of ones, floats N(0, 1)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        dtype = ONNX_TO_NUMPY[tensor.elem_type]
        if np.issubdtype(dtype, np.integer):
            feeds[value.name] = (np.ones(shape, dtype) if "mask" in value.name else rng.integers(0, 100, shape)).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


class BoundSession:
    """One onnxruntime session whose inputs and outputs stay on the device between calls."""

    def __init__(self, model_path: str, feeds: dict[str, np.ndarray], setting: TimingSetting) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if setting.device == "cpu":
            options.intra_op_num_threads = setting.threads
            providers = ["CPUExecutionProvider"]
        else:
            cuda_options = {"enable_cuda_graph": "1"} if setting.cuda_graph else {}
            providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        device = "cuda" if setting.device == "cuda" else "cpu"
        self.session = ort.InferenceSession(model_path, options, providers=providers)
        # output shapes: one run of a plain session with outputs left for onnxruntime to allocate
        probe = ort.InferenceSession(model_path, options, providers=[p for p in providers if p != "CUDAExecutionProvider"]
                                     if setting.device == "cpu" else
                                     [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
        outputs = probe.run(None, feeds)
        del probe
        self.binding = self.session.io_binding()
        self._keep = []
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
            self._keep.append(value)
            self.binding.bind_ortvalue_input(name, value)
        for meta, array in zip(self.session.get_outputs(), outputs):
            value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, device, 0)
            self._keep.append(value)
            self.binding.bind_ortvalue_output(meta.name, value)
        self.first_output = outputs[0]

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def time(self, runs: int) -> float:
        """Median wall time of `runs` calls, in ms (a CUDA call synchronises on its bound outputs)."""
        samples = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            samples[i] = time.perf_counter() - start
        return float(np.median(samples) * 1e3)


@dataclass(frozen=True)
class PairedTiming:
    ratio: float  # median over cycles of median(B)/median(A): < 1 means B is faster
    low: float
    high: float
    a_ms: float
    b_ms: float
    cycles: int
    ratios: tuple[float, ...] = ()  # each cycle's ratio

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio

    def as_dict(self) -> dict:
        out = {"speedup": self.speedup, "speedup_low": 1.0 / self.high, "speedup_high": 1.0 / self.low,
               "a_ms": self.a_ms, "b_ms": self.b_ms, "cycles": self.cycles}
        if self.ratios:  # the spread of the per-cycle speedups (interquartile range)
            r25, r75 = np.percentile(np.array(self.ratios), [25, 75])
            out.update(speedup_p25=float(1.0 / r75), speedup_p75=float(1.0 / r25))
        return out


def paired_timing(path_a: str, path_b: str, setting: TimingSetting, seed: int = 0) -> PairedTiming:
    feeds = random_feeds(path_a, seed)
    a = BoundSession(path_a, feeds, setting)
    b = BoundSession(path_b, feeds, setting)
    for _ in range(setting.warmup):
        a.run()
        b.run()
    ratios, a_ms, b_ms = [], [], []
    for _ in range(setting.cycles):
        ta1 = a.time(setting.runs)
        tb1 = b.time(setting.runs)
        tb2 = b.time(setting.runs)
        ta2 = a.time(setting.runs)
        a_cycle, b_cycle = (ta1 + ta2) / 2, (tb1 + tb2) / 2
        ratios.append(b_cycle / a_cycle)
        a_ms.append(a_cycle)
        b_ms.append(b_cycle)
    ratios_array = np.array(ratios)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios_array, (2000, len(ratios_array))), axis=1)
    return PairedTiming(float(np.median(ratios_array)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)),
                        float(np.median(a_ms)), float(np.median(b_ms)), setting.cycles, tuple(ratios))


def strip_weights(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """The model with every large float initializer's data dropped (dims and dtype kept, marked)."""
    import onnx

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    stripped.ir_version = min(stripped.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14
    for tensor in stripped.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and np.prod(tensor.dims) >= STRIP_MIN_ELEMENTS:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.ClearField("int32_data")
            tensor.doc_string = STRIP_MARK
    return stripped


def fill_weights(model: "onnx.ModelProto", seed: int = 0) -> "onnx.ModelProto":
    """Inverse of `strip_weights` up to the values: marked tensors get N(0, 0.02) data (in place)."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        if tensor.doc_string == STRIP_MARK:
            dtype = np.float16 if tensor.data_type == onnx.TensorProto.FLOAT16 else np.float32
            array = (0.02 * rng.standard_normal(tuple(tensor.dims))).astype(dtype)
            filled = numpy_helper.from_array(array, tensor.name)
            tensor.CopyFrom(filled)
    return model




def refilled_copy(folder: "str | Path", file: str, work: "str | Path") -> str:
    """The path of `folder/file` (a stripped model) with its weights refilled, written once under `work` (as
    external data past protobuf's 2 GB limit) and reused by later calls."""
    import onnx

    target = Path(work) / file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        model = fill_weights(onnx.load(Path(folder) / file))
        onnx.save(model, target, save_as_external_data=model.ByteSize() > 1_800_000_000)
    return str(target)


__all__ = ["BoundSession", "ONNX_TO_NUMPY", "PairedTiming", "STRIP_MARK", "STRIP_MIN_ELEMENTS", "TimingSetting",
           "fill_weights", "paired_timing", "random_feeds", "strip_weights", "refilled_copy"]
