"""Scale-out on Ray: a measurement pool (one long-lived actor per whole GPU) and a VecEnv of Ray actors.

Ray is optional (`pip install 'xrlflow[distributed]'`) and imported only inside this module's functions.

Connection: `RaySession(address)` with `local` (start Ray on this machine), `auto` (the cluster this machine
belongs to) or `HOST:PORT` (a cluster's GCS). The address is probed with a TCP connect before `ray.init`,
which otherwise retries an unreachable address for minutes; an unreachable one is a BadInputError.

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

Rollouts (`RayVecEnv`): an SB3 VecEnv whose sub-environments are Ray actors. Each step returns the next action
mask with the observation, so `env_method("action_masks")` (what MaskablePPO calls before every step) is
answered from the cached copy without a round trip. Auto-reset, seeds, options and infos follow DummyVecEnv,
so the same seed gives the same rollouts.

Multi-node clusters need xrlflow installed (same version) on every node; nothing is shipped in a runtime env.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import Latency
from xrlflow.latency_cache import CacheKey, format_shapes
from xrlflow.measure import MeasureConfig, input_specs
from xrlflow.measure_worker import InputSpec

RAY_MISSING = "Ray is not installed: pip install 'xrlflow[distributed]'"
RAY_ADDRESS_HELP = "use local, auto or HOST:PORT"
WORKER_FAILURE_PREFIX = "worker:"  # MeasuredLatency's reason prefix for a dead or hung worker process


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BadInputError(RAY_MISSING) from None
    return ray


# ---- connection ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayConfig:
    address: str = "local"  # local | auto | HOST:PORT
    connect_timeout_s: float = 10.0  # TCP probe of the address; ray.init itself retries for minutes
    # Only for `local` (a cluster that is joined brings its own resources):
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None  # bytes

    def __post_init__(self) -> None:
        if not self.address or not self.address.strip():
            raise BadInputError(f"--ray-address is empty: {RAY_ADDRESS_HELP}")
        if self.connect_timeout_s <= 0:
            raise BadInputError("the Ray connect timeout must be positive")


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"--ray-address {address!r}: {RAY_ADDRESS_HELP}")
    return host, int(port)


def _probe(address: str, timeout_s: float) -> None:
    host, port = _split_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BadInputError(f"--ray-address {address}: no Ray cluster reachable there ({reason})") from None


def resolve_address(config: RayConfig) -> str | None:
    """The GCS address to join (probed), or None for `local` (start a fresh instance)."""
    address = config.address.strip()
    if address == "local":
        return None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # Ray raises ConnectionError when it finds no running instance
            raise BadInputError(f"--ray-address auto: {str(exc).splitlines()[0]}") from None
        if not found:
            raise BadInputError("--ray-address auto: no running Ray cluster on this machine")
        _probe(found, config.connect_timeout_s)
        return found
    if "://" in address:
        raise BadInputError(f"--ray-address {address!r}: Ray client addresses are not supported; {RAY_ADDRESS_HELP}")
    _probe(address, config.connect_timeout_s)
    return address


class RaySession:
    """Connects this process to Ray; `close()` disconnects (and stops a `local` instance) only if this session
    connected it. A process already connected (a test's cluster, a caller's ray.init) is reused."""

    def __init__(self, config: RayConfig | str = RayConfig()) -> None:
        if isinstance(config, str):
            config = RayConfig(address=config)
        self.config = config
        ray = _import_ray()
        self.owned = False
        if ray.is_initialized():
            return
        address = resolve_address(config)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs.update(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                          object_store_memory=config.object_store_memory)
        else:
            kwargs.update(address=address)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise BadInputError(f"--ray-address {config.address}: {str(exc).splitlines()[0]}") from None
        self.owned = True

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        ray = _import_ray()
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


# ---- rollouts --------------------------------------------------------------------------------------------------
class EnvActor:
    """One sub-environment in a Ray actor; steps auto-reset like DummyVecEnv and carry the next action mask."""

    def __init__(self, env_fn: Callable[[], Any]) -> None:
        self.env = env_fn()
        try:
            self.mask_fn = self.env.get_wrapper_attr("action_masks")
        except AttributeError:
            self.mask_fn = None

    def spaces(self) -> tuple[Any, Any]:
        return self.env.observation_space, self.env.action_space

    def _mask(self) -> np.ndarray | None:
        return None if self.mask_fn is None else np.asarray(self.mask_fn())

    def reset(self, seed: int | None, options: dict[str, Any]) -> tuple[Any, dict[str, Any], np.ndarray | None]:
        obs, info = self.env.reset(seed=seed, **({"options": options} if options else {}))
        return obs, info, self._mask()

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict[str, Any] | None = None
        if done:
            info["terminal_observation"] = obs
            obs, reset_info = self.env.reset()
        return obs, float(reward), bool(done), info, reset_info, self._mask()

    def get_attr(self, name: str) -> Any:
        return self.env.get_wrapper_attr(name)

    def has_attr(self, name: str) -> bool:
        try:
            self.env.get_wrapper_attr(name)
            return True
        except AttributeError:
            return False

    def set_attr(self, name: str, value: Any) -> None:
        self.env.set_wrapper_attr(name, value)

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class: type) -> bool:
        from stable_baselines3.common.env_util import is_wrapped

        return is_wrapped(self.env, wrapper_class)

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


MASK_METHOD = "action_masks"


def _stack(observations: list[Any], space: Any) -> Any:
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {k: np.stack([o[k] for o in observations]) for k in space.spaces}
    if isinstance(space, spaces.Tuple):
        return tuple(np.stack([o[i] for o in observations]) for i in range(len(space.spaces)))
    return np.stack(observations)


@functools.lru_cache(maxsize=1)
def ray_vec_env_class() -> type:
    """The RayVecEnv class (built on first use: SB3 is imported lazily); one class per process."""
    from stable_baselines3.common.vec_env.base_vec_env import VecEnv

    class RayVecEnv(VecEnv):
        """An SB3 VecEnv whose sub-environments are Ray actors (see the module docstring)."""

        def __init__(self, env_fns: Sequence[Callable[[], Any]], num_cpus_per_env: float = 1.0) -> None:
            ray = _import_ray()
            if not ray.is_initialized():
                raise BadInputError("RayVecEnv needs a Ray connection (--ray-address)")
            if not env_fns:
                raise BadInputError("RayVecEnv needs at least one environment")
            remote = ray.remote(EnvActor).options(num_cpus=num_cpus_per_env)
            self.actors = [remote.remote(fn) for fn in env_fns]
            self.round_trips = 0  # batched remote calls (one per step); tests check masks add none
            observation_space, action_space = self._gather([self.actors[0].spaces.remote()])[0]
            self._masks: list[np.ndarray | None] = [None] * len(env_fns)
            self._pending: list[Any] | None = None
            self._closed = False
            super().__init__(len(env_fns), observation_space, action_space)

        def _gather(self, refs: list[Any]) -> list[Any]:
            import ray

            self.round_trips += 1
            return ray.get(refs)

        def _indices(self, indices: Any) -> list[int]:
            if indices is None:
                return list(range(self.num_envs))
            if isinstance(indices, int):
                return [indices]
            return list(indices)

        def reset(self):
            results = self._gather([a.reset.remote(self._seeds[i], self._options[i])
                                    for i, a in enumerate(self.actors)])
            observations = []
            for i, (obs, info, mask) in enumerate(results):
                observations.append(obs)
                self.reset_infos[i] = info
                self._masks[i] = mask
            self._reset_seeds()
            self._reset_options()
            return _stack(observations, self.observation_space)

        def step_async(self, actions: np.ndarray) -> None:
            self._pending = [a.step.remote(action) for a, action in zip(self.actors, actions)]

        def step_wait(self):
            assert self._pending is not None, "step_async first"
            results = self._gather(self._pending)
            self._pending = None
            observations, rewards, dones, infos = [], [], [], []
            for i, (obs, reward, done, info, reset_info, mask) in enumerate(results):
                observations.append(obs)
                rewards.append(reward)
                dones.append(done)
                infos.append(info)
                if reset_info is not None:
                    self.reset_infos[i] = reset_info
                self._masks[i] = mask
            return (_stack(observations, self.observation_space), np.asarray(rewards, dtype=np.float32),
                    np.asarray(dones, dtype=bool), infos)

        def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
            chosen = self._indices(indices)
            if method_name == MASK_METHOD and not method_args and not method_kwargs \
                    and all(self._masks[i] is not None for i in chosen):
                return [self._masks[i].copy() for i in chosen]  # type: ignore[union-attr]
            return self._gather([self.actors[i].call.remote(method_name, method_args, method_kwargs)
                                 for i in chosen])

        def get_attr(self, attr_name: str, indices=None) -> list[Any]:
            chosen = self._indices(indices)
            if attr_name == MASK_METHOD and all(self._masks[i] is not None for i in chosen):
                # A bound method cannot cross processes: hand out callables over the cached masks.
                return [_CachedMask(self._masks[i]) for i in chosen]
            return self._gather([self.actors[i].get_attr.remote(attr_name) for i in chosen])

        def has_attr(self, attr_name: str) -> bool:
            return all(self._gather([a.has_attr.remote(attr_name) for a in self.actors]))

        def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
            self._gather([self.actors[i].set_attr.remote(attr_name, value) for i in self._indices(indices)])

        def env_is_wrapped(self, wrapper_class: type, indices=None) -> list[bool]:
            return self._gather([self.actors[i].is_wrapped.remote(wrapper_class) for i in self._indices(indices)])

        def get_images(self) -> Sequence[np.ndarray | None]:
            if self.render_mode != "rgb_array":
                warnings.warn(f"render_mode is {self.render_mode!r}, not 'rgb_array': no images", UserWarning)
                return [None for _ in self.actors]
            return self._gather([a.render.remote() for a in self.actors])

        def close(self) -> None:
            if self._closed:
                return
            import ray

            self._closed = True
            try:
                ray.get([a.close.remote() for a in self.actors], timeout=30)
            except Exception:  # an actor that died has nothing left to close
                pass
            for actor in self.actors:
                ray.kill(actor)

    return RayVecEnv


class _CachedMask:
    """Stands in for a sub-env's bound `action_masks` method: returns the mask cached at the last step."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def __call__(self) -> np.ndarray:
        return self.mask.copy()


def make_ray_vec_env(env_fns: Sequence[Callable[[], Any]], num_cpus_per_env: float = 1.0):
    """A RayVecEnv over these factories (each runs in its own actor, reserving `num_cpus_per_env`)."""
    return ray_vec_env_class()(env_fns, num_cpus_per_env)


__all__ = [
    "RayConfig", "RaySession", "resolve_address", "PoolConfig", "PoolStats", "WorkerInfo", "MeasurementPool",
    "PooledLatency", "MeasurementActor", "MeasurementCoordinator", "EnvActor", "make_ray_vec_env", "ray_vec_env_class",
    "cache_key_for", "RAY_MISSING",
]
