"""`xrlflow/GraphRewrite-v0`: pick one rewrite, one rewrite at every identical site, or stop, per step.

Observation (a Dict of fixed-size padded arrays, because SB3 needs fixed shapes):
    node_features      float32 (max_nodes, node_feature_size)  rows in the graph's topological order, 0 padding;
                                                               the per-node cost column holds the latency
                                                               service's per-node costs (`EnvConfig.node_costs`)
    edge_index         int64   (2, max_edges)                  producer row -> consumer row, -1 padding
    edge_features      float32 (max_edges, EDGE_FEATURES)      0 padding
    candidate_rules    int64   (max_candidates,)               rule index in the engine's order, -1 padding
    candidate_nodes    int64   (max_candidates, max_bound)     node rows a candidate binds (anchor first), -1 padding
    candidate_features float32 (max_candidates, CANDIDATE_FEATURES)  per slot: the predicted gain (see below) as
                                                               sign(g) log1p(10 |g|) / 4, g > 0, g < 0, macro
                                                               flag, log2(sites) / 4; 0 padding
    counts             int64   (3,)                            valid nodes, edges, candidates (a Box: SB3 one-hots Discrete)

Action: Discrete(max_candidates + 1); action i < num_candidates takes slot i, action max_candidates stops.
`action_masks()` is True on stop and on every valid slot except those already taken from this same graph
earlier in the episode. An action outside the mask is treated as stop and flagged with
`info["invalid_action"] = True` (stop itself is not flagged): the env never asserts.

Slots: first the single matches, then (`EnvConfig.macro_actions`) the macro slots. A macro applies one rule
at every structurally identical site (`xrlflow.sites.site_groups`: same rule, same bound ops, attributes,
shapes, constness and wiring, non-overlapping), one after the other (`xrlflow.sites.apply_at_sites`); its slot
shows the first site's nodes. Macros get at most half the slots; when there are more single matches than
the rest, a per-rule round-robin keeps the first match of every rule, then the second of every rule, ...;
the chosen ones keep engine order and `info["candidates_dropped"]` says how many slots were left out.

Predicted gain (`EnvConfig.cost_features`): 100 x (predicted latency decrease) / current predicted latency,
from the env's `predictor` (by default the latency service itself when it is deterministic, i.e. the cost
model; a measured service gets no predictor unless one is given, and the column stays 0). It is priced on
the rewrite's changed region only (`xrlflow.sites.local_cost_delta`, equal to the whole-graph difference)
once per group of identical sites, on the group's first match, and cached by a structural key of the
match's surroundings (`xrlflow.sites.region_key`); a macro's gain is that times its sites.

Reward: 100 * (L_prev - L_new) / L_initial, no living bonus. **Returning to a graph already seen in the
episode is penalised**: the step's reward is lowered by `config.revisit_penalty` (info["revisit"]), and
(`config.mask_taken`) the ways out taken before from that graph are masked, so a walk cannot cycle. Graphs
are told apart by structure, not names (`xrlflow.sites.ContentKeys`: the graph a round trip returns to has
new node names, and the way out is recognised by what it binds). A failed measurement (Latency.ok
False) ends the episode with reward `config.failure_penalty` (info["measurement_failed"]) and the failing
graph is not taken; a rewrite that grows the graph past max_nodes/max_edges ends the episode with reward 0
(info["graph_too_large"]) and is not taken either; a rewrite the engine refuses (GraphError: a bug in a rule's
find()) ends the episode with reward 0, a RuntimeWarning and info["rewrite_error"].

Episode end: terminated on stop (learned: the stop logit) or when no unmasked slot is left; truncated after
`config.max_steps` steps, or after `config.patience` steps in a row without a new best graph (no improving
chain was left within reach; 0 turns this off).

`best_graph` / `best_latency` / `best_path` hold the fastest graph seen in the current episode (the initial one
included) and the matches that lead to it.
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
from xrlflow.envs.features import DEFAULT_OP_VOCABULARY, EDGE_FEATURES, GraphFeaturizer, edge_count, node_feature_size
from xrlflow.errors import BadInputError, GraphError
from xrlflow.ir import Graph
from xrlflow.latency import Latency, LatencyService, NodeCosts
from xrlflow.sites import ContentKeys, apply_at_sites, local_cost_delta, region_key, site_groups, site_signature
from xrlflow.trajectory import SearchState

ENV_ID = "xrlflow/GraphRewrite-v0"
FEATURE_BOUND = 64.0  # features are log-scaled and non-negative (see features.py); far above any real value
CANDIDATE_FEATURES = 5
RECENT_GRAPHS = 512  # graphs whose slots and arrays an env keeps (see GraphRewriteEnv._recent_entry)

Slot = tuple[Match, ...]  # one match, or a macro: the same rule at several identical sites


@dataclass(frozen=True)
class EnvConfig:
    max_nodes: int = 2048
    max_edges: int = 4096
    max_candidates: int = option("candidate slots per step", 256, kind=int)
    max_bound: int = 8  # bound nodes shown per candidate
    # A macro does a 4-5-step chain in all 12 layers of BERT in 4-5 steps; 64 leaves room for the merges, the
    # CNNs' unrepeated sites and detours through slower graphs, and `patience` ends aimless walks earlier.
    max_steps: int = option("steps (rewrites or macros) per episode", 64, kind=int)  # before truncation
    failure_penalty: float = -10.0  # reward when the latency service fails on a rewritten graph
    op_vocabulary: tuple[str, ...] = field(default=DEFAULT_OP_VOCABULARY)
    # Fill the per-node cost column from the latency service's `node_costs` (when it has them, see
    # `xrlflow.latency.NodeCosts`). Checkpoints written before the column was filled trained on zeros.
    node_costs: bool = True
    macro_actions: bool = True  # offer "this rule at every identical site" slots
    cost_features: bool = True  # fill the predicted-gain candidate features
    revisit_penalty: float = 1.0  # subtracted from the reward of a step that lands on a graph seen before
    mask_taken: bool = True  # back at a graph, mask the ways out already taken from it
    patience: int = 16  # truncate after this many steps without a new best graph (0: never)

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_edges", "max_candidates", "max_bound", "max_steps"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"EnvConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.patience < 0 or self.revisit_penalty < 0:
            raise BadInputError("EnvConfig.patience and revisit_penalty must be >= 0")

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
        # a run.json from before a field: what the env did then
        values.setdefault("node_costs", False)  # the column was always 0
        values.setdefault("macro_actions", False)
        values.setdefault("cost_features", False)
        values.setdefault("revisit_penalty", 0.0)
        values.setdefault("mask_taken", False)
        values.setdefault("patience", 0)
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
        "candidate_features": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (c, CANDIDATE_FEATURES), np.float32),
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
        predictor: LatencyService | None = None,
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
        # what prices the candidates' predicted gain: a cheap deterministic service (the cost model)
        self.predictor = predictor if predictor is not None else (latency if latency.deterministic else None)
        self.model_index = 0
        self.graph: Graph = self.graphs[0]
        self._episode: SearchState | None = None  # this episode's best graph and the path to it
        self.current_latency: Latency | None = None
        self.steps = 0
        self.episode_done = True
        self._slots: list[Slot] = []
        self._singles = 0
        self._children: dict[int, Graph] = {}  # slot -> its graph, where pricing it already built it
        self._features = np.zeros((0, CANDIDATE_FEATURES), np.float32)
        self._dropped = 0
        self._applied: list[Match] = []
        # region key -> predicted ms change: a rewrite whose surroundings look the same (far from the last
        # rewrite, in another identical layer, on another rollout) is priced once
        self._delta_cache: dict[Any, float] = {}
        self._recent: dict[Any, dict[str, Any]] = {}  # see _recent_entry
        self._content = ContentKeys()  # revisits and ways out, recognised independently of node names

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
    def best_path(self) -> list[Match]:
        """The matches from the episode's start to `best_graph`."""
        return list(self._episode.best_path) if self._episode is not None else []

    @property
    def applied(self) -> list[Match]:
        """The matches applied so far in this episode, in order."""
        return list(self._applied)

    def _check_fits(self, name: str, g: Graph) -> None:
        edges = edge_count(g)
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
        self._episode = SearchState(self.graph, self.current_latency, key=self._content.graph_key)
        self.steps = 0
        self.episode_done = False
        self._applied = []
        self._refresh_candidates()
        return self._observation(), self._info(rule=None)

    def step(self, action):
        if self.episode_done:
            raise RuntimeError("step() called on a finished episode; call reset()")
        action = int(action)
        info_extra: dict[str, Any] = {"invalid_action": False, "measurement_failed": False, "graph_too_large": False,
                                      "revisit": False}
        valid = 0 <= action < len(self._slots) and not (
            self.config.mask_taken and self._episode.was_taken(self.graph, self._slot_key(action)))
        if not valid:
            info_extra["invalid_action"] = action != self.config.max_candidates
            return self._finish(0.0, terminated=True, truncated=False, rule=None, extra=info_extra)

        slot = self._slots[action]
        rule = slot[0].rule
        info_extra["sites"] = len(slot)
        try:
            new_graph = self._children.get(action)
            if new_graph is None or len(slot) > 1:
                new_graph, applied = apply_at_sites(self.engine, self.graph, slot)
            else:
                applied = list(slot)
        except GraphError as exc:  # a rule's find() offered a binding its rewrite cannot do: a rule bug
            warnings.warn(f"rule {rule} failed at {slot[0].nodes}: {exc}", RuntimeWarning, stacklevel=2)
            info_extra["rewrite_error"] = f"{rule}: {exc}"
            return self._finish(0.0, terminated=True, truncated=False, rule=rule, extra=info_extra)
        if self._arrays(new_graph) is None:  # grew past the padding: keep the current graph, end the episode
            info_extra["graph_too_large"] = True
            return self._finish(0.0, terminated=True, truncated=False, rule=rule, extra=info_extra)
        lat = self.latency_service.latency(new_graph)
        if not lat.ok:
            info_extra["measurement_failed"] = True
            info_extra["failure_reason"] = lat.reason
            return self._finish(self.config.failure_penalty, terminated=True, truncated=False, rule=rule,
                                extra=info_extra)
        initial = self._initial(self.model_index).ms
        reward = 100.0 * (self.current_latency.ms - lat.ms) / initial
        self._episode.take(self.graph, self._slot_key(action))
        if not self._episode.see(new_graph):
            reward -= self.config.revisit_penalty
            info_extra["revisit"] = True
        self.graph, self.current_latency = new_graph, lat
        self._applied.extend(applied)
        self.steps += 1
        self._episode.offer(new_graph, lat, self._applied)
        self._refresh_candidates()
        terminated = not self.action_masks()[: len(self._slots)].any()
        truncated = not terminated and (
            self.steps >= self.config.max_steps
            or (self.config.patience > 0 and self._episode.steps_since_best >= self.config.patience))
        return self._finish(reward, terminated=terminated, truncated=truncated, rule=rule, extra=info_extra)

    def _finish(self, reward: float, terminated: bool, truncated: bool, rule: str | None, extra: dict[str, Any]):
        self.episode_done = terminated or truncated
        info = self._info(rule=rule)
        info.update(extra)
        if self.episode_done:
            info["episode_steps"] = self.steps
        return self._observation(), float(reward), terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(self.config.max_candidates + 1, dtype=bool)
        mask[: len(self._slots)] = True
        taken = self._episode.taken.get(self._content.graph_key(self.graph)) if self._episode is not None else None
        if taken and self.config.mask_taken:  # back at a graph left before: its earlier ways out are closed
            for i in range(len(self._slots)):
                if self._slot_key(i) in taken:
                    mask[i] = False
        mask[-1] = True
        return mask

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lat = self.current_latency
        return (f"{self.model_name}: step {self.steps}, {len(self.graph)} nodes, "
                f"{lat.ms if lat else float('nan'):.4f} ms, {len(self._slots)} candidates")

    # ---- internals -------------------------------------------------------------------------------------------
    @property
    def candidates(self) -> list[Match]:
        """The single matches behind the first slots (slot i is candidates[i] for i < len(candidates))."""
        return [slot[0] for slot in self._slots[: self._singles]]

    @property
    def slots(self) -> list[Slot]:
        """Every slot's matches: one for a single rewrite, several for a macro (slot i is slots[i])."""
        return list(self._slots)

    @property
    def candidate_features(self) -> np.ndarray:
        return self._features.copy()

    def _slot_key(self, i: int) -> tuple[Any, ...]:
        """Slot i by what it rewrites, independent of node names (a revisited graph has new ones)."""
        return tuple(self._content.match_key(self.graph, m) for m in self._slots[i])

    def _recent_entry(self, g: Graph) -> dict[str, Any]:
        """This env's cache for a graph equal to `g` node for node (same names, same node values), such as the
        same path taken again in a later episode or rollout (a new graph object each time, with an empty
        memo); bounded, oldest entries dropped first."""
        memo = g.memo()
        entry = memo.get(("xrlflow.env.recent", id(self)))
        if entry is None:
            key = (g.structural_hash(), hash(tuple(g.nodes.items())))
            entry = self._recent.pop(key, None) or {}
            self._recent[key] = entry
            while len(self._recent) > RECENT_GRAPHS:
                self._recent.pop(next(iter(self._recent)))
            memo[("xrlflow.env.recent", id(self))] = entry
        return entry

    def _refresh_candidates(self) -> None:
        entry = self._recent_entry(self.graph)
        key = ("slots", self.engine.fingerprint, self.engine.allowed)
        self._children = {}
        if key not in entry:
            # the children are kept for this step only: cached they would keep every graph explored alive
            slots, singles, features, dropped, self._children = self._compute_slots(self.graph)
            entry[key] = (slots, singles, features, dropped)
        self._slots, self._singles, self._features, self._dropped = entry[key]

    def _compute_slots(self, g: Graph):
        cfg = self.config
        matches = self.engine.matches(g)
        signatures = [site_signature(g, m) for m in matches] if (cfg.macro_actions or cfg.cost_features) else []
        groups = site_groups(g, matches, signatures) if signatures else []
        macros = [grp for grp in groups if len(grp) >= 2] if cfg.macro_actions else []
        macro_room = min(len(macros), cfg.max_candidates // 2)
        singles = select_candidates(matches, cfg.max_candidates - macro_room, self.engine.rule_index)
        slots: list[Slot] = [(m,) for m in singles] + list(macros[:macro_room])
        dropped = len(matches) - len(singles) + len(macros) - macro_room
        features = np.zeros((len(slots), CANDIDATE_FEATURES), np.float32)
        children: dict[int, Graph] = {}
        if cfg.cost_features and self.predictor is not None and slots:
            signature_of = dict(zip(matches, signatures))
            gain_of: dict[int, float] = {}
            current_ms = self.predictor.latency(g).ms
            for i, slot in enumerate(slots):
                sig = signature_of[slot[0]]
                if sig not in gain_of:
                    key = region_key(g, slot[0])
                    cached = self._delta_cache.get(key)
                    if cached is None:
                        try:
                            child = self.engine.apply(g, slot[0])
                        except GraphError:
                            child = None
                        delta = 0.0 if child is None else local_cost_delta(self.predictor, g, child)
                        if len(self._delta_cache) >= 100_000:
                            self._delta_cache.clear()
                        cached = self._delta_cache[key] = delta
                        if child is not None and len(slot) == 1:
                            children[i] = child
                    gain_of[sig] = 100.0 * -cached / current_ms if current_ms > 0 else 0.0
                gain = gain_of[sig] * len(slot)
                features[i, 0] = math.copysign(math.log1p(10.0 * abs(gain)), gain) / 4.0
                features[i, 1] = float(gain > 1e-9)
                features[i, 2] = float(gain < -1e-9)
        for i, slot in enumerate(slots):
            features[i, 3] = float(len(slot) > 1)
            features[i, 4] = math.log2(len(slot)) / 4.0
        np.clip(features, -FEATURE_BOUND, FEATURE_BOUND, out=features)
        return slots, len(singles), features, dropped, children

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
            "num_candidates": len(self._slots),
            "candidates_dropped": self._dropped,
            "steps": self.steps,
        }

    def _arrays(self, g: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]] | None:
        """The graph's unpadded arrays (cached per graph in this env); None when the graph does not fit the
        padding."""
        entry = self._recent_entry(g)
        if "arrays" not in entry:
            entry["arrays"] = self._graph_arrays(g)
        return entry["arrays"]

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
            "candidate_features": np.zeros((cfg.max_candidates, CANDIDATE_FEATURES), np.float32),
            "counts": np.zeros(3, np.int64),
        }
        n, e = len(nodes), edge_index.shape[1]
        obs["node_features"][:n] = nodes
        obs["edge_index"][:, :e] = edge_index
        obs["edge_features"][:e] = edge_features
        for i, slot in enumerate(self._slots):
            m = slot[0]
            obs["candidate_rules"][i] = self.engine.rule_index[m.rule]
            bound = [row_of[name] for name in m.nodes[: cfg.max_bound]]
            obs["candidate_nodes"][i, : len(bound)] = bound
        obs["candidate_features"][: len(self._slots)] = self._features
        obs["counts"][:] = (n, e, len(self._slots))
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
