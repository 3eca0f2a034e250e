"""`xrlflow/GraphRewrite-v0`: pick one rewrite (or stop) per step; reward from a latency service.

Observation (a Dict of fixed-size padded arrays, because SB3 needs fixed shapes):
    node_features   float32 (max_nodes, node_feature_size)   rows in the graph's topological order, 0 padding
    edge_index      int64   (2, max_edges)                   producer row -> consumer row, -1 padding
    edge_features   float32 (max_edges, EDGE_FEATURES)       0 padding
    candidate_rules int64   (max_candidates,)                rule index in the engine's order, -1 padding
    candidate_nodes int64   (max_candidates, max_bound)      node rows a candidate binds (anchor first), -1 padding
    counts          int64   (3,)                             valid nodes, edges, candidates (a Box: SB3 one-hots Discrete)

Action: Discrete(max_candidates + 1); action i < num_candidates applies candidate i, action max_candidates
stops. `action_masks()` is True exactly on the valid candidates and on stop. An action outside the mask
(padding) is treated as stop and flagged with `info["invalid_action"] = True`: the env never asserts.

Candidates: the engine's matches in engine order. When there are more than max_candidates, a per-rule
round-robin keeps the first match of every rule, then the second of every rule, ... until max_candidates are
chosen (so every rule stays represented); the chosen ones keep engine order and `info["candidates_dropped"]`
says how many were left out. A match binding more than max_bound nodes shows its first max_bound nodes.

Reward: 100 * (L_prev - L_new) / L_initial, no living bonus. A failed measurement (Latency.ok False) ends
the episode with reward `config.failure_penalty` (info["measurement_failed"]) and the failing graph is not
taken; a rewrite that grows the graph past max_nodes/max_edges ends the episode with reward 0
(info["graph_too_large"]) and is not taken either; a rewrite the engine refuses (GraphError: a bug in a rule's
find()) ends the episode with reward 0, a RuntimeWarning and info["rewrite_error"]. Terminated on stop or
when no candidate is left; truncated after `config.max_steps` rewrites.

`best_graph` / `best_latency` hold the fastest graph seen in the current episode (the initial one included).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from xrlflow.cli_options import option
from xrlflow.engine import Match, RewriteEngine
from xrlflow.envs.features import DEFAULT_OP_VOCABULARY, EDGE_FEATURES, GraphFeaturizer, node_feature_size
from xrlflow.errors import BadInputError, GraphError
from xrlflow.ir import Graph
from xrlflow.latency import Latency, LatencyService, NodeCosts
from xrlflow.trajectory import SearchState

ENV_ID = "xrlflow/GraphRewrite-v0"
FEATURE_BOUND = 64.0  # features are log-scaled and non-negative (see features.py); far above any real value


@dataclass(frozen=True)
class EnvConfig:
    max_nodes: int = 2048
    max_edges: int = 4096
    max_candidates: int = option("candidate slots per step", 256, kind=int)
    max_bound: int = 8  # bound nodes shown per candidate
    max_steps: int = option("rewrites per episode", 50, kind=int)  # before truncation
    failure_penalty: float = -10.0  # reward when the latency service fails on a rewritten graph
    op_vocabulary: tuple[str, ...] = field(default=DEFAULT_OP_VOCABULARY)
    # Fill the per-node cost column from the latency service's `node_costs` (when it has them, see
    # `xrlflow.latency.NodeCosts`). Checkpoints written before the column was filled trained on zeros.
    node_costs: bool = True

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_edges", "max_candidates", "max_bound", "max_steps"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"EnvConfig.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def node_feature_size(self) -> int:
        return node_feature_size(self.op_vocabulary)

    @property
    def edge_feature_size(self) -> int:
        return EDGE_FEATURES

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["op_vocabulary"] = list(self.op_vocabulary)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "EnvConfig":
        known = {f.name for f in dataclasses.fields(EnvConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInputError(f"unknown env config field(s): {', '.join(unknown)}")
        values = dict(d)
        values.setdefault("node_costs", False)  # a run.json from before the field: the column was always 0
        if "op_vocabulary" in values:
            values["op_vocabulary"] = tuple(values["op_vocabulary"])
        return EnvConfig(**values)


def observation_space(config: EnvConfig, num_rules: int) -> spaces.Dict:
    """The observation space for a config and a rule count (also used to load a policy at another padding)."""
    n, e, c, b = config.max_nodes, config.max_edges, config.max_candidates, config.max_bound
    return spaces.Dict({
        "node_features": spaces.Box(0.0, FEATURE_BOUND, (n, config.node_feature_size), np.float32),
        "edge_index": spaces.Box(-1, n - 1, (2, e), np.int64),
        "edge_features": spaces.Box(0.0, FEATURE_BOUND, (e, config.edge_feature_size), np.float32),
        "candidate_rules": spaces.Box(-1, max(num_rules - 1, 0), (c,), np.int64),
        "candidate_nodes": spaces.Box(-1, n - 1, (c, b), np.int64),
        "counts": spaces.Box(0, max(n, e, c), (3,), np.int64),
    })


def select_candidates(matches: Sequence[Match], limit: int, rule_order: Mapping[str, int]) -> list[Match]:
    """At most `limit` matches: per-rule round-robin in engine order, result kept in engine order."""
    if len(matches) <= limit:
        return list(matches)
    per_rule: dict[str, list[int]] = {}
    for i, m in enumerate(matches):
        per_rule.setdefault(m.rule, []).append(i)
    buckets = [per_rule[r] for r in sorted(per_rule, key=lambda r: rule_order.get(r, len(rule_order)))]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for bucket in buckets:
            if depth < len(bucket) and len(chosen) < limit:
                chosen.append(bucket[depth])
        depth += 1
    return [matches[i] for i in sorted(chosen)]


class GraphRewriteEnv(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        graphs: Sequence[tuple[str, Graph]] | Mapping[str, Graph],
        latency: LatencyService,
        config: EnvConfig | None = None,
        engine: RewriteEngine | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        items = list(graphs.items()) if isinstance(graphs, Mapping) else list(graphs)
        if not items:
            raise BadInputError("the environment needs at least one graph")
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise BadInputError(f"duplicate graph names: {names}")
        if engine is None:
            from xrlflow.rules import default_engine

            engine = default_engine()
        self.config = config or EnvConfig()
        self.engine = engine
        self.latency_service = latency
        self.model_names = names
        self.graphs = [g for _, g in items]
        self.render_mode = render_mode
        for name, g in items:
            self._check_fits(name, g)
        self.featurizer = GraphFeaturizer(self.config.op_vocabulary)
        self.observation_space = observation_space(self.config, len(engine.rules))
        self.action_space = spaces.Discrete(self.config.max_candidates + 1)
        self._initial_latency: dict[int, Latency] = {}
        self._node_costs = latency.node_costs if self.config.node_costs and isinstance(latency, NodeCosts) else None
        self.model_index = 0
        self.graph: Graph = self.graphs[0]
        self._episode: SearchState | None = None  # this episode's best graph and the path to it
        self.current_latency: Latency | None = None
        self.steps = 0
        self.episode_done = True
        self._candidates: list[Match] = []
        self._dropped = 0
        self._applied: list[Match] = []

    # Gymnasium sets `spec` after construction (gym.make); a measured reward makes the spec nondeterministic.
    @property
    def spec(self):  # type: ignore[override]
        return self.__dict__.get("_spec")

    @spec.setter
    def spec(self, value) -> None:
        if value is not None and not self.latency_service.deterministic and not value.nondeterministic:
            value = dataclasses.replace(value, nondeterministic=True)
        self.__dict__["_spec"] = value

    @property
    def model_name(self) -> str:
        return self.model_names[self.model_index]

    @property
    def best_graph(self) -> Graph:
        return self._episode.best if self._episode is not None else self.graph

    @property
    def best_latency(self) -> Latency | None:
        return self._episode.best_latency if self._episode is not None else None

    @property
    def applied(self) -> list[Match]:
        """The matches applied so far in this episode, in order."""
        return list(self._applied)

    def _check_fits(self, name: str, g: Graph) -> None:
        edges = sum(1 for n in g.nodes.values() for v in n.inputs if v and v in g.producer)
        if len(g.nodes) > self.config.max_nodes:
            raise BadInputError(
                f"graph {name!r} has {len(g.nodes)} nodes, more than EnvConfig.max_nodes={self.config.max_nodes}")
        if edges > self.config.max_edges:
            raise BadInputError(
                f"graph {name!r} has {edges} edges, more than EnvConfig.max_edges={self.config.max_edges}")

    # ---- latency ---------------------------------------------------------------------------------------------
    def _initial(self, index: int) -> Latency:
        cached = self._initial_latency.get(index)
        if cached is None:
            cached = self.latency_service.latency(self.graphs[index])
            if not cached.ok:
                raise BadInputError(f"cannot get the latency of model {self.model_names[index]!r}: {cached.reason}")
            self._initial_latency[index] = cached
        return cached

    # ---- gymnasium API ---------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        choice = (options or {}).get("model")
        if choice is None:
            index = int(self.np_random.integers(len(self.graphs)))
        elif isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
            if not 0 <= int(choice) < len(self.graphs):
                raise BadInputError(f"model index {choice} out of range (0..{len(self.graphs) - 1})")
            index = int(choice)
        elif choice in self.model_names:
            index = self.model_names.index(choice)
        else:
            raise BadInputError(f"unknown model {choice!r}; the env has {', '.join(self.model_names)}")
        self.model_index = index
        self.graph = self.graphs[index]
        self.current_latency = self._initial(index)
        self._episode = SearchState(self.graph, self.current_latency)
        self.steps = 0
        self.episode_done = False
        self._applied = []
        self._refresh_candidates()
        return self._observation(), self._info(rule=None)

    def step(self, action):
        if self.episode_done:
            raise RuntimeError("step() called on a finished episode; call reset()")
        action = int(action)
        info_extra: dict[str, Any] = {"invalid_action": False, "measurement_failed": False, "graph_too_large": False}
        valid = 0 <= action < len(self._candidates)
        if not valid:
            info_extra["invalid_action"] = action != self.config.max_candidates
            return self._finish(0.0, terminated=True, truncated=False, rule=None, extra=info_extra)

        match = self._candidates[action]
        try:
            new_graph = self.engine.apply(self.graph, match)
        except GraphError as exc:  # a rule's find() offered a binding its rewrite cannot do: a rule bug
            warnings.warn(f"rule {match.rule} failed at {match.nodes}: {exc}", RuntimeWarning, stacklevel=2)
            info_extra["rewrite_error"] = f"{match.rule}: {exc}"
            return self._finish(0.0, terminated=True, truncated=False, rule=match.rule, extra=info_extra)
        if self._arrays(new_graph) is None:  # grew past the padding: keep the current graph, end the episode
            info_extra["graph_too_large"] = True
            return self._finish(0.0, terminated=True, truncated=False, rule=match.rule, extra=info_extra)
        lat = self.latency_service.latency(new_graph)
        if not lat.ok:
            info_extra["measurement_failed"] = True
            info_extra["failure_reason"] = lat.reason
            return self._finish(self.config.failure_penalty, terminated=True, truncated=False, rule=match.rule,
                                extra=info_extra)
        initial = self._initial(self.model_index).ms
        reward = 100.0 * (self.current_latency.ms - lat.ms) / initial
        self.graph, self.current_latency = new_graph, lat
        self._applied.append(match)
        self.steps += 1
        self._episode.offer(new_graph, lat, self._applied)
        self._refresh_candidates()
        terminated = not self._candidates
        truncated = not terminated and self.steps >= self.config.max_steps
        return self._finish(reward, terminated=terminated, truncated=truncated, rule=match.rule, extra=info_extra)

    def _finish(self, reward: float, terminated: bool, truncated: bool, rule: str | None, extra: dict[str, Any]):
        self.episode_done = terminated or truncated
        info = self._info(rule=rule)
        info.update(extra)
        if self.episode_done:
            info["episode_steps"] = self.steps
        return self._observation(), float(reward), terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(self.config.max_candidates + 1, dtype=bool)
        mask[: len(self._candidates)] = True
        mask[-1] = True
        return mask

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lat = self.current_latency
        return (f"{self.model_name}: step {self.steps}, {len(self.graph)} nodes, "
                f"{lat.ms if lat else float('nan'):.4f} ms, {len(self._candidates)} candidates")

    # ---- internals -------------------------------------------------------------------------------------------
    @property
    def candidates(self) -> list[Match]:
        """The matches behind the current candidate slots (slot i is candidates[i])."""
        return list(self._candidates)

    def _refresh_candidates(self) -> None:
        matches = self.engine.matches(self.graph)
        self._candidates = select_candidates(matches, self.config.max_candidates, self.engine.rule_index)
        self._dropped = len(matches) - len(self._candidates)

    def _info(self, rule: str | None) -> dict[str, Any]:
        initial = self._initial(self.model_index).ms
        cur = self.current_latency.ms if self.current_latency else math.nan
        best = self.best_latency.ms if self.best_latency else math.nan
        return {
            "model": self.model_name,
            "rule": rule,
            "latency_ms": cur,
            "initial_latency_ms": initial,
            "speedup": initial / cur if cur > 0 else math.nan,
            "best_latency_ms": best,
            "best_speedup": initial / best if best > 0 else math.nan,
            "best_hash": self.best_graph.structural_hash(),
            "num_candidates": len(self._candidates),
            "candidates_dropped": self._dropped,
            "steps": self.steps,
        }

    def _arrays(self, g: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]] | None:
        """The graph's unpadded arrays (memoised on the graph, shared by envs of the same config and service);
        None when the graph does not fit the padding."""
        memo = g.memo()
        key = ("xrlflow.env.arrays", self.config, id(self.latency_service))
        if key not in memo:
            memo[key] = self._graph_arrays(g)
        return memo[key]

    def _observation(self) -> dict[str, np.ndarray]:
        arrays = self._arrays(self.graph)
        assert arrays is not None, "the current graph always fits (checked before it is taken)"
        nodes, edge_index, edge_features, row_of = arrays
        cfg = self.config
        obs = {
            "node_features": np.zeros((cfg.max_nodes, cfg.node_feature_size), np.float32),
            "edge_index": np.full((2, cfg.max_edges), -1, np.int64),
            "edge_features": np.zeros((cfg.max_edges, cfg.edge_feature_size), np.float32),
            "candidate_rules": np.full(cfg.max_candidates, -1, np.int64),
            "candidate_nodes": np.full((cfg.max_candidates, cfg.max_bound), -1, np.int64),
            "counts": np.zeros(3, np.int64),
        }
        n, e = len(nodes), edge_index.shape[1]
        obs["node_features"][:n] = nodes
        obs["edge_index"][:, :e] = edge_index
        obs["edge_features"][:e] = edge_features
        for i, m in enumerate(self._candidates):
            obs["candidate_rules"][i] = self.engine.rule_index[m.rule]
            bound = [row_of[name] for name in m.nodes[: cfg.max_bound]]
            obs["candidate_nodes"][i, : len(bound)] = bound
        obs["counts"][:] = (n, e, len(self._candidates))
        return obs

    def _graph_arrays(self, g: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]] | None:
        if len(g.nodes) > self.config.max_nodes:
            return None
        order = g.topological_order()
        row_of = {name: i for i, name in enumerate(order)}
        costs = self._node_costs(g) if self._node_costs is not None else None
        nodes = self.featurizer.node_matrix(g, order, costs)
        src, dst, feats = [], [], []
        for name in order:
            for v in g.nodes[name].inputs:
                p = g.producer.get(v) if v else None
                if p is not None:
                    src.append(row_of[p])
                    dst.append(row_of[name])
                    feats.append(self.featurizer.edge_row(g, v))
        if len(src) > self.config.max_edges:
            return None
        edge_index = np.array([src, dst], dtype=np.int64).reshape(2, len(src))
        edge_features = np.stack(feats) if feats else np.zeros((0, EDGE_FEATURES), np.float32)
        return nodes, edge_index, edge_features, row_of
