"""Search baselines over the rule engine with the cost model: they improve where a rewrite pays and never
return a graph slower than their input."""

from __future__ import annotations

import math

import pytest

from tests.rulecheck import ModelBuilder
from xrlflow.costmodel import CostModel
from xrlflow.engine import RewriteEngine
from xrlflow.errors import BadInputError
from xrlflow.latency import Latency
from xrlflow.onnx_io import load_graph
from xrlflow.rules import RULES, default_engine
from xrlflow.search import SEARCH_METHODS, SearchConfig, run_search

CONFIG = SearchConfig(steps=8, rollouts=4, budget=12, seed=3)


def attention_like_model(layers: int = 2, width: int = 32, seed: int = 0):
    """Per layer: Q/K/V projections of one input (mergeable), scores, softmax, a residual."""
    b = ModelBuilder(seed)
    h = b.input("x", [8, width])
    for _ in range(layers):
        q, k, v = (b.op("Add", [b.op("MatMul", [h, b.const((width, width))]), b.const((width,))]) for _ in range(3))
        scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[1, 0])])
        h = b.op("Add", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v]), h])
    b.output(h)
    return b.model()


def chain_model():
    """Nothing to merge: a chain of MatMul + Relu."""
    b = ModelBuilder(1)
    h = b.input("x", [4, 16])
    for _ in range(3):
        h = b.op("Relu", [b.op("MatMul", [h, b.const((16, 16))])])
    b.output(h)
    return b.model()


@pytest.fixture(scope="module")
def cost_model():
    return CostModel()


@pytest.mark.parametrize("method", SEARCH_METHODS)
def test_search_finds_the_merge_improvement(method, cost_model):
    graph = load_graph(attention_like_model())
    engine = default_engine()
    result = run_search(method, graph, engine, cost_model, CONFIG)
    assert result.initial_latency.ms == cost_model.latency(graph).ms
    assert result.best_latency.ms < result.initial_latency.ms
    assert result.applied, "an improvement was reported without a rewrite"
    # the path replays to the graph the search returned, whose latency is the one reported
    replayed = engine.apply_sequence(graph, result.applied)
    assert replayed.structural_hash() == result.best.structural_hash()
    assert cost_model.latency(replayed).ms == pytest.approx(result.best_latency.ms)
    assert result.best.op_counts().get("MatMul", 0) < graph.op_counts()["MatMul"]
    assert result.decision_seconds >= 0 and result.latency_seconds >= 0 and result.latency_calls >= 2
    assert all(r.best_ms <= result.initial_latency.ms for r in result.history)


@pytest.mark.parametrize("method", SEARCH_METHODS)
def test_search_never_returns_a_slower_graph(method, cost_model):
    for model in (chain_model(), attention_like_model(layers=1, width=8, seed=4)):
        graph = load_graph(model)
        result = run_search(method, graph, default_engine(), cost_model, CONFIG)
        assert result.best_latency.ms <= result.initial_latency.ms
        if not result.applied:
            assert result.best is graph


class PenaliseRule:
    """A latency service under which every rewrite of one rule is a slowdown (and everything else neutral)."""

    name = "test:penalise"
    deterministic = True

    def __init__(self, rule: str) -> None:
        self.rule = rule

    def latency(self, graph) -> Latency:
        ms = 1.0 + sum(1 for n in graph.nodes.values() if n.origin == self.rule)
        return Latency(ms, ms, ms, 1, "cost-model")


@pytest.mark.parametrize("method", SEARCH_METHODS)
def test_search_keeps_the_input_when_every_rewrite_is_slower(method):
    graph = load_graph(attention_like_model())
    service = PenaliseRule("merge-parallel-matmul")
    engine = RewriteEngine([r for r in RULES if r.name == "merge-parallel-matmul"])
    result = run_search(method, graph, engine, service, CONFIG)
    assert result.applied == []
    assert result.best is graph and result.best_latency.ms == 1.0


class DelayedReward:
    """Merging Q/K/V costs a little; splitting the merge back out of a merged layer pays a lot. Greedy never
    merges; a search that tolerates a temporary loss (backtracking with alpha) finds the payoff."""

    name = "test:delayed"
    deterministic = True

    def latency(self, graph) -> Latency:
        merged = sum(1 for n in graph.nodes.values() if n.origin == "merge-parallel-matmul" and n.op_type == "MatMul")
        split_back = sum(1 for n in graph.nodes.values() if n.origin == "split-merged-matmul" and n.op_type == "MatMul")
        ms = 10.0 + 0.2 * merged - 1.0 * split_back
        return Latency(ms, ms, ms, 1, "cost-model")


def test_backtracking_tolerates_a_temporary_loss_greedy_does_not():
    graph = load_graph(attention_like_model(layers=1))
    engine = RewriteEngine([r for r in RULES if r.name in ("merge-parallel-matmul", "split-merged-matmul")])
    greedy = run_search("greedy", graph, engine, DelayedReward(), CONFIG)
    backtrack = run_search("backtrack", graph, engine, DelayedReward(), SearchConfig(steps=4, budget=10, alpha=1.05))
    assert greedy.applied == []
    assert [m.rule for m in backtrack.applied] == ["merge-parallel-matmul", "split-merged-matmul"]
    assert backtrack.best_latency.ms < greedy.best_latency.ms


def test_random_search_is_reproducible_by_seed(cost_model):
    graph = load_graph(attention_like_model())
    a = run_search("random", graph, default_engine(), cost_model, CONFIG)
    b = run_search("random", graph, default_engine(), cost_model, CONFIG)
    assert [(m.rule, m.nodes) for m in a.applied] == [(m.rule, m.nodes) for m in b.applied]
    assert len(a.history) == len(b.history) and all(math.isfinite(r.current_ms) for r in a.history)


class CountingService:
    """Wraps a service and records which graphs it was asked about."""

    name = "test:counting"
    deterministic = True

    def __init__(self, inner) -> None:
        self.inner = inner
        self.asked: list[str] = []

    def latency(self, graph) -> Latency:
        self.asked.append(graph.structural_hash())
        return self.inner.latency(graph)


@pytest.mark.parametrize("method", SEARCH_METHODS)
def test_each_distinct_graph_is_costed_once(method, cost_model):
    graph = load_graph(attention_like_model())
    service = CountingService(cost_model)
    result = run_search(method, graph, default_engine(), service, SearchConfig(steps=6, budget=30, rollouts=4))
    assert len(service.asked) == len(set(service.asked)) == result.latency_calls
    assert result.latency_calls <= result.graphs_seen


def test_bad_config_is_refused():
    with pytest.raises(BadInputError):
        SearchConfig(alpha=0.9)
    with pytest.raises(ValueError):
        run_search("annealing", load_graph(chain_model()), default_engine(), PenaliseRule("x"))


def test_backtracking_prices_rewrites_on_their_region_with_the_same_result():
    """The cost model prices a child as parent + the rewrite's regional change; hiding that capability
    (a plain wrapper prices every child whole) gives the same expansions, trace, best graph and latency (the
    path may take identical-cost sites in another order: whole-graph sums round differently)."""
    graph = load_graph(attention_like_model(layers=3))
    cost = CostModel.for_device("h200")
    config = SearchConfig(steps=8, budget=25, alpha=1.05)
    regional = run_search("backtrack", graph, default_engine(), cost, config)
    whole = run_search("backtrack", graph, default_engine(), CountingService(cost), config)
    assert regional.expansions == whole.expansions == 25 and regional.stopped_by == whole.stopped_by == "budget"
    assert [m.rule for m in regional.applied] == [m.rule for m in whole.applied]
    assert [h.current_ms for h in regional.history] == pytest.approx([h.current_ms for h in whole.history], abs=1e-12)
    assert regional.best.structural_hash() == whole.best.structural_hash()
    assert regional.best_latency.ms == pytest.approx(whole.best_latency.ms, abs=1e-12)
    assert regional.best_latency.ms == pytest.approx(cost.latency(regional.best).ms, abs=1e-12)


def test_backtracking_time_limit_stops_it_and_says_so(cost_model):
    graph = load_graph(attention_like_model(layers=3))
    result = run_search("backtrack", graph, default_engine(), cost_model, SearchConfig(budget=1000, time_limit=1e-6))
    assert result.expansions == 1 and result.stopped_by == "time limit"
    assert run_search("backtrack", graph, default_engine(), cost_model, SearchConfig(budget=3)).stopped_by == "budget"
    with pytest.raises(BadInputError):
        SearchConfig(time_limit=-1)


class WholeGraphOnly:
    """The cost model without its `rewrite_delta`: every child is priced whole."""

    def __init__(self, model: CostModel) -> None:
        self.model, self.name, self.deterministic = model, model.name, True

    def latency(self, graph):
        return self.model.latency(graph)


def test_greedy_by_default_runs_until_nothing_improves(cost_model):
    """A deep model needs more rewrites than a fixed cap that fits a small one (50 did not fit zoo bert-base):
    by default (steps 0) greedy stops only when no rewrite improves; an explicit --steps still caps the path."""
    graph = load_graph(attention_like_model(layers=56, width=8))
    engine = default_engine().restricted(["merge-parallel-matmul"])  # few matches per step: a quick test
    unlimited = run_search("greedy", graph, engine, cost_model, SearchConfig())
    assert len(unlimited.applied) == 56, len(unlimited.applied)  # the QKV merge of every layer, past 50
    capped = run_search("greedy", graph, engine, cost_model, SearchConfig(steps=5))
    assert len(capped.applied) == 5 and capped.best_latency.ms > unlimited.best_latency.ms
    assert SearchConfig().rollout_steps == 50 and SearchConfig(steps=7).rollout_steps == 7


def test_greedy_priced_by_regional_deltas_takes_the_whole_graph_path(cost_model):
    """Pricing children as parent + the rewrite's regional change picks the same rewrites as pricing each
    child whole, with far fewer whole-graph evaluations."""
    graph = load_graph(attention_like_model(layers=3, width=16))
    engine = default_engine()
    by_delta = run_search("greedy", graph, engine, cost_model, SearchConfig())
    whole = run_search("greedy", graph, engine, WholeGraphOnly(cost_model), SearchConfig())
    assert [m.rule for m in by_delta.applied] == [m.rule for m in whole.applied]
    assert by_delta.best.structural_hash() == whole.best.structural_hash()
    assert by_delta.best_latency.ms == pytest.approx(whole.best_latency.ms)
