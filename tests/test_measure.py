"""Measured latency: timing statistics, interleaved comparison, the SQLite cache, isolation of failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.rulecheck import ModelBuilder
from xrlflow.cli import main as cli_main
from xrlflow.latency import Latency, LatencyService
from xrlflow.latency_cache import CacheKey, LatencyCache
from xrlflow.measure import MeasureConfig, MeasuredLatency
from xrlflow import measure_worker
from xrlflow.measure_worker import SessionSettings, TimingPlan, median_ci, time_comparison
from xrlflow.onnx_io import load_graph, save_model

FAST = dict(warmup_runs=3, min_runs=20, max_runs=400, max_seconds=2.0)


def tiny_model(width: int = 64, seed: int = 0) -> onnx.ModelProto:
    b = ModelBuilder(seed=seed)
    x = b.input("x", [4, width])
    h = b.op("Relu", [b.op("MatMul", [x, b.const([width, width])])])
    b.output(b.op("MatMul", [h, b.const([width, width])]))
    return b.model()


def custom_op_model() -> onnx.ModelProto:
    """Valid ONNX that onnxruntime cannot load: an op from an unknown domain."""
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example.nothing")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.nothing", 1)])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "latency.sqlite"
    with MeasuredLatency(MeasureConfig.create(cache_path=str(path), **FAST)) as s:
        yield s


def test_median_ci_brackets_the_median_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small = rng.lognormal(0, 0.1, 50)
    large = rng.lognormal(0, 0.1, 5000)
    for x in (small, large):
        med, low, high = median_ci(x)
        assert low <= med <= high
    assert (median_ci(large)[2] - median_ci(large)[1]) < (median_ci(small)[2] - median_ci(small)[1])
    # coverage: the true median (1.0) falls inside the interval in roughly 95% of draws
    hits = sum(low <= 1.0 <= high for low, high in (median_ci(rng.lognormal(0, 0.1, 101))[1:] for _ in range(400)))
    assert 0.90 <= hits / 400 <= 0.99


def test_measures_a_tiny_model_with_a_sane_median_and_ci(service):
    assert isinstance(service, LatencyService)
    result = service.latency(load_graph(tiny_model()))
    assert result.ok and result.source == "measured", result.reason
    assert 0 < result.low_ms <= result.ms <= result.high_ms < 50
    assert 20 <= result.runs <= 400
    again = service.latency(load_graph(tiny_model()))
    assert again.source == "cache" and again.ms == result.ms


def test_interleaved_compare_of_a_graph_with_itself_is_near_one_and_finds_a_bigger_graph_slower(service):
    small, big = load_graph(tiny_model(32)), load_graph(tiny_model(384))
    same = service.compare(small, small)
    assert same.ok and same.low <= same.ratio <= same.high
    assert 0.8 < same.ratio < 1.25
    bigger = service.compare(small, big)
    assert bigger.ok and bigger.ratio > 2 and bigger.speedup < 0.5
    assert bigger.a.ms < bigger.b.ms


class OrderEffectMachine:
    """Fake sessions with the two order effects seen on real hardware, deterministic: a run right after the
    same session is 3% faster (warm caches), and each session created later runs 1% faster."""

    def __init__(self) -> None:
        self.created = 0
        self.last: object = None

    def session(self, model: bytes, specs, settings, seed) -> "FakeRunner":
        self.created += 1
        return FakeRunner(self, base_ms=float(len(model)) * 0.99 ** self.created)


class FakeRunner:
    def __init__(self, machine: OrderEffectMachine, base_ms: float) -> None:
        self.machine, self.base_ms = machine, base_ms

    def run(self) -> None:
        self.timed()

    def timed(self) -> float:
        ms = self.base_ms * (0.97 if self.machine.last is self else 1.0)
        self.machine.last = self
        return ms


def test_comparison_design_cancels_warm_repeat_and_creation_order_effects(monkeypatch):
    # Exact, so it cannot flake: with identical models every systematic order effect shows as ratio != 1.
    machine = OrderEffectMachine()
    monkeypatch.setattr(measure_worker, "SessionRunner", machine.session)
    plan = TimingPlan(warmup_runs=2, min_runs=10, max_runs=100, max_seconds=5.0, check_every=10)
    sa, sb = time_comparison((b"m" * 10, b"m" * 10), ((), ()), SessionSettings(), plan, seed=0)
    assert machine.created == 4 and len(sa) == len(sb) >= 10
    assert np.allclose(np.asarray(sb) / np.asarray(sa), 1.0, rtol=1e-12, atol=0)
    # a genuinely 2x larger B still reads as 2x
    sa, sb = time_comparison((b"m" * 10, b"m" * 20), ((), ()), SessionSettings(), plan, seed=0)
    assert np.allclose(np.asarray(sb) / np.asarray(sa), 2.0, rtol=1e-12, atol=0)


def test_a_a_compare_in_a_worker_that_ran_other_jobs_is_within_two_percent():
    # The condition that biased the two-phase design to 0.973-0.987: a long-lived worker whose heap other
    # graphs' sessions have used and freed. Median of 5 compares: one compare's ratio had sd 0.0065 (range
    # 0.984-1.022 over 60 repetitions in this condition), so the median's sd is about 0.004 and 0.02 is
    # five of them; a 2% bias puts the median at 0.98 and fails this about half the time, 2.7% nearly always.
    with MeasuredLatency(MeasureConfig.create(cache_path="", **FAST)) as service:
        for k, width in enumerate((32, 384, 48, 64, 256, 128, 512, 96)):
            assert service.latency(load_graph(tiny_model(width, seed=k + 1))).ok
        graph = load_graph(tiny_model(512))
        ratios = []
        for _ in range(5):
            same = service.compare(graph, graph)
            assert same.ok and same.low <= same.ratio <= same.high, same.reason
            ratios.append(same.ratio)
    assert abs(float(np.median(ratios)) - 1.0) < 0.02, ratios


def test_unrunnable_model_is_a_failed_measurement_and_the_worker_keeps_serving(service):
    result = service.latency(load_graph(custom_op_model()))
    assert not result.ok and result.ms == float("inf")
    assert "Mystery" in result.reason or "com.example.nothing" in result.reason
    assert service.latency(load_graph(tiny_model(48))).ok


def test_killed_worker_is_a_failed_measurement_then_a_fresh_worker_measures(tmp_path):
    config = MeasureConfig.create(cache_path="", warmup_runs=1, min_runs=100000, max_runs=100000, max_seconds=60)
    with MeasuredLatency(config) as service:
        graph = load_graph(tiny_model(256))
        killer = threading.Thread(target=_kill_worker_when_up, args=(service,))
        killer.start()
        result = service.latency(graph)
        killer.join()
        assert not result.ok and "SIGKILL" in result.reason
    with MeasuredLatency(MeasureConfig.create(cache_path="", timeout_s=0.5, warmup_runs=1, min_runs=100000,
                                       max_runs=100000, max_seconds=60)) as service:
        hung = service.latency(load_graph(tiny_model(256)))
        assert not hung.ok and "timed out" in hung.reason
        assert service.worker.pid is None  # killed, not left running
        service.config = MeasureConfig.create(cache_path="", timeout_s=30, **FAST)
        assert service.latency(load_graph(tiny_model(256))).ok


def _kill_worker_when_up(service: MeasuredLatency) -> None:
    deadline = time.time() + 20
    while time.time() < deadline:
        pid = service.worker.pid
        if pid is not None:
            time.sleep(1.0)  # inside the timing loop by now
            os.kill(pid, 9)
            return
        time.sleep(0.02)


def test_cache_round_trip_and_failures_keep_their_reason(tmp_path):
    key = CacheKey("abc", "x=1x2", "CPUExecutionProvider/t1", "cpu", "1.0", "ORT_ENABLE_ALL")
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        assert cache.get(key) is None
        cache.put(key, Latency(1.5, 1.4, 1.6, 30, "measured"))
        failed_key = CacheKey("def", "", "p", "cpu", "1.0", "ORT_ENABLE_ALL")
        cache.put(failed_key, Latency.failed("cannot load"))
    with LatencyCache(tmp_path / "c.sqlite") as fresh:  # from disk, not the in-process dict
        hit = fresh.get(key)
        assert (hit.ms, hit.low_ms, hit.high_ms, hit.runs, hit.source) == (1.5, 1.4, 1.6, 30, "cache")
        failed = fresh.get(failed_key)
        assert not failed.ok and failed.reason == "cannot load" and failed.ms == float("inf")
        assert fresh.get(CacheKey("abc", "x=1x2", "CPUExecutionProvider/t1", "cpu", "1.0", "ORT_DISABLE_ALL")) is None
        assert fresh.stats()["measurements"] == 2
        assert fresh.clear() == 2 and fresh.get(key) is None


_WRITER = """
import sys
from xrlflow.latency import Latency
from xrlflow.latency_cache import CacheKey, LatencyCache
cache = LatencyCache(sys.argv[1])
for i in range(200):
    cache.put(CacheKey(f"{sys.argv[2]}{i}", "", "p", "d", "v", "o"), Latency(float(i), i, i, 1, "measured"))
    cache.get(CacheKey(f"{sys.argv[3]}{i}", "", "p", "d", "v", "o"))
"""


def test_two_processes_share_the_cache_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, path, tag, other])
        for tag, other in (("a", "b"), ("b", "a"))
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    with LatencyCache(path) as cache:
        assert cache.stats()["measurements"] == 400
        assert cache.get(CacheKey("b199", "", "p", "d", "v", "o")).ms == 199.0


def test_cli_measure_json_and_failure_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XRLFLOW_CACHE_DIR", str(tmp_path))
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    save_model(tiny_model(), good)
    save_model(custom_op_model(), bad)
    assert cli_main(["measure", str(good), "--json", "--max-seconds", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["median_ms"] > 0 and report["runs"] >= 1
    assert cli_main(["measure", str(bad)]) == 2
    assert "measurement failed" in capsys.readouterr().err
    assert cli_main(["cache", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["measurements"] == 2
    assert cli_main(["measure", str(tmp_path / "missing.onnx")]) == 2
    # several sessions: each one's median in the report; an impossible one is a one-line error
    assert cli_main(["measure", str(good), "--json", "--no-cache", "--sessions", "2", "--max-seconds", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["session_medians_ms"]) == 2
    assert cli_main(["measure", str(good), "--sessions", "0"]) == 2
    assert "sessions must be >= 1" in capsys.readouterr().err


def test_cuda_without_the_provider_is_bad_input():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    from xrlflow.errors import BadInputError

    with pytest.raises(BadInputError, match="no CUDA execution provider") as caught:
        MeasuredLatency(MeasureConfig.create(device="cuda", cache_path=""))
    from xrlflow.runtime import cuda_install_hint

    assert str(caught.value).endswith(cuda_install_hint())  # the fix for the builds installed here


def test_several_sessions_are_timed_round_robin_and_the_latency_is_the_median_of_their_medians(monkeypatch):
    # A fake machine where the third session created is 30% slower (an unlucky placement): the median of
    # the three session medians ignores it, where one session would have been that draw.
    created: list[float] = []

    class Session:
        def __init__(self, *args, **kwargs):
            self.ms = 1.3 if len(created) == 2 else 1.0 + 0.01 * len(created)
            created.append(self.ms)

        def run(self):
            pass

        def timed(self):
            return self.ms

    monkeypatch.setattr(measure_worker, "SessionRunner", Session)
    plan = TimingPlan(warmup_runs=1, min_runs=10, max_runs=600, max_seconds=5.0, check_every=5, sessions=3)
    job = measure_worker.TimingJob((b"m",), ((),), SessionSettings(), plan)
    result = measure_worker.run_job(job)
    assert created == [1.0, 1.01, 1.3]
    assert result.session_medians_ms == (1.0, 1.01, 1.3)
    samples = result.samples_ms[0]
    assert len(samples) % 3 == 0 and len(samples) >= 30 and samples[:6] == (1.0, 1.01, 1.3) * 2  # round-robin


def test_measured_latency_with_three_sessions_reports_them_and_a_pinned_worker(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    config = MeasureConfig.create(cache_path="", sessions=3, pin_cpu=cpu, **FAST)
    with MeasuredLatency(config) as service:
        result = service.latency(load_graph(tiny_model()))
        assert result.ok and len(result.session_ms) == 3
        assert result.ms == pytest.approx(float(np.median(result.session_ms)))
        assert result.low_ms <= result.ms <= result.high_ms
        assert os.sched_getaffinity(service.worker.pid) == {cpu}


def test_measure_settings_that_change_what_is_timed_are_in_the_cache_key():
    assert MeasureConfig().provider == "CPUExecutionProvider/t1"
    assert MeasureConfig.create(sessions=3).provider == MeasureConfig().provider  # precision, not a different quantity
    # (the CUDA flavours are only named here; building a CUDA service needs onnxruntime-gpu)
    assert MeasureConfig.create(device="cuda").provider == "CUDAExecutionProvider/iobinding/cudagraph"
    assert MeasureConfig.create(device="cuda", cuda_graph=False).provider == "CUDAExecutionProvider/iobinding"
    assert (MeasureConfig.create(device="cuda", cudnn_conv_algo_search="HEURISTIC").provider
            == "CUDAExecutionProvider/iobinding/cudnn-heuristic/cudagraph")
    assert MeasureConfig.create(device="cuda").session.cuda_graph and not MeasureConfig().session.cuda_graph


@pytest.mark.parametrize("settings, message", [
    (dict(sessions=0), "sessions must be >= 1"),
    (dict(cudnn_conv_algo_search="FASTEST"), "unknown cuDNN algorithm search"),
    (dict(pin_cpu=10**6), "cannot pin the measurement worker"),
])
def test_bad_measurement_settings_are_one_line_errors(settings, message):
    from xrlflow.errors import BadInputError

    with pytest.raises(BadInputError, match=message):
        MeasureConfig.create(**settings)


def test_a_model_cuda_graphs_cannot_capture_is_a_failure_that_says_what_to_do(monkeypatch):
    class Pipe:
        def __init__(self, job):
            self.inbox, self.sent = [job, None], []

        def recv(self):
            return self.inbox.pop(0)

        def send(self, message):
            self.sent.append(message)

    def refuse(job):
        raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user as all "
                           "compute graph nodes have not been partitioned to the CUDA EP.")

    monkeypatch.setattr(measure_worker, "run_job", refuse)
    monkeypatch.setattr("onnxruntime.set_default_logger_severity", lambda level: None)
    for cuda_graph, expected in ((True, measure_worker.CUDA_GRAPH_IMPOSSIBLE), (False, "This session cannot")):
        job = measure_worker.TimingJob((b"m",), ((),), SessionSettings(device="cuda", cuda_graph=cuda_graph), TimingPlan())
        pipe = Pipe(job)
        measure_worker.worker_main(pipe, None)
        status, line = pipe.sent[0]
        assert status == "error" and line.startswith(expected) and "\n" not in line


def test_the_optimizer_times_plain_cuda_runs_when_capture_is_impossible():
    from xrlflow.optimizer import plain_cuda_if_uncapturable

    class Service:
        def __init__(self, reason=""):
            self.reason, self.closed = reason, False

        def latency(self, graph):
            return Latency.failed(self.reason) if self.reason else Latency(1.0, 1.0, 1.0, 10, "measured")

        def close(self):
            self.closed = True

    plain = Service()
    graph = load_graph(tiny_model())
    refusing = Service(f"{measure_worker.CUDA_GRAPH_IMPOSSIBLE} (...): measure it with cuda_graph=False")
    service, note = plain_cuda_if_uncapturable(refusing, graph, lambda: plain)
    assert service is plain and refusing.closed and "plain CUDA runs" in note
    for kept in (Service(), Service("onnxruntime cannot load the model")):  # capture worked, or another failure
        service, note = plain_cuda_if_uncapturable(kept, graph, lambda: plain)
        assert service is kept and note is None and not kept.closed


def test_the_deployment_setting_of_onnxruntimes_default_threads_is_its_own_cache_entry_and_says_so():
    default = MeasureConfig.create(intra_op_threads=0)
    assert default.provider == "CPUExecutionProvider/tdefault" != MeasureConfig().provider
    assert default.setting == "cpu, onnxruntime's default threads"
    assert MeasureConfig().setting == "cpu, 1 intra-op thread"
    assert MeasureConfig.create(device="cuda", cuda_graph=False).setting == "cuda, plain runs (no CUDA graph)"
    from xrlflow.errors import BadInputError

    with pytest.raises(BadInputError, match="threads >= 0"):
        MeasureConfig.create(intra_op_threads=-1)


def test_compare_models_of_the_same_file_at_default_threads_is_near_one():
    """A/A of two serialised models in the deployment setting (uncached): the repeated A/B of optimize.

    The model is big enough (~80 us on a 2-core VM) that microsecond thread wake-ups do not dominate: at
    ~8 us a CI machine once read an A/A as 1.13x. A second A/A round is allowed, because one round is a
    statistical sample on a shared machine; a harness that is biased fails both."""
    from xrlflow.guarantee import repeated_ab
    from xrlflow.measure import input_specs

    model = tiny_model(width=512)
    data, specs = model.SerializeToString(), input_specs(load_graph(model))
    with MeasuredLatency(MeasureConfig.create(intra_op_threads=0, cache_path="", **FAST)) as service:
        rounds = []
        for _ in range(2):
            rounds.append(repeated_ab(lambda swapped: service.compare_models(data, specs, data, specs), 4))
            if 0.9 < rounds[-1].speedup < 1.1:
                break
        bigger = tiny_model(width=1024)
        big_data, big_specs = bigger.SerializeToString(), input_specs(load_graph(bigger))
        pair = lambda swapped: (big_data, big_specs, data, specs) if swapped else (data, specs, big_data, big_specs)  # noqa: E731
        slower = repeated_ab(lambda swapped: service.compare_models(*pair(swapped)), 4)
    ab = rounds[-1]
    assert all(r.ok and len(r.compares) == 4 and r.low < r.high for r in rounds)
    assert 0.9 < ab.speedup < 1.1, [r.speedup for r in rounds]
    assert slower.ok and slower.speedup < 0.8 and not slower.faster
