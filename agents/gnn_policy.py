"""A per-candidate GNN policy for the graph rewrite env, wired into sb3-contrib's MaskablePPO.

The encoder (GINEConv layers with edge features, messages both along and against the dataflow) embeds every
node of the current graph. Each candidate's logit is MLP(rule embedding + anchor node embedding + mean of its
bound nodes' embeddings + graph embedding + the candidate's own features: predicted gain, macro flag, sites);
the stop logit comes from the graph embedding plus the best predicted gain on offer and whether any candidate
is predicted to gain; the value from the graph embedding. A policy saved before the candidate features
existed has no `candidate_features` in its observation space and is built without them. No
weight is tied to a candidate slot, so one policy runs on any graph size and any number of candidates.

SB3 wiring: the features extractor returns [logits of every slot and stop | value features]; the MLP extractor
only splits that vector and the action net is the identity, so SB3's masked categorical distribution gets the
candidate logits unchanged. Observations arrive as float32 (SB3 casts every key): index arrays are cast back
to long here, and all padding sizes are read from the tensors, not the space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import torch
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch_geometric.nn import GINEConv, global_max_pool, global_mean_pool

from xrlflow.cli_options import option

FEATURE_FLOOR = 4.0  # the stop head's "best predicted gain" when no slot is valid is 0; clamp below at -4


@dataclass(frozen=True)
class PolicyConfig:
    hidden: int = option("width of the GNN and the scorer", 64, kind=int)
    layers: int = option("GINEConv layers", 4, kind=int)
    rule_embedding: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GraphEncoder(nn.Module):
    """Node embeddings and a graph embedding for a batch of padded graphs."""

    def __init__(self, node_features: int, edge_features: int, cfg: PolicyConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.node_in = nn.Linear(node_features, h)
        # one more edge feature: +1 along the dataflow, -1 for the reversed copy of the edge
        self.edge_in = nn.Linear(edge_features + 1, h)
        self.convs = nn.ModuleList(GINEConv(_mlp([h, h, h]), edge_dim=h) for _ in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.layers))
        self.graph_out = nn.Linear(2 * h, h)

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (node embeddings of all valid nodes, stacked; per-graph row offset; graph embeddings;
        batch vector)."""
        counts = obs["counts"].long()
        n_nodes, n_edges = counts[:, 0], counts[:, 1]
        batch_size, max_nodes, _ = obs["node_features"].shape
        max_edges = obs["edge_index"].shape[-1]
        device = obs["node_features"].device

        node_mask = torch.arange(max_nodes, device=device)[None, :] < n_nodes[:, None]
        x = obs["node_features"][node_mask]
        batch = torch.arange(batch_size, device=device).repeat_interleave(n_nodes)
        offsets = torch.cumsum(n_nodes, 0) - n_nodes

        edge_mask = torch.arange(max_edges, device=device)[None, :] < n_edges[:, None]
        edge_index = obs["edge_index"].long() + offsets[:, None, None]  # (B, 2, E)
        edge_index = edge_index.permute(1, 0, 2)[:, edge_mask]  # (2, total edges)
        edge_attr = obs["edge_features"][edge_mask]
        direction = torch.ones(edge_attr.shape[0], 1, device=device)
        edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        edge_attr = torch.cat([torch.cat([edge_attr, direction], 1), torch.cat([edge_attr, -direction], 1)], 0)

        h = torch.relu(self.node_in(x))
        e = torch.relu(self.edge_in(edge_attr))
        for conv, norm in zip(self.convs, self.norms):
            h = norm(h + torch.relu(conv(h, edge_index, e)))
        pooled = torch.cat([global_mean_pool(h, batch, batch_size), global_max_pool(h, batch, batch_size)], 1)
        graph = torch.relu(self.graph_out(pooled))
        return h, offsets, graph, batch


class CandidateScorer(BaseFeaturesExtractor):
    """Features extractor: [slot logits (max_candidates) | stop logit | value features (hidden)]."""

    def __init__(self, observation_space: gym.spaces.Dict, hidden: int = 64, layers: int = 4,
                 rule_embedding: int = 16) -> None:
        cfg = PolicyConfig(hidden, layers, rule_embedding)
        self.max_candidates = int(observation_space["candidate_rules"].shape[0])
        super().__init__(observation_space, features_dim=self.max_candidates + 1 + hidden)
        self.cfg = cfg
        self.num_rules = int(observation_space["candidate_rules"].high.max()) + 1
        self.encoder = GraphEncoder(
            int(observation_space["node_features"].shape[-1]), int(observation_space["edge_features"].shape[-1]), cfg)
        h = hidden
        spaces = observation_space.spaces
        self.candidate_features = int(spaces["candidate_features"].shape[-1]) if "candidate_features" in spaces else 0
        stop_extra = 2 if self.candidate_features else 0
        self.rule_embedding = nn.Embedding(self.num_rules, rule_embedding)
        self.candidate_head = _mlp([rule_embedding + 3 * h + self.candidate_features, h, h, 1])
        self.stop_head = _mlp([h + stop_extra, h, 1])
        self.value_features = _mlp([h, h])

    def scores(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over candidate slots then stop, (B, C + 1); value features (B, hidden)). Padding slots get
        a finite very negative logit; the env's mask removes them anyway."""
        node_emb, offsets, graph_emb, _ = self.encoder(obs)
        rules = obs["candidate_rules"].long()  # (B, C)
        bound = obs["candidate_nodes"].long()  # (B, C, K)
        batch_size, num_slots = rules.shape
        valid_slot = rules >= 0
        valid_bound = (bound >= 0) & valid_slot[:, :, None]
        flat = (bound.clamp(min=0) + offsets[:, None, None]).clamp(max=max(node_emb.shape[0] - 1, 0))
        emb = node_emb[flat] if node_emb.shape[0] else torch.zeros(*flat.shape, node_emb.shape[1], device=rules.device)
        emb = emb * valid_bound[..., None]
        mean_bound = emb.sum(2) / valid_bound.sum(2, keepdim=True).clamp(min=1)
        anchor = emb[:, :, 0]
        rule_emb = self.rule_embedding(rules.clamp(min=0, max=self.num_rules - 1))
        graph_per_slot = graph_emb[:, None, :].expand(batch_size, num_slots, graph_emb.shape[1])
        parts = [rule_emb, anchor, mean_bound, graph_per_slot]
        stop_input = graph_emb
        if self.candidate_features:
            feats = obs["candidate_features"] * valid_slot[..., None]
            parts.append(feats)
            gain = torch.where(valid_slot, feats[..., 0], torch.full_like(feats[..., 0], -FEATURE_FLOOR))
            best_gain = gain.max(1).values.clamp(min=-FEATURE_FLOOR) if num_slots else torch.zeros(batch_size)
            best_gain = torch.where(valid_slot.any(1), best_gain, torch.zeros_like(best_gain))
            stop_input = torch.cat([graph_emb, best_gain[:, None], feats[..., 1].amax(1, keepdim=True)
                                    if num_slots else torch.zeros(batch_size, 1)], 1)
        logits = self.candidate_head(torch.cat(parts, -1)).squeeze(-1)
        logits = torch.where(valid_slot, logits, torch.full_like(logits, -1e8))
        stop = self.stop_head(stop_input)
        return torch.cat([logits, stop], 1), self.value_features(graph_emb)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, value_features = self.scores(obs)
        return torch.cat([logits, value_features], 1)


class SplitLogitsAndValue(nn.Module):
    """Stands in for SB3's MLP extractor: splits the scorer's output into (logits, value features)."""

    def __init__(self, num_actions: int, value_dim: int) -> None:
        super().__init__()
        self.latent_dim_pi = num_actions
        self.latent_dim_vf = value_dim

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, : self.latent_dim_pi]

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, self.latent_dim_pi:]


class CandidateGNNPolicy(MaskableActorCriticPolicy):
    """MaskablePPO policy: GNN candidate scorer as features extractor, identity action net."""

    def __init__(self, observation_space, action_space, lr_schedule, policy_config: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        cfg = PolicyConfig(**(policy_config or {}))
        kwargs.setdefault("ortho_init", False)
        kwargs["features_extractor_class"] = CandidateScorer
        kwargs["features_extractor_kwargs"] = cfg.to_dict()
        kwargs["share_features_extractor"] = True
        self.policy_config = cfg
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = SplitLogitsAndValue(int(self.action_space.n), self.policy_config.hidden)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.action_net = nn.Identity()  # the scorer already produced one logit per slot
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["policy_config"] = self.policy_config.to_dict()
        return data
