"""Search baselines over the rewrite engine: greedy, cost-based backtracking (TASO-style) and random rollouts.

All three use the same rule set (a `RewriteEngine`) and the same `LatencyService` as the RL agent, so their
results compare directly. Each returns a `SearchResult` with the best graph found, the sequence of matches
that leads from the input to it (replayable with `RewriteEngine.apply_sequence`: rewrites name new nodes
deterministically), a latency trace per step, and the time split between deciding (matching, applying,
hashing) and asking the latency service.

A search never returns a graph slower than its input: the input is the first incumbent, and only a graph
with a strictly lower latency replaces it.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from xrlflow.engine import Match, RewriteEngine
from xrlflow.errors import GraphError
from xrlflow.ir import Graph
from xrlflow.latency import Latency, LatencyService

SEARCH_METHODS = ("greedy", "backtrack", "random")


@dataclass(frozen=True)
class SearchConfig:
    steps: int = 50  # most rewrites on one path (greedy steps, random rollout length, backtracking depth)
    rollouts: int = 8  # random: number of rollouts
    budget: int = 100  # backtrack: most graphs expanded (each expansion evaluates all its matches)
    alpha: float = 1.05  # backtrack: keep candidates whose latency is within alpha x the best so far
    min_improvement: float = 0.0  # relative gain a step must bring to count as an improvement
    max_candidates: int = 0  # greedy/backtrack: evaluate at most this many matches per graph (0: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.rollouts < 1 or self.budget < 1:
            raise ValueError("steps must be >= 0, rollouts and budget >= 1")
        if self.alpha < 1.0:
            raise ValueError("alpha must be >= 1")
        if not 0.0 <= self.min_improvement < 1.0:
            raise ValueError("min_improvement must be in [0, 1)")


@dataclass(frozen=True)
class StepRecord:
    """One step of a search: the latency of the graph it reached and of the best graph so far."""

    step: int
    current_ms: float
    best_ms: float
    candidates: int  # matches evaluated (greedy/backtrack) or available (random) at this step
    rollout: int = 0  # random: which rollout the step belongs to


@dataclass
class SearchResult:
    method: str
    initial: Graph
    best: Graph
    initial_latency: Latency
    best_latency: Latency
    applied: list[Match]  # the path from `initial` to `best`
    history: list[StepRecord]
    decision_seconds: float  # matching, applying, hashing, choosing
    latency_seconds: float  # inside the latency service
    latency_calls: int  # distinct graphs the latency service was asked about
    graphs_seen: int

    @property
    def speedup(self) -> float:
        return self.initial_latency.ms / self.best_latency.ms if self.best_latency.ms > 0 else 1.0


StepCallback = Callable[[StepRecord], None]


class TimedLatency:
    """A latency service wrapper for one search: deduplicated by structural hash, timed apart from the rest.

    It is itself a `LatencyService` (the RL env can be handed one); other attributes of the wrapped service
    (per-node costs, `compare`) pass through.
    """

    def __init__(self, service: LatencyService) -> None:
        self.service = service
        self.name = service.name
        self.known: dict[str, Latency] = {}
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, attribute: str):
        if attribute == "service":  # not set yet (copy/pickle): never recurse
            raise AttributeError(attribute)
        return getattr(self.service, attribute)

    def latency(self, graph: Graph) -> Latency:
        key = graph.structural_hash()
        cached = self.known.get(key)
        if cached is not None:
            return cached
        start = time.perf_counter()
        try:
            result = self.service.latency(graph)
        finally:
            self.seconds += time.perf_counter() - start
        self.calls += 1
        self.known[key] = result
        return result

    __call__ = latency


def _ms(latency: Latency) -> float:
    return latency.ms if latency.ok and math.isfinite(latency.ms) else math.inf


def _better(candidate: Latency, incumbent: Latency, min_improvement: float) -> bool:
    return _ms(candidate) < _ms(incumbent) * (1.0 - min_improvement)


def _children(engine: RewriteEngine, graph: Graph, limit: int) -> list[tuple[Match, Graph]]:
    matches = engine.matches(graph)
    if limit:
        matches = matches[:limit]
    out = []
    for match in matches:
        try:
            out.append((match, engine.apply(graph, match)))
        except GraphError:
            continue  # a rule that would create a cycle here: not a candidate
    return out


def _begin(graph: Graph, service: LatencyService) -> tuple[float, TimedLatency, Latency]:
    """The start time, the search's latency wrapper and the input's latency: the first incumbent."""
    started = time.perf_counter()
    evaluate = TimedLatency(service)
    return started, evaluate, evaluate(graph)


def _log_step(history: list[StepRecord], on_step: StepCallback | None, record: StepRecord) -> None:
    history.append(record)
    if on_step:
        on_step(record)


def greedy_search(
    graph: Graph,
    engine: RewriteEngine,
    service: LatencyService,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
) -> SearchResult:
    """Apply the best immediate improvement until no match improves (or `steps` rewrites were applied)."""
    started, evaluate, initial_latency = _begin(graph, service)
    current, current_latency = graph, initial_latency
    applied: list[Match] = []
    history: list[StepRecord] = []
    seen = {graph.structural_hash()}
    for step in range(1, config.steps + 1):
        best_child: tuple[Match, Graph, Latency] | None = None
        children = _children(engine, current, config.max_candidates)
        for match, child in children:
            seen.add(child.structural_hash())
            latency = evaluate(child)
            if best_child is None or _ms(latency) < _ms(best_child[2]):
                best_child = (match, child, latency)
        if best_child is None or not _better(best_child[2], current_latency, config.min_improvement):
            break
        match, current, current_latency = best_child
        applied.append(match)
        _log_step(history, on_step, StepRecord(step, _ms(current_latency), _ms(current_latency), len(children)))
    return finish_result("greedy", graph, current, initial_latency, current_latency, applied, history, evaluate, started, len(seen))


def backtracking_search(
    graph: Graph,
    engine: RewriteEngine,
    service: LatencyService,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
) -> SearchResult:
    """TASO's cost-based backtracking search.

    A priority queue ordered by latency; every expansion evaluates all matches of the cheapest queued graph;
    a new graph (dedup by structural hash) is queued when its latency is below alpha x the best so far, so
    the search may pass through slower graphs to reach faster ones. Stops after `budget` expansions.
    """
    started, evaluate, initial_latency = _begin(graph, service)
    best, best_latency, best_path = graph, initial_latency, []
    order = 0  # tie-breaker: first queued first
    queue: list[tuple[float, int, Graph, tuple[Match, ...]]] = [(_ms(initial_latency), order, graph, ())]
    seen = {graph.structural_hash()}
    history: list[StepRecord] = []
    expansions = 0
    while queue and expansions < config.budget:
        latency_ms, _, current, path = heapq.heappop(queue)
        if latency_ms > config.alpha * _ms(best_latency):
            continue  # the bound tightened since it was queued
        expansions += 1
        children = _children(engine, current, config.max_candidates) if len(path) < config.steps else []
        for match, child in children:
            key = child.structural_hash()
            if key in seen:
                continue
            seen.add(key)
            latency = evaluate(child)
            child_ms = _ms(latency)
            child_path = path + (match,)
            if _better(latency, best_latency, config.min_improvement):
                best, best_latency, best_path = child, latency, list(child_path)
            if child_ms < config.alpha * _ms(best_latency):
                order += 1
                heapq.heappush(queue, (child_ms, order, child, child_path))
        _log_step(history, on_step, StepRecord(expansions, latency_ms, _ms(best_latency), len(children)))
    return finish_result("backtrack", graph, best, initial_latency, best_latency, best_path, history, evaluate, started, len(seen))


def random_search(
    graph: Graph,
    engine: RewriteEngine,
    service: LatencyService,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
) -> SearchResult:
    """`rollouts` random walks of up to `steps` uniformly chosen rewrites each; the best graph on any walk wins."""
    started, evaluate, initial_latency = _begin(graph, service)
    rng = random.Random(config.seed)
    best, best_latency, best_path = graph, initial_latency, []
    history: list[StepRecord] = []
    seen = {graph.structural_hash()}
    step_count = 0
    for rollout in range(config.rollouts):
        current, path = graph, []
        for _ in range(config.steps):
            matches = list(engine.matches(current))
            available = len(matches)
            child = None
            while matches and child is None:
                match = matches.pop(rng.randrange(len(matches)))
                try:
                    child = engine.apply(current, match)
                except GraphError:
                    child = None
            if child is None:
                break
            current = child
            path.append(match)
            seen.add(current.structural_hash())
            latency = evaluate(current)
            if _better(latency, best_latency, config.min_improvement):
                best, best_latency, best_path = current, latency, list(path)
            step_count += 1
            _log_step(history, on_step, StepRecord(step_count, _ms(latency), _ms(best_latency), available, rollout))
    return finish_result("random", graph, best, initial_latency, best_latency, best_path, history, evaluate, started, len(seen))


def finish_result(
    method: str, initial: Graph, best: Graph, initial_latency: Latency, best_latency: Latency,
    applied: Sequence[Match], history: list[StepRecord], evaluate: TimedLatency, started: float, graphs_seen: int,
) -> SearchResult:
    total = time.perf_counter() - started
    return SearchResult(
        method=method, initial=initial, best=best, initial_latency=initial_latency, best_latency=best_latency,
        applied=list(applied), history=history, decision_seconds=max(0.0, total - evaluate.seconds),
        latency_seconds=evaluate.seconds, latency_calls=evaluate.calls, graphs_seen=graphs_seen,
    )


SEARCHES: dict[str, Callable[..., SearchResult]] = {
    "greedy": greedy_search,
    "backtrack": backtracking_search,
    "random": random_search,
}


def run_search(
    method: str,
    graph: Graph,
    engine: RewriteEngine,
    service: LatencyService,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
) -> SearchResult:
    try:
        search = SEARCHES[method]
    except KeyError:
        raise ValueError(f"unknown search {method!r}; choose from {', '.join(SEARCH_METHODS)}") from None
    return search(graph, engine, service, config, on_step)


__all__ = [
    "SEARCH_METHODS", "SearchConfig", "SearchResult", "StepRecord", "TimedLatency", "finish_result", "greedy_search", "backtracking_search",
    "random_search", "run_search",
]
