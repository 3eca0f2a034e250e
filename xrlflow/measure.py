"""Measured latency: end-to-end onnxruntime timing of a graph, isolated in a worker process, cached in SQLite.

`MeasuredLatency(config).latency(graph)` exports the graph unfolded (onnxruntime folds the weight Concats that
rewrites add at session creation, so the timed model is what a folded export would be), times it in a
worker process until the 95% confidence interval of the median is within `target_rel_ci` of the median (or
a cap on runs / seconds is hit), and caches the result by structural hash and setting.

`compare(a, b)` times both graphs interleaved in one worker, as two sessions each created in the order
A1 B1 B2 A2 and all alive, in cycles A1 B1 B1 A1 B2 A2 A2 B2, and returns the median of the per-cycle time
ratios B/A with its CI: on a noisy machine that cancels drift which separate measurements do not, and the
order effects that biased an A/A comparison by 1-3% (`measure_worker.time_comparison` says which).

Isolation: a segfault, a hang past `timeout_s` or an out-of-memory kill of the worker becomes a failed
`Latency` (ok=False, with the reason) and a fresh worker serves the next request.
"""

from __future__ import annotations

import platform
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import Latency
from xrlflow.latency_cache import CacheKey, LatencyCache, format_shapes
from xrlflow.measure_worker import (
    OPT_LEVELS, InputSpec, PlacementJob, SessionSettings, TimingJob, TimingPlan, TimingResult, median_ci,
)

CUDNN_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def no_cuda_message() -> str:
    """The one line for --device cuda without a CUDA execution provider, naming the fix for the builds installed."""
    from xrlflow.runtime import cuda_install_hint

    return f"onnxruntime has no CUDA execution provider: {cuda_install_hint()}"


def parse_pin_cpu(text: str | None) -> int | None:
    """A --pin-cpu value: a CPU number, or "auto" for the last CPU this process may use."""
    if text is None:
        return None
    if text == "auto":
        import os

        return max(os.sched_getaffinity(0))
    try:
        return int(text)
    except ValueError:
        raise BadInputError(f"--pin-cpu takes a CPU number or auto, not {text!r}") from None


@dataclass(frozen=True)
class MeasureConfig:
    """A measurement: the session it times (`SessionSettings`), how long (`TimingPlan`), and the worker's limits.
    `MeasureConfig.create(device="cuda", max_seconds=2, ...)` takes the nested settings' fields flat."""

    session: SessionSettings = SessionSettings()
    plan: TimingPlan = TimingPlan()
    timeout_s: float = 120.0  # per request, session creation included; past it the worker is killed
    memory_limit_mb: int | None = None  # address-space cap for the worker on the CPU (never on CUDA)
    pin_cpu: int | None = None  # run the worker on this one CPU core (launch-bound GPU timing is CPU timing)
    cache_path: str | None = None  # None: default_cache_path(); "" turns the cache off
    seed: int = 0

    @classmethod
    def create(cls, cuda_graph: bool | None = None, **settings: Any) -> "MeasureConfig":
        """From flat keywords: SessionSettings' and TimingPlan's fields go to them, the rest to this class.
        `cuda_graph` None means on for CUDA; `check_every` defaults to min(10, min_runs)."""
        session_fields = {f.name for f in fields(SessionSettings)}
        plan_fields = {f.name for f in fields(TimingPlan)}
        session = {k: settings.pop(k) for k in list(settings) if k in session_fields}
        plan = {k: settings.pop(k) for k in list(settings) if k in plan_fields}
        device = session.get("device", SessionSettings.device)
        session["cuda_graph"] = device == "cuda" and cuda_graph is not False
        plan.setdefault("check_every", min(10, plan.get("min_runs", TimingPlan.min_runs)))
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise BadInputError(f"unknown measurement setting(s): {', '.join(unknown)}")
        return cls(SessionSettings(**session), TimingPlan(**plan), **settings)

    def __post_init__(self) -> None:
        session, plan = self.session, self.plan
        if session.device not in ("cpu", "cuda"):
            raise BadInputError(f"unknown device {session.device!r}: use cpu or cuda")
        if session.opt_level not in OPT_LEVELS:
            raise BadInputError(f"unknown optimisation level {session.opt_level!r}: use one of {', '.join(OPT_LEVELS)}")
        if session.intra_op_threads < 0 or plan.min_runs < 1 or plan.max_runs < plan.min_runs or self.timeout_s <= 0:
            raise BadInputError("bad measurement settings: need threads >= 0 (0: onnxruntime's default), "
                                "1 <= min_runs <= max_runs, timeout > 0")
        if plan.sessions < 1:
            raise BadInputError(f"bad measurement settings: sessions must be >= 1, not {plan.sessions}")
        if session.cudnn_conv_algo_search not in CUDNN_ALGO_SEARCHES:
            raise BadInputError(f"unknown cuDNN algorithm search {session.cudnn_conv_algo_search!r}: use one of {', '.join(CUDNN_ALGO_SEARCHES)}")
        if self.pin_cpu is not None:
            import os

            if not hasattr(os, "sched_setaffinity"):
                raise BadInputError("pinning the measurement worker to a CPU needs Linux (os.sched_setaffinity)")
            if self.pin_cpu not in os.sched_getaffinity(0):
                raise BadInputError(f"cannot pin the measurement worker to CPU {self.pin_cpu}: this process may use {sorted(os.sched_getaffinity(0))}")

    # what the cache key, the service's name and the Ray pool read
    @property
    def device(self) -> str:
        return self.session.device

    @property
    def opt_level(self) -> str:
        return self.session.opt_level

    @property
    def intra_op_threads(self) -> int:
        return self.session.intra_op_threads

    @property
    def uses_cuda_graph(self) -> bool:
        return self.session.device == "cuda" and self.session.cuda_graph

    @property
    def provider(self) -> str:
        """The execution provider and the options that change what is timed (part of the cache key)."""
        session = self.session
        if session.device == "cuda":
            name = "CUDAExecutionProvider/iobinding"
            if session.cudnn_conv_algo_search != "EXHAUSTIVE":
                name += f"/cudnn-{session.cudnn_conv_algo_search.lower()}"
            return name + ("/cudagraph" if self.uses_cuda_graph else "")
        return f"CPUExecutionProvider/t{session.intra_op_threads or 'default'}"

    @property
    def setting(self) -> str:
        """The session setting in words, for the report: 'cpu, 1 thread' / 'cuda, CUDA-graph replay'."""
        session = self.session
        if session.device == "cuda":
            return "cuda, " + ("CUDA-graph replay" if self.uses_cuda_graph else "plain runs (no CUDA graph)")
        threads = session.intra_op_threads
        return f"cpu, {threads} intra-op thread{'s' if threads != 1 else ''}" if threads else \
            "cpu, onnxruntime's default threads"


@dataclass(frozen=True)
class Comparison:
    """Interleaved A/B timing: `ratio` is the median of per-cycle time ratios B/A (< 1: B is faster);
    `runs` counts cycle samples (each from 4 runs of each graph, two in each of its two sessions).

    The CI covers run-to-run noise only: where each session's weights land in memory leaves a fixed effect
    per session (about +-0.3% on the CPU A/A runs in bench/results/measure_cpu.md) that no interval from
    these four sessions can see: over repeated A/A compares the CI held 1.0 in only 55-75% of them. So this is
    a within-compare interval; the final A/B of `xrlflow optimize` (`guarantee.repeated_ab`) spans several
    independent compares instead, which holds 1.0 at its stated rate."""

    ratio: float
    low: float
    high: float
    runs: int
    a: Latency
    b: Latency
    ok: bool = True
    reason: str = ""

    @property
    def speedup(self) -> float:
        """How much faster B is than A (A/B)."""
        return 1.0 / self.ratio


class WorkerFailure(Exception):
    """The worker died or hung; the message says how. Not cached: the next attempt may succeed."""


class MeasureWorker:
    """One worker process (`python -m xrlflow.measure_worker`), reused across requests and replaced when it
    dies or hangs. A fresh interpreter rather than multiprocessing's spawn: spawn re-imports the caller's
    __main__, which breaks every script without a main guard."""

    def __init__(self, memory_limit_mb: int | None = None, pin_cpu: int | None = None) -> None:
        self.memory_limit_mb = memory_limit_mb
        self.pin_cpu = pin_cpu
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def _start(self) -> None:
        parent, child = socket.socketpair()
        args = [sys.executable, "-m", "xrlflow.measure_worker", str(child.fileno()), str(self.memory_limit_mb or 0),
                str(-1 if self.pin_cpu is None else self.pin_cpu)]
        try:
            self._process = subprocess.Popen(args, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            child.close()
        self._conn = Connection(parent.detach())

    def request(self, job: TimingJob, timeout_s: float) -> tuple[str, Any]:
        """Send a job; returns ("ok", result) or ("error", reason); raises WorkerFailure on death or hang."""
        if self.pid is None:
            self.stop()
            self._start()
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send(job)
            if not self._conn.poll(timeout_s):
                self.stop()
                raise WorkerFailure(f"timed out after {timeout_s:g} s")
            return self._conn.recv()
        except (EOFError, OSError):
            try:
                code: int | None = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self.stop()
            raise WorkerFailure(_death_reason(code)) from None

    def stop(self) -> None:
        if self._process is None:
            return
        process, conn = self._process, self._conn
        self._process = self._conn = None
        try:
            if process.poll() is None and conn is not None:
                try:
                    conn.send(None)
                    process.wait(timeout=0.5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
        finally:
            if conn is not None:
                conn.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker stopped answering"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        if -exitcode == signal.SIGKILL:
            return f"the worker was killed ({name}; out of memory?)"
        return f"the worker crashed ({name})"
    return f"the worker exited with code {exitcode}"


def input_specs(graph: Graph) -> tuple[InputSpec, ...]:
    """The graph's inputs with static shapes (load_graph binds symbolic dims via --input-shape)."""
    specs = []
    for name in graph.inputs:
        t = graph.types.get(name)
        if t is None or not t.is_static:
            raise BadInputError(f"input {name!r} has no static shape: bind it with --input-shape")
        specs.append(InputSpec(name, t.dtype, tuple(int(d) for d in t.shape)))  # type: ignore[union-attr]
    return tuple(specs)


def device_name(device: str, device_id: int = 0) -> str:
    """A human-readable device name for the cache key (CPU model, or the GPU's name from nvidia-smi)."""
    if device == "cuda":
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
        return f"cuda:{device_id}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def ort_info() -> tuple[str, list[str]]:
    from xrlflow.runtime import import_onnxruntime

    ort = import_onnxruntime()

    return ort.__version__, list(ort.get_available_providers())


def _latency_from_samples(samples: np.ndarray, session_medians: tuple[float, ...] = ()) -> Latency:
    med, low, high = median_ci(samples)
    if len(session_medians) < 2:
        return Latency(med, low, high, len(samples), "measured")
    # Several sessions: the median of their medians, so one session's unlucky draw cannot move it; the
    # interval (order statistics of the pooled runs) is widened to contain it.
    ms = float(np.median(session_medians))
    return Latency(ms, min(low, ms), max(high, ms), len(samples), "measured", session_ms=tuple(session_medians))


class MeasuredLatency:
    """The measured `LatencyService`: onnxruntime end-to-end latency in a reusable worker, cached."""

    deterministic = False

    def __init__(self, config: MeasureConfig = MeasureConfig(), cache: LatencyCache | None = None) -> None:
        self.config = config
        version, providers = ort_info()
        if config.device == "cuda" and "CUDAExecutionProvider" not in providers:
            raise BadInputError(no_cuda_message())
        self.ort_version = version
        self.device = device_name(config.device, config.session.device_id)
        self.name = f"measured:{config.device}:{config.opt_level}"
        if cache is None and config.cache_path != "":
            cache = LatencyCache(config.cache_path)
        self.cache = cache
        self.worker = MeasureWorker(config.memory_limit_mb if config.device == "cpu" else None, config.pin_cpu)

    def close(self) -> None:
        self.worker.stop()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "MeasuredLatency":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cache_key(self, graph: Graph) -> CacheKey:
        shapes = {s.name: s.shape for s in input_specs(graph)}
        return CacheKey(
            graph.structural_hash(), format_shapes(shapes), self.config.provider, self.device, self.ort_version,
            self.config.opt_level,
        )

    # ---- the service --------------------------------------------------------------------------------------
    def latency(self, graph: Graph) -> Latency:
        key = self.cache_key(graph)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        from xrlflow.onnx_io import graph_to_bytes

        result = self.measure_model(graph_to_bytes(graph), input_specs(graph))
        # Worker deaths and hangs are not cached (they can be the machine's fault); model errors are.
        if self.cache is not None and (result.ok or not result.reason.startswith("worker:")):
            self.cache.put(key, result)
        return result

    def measure_model(self, model: bytes, specs: tuple[InputSpec, ...], plan: TimingPlan | None = None) -> Latency:
        """Time one serialised model (uncached); the cost model measures its per-kernel models through this."""
        job = TimingJob((model,), (specs,), self.config.session, plan or self.config.plan, self.config.seed)
        status, payload = self._request(job)
        if status != "ok":
            return Latency.failed(payload)
        return _latency_from_samples(np.asarray(payload.samples_ms[0]), payload.session_medians_ms)

    def compare(self, graph_a: Graph, graph_b: Graph) -> Comparison:
        """Interleaved, order-balanced A/B timing in one worker; the ratio is B/A with the 95% CI of its median."""
        from xrlflow.onnx_io import graph_to_bytes

        return self.compare_models(graph_to_bytes(graph_a), input_specs(graph_a), graph_to_bytes(graph_b), input_specs(graph_b))

    def compare_models(self, model_a: bytes, specs_a: tuple[InputSpec, ...], model_b: bytes,
                       specs_b: tuple[InputSpec, ...], plan: TimingPlan | None = None) -> Comparison:
        """`compare` of two serialised models (never cached): the user's file against a candidate."""
        job = TimingJob((model_a, model_b), (specs_a, specs_b), self.config.session, plan or self.config.plan,
                        self.config.seed)
        status, payload = self._request(job)
        if status != "ok":
            failed = Latency.failed(payload)
            return Comparison(float("nan"), float("nan"), float("nan"), 0, failed, failed, ok=False, reason=payload)
        sa, sb = (np.asarray(s) for s in payload.samples_ms)
        ratio, low, high = median_ci(sb / sa)
        return Comparison(ratio, low, high, len(sa), _latency_from_samples(sa), _latency_from_samples(sb))

    def node_placement(self, model: bytes, specs: tuple[InputSpec, ...]) -> tuple[tuple[str, str, str], ...] | str:
        """(node, op type, provider) per node from one profiled run, or the reason it could not be run."""
        try:
            status, payload = self.worker.request(PlacementJob(model, specs, self.config.session, self.config.seed),
                                                  self.config.timeout_s)
        except WorkerFailure as exc:
            return f"worker: {exc}"
        return payload if status == "ok" else str(payload)

    def _request(self, job: TimingJob) -> tuple[str, Any]:
        try:
            status, payload = self.worker.request(job, self.config.timeout_s)
        except WorkerFailure as exc:
            return "error", f"worker: {exc}"
        if status == "ok" and not isinstance(payload, TimingResult):
            return "error", "worker: malformed answer"
        return status, payload


__all__ = ["MeasureConfig", "parse_pin_cpu", "MeasuredLatency", "Comparison", "MeasureWorker", "input_specs", "device_name",
           "no_cuda_message"]
