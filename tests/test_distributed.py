"""Ray scale-out: the measurement pool (devices, dedup, retry after a killed actor, failure cap), the Ray VecEnv
(same rollouts as DummyVecEnv), the CLI wiring, bad addresses and a clean shutdown.

Ray binds the host's routable address even when asked for 127.0.0.1, so every Ray test runs inside a
loopback-only network namespace (`unshare -n`, as root), where Ray falls back to 127.0.0.1: outside it, each
Ray test reports the result of one inner pytest run of this file in the namespace (one cluster for all).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from tests.test_env import inception_pair, projections
from xrlflow.errors import BadInputError
from xrlflow.measure import MeasureConfig

IN_NAMESPACE = os.environ.get("XRLFLOW_TEST_NETNS") == "1"
MB = 1 << 20
QUICK_PLAN = dict(warmup_runs=2, min_runs=5, max_runs=20, max_seconds=0.3)


def _graphs():
    return [inception_pair(), projections(1), projections(2), projections(3), projections(4)]


def _namespace_unavailable() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install '.[distributed]')"
    if os.geteuid() != 0:
        return "Ray tests need a loopback-only network namespace: run as root (unshare -n)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "Ray tests need `unshare` and `ip` for a loopback-only network namespace"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a loopback-only network namespace: {probe.stderr.strip() or probe.returncode}"
    return None


# ---- outside the namespace: run the Ray tests once inside it, report each -------------------------------------
class NamespaceReport:
    def __init__(self, outcomes: dict[str, tuple[str, str]], output: str) -> None:
        self.outcomes = outcomes
        self.output = output

    def check(self, name: str) -> None:
        outcome, message = self.outcomes.get(name, ("missing", ""))
        if outcome == "passed":
            return
        if outcome == "skipped":
            pytest.skip(message)
        pytest.fail(f"{name} {outcome} in the network namespace: {message}\n--- inner output ---\n{self.output[-6000:]}")


@pytest.fixture(scope="module")
def namespace_report(tmp_path_factory) -> NamespaceReport:
    reason = _namespace_unavailable()
    if reason:
        pytest.skip(reason)
    report = tmp_path_factory.mktemp("netns") / "report.xml"
    script = 'ip link set lo up && exec "$0" -m pytest "$1" -q -p no:cacheprovider -p no:randomly --junitxml="$2"'
    env = dict(os.environ, XRLFLOW_TEST_NETNS="1", RAY_AUTH_MODE="disabled")
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script, sys.executable, __file__, str(report)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).parent.parent)
    output = proc.stdout + proc.stderr
    if not report.is_file():
        pytest.fail(f"the namespaced Ray tests wrote no report (exit {proc.returncode}):\n{output[-6000:]}")
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = "skipped" if tag == "skipped" else tag
                message = (element.get("message") or "") + "\n" + (element.text or "")
                break
        name = case.get("name", "")
        if outcome != "passed" or name not in outcomes:  # a teardown error overrides the call's pass
            outcomes[name] = (outcome, message)
    return NamespaceReport(outcomes, output)


def _reported(name: str):
    def test(namespace_report: NamespaceReport) -> None:
        namespace_report.check(name)

    test.__name__ = name
    return test


# ---- inside the namespace: one small two-node cluster for the module ------------------------------------------
class ClusterHolder:
    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        from xrlflow.ray_session import RaySession

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 3, "num_gpus": 0, "object_store_memory": 100 * MB})
        # Fake GPUs: Ray only counts them, so the pool's placement and CUDA_VISIBLE_DEVICES can be checked here.
        self.gpu_nodes = [self.cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=100 * MB),
                          self.cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * MB)]
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address
        self.session = RaySession(self.address)
        self.down = False

    def shutdown(self) -> None:
        if not self.down:
            self.down = True
            self.session.close()
            self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    holder = ClusterHolder()
    yield holder
    holder.shutdown()


def _quick_pool_config(tmp_path: Path, **overrides) -> "PoolConfig":  # noqa: F821
    from xrlflow.measure_pool import PoolConfig

    measure = MeasureConfig.create(cache_path=str(tmp_path / "latency.sqlite"), **QUICK_PLAN)
    return PoolConfig(measure=measure, **overrides)


def _cache_rows(path: Path) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT graph_hash, ok, reason FROM latency ORDER BY graph_hash").fetchall()


def ray_pool_gives_each_worker_its_own_gpu_and_dedups(cluster, tmp_path):
    import ray

    from xrlflow.measure_pool import MeasurementPool
    from xrlflow.measure import MeasuredLatency

    with pytest.raises(BadInputError, match="3 GPU"):
        MeasurementPool(_quick_pool_config(tmp_path, workers=4, gpu_per_worker=True))
    config = _quick_pool_config(tmp_path, gpu_per_worker=True)  # workers=None: one per GPU
    with MeasurementPool(config) as pool:
        workers = pool.workers()
        assert len(workers) == 3
        devices = {(w.node_id, w.gpu_ids) for w in workers}
        assert len(devices) == 3 and all(len(w.gpu_ids) == 1 for w in workers), workers
        assert all(w.cuda_visible_devices == w.gpu_ids[0] for w in workers), workers
        gpu_node_ids = {n.node_id for n in cluster.gpu_nodes}
        per_node = sorted(sum(w.node_id == n for w in workers) for n in gpu_node_ids)
        assert per_node == [1, 2], "two actors on the 2-GPU node, one on the other"
        assert ray.available_resources().get("GPU", 0) == 0, "each actor holds a whole GPU"

        graphs = _graphs()
        batch = graphs + [graphs[1], graphs[3]]  # duplicates are measured once
        results = pool.latencies(batch)
        assert all(r.ok and r.runs >= 5 for r in results), results
        assert [r.source for r in results] == ["measured"] * len(graphs) + ["cache", "cache"]
        assert results[-2].ms == results[1].ms and results[-1].ms == results[3].ms
        stats = pool.stats()
        assert stats.measured == stats.dispatched == len(graphs)
        with MeasuredLatency(dataclasses.replace(config.measure, cache_path="")) as local:
            assert [pool.cache_key(g) for g in graphs] == [local.cache_key(g) for g in graphs], \
                "the pool and the local path share cache entries"
        assert len(_cache_rows(tmp_path / "latency.sqlite")) == len(graphs)
        again = pool.latencies(graphs)
        assert [r.source for r in again] == ["cache"] * len(graphs)
        assert pool.stats().dispatched == len(graphs)
    deadline = time.time() + 30
    while ray.available_resources().get("GPU", 0) < 3 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 3, "closing the pool frees the GPUs"
    # A fresh pool (a new client) finds everything in the driver's SQLite cache: nothing is dispatched.
    with MeasurementPool(_quick_pool_config(tmp_path, workers=1)) as pool:
        assert [r.source for r in pool.latencies(graphs)] == ["cache"] * len(graphs)
        assert pool.stats().dispatched == 0 and pool.stats().cache_hits == len(graphs)


def ray_killed_measurement_actor_is_replaced_and_graph_resubmitted(cluster, tmp_path):
    import ray

    from xrlflow.measure_pool import MeasurementPool

    # Each measurement runs its full 1.5 s, so the kill lands while graphs are in flight.
    config = _quick_pool_config(tmp_path, workers=2, gpu_per_worker=True)
    config = dataclasses.replace(config, measure=dataclasses.replace(config.measure, plan=dataclasses.replace(
        config.measure.plan, min_runs=10**6, max_runs=10**6, max_seconds=1.5)))
    graphs = _graphs()
    with MeasurementPool(config) as pool:
        before = {w.actor_id for w in pool.workers()}
        outcome: dict[str, object] = {}
        runner = threading.Thread(target=lambda: outcome.update(results=pool.latencies(graphs)))
        runner.start()
        deadline = time.time() + 60
        while pool.stats().dispatched < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert pool.stats().in_flight > 0
        ray.kill(pool.actor_handles()[0])
        runner.join(120)
        assert not runner.is_alive()
        results = outcome["results"]
        assert all(r.ok for r in results), results  # type: ignore[union-attr]
        stats = pool.stats()
        assert stats.actor_restarts == 1 and stats.measured == len(graphs) and stats.dispatched == len(graphs) + 1
        after = pool.workers()
        assert len(after) == 2 and len({w.actor_id for w in after} - before) == 1
    rows = _cache_rows(tmp_path / "latency.sqlite")
    assert len(rows) == len(graphs) and all(ok for _, ok, _ in rows), "no cache entry is lost"


def ray_graph_that_keeps_failing_workers_is_recorded_as_failed(cluster, tmp_path):
    from xrlflow.measure_pool import MeasurementPool

    # 50 ms is less than the worker process needs to import onnxruntime: every attempt hangs and is killed.
    config = _quick_pool_config(tmp_path, workers=1, max_attempts=2)
    config = dataclasses.replace(config, measure=dataclasses.replace(config.measure, timeout_s=0.05))
    graph = inception_pair()
    with MeasurementPool(config) as pool:
        first = pool.latency(graph)
        assert not first.ok and "failed on 2 measurement workers" in first.reason and "timed out" in first.reason
        assert pool.stats().dispatched == 2 and pool.stats().failed_after_retries == 1
    with MeasurementPool(config) as pool:  # a fresh client: the failure comes from the cache, no new attempt
        again = pool.latency(graph)
        assert not again.ok and again.source == "cache" and pool.stats().dispatched == 0
    assert [ok for _, ok, _ in _cache_rows(tmp_path / "latency.sqlite")] == [0]


def _ppo_rollouts(vec_env, seed: int = 3):
    import torch
    from sb3_contrib import MaskablePPO

    from xrlflow.agents import CandidateGNNPolicy

    torch.set_num_threads(1)
    model = MaskablePPO(CandidateGNNPolicy, vec_env, n_steps=8, batch_size=16, n_epochs=1, seed=seed,
                        policy_kwargs={"policy_config": {"hidden": 16, "layers": 2}}, verbose=0, device="cpu")
    buffers = []

    from stable_baselines3.common.callbacks import BaseCallback

    class KeepRollouts(BaseCallback):
        def _on_rollout_end(self) -> None:
            buf = self.model.rollout_buffer
            buffers.append((buf.actions.copy(), buf.rewards.copy(), buf.episode_starts.copy()))

        def _on_step(self) -> bool:
            return True

    model.learn(3 * 8 * vec_env.num_envs, callback=KeepRollouts())
    episodes = [(e["r"], e["l"], e["model"]) for e in model.ep_info_buffer]
    vec_env.close()
    return buffers, episodes


def ray_vecenv_training_matches_dummy_vecenv(cluster):
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from xrlflow.costmodel import CostModel
    from xrlflow.agents.ray_vec_env import make_ray_vec_env
    from xrlflow.envs import EnvConfig, GraphRewriteEnv

    graphs = {"pair": inception_pair(), "proj": projections(3)}
    config = EnvConfig(max_nodes=64, max_edges=128, max_candidates=16, max_steps=3)

    def factory():
        return Monitor(GraphRewriteEnv(graphs, CostModel("cpu"), config), info_keywords=("model",))

    local_buffers, local_episodes = _ppo_rollouts(DummyVecEnv([factory, factory]))
    ray_env = make_ray_vec_env([factory, factory])
    ray_buffers, ray_episodes = _ppo_rollouts(ray_env)
    assert len(local_buffers) == len(ray_buffers) == 3
    for (a_local, r_local, s_local), (a_ray, r_ray, s_ray) in zip(local_buffers, ray_buffers):
        np.testing.assert_array_equal(a_local, a_ray)
        np.testing.assert_array_equal(r_local, r_ray)
        np.testing.assert_array_equal(s_local, s_ray)
    assert local_episodes and local_episodes == ray_episodes
    assert np.abs(np.concatenate([r for _, r, _ in ray_buffers])).sum() > 0, "the rewards are not all zero"
    # One batched round trip per step (plus spaces, render_mode, has_attr and reset): masks cost none.
    assert ray_env.round_trips <= 3 * 8 + 6, ray_env.round_trips


def ray_train_cli_with_measured_rewards_on_the_pool(cluster, tmp_path):
    from xrlflow.measure_pool import MeasurementPool
    from xrlflow.train import EnvConfig, PolicyConfig, TrainConfig, train

    pool_config = _quick_pool_config(tmp_path, workers=2)
    cfg = TrainConfig(models=("pair",), steps=32, num_envs=2, n_steps=8, batch_size=16, n_epochs=1,
                      policy=PolicyConfig(hidden=16, layers=2), env=EnvConfig(max_steps=3, max_candidates=8), checkpoint_every=32, run_name="ray",
                      runs_dir=str(tmp_path / "runs"), checkpoints_dir=str(tmp_path / "ck"), progress=False,
                      ray_address=cluster.address)
    with MeasurementPool(pool_config) as pool:
        meta = train(cfg, graphs=[("pair", inception_pair())], latency=pool.client)
        measured = pool.stats().measured
    assert meta["num_timesteps"] >= 32 and meta["latency_service"].startswith("measured:cpu")
    rows = _cache_rows(tmp_path / "latency.sqlite")
    assert measured >= 2 and len(rows) == measured, "env actors measured rewritten graphs through the pool"


def ray_measure_cli_measures_files_in_parallel(cluster, tmp_path):
    from xrlflow.onnx_io import save_model, to_model

    paths = []
    for i, graph in enumerate(_graphs()[:3]):
        path = tmp_path / f"m{i}.onnx"
        save_model(to_model(graph), path)
        paths.append(str(path))
    env = dict(os.environ, XRLFLOW_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "xrlflow.cli", "measure", *paths, "--workers", "2", "--ray-address",
           cluster.address, "--max-seconds", "0.3", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    assert [r["model"] for r in reports] == paths and all(r["ok"] and r["source"] == "measured" for r in reports)
    assert len(_cache_rows(tmp_path / "cache" / "latency.sqlite")) == 3


def _processes_in_my_network_namespace() -> list[str]:
    mine = os.readlink("/proc/self/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "ns/net") != mine:
                continue
            status = (entry / "status").read_text()
            if "\nState:\tZ" in status:
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command[:120]}")
        except OSError:
            continue
    return found


def ray_shutdown_leaves_nothing_running(cluster):
    assert any("raylet" in p or "gcs_server" in p for p in _processes_in_my_network_namespace())
    cluster.shutdown()
    deadline = time.time() + 30
    left = _processes_in_my_network_namespace()
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _processes_in_my_network_namespace()
    assert not left, f"still running after shutdown: {left}"


RAY_TESTS = {
    "test_pool_gives_each_worker_its_own_gpu_and_dedups": ray_pool_gives_each_worker_its_own_gpu_and_dedups,
    "test_killed_measurement_actor_is_replaced_and_graph_resubmitted":
        ray_killed_measurement_actor_is_replaced_and_graph_resubmitted,
    "test_graph_that_keeps_failing_workers_is_recorded_as_failed":
        ray_graph_that_keeps_failing_workers_is_recorded_as_failed,
    "test_ray_vecenv_training_matches_dummy_vecenv": ray_vecenv_training_matches_dummy_vecenv,
    "test_train_with_measured_rewards_on_the_pool": ray_train_cli_with_measured_rewards_on_the_pool,
    "test_measure_cli_measures_files_in_parallel": ray_measure_cli_measures_files_in_parallel,
    "test_shutdown_leaves_nothing_running": ray_shutdown_leaves_nothing_running,  # last: it stops the cluster
}
for _name, _body in RAY_TESTS.items():
    globals()[_name] = _body if IN_NAMESPACE else _reported(_name)


# ---- no Ray instance needed ----------------------------------------------------------------------------------
def test_unreachable_address_is_bad_input_within_30_seconds(tmp_path):
    pytest.importorskip("ray")
    start = time.time()
    for argv in (["measure", "m.onnx", "--ray-address", "127.0.0.1:1", "--workers", "2"],
                 ["train", "--models", "squeezenet", "--ray-address", "127.0.0.1:1"]):
        model = tmp_path / "m.onnx"
        from xrlflow.onnx_io import save_model, to_model

        save_model(to_model(inception_pair()), model)
        argv = [str(model) if a == "m.onnx" else a for a in argv]
        proc = subprocess.run([sys.executable, "-m", "xrlflow.cli", *argv], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "127.0.0.1:1" in proc.stderr and "no Ray cluster" in proc.stderr
    assert time.time() - start < 60


def test_bad_addresses_and_flags_are_one_line_errors():
    from xrlflow.ray_session import RayConfig, resolve_address
    from xrlflow.train import TrainConfig

    pytest.importorskip("ray")
    for address in ("nonsense", "host:notaport", "ray://head:10001", "host:70000"):
        with pytest.raises(BadInputError, match="--ray-address"):
            resolve_address(RayConfig(address=address))
    with pytest.raises(BadInputError, match="empty"):
        RayConfig(address=" ")
    assert resolve_address(RayConfig(address="local")) is None
    with pytest.raises(BadInputError, match="--measure-workers needs --ray-address"):
        TrainConfig(models=("x",), measure_workers=2)
