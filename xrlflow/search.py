"""Searches over the rewrite engine: greedy, cost-based backtracking (TASO-style), random rollouts, and a
trained policy's rollouts (`policy_search`, handed the policy's `choose`; this module never imports agents).

All of them use the same rule set (a `RewriteEngine`) and the same `LatencyService`, so their results compare
directly, and keep their incumbent, history and seen set in a `trajectory.SearchState`. Each returns a `SearchResult` with the best graph found, the sequence of matches
that leads from the input to it (replayable with `RewriteEngine.apply_sequence`: rewrites name new nodes
deterministically), a latency trace per step, and the time split between deciding (matching, applying,
hashing) and asking the latency service.

A search never returns a graph slower than its input: the input is the first incumbent, and only a graph
with a strictly lower latency replaces it.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from xrlflow.cli_options import option
from xrlflow.engine import Match, RewriteEngine
from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import Latency, LatencyService, NodeCosts, PricesRewrites
from xrlflow.trajectory import SearchState, StepCallback, StepRecord, latency_ms, try_apply

if TYPE_CHECKING:
    import numpy as np

SEARCH_METHODS = ("greedy", "backtrack", "random")


DEFAULT_ROLLOUT_STEPS = 50  # the shipped policy's training episodes are 50 steps long


@dataclass(frozen=True)
class SearchConfig:
    # 0 lets greedy run until nothing improves and backtracking until its budget: a 12-layer transformer needs
    # about 100 rewrites (zoo bert-base: 96), and a cap of 50 stopped both searches half-way through the layers
    steps: int = option("most rewrites on one path (0: no limit for greedy and backtracking; policy and random "
                        f"rollouts then take {DEFAULT_ROLLOUT_STEPS})", 0, kind=int)
    rollouts: int = option("policy: sampled rollouts besides the greedy one; random search: rollouts", 4, kind=int)
    budget: int = option("backtrack search: graphs expanded", 100, kind=int)  # each expansion evaluates all its matches
    alpha: float = option("backtrack search: relaxation factor", 1.05, kind=float)  # keep graphs within alpha x the best
    time_limit: float = option("backtrack search: stop expanding after this many seconds (0: no limit; the "
                               "expansions spent are reported)", 0.0, kind=float)
    min_improvement: float = 0.0  # relative gain a step must bring to count as an improvement
    max_candidates: int = 0  # greedy/backtrack: evaluate at most this many matches per graph (0: all)
    # policy: continue greedily from the rollouts' best graph on the predictor (a deterministic one: the cost
    # model), so a rollout that stopped one improving rewrite short of a local optimum does not lose to greedy
    polish: bool = True
    seed: int = option("random search, sampled policy rollouts and random verification inputs", 0, kind=int)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise BadInputError("--steps must be >= 0")
        if self.rollouts < 0:
            raise BadInputError("--rollouts must be >= 1 for the random search (>= 0 with a policy)")
        if self.budget < 1:
            raise BadInputError("--budget must be >= 1")
        if self.alpha < 1.0:
            raise BadInputError("--alpha must be >= 1")
        if self.time_limit < 0:
            raise BadInputError("--time-limit must be >= 0")
        if not 0.0 <= self.min_improvement < 1.0:
            raise BadInputError("min_improvement must be in [0, 1)")

    @property
    def rollout_steps(self) -> int:
        """Rewrites per rollout of a policy or of the random search (a walk needs an end: `steps`, else the default)."""
        return self.steps or DEFAULT_ROLLOUT_STEPS

    def path_allows(self, length: int) -> bool:
        """Whether greedy or backtracking may extend a path of `length` rewrites."""
        return not self.steps or length < self.steps


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
    expansions: int | None = None  # backtracking: graphs expanded (at most the budget)
    stopped_by: str = ""  # backtracking: "budget", "time limit" or "queue empty"

    @property
    def speedup(self) -> float:
        return self.initial_latency.ms / self.best_latency.ms if self.best_latency.ms > 0 else 1.0


class TimedLatency:
    """A latency service wrapper for one search: deduplicated by structural hash, timed apart from the rest.

    It is itself a `LatencyService` (the RL env can be handed one) and passes the wrapped service's per-node
    costs through (none when it has none).
    """

    def __init__(self, service: LatencyService) -> None:
        self.service = service
        self.name = service.name
        self.deterministic = service.deterministic
        self.known: dict[str, Latency] = {}
        self.seconds = 0.0
        self.calls = 0
        self._deltas: dict[Any, float] = {}  # region key -> a rewrite's latency change (see `estimate`)

    def node_costs(self, graph: Graph) -> Mapping[str, float]:
        return self.service.node_costs(graph) if isinstance(self.service, NodeCosts) else {}

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

    def estimate(self, parent: Graph, parent_ms: float, match: Match, child: Graph) -> float:
        """The child's latency in ms. For a service that prices rewrites (`PricesRewrites`, equal to the
        whole-graph estimate): `parent_ms` plus the rewrite's change, priced on its changed region once per
        structural key of the match's surroundings (`sites.region_key`: the same rewrite in another identical
        layer costs the same, up to a hash collision). Otherwise the child's latency."""
        if not isinstance(self.service, PricesRewrites):
            return latency_ms(self.latency(child))
        from xrlflow.sites import region_key

        start = time.perf_counter()
        try:
            key = region_key(parent, match)
            delta = self._deltas.get(key)
            if delta is None:
                if len(self._deltas) >= 100_000:
                    self._deltas.clear()
                delta = self._deltas[key] = self.service.rewrite_delta(parent, child)
                self.calls += 1
            return parent_ms + delta
        finally:
            self.seconds += time.perf_counter() - start


def _children(engine: RewriteEngine, graph: Graph, limit: int) -> list[tuple[Match, Graph]]:
    matches = engine.matches(graph)
    if limit:
        matches = matches[:limit]
    return [(match, child) for match in matches if (child := try_apply(engine, graph, match)) is not None]


def _begin(graph: Graph, service: LatencyService, config: SearchConfig,
           on_step: StepCallback | None) -> tuple[float, TimedLatency, SearchState]:
    """The start time, the search's latency wrapper and its state, the input as the first incumbent."""
    started = time.perf_counter()
    evaluate = TimedLatency(service)
    return started, evaluate, SearchState(graph, evaluate(graph), config.min_improvement, on_step)


def greedy_search(
    graph: Graph,
    engine: RewriteEngine,
    service: LatencyService,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
) -> SearchResult:
    """Apply the best immediate improvement until no match improves (or `steps` rewrites were applied).

    Children are priced like backtracking's (`TimedLatency.estimate`: the parent plus the rewrite's regional
    change, for a service that prices rewrites); the chosen one is priced whole before it is taken."""
    started, evaluate, state = _begin(graph, service, config, on_step)
    current = graph
    step = 0
    while config.path_allows(step):
        step += 1
        best_child: tuple[Match, Graph, float] | None = None
        children = _children(engine, current, config.max_candidates)
        current_ms = latency_ms(evaluate(current))
        for match, child in children:
            state.see(child)
            child_ms = evaluate.estimate(current, current_ms, match, child)
            if best_child is None or child_ms < best_child[2]:
                best_child = (match, child, child_ms)
        if best_child is None or not state.offer(best_child[1], evaluate(best_child[1]),
                                                 state.best_path + [best_child[0]]):
            break
        current = state.best
        state.log(step, latency_ms(state.best_latency), len(children))
    return finish_result("greedy", graph, state, evaluate, started)


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
    the search may pass through slower graphs to reach faster ones. Stops after `budget` expansions, or
    after `time_limit` seconds when one is set (`SearchResult.expansions` and `stopped_by` say which).

    With a service that prices rewrites (`PricesRewrites`: the cost model) a child is priced as its parent's
    latency plus the rewrite's change on the changed region, and only a would-be incumbent is priced whole:
    the same order and result as pricing every child whole, at a fraction of the time.
    """
    started, evaluate, state = _begin(graph, service, config, on_step)
    order = 0  # tie-breaker: first queued first
    queue: list[tuple[float, int, Graph, tuple[Match, ...]]] = [(latency_ms(state.best_latency), order, graph, ())]
    expansions = 0
    stopped_by = "queue empty"
    deadline = started + config.time_limit if config.time_limit else None
    while queue:
        if expansions >= config.budget:
            stopped_by = "budget"
            break
        if deadline is not None and expansions and time.perf_counter() >= deadline:  # at least one expansion
            stopped_by = "time limit"
            break
        current_ms, _, current, path = heapq.heappop(queue)
        if current_ms > config.alpha * latency_ms(state.best_latency):
            continue  # the bound tightened since it was queued
        expansions += 1
        children = _children(engine, current, config.max_candidates) if config.path_allows(len(path)) else []
        # children are priced from the parent's whole-graph latency plus their rewrite's change (on the changed
        # region, for a service that prices rewrites); one that would become the incumbent is priced whole
        parent_ms = latency_ms(evaluate(current))
        for match, child in children:
            if not state.see(child):
                continue
            child_ms = evaluate.estimate(current, parent_ms, match, child)
            child_path = path + (match,)
            if child_ms < latency_ms(state.best_latency):
                state.offer(child, evaluate(child), child_path)
            else:
                state.steps_since_best += 1
            if child_ms < config.alpha * latency_ms(state.best_latency):
                order += 1
                heapq.heappush(queue, (child_ms, order, child, child_path))
        state.log(expansions, current_ms, len(children))
    result = finish_result("backtrack", graph, state, evaluate, started)
    result.expansions, result.stopped_by = expansions, stopped_by
    return result


def random_search(
    graph: Graph,
    engine: RewriteEngine,
    service: LatencyService,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
) -> SearchResult:
    """`rollouts` random walks of up to `rollout_steps` uniformly chosen rewrites each; the best graph on any walk wins."""
    if config.rollouts < 1:
        raise BadInputError("--rollouts must be >= 1 for the random search (>= 0 with a policy)")
    started, evaluate, state = _begin(graph, service, config, on_step)
    rng = random.Random(config.seed)
    step_count = 0
    for rollout in range(config.rollouts):
        current, path = graph, []
        for _ in range(config.rollout_steps):
            matches = list(engine.matches(current))
            available = len(matches)
            child = None
            while matches and child is None:
                match = matches.pop(rng.randrange(len(matches)))
                child = try_apply(engine, current, match)
            if child is None:
                break
            current = child
            path.append(match)
            state.see(current)
            latency = evaluate(current)
            state.offer(current, latency, path)
            step_count += 1
            state.log(step_count, latency_ms(latency), available, rollout)
    return finish_result("random", graph, state, evaluate, started)


# A policy's decision: the observation, the action mask and a generator -> an action. With `rng` None it
# decides deterministically (its most probable action). Built in `xrlflow.agents` (search never imports it).
Choose = Callable[[Any, Any, "np.random.Generator | None"], int]


# Progress of a policy search: (phase, done, total) with phase "rollout" or "measure".
PolicyProgress = Callable[[str, int, int], None]


def policy_search(
    graph: Graph,
    service: LatencyService,
    make_env: Callable[[LatencyService, LatencyService | None], Any],
    choose: Choose,
    config: SearchConfig = SearchConfig(),
    on_step: StepCallback | None = None,
    predictor: LatencyService | None = None,
    progress: PolicyProgress | None = None,
) -> SearchResult:
    """A policy's deterministic rollout plus `config.rollouts` sampled ones, each an episode of the rewrite env
    `make_env(latency, predictor)` builds over `graph` alone (`choose` decides each step; `make_env` pads the env to fit).

    The rollouts walk on the `predictor`'s latencies (the cost model; by default `service` itself). Only each
    rollout's final graph and its best graph by the predictor are then given to `service`, each distinct
    graph once (by structural hash), and the fastest of those by `service` wins, the input included. With
    `service` the predictor itself nothing is priced twice. `on_step` sees every rollout step (latencies by
    the predictor); `progress` sees rollouts and measurements done. With `config.polish` and a deterministic
    predictor, greedy continues from the rollouts' best graph and its result joins the shortlist."""
    import numpy as np

    started = time.perf_counter()
    evaluate = TimedLatency(service)
    walk_service = predictor if predictor is not None else service
    same = walk_service is service
    # the env prices candidates with the bare predictor (not through `evaluate`: those are no measurements)
    env = make_env(evaluate, service) if same else make_env(walk_service, walk_service)
    state = SearchState(graph, evaluate(graph), config.min_improvement)
    walk = SearchState(graph, env.latency_service.latency(graph), config.min_improvement, on_step)
    step_count = 0
    shortlist: dict[str, tuple[Graph, list[Match]]] = {}
    total = config.rollouts + 1
    for rollout in range(total):
        rng = None if rollout == 0 else np.random.default_rng([config.seed, rollout])
        obs, _ = env.reset(seed=config.seed, options={"model": 0})
        done = False
        while not done:
            action = choose(obs, env.action_masks(), rng)
            candidates = len(env.slots)
            taken_before = env.steps
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            if env.steps == taken_before:
                continue  # stop, or a rewrite the env did not take
            step_count += 1
            walk.see(env.graph)
            walk.offer(env.graph, env.current_latency, env.applied)
            walk.log(step_count, env.current_latency.ms, candidates, rollout)
        for g, path in ((env.graph, env.applied), (env.best_graph, env.best_path)):
            shortlist.setdefault(g.structural_hash(), (g, path))
        if progress is not None:
            progress("rollout", rollout + 1, total)
    if config.polish and walk_service.deterministic:
        polished = greedy_search(walk.best, env.engine, walk_service,
                                 SearchConfig(steps=0, max_candidates=config.max_candidates))
        if polished.applied:
            path = list(walk.best_path) + polished.applied
            walk.offer(polished.best, polished.best_latency, path)
            shortlist.setdefault(polished.best.structural_hash(), (polished.best, path))
    shortlist.pop(graph.structural_hash(), None)
    for done_count, (g, path) in enumerate(shortlist.values(), 1):
        state.offer(g, evaluate(g), path)
        if progress is not None:
            progress("measure", done_count, len(shortlist))
    state.history = walk.history
    state.seen = walk.seen
    return finish_result("policy", graph, state, evaluate, started)


def finish_result(method: str, initial: Graph, state: SearchState, evaluate: TimedLatency, started: float) -> SearchResult:
    total = time.perf_counter() - started
    return SearchResult(
        method=method, initial=initial, best=state.best, initial_latency=evaluate(initial),
        best_latency=state.best_latency, applied=list(state.best_path), history=state.history,
        decision_seconds=max(0.0, total - evaluate.seconds), latency_seconds=evaluate.seconds,
        latency_calls=evaluate.calls, graphs_seen=len(state.seen),
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
    "SEARCH_METHODS", "SearchConfig", "SearchResult", "StepRecord", "TimedLatency", "greedy_search",
    "backtracking_search", "random_search", "policy_search", "PolicyProgress", "run_search",
]
