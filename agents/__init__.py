"""The agent: a per-candidate GNN policy for MaskablePPO, its checkpoints and `load_policy` for inference."""

from xrlflow.agents.checkpoint import (
    TrainedPolicy, check_fingerprint, load_policy, policy_device, read_meta, save_checkpoint,
)
from xrlflow.agents.gnn_policy import CandidateGNNPolicy, CandidateScorer, PolicyConfig

__all__ = [
    "CandidateGNNPolicy", "CandidateScorer", "PolicyConfig", "TrainedPolicy", "check_fingerprint", "load_policy", "policy_device",
    "read_meta", "save_checkpoint",
]
