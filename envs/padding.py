"""The sizes the env pads its observation arrays to (`EnvConfig.max_nodes`, `max_edges`, `max_candidates`).

Two sizings with two purposes, both here so that neither is computed anywhere else:

- `training_padding`: one observation space for every training graph, for the whole run. It is saved with the
  checkpoint (policy.zip's observation_space, run.json's env_config) and a resumed run reads it back, so it
  is sized once: the largest graph plus a quarter for the Concat/Split nodes rewrites add, in steps of 64.
- `rollout_padding`: one graph at inference. The policy scores each candidate on its own, so it runs on any
  padding; this is never below the trained one and leaves double room, so that a rollout is not cut short by a
  graph that grows (and the optimizer's outputs depend on it: changing it changes what a policy finds).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from xrlflow.engine import RewriteEngine
from xrlflow.envs.features import edge_count
from xrlflow.envs.graph_rewrite_env import EnvConfig
from xrlflow.ir import Graph


def training_padding(graphs: Iterable[Graph], base: EnvConfig) -> EnvConfig:
    """`base` padded to the largest of `graphs` with room to grow."""
    graphs = list(graphs)

    def room(n: int) -> int:
        return max(64, int(math.ceil(n * 1.25 / 64.0)) * 64)

    nodes = max(len(g.nodes) for g in graphs)
    edges = max(edge_count(g) for g in graphs)
    return dataclasses.replace(base, max_nodes=room(nodes), max_edges=room(edges))


def rollout_padding(graph: Graph, engine: RewriteEngine, trained: EnvConfig) -> EnvConfig:
    """`trained` padded for rollouts over `graph` alone: never smaller, and twice the graph's nodes, edges and
    matches (plus a margin; the macro slots sit beside the single ones)."""
    return dataclasses.replace(
        trained,
        max_nodes=max(trained.max_nodes, 2 * len(graph) + 64),
        max_edges=max(trained.max_edges, 2 * edge_count(graph) + 128),
        max_candidates=max(trained.max_candidates, 2 * len(engine.matches(graph)) + 16),
    )


__all__ = ["rollout_padding", "training_padding"]
