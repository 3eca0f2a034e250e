"""Checkpoints of a training run and `load_policy` for inference.

A run directory (checkpoints/<run>/) holds:
    policy.zip   the MaskablePPO model (SB3 format: policy weights, optimizer, spaces, policy kwargs)
    run.json     {"rule_fingerprint", "rule_names", "env_config", "policy_config", "train_config",
                  "num_timesteps", "best_speedup", ...}
Both are written atomically (temporary file + rename), so a run killed mid-save keeps its previous checkpoint.

`load_policy(path)` accepts the run directory or its policy.zip, refuses a checkpoint trained on another rule
registry (BadInputError), and returns a `TrainedPolicy` that runs on observations of any padding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from xrlflow.atomic import replacing, write_bytes
from xrlflow.agents.gnn_policy import CandidateGNNPolicy, CandidateScorer
from xrlflow.engine import RewriteEngine
from xrlflow.envs import EnvConfig, GraphRewriteEnv
from xrlflow.envs.padding import rollout_padding
from xrlflow.ir import Graph
from xrlflow.errors import BadInputError

POLICY_FILE = "policy.zip"
META_FILE = "run.json"


def save_checkpoint(model: Any, run_dir: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
    """Save a MaskablePPO model and its run metadata into run_dir; returns the policy path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with replacing(run_dir / POLICY_FILE, suffix=".zip") as tmp:
        model.save(tmp)
    write_bytes(run_dir / META_FILE, (json.dumps(dict(meta), indent=2, sort_keys=True) + "\n").encode())
    return run_dir / POLICY_FILE


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(policy.zip, run.json) for a run directory or a policy.zip path; BadInputError when either is missing."""
    p = Path(path)
    policy = p / POLICY_FILE if p.is_dir() else p
    meta = policy.parent / META_FILE
    if not policy.is_file():
        raise BadInputError(f"{path}: no checkpoint ({policy} does not exist)")
    if not meta.is_file():
        raise BadInputError(f"{path}: checkpoint without {META_FILE} (its rule fingerprint cannot be checked)")
    return policy, meta


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    _, meta_path = checkpoint_paths(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{meta_path}: unreadable checkpoint metadata ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or "rule_fingerprint" not in meta:
        raise BadInputError(f"{meta_path}: checkpoint metadata has no rule_fingerprint")
    return meta


def check_fingerprint(meta: Mapping[str, Any], expected: str | None = None, where: str = "checkpoint") -> None:
    """Refuse a checkpoint trained on another rule registry (the rule index is part of the action meaning)."""
    if expected is None:
        from xrlflow.rules import RULE_FINGERPRINT

        expected = RULE_FINGERPRINT
    found = meta.get("rule_fingerprint")
    if found != expected:
        from xrlflow.shipped import DEFAULT_POLICY

        if Path(where).name in (DEFAULT_POLICY, POLICY_FILE) and DEFAULT_POLICY in str(where):
            advice = f"this is a copy of the shipped {DEFAULT_POLICY} from another xrlflow version: reinstall xrlflow"
        else:
            advice = (f"use the shipped policy {DEFAULT_POLICY} (--policy checkpoints/{DEFAULT_POLICY}, trained on "
                      "this registry), retrain, or use the matching xrlflow version")
        raise BadInputError(f"{where} was trained with rule registry {found} but this build has {expected}; {advice}")


@dataclass
class TrainedPolicy:
    """A trained candidate policy for inference (no SB3 model, no env needed)."""

    policy: CandidateGNNPolicy
    meta: dict[str, Any]
    device: torch.device

    @property
    def env_config(self) -> EnvConfig:
        """The env config the policy was trained with (any padding works at inference)."""
        return EnvConfig.from_dict(self.meta["env_config"])

    @property
    def rule_fingerprint(self) -> str:
        return self.meta["rule_fingerprint"]

    def _tensors(self, obs: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], bool]:
        single = np.asarray(obs["counts"]).ndim == 1
        out = {}
        for key, value in obs.items():
            arr = np.asarray(value)
            if single:
                arr = arr[None]
            out[key] = torch.as_tensor(arr, dtype=torch.float32, device=self.device)
        return out, single

    @torch.no_grad()
    def action_probabilities(self, obs: Mapping[str, np.ndarray], masks: np.ndarray) -> np.ndarray:
        """Probabilities over candidate slots then stop (masked); shape (C + 1,) or (B, C + 1)."""
        tensors, single = self._tensors(obs)
        scorer: CandidateScorer = self.policy.features_extractor  # type: ignore[assignment]
        logits, _ = scorer.scores(tensors)
        mask = torch.as_tensor(np.asarray(masks, dtype=bool), device=self.device)
        if single:
            mask = mask[None]
        if mask.shape != logits.shape:
            raise BadInputError(f"action mask shape {tuple(mask.shape)} does not match the observation's "
                                f"{tuple(logits.shape)} (candidate slots + stop)")
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).cpu().numpy()
        return probs[0] if single else probs

    def choose(self, obs: Mapping[str, np.ndarray], masks: np.ndarray, rng: np.random.Generator | None) -> int:
        """The `xrlflow.search.Choose` of this policy: its most probable action without `rng`, else a sample."""
        return int(self.act(obs, masks, deterministic=rng is None, rng=rng))

    def env_maker(self, graph: Graph, engine: RewriteEngine, steps: int) -> Callable[..., GraphRewriteEnv]:
        """What `xrlflow.search.policy_search` builds its env with: the trained env config (its op vocabulary
        fixes the feature layout) padded to fit `graph` alone.

        The policy scores each candidate on its own, so any padding works (`envs.padding.rollout_padding`). The env is built as
        `maker(latency, predictor=None)` (the predictor prices the candidates' predicted gain)."""
        config = dataclasses.replace(rollout_padding(graph, engine, self.env_config), max_steps=max(1, steps))
        return lambda latency, predictor=None: GraphRewriteEnv([("model", graph)], latency, config, engine,
                                                               predictor=predictor)

    def act(self, obs: Mapping[str, np.ndarray], masks: np.ndarray, deterministic: bool = True,
            rng: np.random.Generator | None = None) -> int | np.ndarray:
        """The chosen action (slot index, or C for stop) for one observation, or an array for a batch."""
        probs = self.action_probabilities(obs, masks)
        if deterministic:
            choice = probs.argmax(-1)
        else:
            rng = rng or np.random.default_rng()
            flat = np.atleast_2d(probs)
            choice = np.array([rng.choice(len(p), p=p / p.sum()) for p in flat])
            choice = choice[0] if probs.ndim == 1 else choice
        return int(choice) if np.ndim(choice) == 0 else choice

    def predict(self, observation: Mapping[str, np.ndarray], state: Any = None, episode_start: Any = None,
                deterministic: bool = False, action_masks: np.ndarray | None = None):
        """SB3-style predict: (actions, None). `action_masks` is required (padding must never be chosen)."""
        if action_masks is None:
            raise BadInputError("predict() needs action_masks (env.action_masks())")
        return np.asarray(self.act(observation, action_masks, deterministic)), None

    @torch.no_grad()
    def value(self, obs: Mapping[str, np.ndarray]) -> float | np.ndarray:
        tensors, single = self._tensors(obs)
        _, features = self.policy.features_extractor.scores(tensors)  # type: ignore[union-attr]
        v = self.policy.value_net(features).squeeze(-1).cpu().numpy()
        return float(v[0]) if single else v


def policy_device(device: str) -> str:
    """The torch device a policy runs on when optimising for `device`: the GPU when there is one."""
    return "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"


def load_policy(path: str | os.PathLike[str], device: str = "cpu", expected_fingerprint: str | None = None) -> TrainedPolicy:
    """Load a checkpoint for inference; BadInputError when it is missing, unreadable or from another registry."""
    from stable_baselines3.common.save_util import load_from_zip_file

    policy_path, _ = checkpoint_paths(path)
    meta = read_meta(path)
    check_fingerprint(meta, expected_fingerprint, where=str(path))
    try:
        data, params, _ = load_from_zip_file(policy_path, device=device, print_system_info=False)
    except Exception as exc:
        raise BadInputError(f"{policy_path}: unreadable policy ({type(exc).__name__}: {exc})") from None
    if data is None or params is None or "policy" not in params:
        raise BadInputError(f"{policy_path}: the file holds no policy weights")
    kwargs = dict(data.get("policy_kwargs") or {})
    policy = CandidateGNNPolicy(data["observation_space"], data["action_space"], lambda _: 0.0, **kwargs)
    try:
        policy.load_state_dict(params["policy"])
    except RuntimeError as exc:
        raise BadInputError(f"{policy_path}: weights do not fit the policy ({str(exc).splitlines()[0]})") from None
    policy.to(device).eval()
    return TrainedPolicy(policy, meta, torch.device(device))
