"""The step logic every search shares with the environment: apply a rewrite, keep the best graph, log.

A `SearchState` is one search's incumbent (the best graph, its latency and the matches that lead to it), its
step history, the graphs it has seen, the actions already taken from each seen graph (a walk that comes back
to a graph must not take the same way out again: that is how it would cycle) and the steps since the
incumbent last improved (a walk with no improvement for a while has no improving chain left in reach).
The env keeps one per episode; the searches in `xrlflow.search` (greedy, backtracking, random, a policy's
rollouts) keep one per search. Only a strictly lower latency
replaces the incumbent, so nothing that starts from the input ends slower than it. A noisy (measured)
latency replaces it only when its 95% interval lies wholly below the incumbent's (`is_better`): a change
within noise cannot win by one lucky median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from xrlflow.engine import Match, RewriteEngine
from xrlflow.errors import GraphError
from xrlflow.ir import Graph
from xrlflow.latency import Latency


@dataclass(frozen=True)
class StepRecord:
    """One step of a search: the latency of the graph it reached and of the best graph so far."""

    step: int
    current_ms: float
    best_ms: float
    candidates: int  # matches evaluated (greedy/backtrack) or available (random, policy) at this step
    rollout: int = 0  # random / policy: which rollout the step belongs to


StepCallback = Callable[[StepRecord], None]


def latency_ms(latency: Latency) -> float:
    """The latency as a number to rank by: a failed or non-finite one ranks last."""
    return latency.ms if latency.ok and math.isfinite(latency.ms) else math.inf


def is_better(candidate: Latency, incumbent: Latency, min_improvement: float = 0.0) -> bool:
    """The significance rule of every search's acceptance: the candidate's interval must clear the
    incumbent's (its upper bound below the incumbent's lower bound, less `min_improvement`). A deterministic
    estimate (a cost model: low == median == high) reduces to a strictly lower median."""
    if not (candidate.ok and incumbent.ok):
        return latency_ms(candidate) < latency_ms(incumbent)
    upper = max(candidate.high_ms, candidate.ms)
    lower = min(incumbent.low_ms, incumbent.ms)
    if not (math.isfinite(upper) and math.isfinite(lower)):
        return latency_ms(candidate) < latency_ms(incumbent) * (1.0 - min_improvement)
    return upper < lower * (1.0 - min_improvement)


def try_apply(engine: RewriteEngine, graph: Graph, match: Match) -> Graph | None:
    """The rewritten graph, or None when the rewrite would create a cycle here (then it is no candidate)."""
    try:
        return engine.apply(graph, match)
    except GraphError:
        return None


class SearchState:
    """The incumbent, the history and the seen set of one search (or one env episode)."""

    def __init__(self, graph: Graph, latency: Latency, min_improvement: float = 0.0,
                 on_step: StepCallback | None = None, key: Callable[[Graph], Any] | None = None) -> None:
        self.best, self.best_latency, self.best_path = graph, latency, []
        self.min_improvement = min_improvement
        self.on_step = on_step
        self.history: list[StepRecord] = []
        # what identifies a graph: its structural hash, or e.g. `sites.ContentKeys.graph_key`
        self.key: Callable[[Graph], Any] = key or Graph.structural_hash
        self.seen = {self.key(graph)}
        self.taken: dict[Any, set[Any]] = {}  # graph hash -> actions already taken from that graph
        self.steps_since_best = 0

    def offer(self, graph: Graph, latency: Latency, path: Sequence[Match]) -> bool:
        """Take `graph` as the incumbent when it is faster; True when it was taken."""
        if not is_better(latency, self.best_latency, self.min_improvement):
            self.steps_since_best += 1
            return False
        self.best, self.best_latency, self.best_path = graph, latency, list(path)
        self.steps_since_best = 0
        return True

    def take(self, graph: Graph, action: Any) -> None:
        """Record that `action` (any hashable key, e.g. a tuple of matches) was taken from `graph`."""
        self.taken.setdefault(self.key(graph), set()).add(action)

    def was_taken(self, graph: Graph, action: Any) -> bool:
        return action in self.taken.get(self.key(graph), ())

    def see(self, graph: Graph) -> bool:
        """Add the graph to the seen set; True when it is new."""
        key = self.key(graph)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def log(self, step: int, current_ms: float, candidates: int, rollout: int = 0) -> None:
        record = StepRecord(step, current_ms, latency_ms(self.best_latency), candidates, rollout)
        self.history.append(record)
        if self.on_step is not None:
            self.on_step(record)
