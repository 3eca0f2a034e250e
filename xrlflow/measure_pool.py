"""Scale-out of latency measurement on Ray: a pool of long-lived measurement actors (one per whole GPU).

Ray is optional (`pip install 'xrlflow[distributed]'`) and imported only inside this module's functions; the
connection is `xrlflow.ray_session.RaySession`, the rollout side of Ray (an SB3 VecEnv of Ray actors)
`xrlflow.agents.ray_vec_env`.

Measurement (`MeasurementPool`):
    driver / env actors                      coordinator actor (pinned to the driver's node)     measurement actors
    PooledLatency.latencies(graphs) --keys--> lookup in the SQLite cache (dedup by hash)
                                    --misses: ONNX bytes (ray.put) + input specs--> dispatch ----> MeasuredLatency
The coordinator owns the SQLite cache, so the cache stays on the driver's host; concurrent requests for one
graph (several envs reaching the same rewrite) share one measurement. Each measurement actor reserves a whole
GPU (`num_gpus=1`: a fraction would share a device and skew latency) or, on CPU-only hosts, `num_cpus` equal
to its intra-op threads, and holds the same `MeasuredLatency` (with its isolated worker process) as the local
path. A measurement actor that dies is replaced and the graph resubmitted; a graph whose measurement kills or
hangs workers `max_attempts` times is recorded in the cache as a failed measurement, so nothing crash-loops.

Multi-node clusters need xrlflow installed (same version) on every node; nothing is shipped in a runtime env.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import Latency
from xrlflow.latency_cache import CacheKey, format_shapes
from xrlflow.measure import MeasureConfig, input_specs
from xrlflow.measure_worker import InputSpec
from xrlflow.ray_session import import_ray

WORKER_FAILURE_PREFIX = "worker:"  # MeasuredLatency's reason prefix for a dead or hung worker process


def _driver_node_affinity():
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


# ---- measurement pool ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolConfig:
    measure: MeasureConfig = MeasureConfig()
    workers: int | None = None  # None: one per GPU in the cluster when measuring on cuda, else 1
    # Reserve a whole GPU per worker. None: when measuring on cuda. Tests set True with fake GPU resources.
    gpu_per_worker: bool | None = None
    max_attempts: int = 3  # a graph whose measurement kills or hangs this many workers is recorded as failed
    start_timeout_s: float = 300.0  # for a measurement actor to start (placement, imports)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise BadInputError(f"--measure-workers must be at least 1, got {self.workers}")
        if self.max_attempts < 1 or self.start_timeout_s <= 0:
            raise BadInputError("bad pool settings: need max_attempts >= 1 and a positive start timeout")

    @property
    def uses_gpus(self) -> bool:
        return self.measure.device == "cuda" if self.gpu_per_worker is None else self.gpu_per_worker


@dataclass(frozen=True)
class WorkerInfo:
    """Where a measurement actor runs and which device Ray gave it."""

    slot: int
    actor_id: str
    node_id: str
    pid: int
    gpu_ids: tuple[str, ...]
    cuda_visible_devices: str
    device: str  # the device name that keys the cache
    ort_version: str


def cache_key_for(graph: Graph, measure: MeasureConfig, device: str, ort_version: str) -> CacheKey:
    """The key `MeasuredLatency.cache_key` gives on a worker with this device name and onnxruntime version."""
    shapes = {s.name: s.shape for s in input_specs(graph)}
    return CacheKey(graph.structural_hash(), format_shapes(shapes), measure.provider, device, ort_version,
                    measure.opt_level)


class MeasurementActor:
    """One Ray actor: a MeasuredLatency (uncached; the coordinator caches) on the device Ray assigned."""

    def __init__(self, measure: MeasureConfig, slot: int) -> None:
        import ray

        from xrlflow.measure import MeasuredLatency, device_name

        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        config = dataclasses.replace(measure, cache_path="")
        if gpu_ids and measure.device == "cuda":
            config = dataclasses.replace(config, session=dataclasses.replace(config.session, device_id=0))  # CUDA_VISIBLE_DEVICES holds just the assigned GPU
        self.service = MeasuredLatency(config)
        if gpu_ids and measure.device == "cuda":
            self.service.device = device_name("cuda", int(gpu_ids[0]))  # nvidia-smi numbers GPUs physically
        context = ray.get_runtime_context()
        self.info = WorkerInfo(slot, context.get_actor_id(), context.get_node_id(), os.getpid(), gpu_ids,
                               os.environ.get("CUDA_VISIBLE_DEVICES", ""), self.service.device,
                               self.service.ort_version)

    def describe(self) -> WorkerInfo:
        return self.info

    def measure(self, model: bytes, specs: tuple[InputSpec, ...]) -> Latency:
        return self.service.measure_model(model, specs)

    def close(self) -> None:
        self.service.close()


@dataclass
class PoolStats:
    dispatched: int = 0  # measurement requests sent to actors (retries included)
    measured: int = 0  # graphs measured (ok or a model error), each counted once
    failed_after_retries: int = 0  # graphs recorded as failed after max_attempts worker deaths or hangs
    actor_restarts: int = 0
    cache_hits: int = 0
    in_flight: int = 0


class MeasurementCoordinator:
    """The pool's driver-side half (an async actor pinned to the driver's node): cache, dedup, dispatch, retry."""

    def __init__(self, config: PoolConfig, workers: int) -> None:
        from xrlflow.latency_cache import LatencyCache

        self.config = config
        self.cache = LatencyCache(config.measure.cache_path) if config.measure.cache_path != "" else None
        self.workers = workers
        self.actors: dict[int, Any] = {}
        self.infos: dict[int, WorkerInfo] = {}
        self.idle: asyncio.Queue[int] | None = None
        self.in_flight: dict[CacheKey, asyncio.Future[Latency]] = {}
        self.stats = PoolStats()
        self.device = ""
        self.ort_version = ""

    def _actor_options(self) -> dict[str, Any]:
        if self.config.uses_gpus:
            return {"num_gpus": 1, "num_cpus": 1, "scheduling_strategy": "SPREAD"}
        return {"num_cpus": self.config.measure.intra_op_threads, "scheduling_strategy": "SPREAD"}

    async def _start_actor(self, slot: int) -> WorkerInfo:
        import ray

        actor = ray.remote(MeasurementActor).options(**self._actor_options()).remote(self.config.measure, slot)
        try:
            info = await asyncio.wait_for(actor.describe.remote(), self.config.start_timeout_s)
        except BaseException:
            ray.kill(actor)
            raise
        self.actors[slot], self.infos[slot] = actor, info
        return info

    async def start(self) -> list[WorkerInfo]:
        self.idle = asyncio.Queue()
        try:
            infos = await asyncio.gather(*(self._start_actor(slot) for slot in range(self.workers)))
        except asyncio.TimeoutError:
            await self.shutdown()
            raise RuntimeError(f"measurement actors did not start within {self.config.start_timeout_s:g} s "
                               "(not enough free GPUs/CPUs in the cluster?)") from None
        settings = {(i.device, i.ort_version) for i in infos}
        if len(settings) > 1:
            await self.shutdown()
            raise RuntimeError(f"measurement workers differ in device or onnxruntime version: {sorted(settings)}; "
                               "one pool measures on one kind of device")
        self.device, self.ort_version = infos[0].device, infos[0].ort_version
        for slot in range(self.workers):
            self.idle.put_nowait(slot)
        return list(infos)

    def describe(self) -> list[WorkerInfo]:
        return [self.infos[s] for s in sorted(self.infos)]

    def handles(self) -> dict[int, Any]:
        return dict(self.actors)

    def get_stats(self) -> PoolStats:
        return dataclasses.replace(self.stats, in_flight=len(self.in_flight))

    def lookup(self, keys: list[CacheKey]) -> list[Latency | None]:
        hits = [self.cache.get(k) if self.cache is not None else None for k in keys]
        self.stats.cache_hits += sum(h is not None for h in hits)
        return hits

    async def measure(self, jobs: list[tuple[CacheKey, Any, tuple[InputSpec, ...]]]) -> list[Latency]:
        """jobs: (key, ObjectRef of the ONNX bytes, input specs); answers in order."""
        return list(await asyncio.gather(*(self._measure_one(*job) for job in jobs)))

    async def _measure_one(self, key: CacheKey, model_ref: Any, specs: tuple[InputSpec, ...]) -> Latency:
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit
        pending = self.in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Latency] = asyncio.get_running_loop().create_future()
        self.in_flight[key] = future
        try:
            result = await self._run_with_retries(model_ref, specs)
            if self.cache is not None and (result.ok or not result.reason.startswith(WORKER_FAILURE_PREFIX)):
                self.cache.put(key, result)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "exception never retrieved" warning when nobody else waits
            raise
        finally:
            del self.in_flight[key]

    async def _run_with_retries(self, model_ref: Any, specs: tuple[InputSpec, ...]) -> Latency:
        from ray.exceptions import RayActorError

        assert self.idle is not None, "start() first"
        reasons: list[str] = []
        for _ in range(self.config.max_attempts):
            if not self.actors:
                raise RuntimeError("every measurement actor is gone and none could be restarted")
            slot = await self.idle.get()
            self.stats.dispatched += 1
            try:
                result: Latency = await self.actors[slot].measure.remote(model_ref, specs)
            except RayActorError as exc:
                reasons.append(f"measurement actor died ({type(exc).__name__})")
                await self._replace(slot)
                continue
            self.idle.put_nowait(slot)
            if result.ok or not result.reason.startswith(WORKER_FAILURE_PREFIX):
                self.stats.measured += 1
                return result
            reasons.append(result.reason)
        self.stats.failed_after_retries += 1
        self.stats.measured += 1
        # Not prefixed "worker:": the coordinator caches it, so the graph is never dispatched again.
        return Latency.failed(f"failed on {len(reasons)} measurement workers; last: {reasons[-1]}")

    async def _replace(self, slot: int) -> None:
        """A fresh actor in a dead one's slot; the slot goes back to the idle queue once it answers."""
        import ray

        old = self.actors.pop(slot)
        self.infos.pop(slot, None)
        ray.kill(old)  # already dead in the usual case; makes sure a half-alive one does not keep its GPU
        self.stats.actor_restarts += 1
        try:
            info = await self._start_actor(slot)
        except Exception as exc:
            warnings.warn(f"measurement slot {slot} dropped: its replacement did not start ({exc})", RuntimeWarning)
            return
        if (info.device, info.ort_version) != (self.device, self.ort_version):
            warnings.warn(f"measurement slot {slot} dropped: its replacement runs on {info.device} / onnxruntime "
                          f"{info.ort_version}, not {self.device} / {self.ort_version}", RuntimeWarning)
            ray.kill(self.actors.pop(slot))
            self.infos.pop(slot, None)
            return
        assert self.idle is not None
        self.idle.put_nowait(slot)

    async def shutdown(self) -> None:
        import ray

        actors = list(self.actors.values())
        self.actors.clear()
        if actors:
            # Let each actor stop its worker process, then free the actor (and its GPU) for good.
            await asyncio.wait([asyncio.ensure_future(_as_future(a.close.remote())) for a in actors], timeout=10)
        for actor in actors:
            ray.kill(actor)
        if self.cache is not None:
            self.cache.close()


async def _as_future(ref: Any) -> Any:
    try:
        return await ref
    except Exception:  # an actor that is already dead has nothing to close
        return None


class PooledLatency:
    """The `LatencyService` of a measurement pool. Picklable: env actors on other nodes measure through it."""

    deterministic = False

    def __init__(self, coordinator: Any, measure: MeasureConfig, device: str, ort_version: str) -> None:
        self.coordinator = coordinator
        self.measure = measure
        self.device = device
        self.ort_version = ort_version
        self.name = f"measured:{measure.device}:{measure.opt_level}"  # the same measurement as MeasuredLatency
        self._known: dict[CacheKey, Latency] = {}  # answers this process already has

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_known"] = {}
        return state

    def cache_key(self, graph: Graph) -> CacheKey:
        return cache_key_for(graph, self.measure, self.device, self.ort_version)

    def latency(self, graph: Graph) -> Latency:
        return self.latencies([graph])[0]

    def latencies(self, graphs: Sequence[Graph]) -> list[Latency]:
        """Measure several graphs in parallel across the pool; duplicates and cached graphs cost nothing."""
        import ray

        from xrlflow.onnx_io import graph_to_bytes

        keys = [self.cache_key(g) for g in graphs]
        first: dict[CacheKey, Graph] = {}
        for key, graph in zip(keys, graphs):
            if key not in self._known:
                first.setdefault(key, graph)
        unknown = list(first)
        if unknown:
            hits = ray.get(self.coordinator.lookup.remote(unknown))
            misses = []
            for key, hit in zip(unknown, hits):
                if hit is None:
                    misses.append(key)
                else:
                    self._known[key] = hit
            if misses:
                jobs = [(k, ray.put(graph_to_bytes(first[k])), input_specs(first[k])) for k in misses]
                results = ray.get(self.coordinator.measure.remote(jobs))
                for key, result in zip(misses, results):
                    if result.ok or not result.reason.startswith(WORKER_FAILURE_PREFIX):
                        self._known[key] = dataclasses.replace(result, source="cache")
                    first[key] = result  # type: ignore[assignment]
        answers = []
        # The graphs answered just now keep source "measured"; repeats and earlier answers read "cache".
        fresh = {k: v for k, v in first.items() if isinstance(v, Latency)}
        answered: set[CacheKey] = set()
        answers = []
        for key in keys:
            if key in fresh and (key not in answered or key not in self._known):
                answers.append(fresh[key])  # an uncached worker failure stays a failure for every repeat
            else:
                answers.append(self._known[key])
            answered.add(key)
        return answers


class MeasurementPool:
    """Owns the coordinator and the measurement actors. Connect to Ray first (RaySession)."""

    def __init__(self, config: PoolConfig = PoolConfig()) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            raise BadInputError("the measurement pool needs a Ray connection (--ray-address)")
        if config.measure.cache_path is None:  # the driver's default (its environment), not the actor's
            from xrlflow.latency_cache import default_cache_path

            config = dataclasses.replace(config, measure=dataclasses.replace(
                config.measure, cache_path=str(default_cache_path())))
        self.config = config
        workers = self._worker_count(ray.cluster_resources())
        self.coordinator = ray.remote(MeasurementCoordinator).options(
            num_cpus=0, scheduling_strategy=_driver_node_affinity(), max_concurrency=1000,
        ).remote(config, workers)
        try:
            infos = ray.get(self.coordinator.start.remote())
        except Exception as exc:
            ray.kill(self.coordinator)
            cause = getattr(exc, "cause", None) or exc
            raise BadInputError(f"measurement pool: {str(cause).strip().splitlines()[-1]}") from None
        self.client = PooledLatency(self.coordinator, config.measure, infos[0].device, infos[0].ort_version)
        self.name = self.client.name
        self.deterministic = False
        self._closed = False

    def _worker_count(self, resources: dict[str, float]) -> int:
        if self.config.uses_gpus:
            gpus = int(resources.get("GPU", 0))
            if gpus == 0:
                raise BadInputError("the Ray cluster has no GPU: measure on --device cpu")
            workers = self.config.workers or gpus
            if workers > gpus:
                raise BadInputError(f"--measure-workers {workers}: the Ray cluster has {gpus} GPU(s) and each "
                                    "measurement worker takes a whole one")
            return workers
        cpus = int(resources.get("CPU", 0))
        workers = self.config.workers or 1
        need = workers * self.config.measure.intra_op_threads
        if need > cpus:
            raise BadInputError(f"--measure-workers {workers}: needs {need} CPUs, the Ray cluster has {cpus}")
        return workers

    # ---- the service ----------------------------------------------------------------------------------------
    def latency(self, graph: Graph) -> Latency:
        return self.client.latency(graph)

    def latencies(self, graphs: Sequence[Graph]) -> list[Latency]:
        return self.client.latencies(graphs)

    def cache_key(self, graph: Graph) -> CacheKey:
        return self.client.cache_key(graph)

    # ---- inspection -----------------------------------------------------------------------------------------
    def workers(self) -> list[WorkerInfo]:
        import ray

        return ray.get(self.coordinator.describe.remote())

    def actor_handles(self) -> dict[int, Any]:
        import ray

        return ray.get(self.coordinator.handles.remote())

    def stats(self) -> PoolStats:
        import ray

        return ray.get(self.coordinator.get_stats.remote())

    def close(self) -> None:
        if self._closed:
            return
        import ray

        self._closed = True
        try:
            ray.get(self.coordinator.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.coordinator)

    def __enter__(self) -> "MeasurementPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "PoolConfig", "PoolStats", "WorkerInfo", "MeasurementPool", "PooledLatency", "MeasurementActor",
    "MeasurementCoordinator", "cache_key_for",
]
