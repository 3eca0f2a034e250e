"""The Gymnasium environment: graph rewriting as an MDP (see graph_rewrite_env.py for the contract)."""

import gymnasium

from xrlflow.envs.graph_rewrite_env import ENV_ID, EnvConfig, GraphRewriteEnv, observation_space, select_candidates

if ENV_ID not in gymnasium.registry:
    # Deterministic by default; the env marks its spec nondeterministic itself when the reward is measured.
    gymnasium.register(id=ENV_ID, entry_point="xrlflow.envs.graph_rewrite_env:GraphRewriteEnv")

__all__ = ["ENV_ID", "EnvConfig", "GraphRewriteEnv", "observation_space", "select_candidates"]
