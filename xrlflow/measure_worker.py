"""What runs inside the measurement worker process: sessions, inputs, the timing loops, and their statistics.

The parent (`xrlflow.measure`) sends a `TimingJob` over a pipe and receives `TimingResult` or an error line.
Everything here is importable without side effects so that a spawn-started process can load it cheaply.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# onnxruntime's GraphOptimizationLevel by the names the CLI and the cache use
OPT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
Z95 = 1.959963984540054
CUDA_GRAPH_IMPOSSIBLE = "CUDA graph capture is not possible for this model"


@dataclass(frozen=True)
class SessionSettings:
    """How an onnxruntime session is made (what is timed)."""

    device: str = "cpu"  # "cpu" or "cuda"
    device_id: int = 0
    opt_level: str = "ORT_ENABLE_ALL"
    # One intra-op thread on the CPU: on a shared machine a thread pool's spin-waiting collides with every
    # other process and doubles the noise, and parallel environment workers each get a core of their own.
    # Rewrites ranked the same at 1 and 2 threads (fewer kernels and larger GEMMs win at both) when the
    # measured service was first checked on the CPU. 0: onnxruntime's default (all cores), what users deploy.
    intra_op_threads: int = 1
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # the CUDA EP's default; HEURISTIC / DEFAULT skip the timing
    # CUDA EP option enable_cuda_graph: time the run replayed as one captured CUDA graph (`MeasureConfig.create`
    # turns it on for CUDA). A plain CUDA run of a batch-1 model is bound by the host launching each kernel,
    # and on the H200 machine that host time varied by 5-18% (CV) between sessions; replayed graphs measure
    # the GPU work at a CV under 1% (bench/results/measure_cuda.md). Needs every node on the CUDA EP and
    # static shapes.
    cuda_graph: bool = False


@dataclass(frozen=True)
class TimingPlan:
    """How long a model is timed: adaptive stopping on the median's CI, with caps on runs and seconds."""

    warmup_runs: int = 10
    min_runs: int = 20
    max_runs: int = 2000
    max_seconds: float = 10.0
    target_rel_ci: float = 0.01  # stop when the 95% CI half-width of the median is within 1% of the median
    check_every: int = 10
    # Sessions of the same model timed round-robin; the result is the median of their medians. On the H200
    # one session's speed is a draw (where its buffers and kernel objects land), so a single session's
    # median varies by more than its own CI (bench/results/measure_cuda.md).
    sessions: int = 1


@dataclass(frozen=True)
class InputSpec:
    name: str
    elem_type: int  # onnx.TensorProto elem type
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TimingJob:
    """One model (adaptive timing) or two (interleaved A/B timing with both sessions alive)."""

    models: tuple[bytes, ...]
    inputs: tuple[tuple[InputSpec, ...], ...]
    session: SessionSettings
    plan: TimingPlan
    seed: int = 0


@dataclass(frozen=True)
class TimingResult:
    # per model, in run order; for a comparison per cycle index (see time_comparison), so B/A lines up
    samples_ms: tuple[tuple[float, ...], ...]
    seconds: float
    # single-model jobs: the median of each session's runs (TimingPlan.sessions of them)
    session_medians_ms: tuple[float, ...] = ()


# ---- statistics (pure numpy; also used by the parent) ----------------------------------------------------------
def median_ci(samples: Sequence[float] | np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """Median and its distribution-free 95% CI from order statistics (normal approximation to the binomial)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    med = float(np.median(x))
    half = z * math.sqrt(n) / 2.0
    lo_rank = max(1, math.floor(n / 2.0 - half))  # 1-based ranks
    hi_rank = min(n, math.ceil(n / 2.0 + half) + 1)
    return med, float(x[lo_rank - 1]), float(x[hi_rank - 1])


def relative_half_width(med: float, low: float, high: float) -> float:
    if not med > 0:
        return math.inf
    return max(med - low, high - med) / med


# ---- sessions ----------------------------------------------------------------------------------------------
def random_feeds(specs: Sequence[InputSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded random inputs: normal floats, small non-negative integers (valid ids and indices), random bools."""
    import onnx

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 8, spec.shape).astype(dtype)
    return feeds


class SessionRunner:
    """An onnxruntime session with its inputs in place; on CUDA the inputs and outputs live on the device
    (IO binding), so a timed run contains no host<->device copy."""

    def __init__(self, model: bytes, specs: Sequence[InputSpec], settings: SessionSettings, seed: int) -> None:
        from xrlflow.runtime import import_onnxruntime

        ort = import_onnxruntime()
        self.session = ort.InferenceSession(model, session_options(ort, settings), providers=providers(settings))
        feeds = random_feeds(specs, seed)
        self.cuda = settings.device == "cuda"
        if self.cuda:
            self.binding = self.session.io_binding()
            self._device_inputs = []  # keep the OrtValues alive as long as the binding
            for name, array in feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", settings.device_id)
                self._device_inputs.append(value)
                self.binding.bind_ortvalue_input(name, value)
            for out in self.session.get_outputs():
                if settings.cuda_graph:  # a replayed graph writes to fixed addresses: allocate them once
                    if not all(isinstance(d, int) for d in out.shape):
                        raise RuntimeError(f"CUDA graph capture needs static output shapes ({out.name}: {out.shape})")
                    value = ort.OrtValue.ortvalue_from_shape_and_type(out.shape, _numpy_type(out.type), "cuda", settings.device_id)
                    self._device_inputs.append(value)
                    self.binding.bind_ortvalue_output(out.name, value)
                else:
                    self.binding.bind_output(out.name, "cuda", settings.device_id)
            self.binding.synchronize_inputs()
        else:
            self.feeds = feeds
            self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self) -> None:
        if self.cuda:
            self.session.run_with_iobinding(self.binding)  # synchronises the CUDA stream before returning
        else:
            self.session.run(self.output_names, self.feeds)

    def timed(self) -> float:
        start = time.perf_counter_ns()
        self.run()
        return (time.perf_counter_ns() - start) / 1e6


def session_options(ort: Any, settings: SessionSettings) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings.opt_level)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = settings.intra_op_threads  # 0: onnxruntime's default
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def providers(settings: SessionSettings) -> list[Any]:
    if settings.device != "cuda":
        return ["CPUExecutionProvider"]
    cuda_options = {"device_id": settings.device_id, "cudnn_conv_algo_search": settings.cudnn_conv_algo_search}
    if settings.cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


@dataclass(frozen=True)
class PlacementJob:
    """Which execution provider runs each node: one profiled run of a session without CUDA-graph capture."""

    model: bytes
    inputs: tuple[InputSpec, ...]
    session: SessionSettings
    seed: int = 0


def profile_placement(events: Sequence[dict]) -> tuple[tuple[str, str, str], ...]:
    """(node name, op type, provider) of each node, from onnxruntime's profiling events (cat "Node", whose
    args carry op_name and provider; the event's name is the node's name + "_kernel_time")."""
    placed: dict[str, tuple[str, str, str]] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        name = str(event.get("name", ""))
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        placed.setdefault(name, (name, str(args.get("op_name", "")), str(args["provider"])))
    return tuple(placed.values())


def run_placement(job: PlacementJob) -> tuple[tuple[str, str, str], ...]:
    import dataclasses
    import json
    import tempfile
    from pathlib import Path

    from xrlflow.runtime import import_onnxruntime

    ort = import_onnxruntime()
    settings = dataclasses.replace(job.session, cuda_graph=False)
    options = session_options(ort, settings)
    with tempfile.TemporaryDirectory(prefix="xrlflow-placement-") as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "placement")
        session = ort.InferenceSession(job.model, options, providers=providers(settings))
        session.run(None, random_feeds(job.inputs, job.seed))
        profile = session.end_profiling()
        events = json.loads(Path(profile).read_text())
    return profile_placement(events)


def _numpy_type(ort_type: str) -> Any:
    """numpy dtype of an onnxruntime type string such as 'tensor(float)'."""
    names = {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64, "int32": np.int32,
             "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") else ort_type
    if inner not in names:
        raise RuntimeError(f"CUDA graph capture: unsupported output type {ort_type}")
    return names[inner]


def time_sessions(runners: Sequence[SessionRunner], plan: TimingPlan) -> list[list[float]]:
    """Adaptive timing of one model held by one or more sessions, timed round-robin (one run of each per
    cycle); stops once the pooled median's CI is within the target after min_runs cycles, or at a cap.
    Returns each session's samples."""
    for runner in runners:  # warm up every session before any is timed
        for _ in range(plan.warmup_runs):
            runner.run()
    per_session: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    while True:
        for _ in range(plan.check_every):
            for samples, runner in zip(per_session, runners):
                samples.append(runner.timed())
        cycles = len(per_session[0])
        pooled = [x for samples in per_session for x in samples]
        if cycles >= plan.min_runs and relative_half_width(*median_ci(pooled)) <= plan.target_rel_ci:
            return per_session
        if len(pooled) >= plan.max_runs or time.perf_counter() - start >= plan.max_seconds:
            return per_session


# One sample of a comparison: the runs of four sessions created in the order A1 B1 B2 A2, timed in this order.
_CYCLE = ("a1", "b1", "b1", "a1", "b2", "a2", "a2", "b2")
_A_RUNS, _B_RUNS = [0, 3, 5, 6], [1, 2, 4, 7]


def cycle_ratios(rows: np.ndarray) -> np.ndarray:
    """B/A per cycle (one row of `_CYCLE` run times): the geometric mean of its four B/A pair ratios."""
    return np.exp(np.log(rows[:, _B_RUNS]).mean(axis=1) - np.log(rows[:, _A_RUNS]).mean(axis=1))


def time_comparison(
    models: Sequence[bytes], inputs: Sequence[Sequence[InputSpec]], settings: SessionSettings, plan: TimingPlan, seed: int,
) -> tuple[list[float], list[float]]:
    """Interleaved A/B timing that cancels the order effects A/A comparisons exposed (bench/results):

    - within a pair: a run right after a run of the same session is faster (warm caches), so alternating
      A B, B A, ... gives bimodal per-pair ratios. In a cycle A1 B1 B1 A1 B2 A2 A2 B2 each graph gets exactly
      one such warm repeat, and the cycle's B/A (geometric mean of its four pair ratios) is one sample.
    - session creation: of identical sessions, where each lands in memory shifts its speed (the one created
      later ran 0.5-1% faster in a fresh worker). The previous design timed the two creation orders in two
      phases one after the other, freeing phase one's sessions before phase two created its own; in a
      worker that had run other jobs an A/A comparison then read 0.973 and 0.987 in some test-suite runs.
      Now all four sessions are created up front, A1 B1 B2 A2 (creation ranks 1+4 for A, 2+3 for B), stay
      alive together, and both orders are timed inside every cycle, so phase-to-phase drift cannot enter.
      Costs twice the session memory of one A/B pair.

    Stops when the CI of the median cycle ratio is within the plan's target, or at max_runs / 2 cycles (each
    graph then ran 2 * max_runs times, as two sessions) or max_seconds. Returns per model and per cycle the
    geometric mean of its four runs, so that B/A of the returned samples is the cycle ratio."""
    runners: dict[str, SessionRunner] = {}
    for key in ("a1", "b1", "b2", "a2"):
        runners[key] = SessionRunner(models[0 if key[0] == "a" else 1], inputs[0 if key[0] == "a" else 1], settings, seed)
    cycle = [runners[key] for key in _CYCLE]
    for _ in range(plan.warmup_runs):  # the same warm-up for all four, after all four exist
        for runner in cycle:
            runner.run()
    rows: list[list[float]] = []
    start = time.perf_counter()
    max_cycles = max(1, plan.max_runs // 2)
    while True:
        for _ in range(plan.check_every):
            rows.append([runner.timed() for runner in cycle])
        n = len(rows)
        table = np.asarray(rows)
        if n >= plan.min_runs and relative_half_width(*median_ci(cycle_ratios(table))) <= plan.target_rel_ci:
            break
        if n >= max_cycles or time.perf_counter() - start >= plan.max_seconds:
            break
    a = np.exp(np.log(table[:, _A_RUNS]).mean(axis=1))
    b = np.exp(np.log(table[:, _B_RUNS]).mean(axis=1))
    return a.tolist(), b.tolist()


def run_job(job: TimingJob | PlacementJob) -> Any:
    if isinstance(job, PlacementJob):
        return run_placement(job)
    start = time.perf_counter()
    if len(job.models) == 1:
        runners = [SessionRunner(job.models[0], job.inputs[0], job.session, job.seed) for _ in range(max(1, job.plan.sessions))]
        per_session = time_sessions(runners, job.plan)
        pooled = tuple(x for cycle in zip(*per_session) for x in cycle)  # in run order
        medians = tuple(float(np.median(s)) for s in per_session)
        return TimingResult((pooled,), time.perf_counter() - start, medians)
    if len(job.models) == 2:
        sa, sb = time_comparison(job.models, job.inputs, job.session, job.plan, job.seed)
        return TimingResult((tuple(sa), tuple(sb)), time.perf_counter() - start)
    raise ValueError("a timing job holds one or two models")


def _limit_memory(megabytes: int | None) -> None:
    if not megabytes:
        return
    import resource

    limit = megabytes * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker_main(conn: Any, memory_limit_mb: int | None, pin_cpu: int | None = None) -> None:
    """The worker loop: receive a job, answer ("ok", TimingResult) or ("error", one line); None ends it."""
    _limit_memory(memory_limit_mb)
    if pin_cpu is not None:
        import os

        os.sched_setaffinity(0, {pin_cpu})  # before onnxruntime starts any thread: they inherit it
    from xrlflow.runtime import import_onnxruntime

    onnxruntime = import_onnxruntime()  # load it once, before the first job's clock starts

    # onnxruntime-gpu logs a warning per CUDA session about plugin EP devices through its default logger,
    # which SessionOptions.log_severity_level does not reach
    onnxruntime.set_default_logger_severity(3)

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            conn.send(("ok", run_job(job)))
        except MemoryError:
            conn.send(("error", "out of memory"))
        except Exception as exc:  # onnxruntime's load and run failures: the model is unrunnable here
            message = str(exc).strip().splitlines()
            line = next((m for m in message if m.strip()), type(exc).__name__)
            if not isinstance(exc, RuntimeError) and "onnxruntime" not in type(exc).__module__:
                line = f"{type(exc).__name__}: {line} ({traceback.extract_tb(exc.__traceback__)[-1].name})"
            if isinstance(job, TimingJob) and job.session.cuda_graph and "cuda graph" in line.lower():
                # session creation refuses (a node off the GPU) or capture fails: say what to do instead
                line = f"{CUDA_GRAPH_IMPOSSIBLE} ({line}): measure it with cuda_graph=False (--no-cuda-graph)"
            conn.send(("error", line[:500]))


if __name__ == "__main__":
    import sys
    from multiprocessing.connection import Connection

    # Run the imported module's loop, so results pickle as xrlflow.measure_worker.*, not __main__.*
    from xrlflow.measure_worker import worker_main as module_worker_main

    pin = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    module_worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]) or None, pin if pin >= 0 else None)
