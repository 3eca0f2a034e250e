"""SB3 construction for training: the vectorised envs, the reward normaliser, MaskablePPO and the callback
that logs per-model speedups and writes checkpoints. `xrlflow.train` wires these together."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from xrlflow.agents.checkpoint import POLICY_FILE, save_checkpoint
from xrlflow.agents.gnn_policy import CandidateGNNPolicy, PolicyConfig
from xrlflow.atomic import replacing
from xrlflow.envs import EnvConfig, GraphRewriteEnv

REWARD_STATS_FILE = "reward_normalization.pkl"
INFO_KEYWORDS = ("model", "speedup", "best_speedup")


def make_vec_env(graphs, latency, env_config: EnvConfig, num_envs: int, ray: bool = False):
    """DummyVecEnv, or with `ray` a RayVecEnv whose sub-envs are Ray actors (connect to Ray first)."""

    def factory():
        return Monitor(GraphRewriteEnv(graphs, latency, env_config), info_keywords=INFO_KEYWORDS)

    if ray:
        from xrlflow.agents.ray_vec_env import make_ray_vec_env

        return make_ray_vec_env([factory for _ in range(num_envs)])
    return DummyVecEnv([factory for _ in range(num_envs)])


def normalize_rewards(vec_env, gamma: float, stats_path: Path | None = None):
    """Scale rewards by the running std of returns (observations untouched: they hold index arrays).

    The env's reward (100 x relative latency change) reaches tens of units per step; unscaled, the value loss
    dominates the shared encoder's gradient, which PPO clips as a whole, and the policy stops learning."""
    if stats_path is not None and stats_path.is_file():
        wrapped = VecNormalize.load(str(stats_path), vec_env)
        wrapped.training = True
        return wrapped
    return VecNormalize(vec_env, norm_obs=False, norm_reward=True, gamma=gamma)


def build_ppo(vec_env, ppo: Mapping[str, Any], policy_config: PolicyConfig, seed: int, device: str,
              tensorboard_log: str, resume_from: Path | None = None) -> MaskablePPO:
    """A new MaskablePPO with the candidate GNN policy (`ppo`: its hyperparameters), or the one saved in
    `resume_from` (reseeded by its step count, so a resumed run does not replay the same samples)."""
    if resume_from is not None:
        model = MaskablePPO.load(resume_from / POLICY_FILE, env=vec_env, device=device)
        model.set_random_seed(seed + int(model.num_timesteps))
        return model
    return MaskablePPO(
        CandidateGNNPolicy, vec_env, **ppo, seed=seed, device=device, tensorboard_log=tensorboard_log,
        policy_kwargs={"policy_config": policy_config.to_dict()}, verbose=0,
    )


class TrainingProgress(BaseCallback):
    """Per-model episode speedups to TensorBoard, a progress bar with the best speedup, checkpoints every
    `checkpoint_every` env steps (the reward statistics first, so a policy.zip never points at missing ones)."""

    def __init__(self, run_dir: Path, meta_base: Mapping[str, Any], start_best: Mapping[str, float],
                 checkpoint_every: int, total_steps: int, bar_label: str | None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.meta_base = dict(meta_base)
        self.checkpoint_every = checkpoint_every
        self.total_steps = total_steps
        self.bar_label = bar_label  # None: no progress bar
        self.best: dict[str, float] = dict(start_best)
        self.best_hash: dict[str, str] = {}
        self.bar = None
        self.last_checkpoint = 0

    def _on_training_start(self) -> None:
        self.last_checkpoint = self.num_timesteps
        if self.bar_label is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.num_timesteps, unit="step", dynamic_ncols=True,
                            desc=self.bar_label)

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if not done:
                continue
            model = info["model"]
            self.logger.record_mean(f"episode/speedup/{model}", info["speedup"])
            self.logger.record_mean(f"episode/best_speedup/{model}", info["best_speedup"])
            if info["best_speedup"] > self.best.get(model, 0.0):
                self.best[model] = info["best_speedup"]
                self.best_hash[model] = info["best_hash"]
            self.logger.record(f"best/speedup/{model}", self.best.get(model, 1.0))
        if self.bar is not None:
            self.bar.update(self.training_env.num_envs)
            if self.best:
                self.bar.set_postfix_str(
                    "best " + " ".join(f"{m}={s:.3f}x" for m, s in sorted(self.best.items())), refresh=False)
        if self.num_timesteps - self.last_checkpoint >= self.checkpoint_every:
            self.save()
        return True

    def save(self) -> None:
        self.last_checkpoint = self.num_timesteps
        meta = dict(self.meta_base, num_timesteps=int(self.num_timesteps), best_speedup=self.best,
                    best_hash=self.best_hash, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        normalizer = self.model.get_vec_normalize_env()
        if normalizer is not None:
            with replacing(self.run_dir / REWARD_STATS_FILE) as tmp:
                normalizer.save(str(tmp))
        save_checkpoint(self.model, self.run_dir, meta)

    def _on_training_end(self) -> None:
        self.save()
        if self.bar is not None:
            self.bar.close()


def learn(model: MaskablePPO, callback: TrainingProgress, total_steps: int, run_name: str, resume: bool) -> None:
    """Train up to `total_steps` env steps in all (a resumed run only does what is left); always checkpoint."""
    remaining = total_steps - int(model.num_timesteps)
    if remaining > 0:
        model.learn(remaining, callback=callback, tb_log_name=run_name, reset_num_timesteps=not resume)
    else:
        callback.init_callback(model)
        callback.save()


__all__ = ["REWARD_STATS_FILE", "TrainingProgress", "build_ppo", "learn", "make_vec_env", "normalize_rewards"]

