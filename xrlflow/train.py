"""`xrlflow train` / `python train.py`: one MaskablePPO policy across several zoo models.

    python train.py --models bert-base,resnext50 --latency cost --steps 20000 --seed 0 --run-name demo --small

Writes TensorBoard logs under runs/<run>_N (per-model episode speedup and best speedup, SB3's entropy and
value loss), checkpoints under checkpoints/<run>/ (policy.zip + run.json with the rule fingerprint, the env,
policy and training configs). `--resume` continues a killed run from its last checkpoint; a checkpoint of
another rule registry is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from xrlflow.errors import BadInputError

LATENCY_KINDS = ("cost", "measured")
REWARD_STATS_FILE = "reward_normalization.pkl"


@dataclass(frozen=True)
class TrainConfig:
    models: tuple[str, ...]
    latency: str = "cost"  # cost | measured
    device: str = "cpu"  # the device the latency (reward) is for: cpu, or cuda (the H200 table with --latency cost)
    policy_device: str = "cpu"  # the policy's torch device (GNN training is small: the CPU is the default)
    steps: int = 20_000  # total env steps
    seed: int = 0
    run_name: str = "run"
    small: bool = False
    num_envs: int = 4
    learning_rate: float = 1e-3
    n_steps: int = 64  # env steps per env per rollout
    batch_size: int = 64
    n_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    hidden: int = 64
    layers: int = 4
    max_steps: int = 50  # rewrites per episode
    max_candidates: int = 256
    checkpoint_every: int = 2048  # env steps between checkpoints
    torch_threads: int = 1  # one intra-op thread: a thread pool on a shared 2-core machine is 10x slower
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"
    progress: bool = True
    ray_address: str | None = None  # None: envs in this process; local | auto | HOST:PORT: envs as Ray actors
    measure_workers: int | None = None  # Ray measurement actors (None: one per GPU on cuda, else 1)

    def __post_init__(self) -> None:
        if not self.models:
            raise BadInputError("--models: give at least one zoo model")
        if self.latency not in LATENCY_KINDS:
            raise BadInputError(f"--latency {self.latency!r}: use one of {', '.join(LATENCY_KINDS)}")
        if self.device not in ("cpu", "cuda"):
            raise BadInputError(f"--device {self.device!r}: use cpu or cuda")
        for name in ("steps", "num_envs", "n_steps", "batch_size", "n_epochs", "max_steps", "max_candidates",
                     "checkpoint_every", "torch_threads", "hidden", "layers"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise BadInputError("--lr must be positive")
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise BadInputError(f"--run-name {self.run_name!r}: use a plain folder name")
        if self.measure_workers is not None and self.ray_address is None:
            raise BadInputError("--measure-workers needs --ray-address (local starts Ray on this machine)")
        if self.measure_workers is not None and self.measure_workers < 1:
            raise BadInputError(f"measure-workers must be at least 1, got {self.measure_workers}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["models"] = list(self.models)
        return d

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoints_dir) / self.run_name


# ---- wiring ----------------------------------------------------------------------------------------------------
def load_zoo_graphs(models: Sequence[str], small: bool) -> list[tuple[str, Any]]:
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import load_graph
    from xrlflow.rules import CANONICAL_RULES, default_engine
    from xrlflow.zoo import export_model

    engine = default_engine()
    graphs = []
    for name in models:
        # Episodes start from the canonical form, as `xrlflow optimize` does (BatchNorm folded into convs).
        graphs.append((name, prepare_for_search(load_graph(export_model(name, small=small)), engine, CANONICAL_RULES)))
    return graphs


def make_latency_service(kind: str, device: str):
    if kind == "measured":
        from xrlflow.measure import MeasureConfig, MeasuredLatency

        return MeasuredLatency(MeasureConfig(device=device))
    from xrlflow.costmodel import CostModel

    # The GPU profile is the H200, with its per-kernel table measured by bench/gpu.sh (bundled).
    return CostModel.for_device("h200" if device == "cuda" else "cpu")


def env_config_for(graphs: Sequence[tuple[str, Any]], cfg: TrainConfig):
    """Padding sized to the largest graph with room to grow (rewrites add Concat/Split nodes)."""
    from xrlflow.envs import EnvConfig

    def room(n: int) -> int:
        return max(64, int(math.ceil(n * 1.25 / 64.0)) * 64)

    nodes = max(len(g.nodes) for _, g in graphs)
    edges = max(sum(1 for n in g.nodes.values() for v in n.inputs if v and v in g.producer) for _, g in graphs)
    return EnvConfig(max_nodes=room(nodes), max_edges=room(edges), max_candidates=cfg.max_candidates,
                     max_steps=cfg.max_steps)


def make_vec_env(graphs, latency, env_config, num_envs: int, ray: bool = False):
    """DummyVecEnv, or with `ray` a RayVecEnv whose sub-envs are Ray actors (connect to Ray first)."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from xrlflow.envs import GraphRewriteEnv

    info_keywords = ("model", "speedup", "best_speedup")

    def factory():
        return Monitor(GraphRewriteEnv(graphs, latency, env_config), info_keywords=info_keywords)

    if ray:
        from xrlflow.distributed import make_ray_vec_env

        return make_ray_vec_env([factory for _ in range(num_envs)])
    return DummyVecEnv([factory for _ in range(num_envs)])


def make_pooled_latency_service(device: str, workers: int | None):
    """The measured latency service on a Ray measurement pool (one actor per GPU on cuda)."""
    from xrlflow.distributed import MeasurementPool, PoolConfig
    from xrlflow.measure import MeasureConfig

    return MeasurementPool(PoolConfig(MeasureConfig(device=device), workers=workers))


def normalize_rewards(vec_env, gamma: float, stats_path: Path | None = None):
    """Scale rewards by the running std of returns (observations untouched: they hold index arrays).

    The env's reward (100 x relative latency change) reaches tens of units per step; unscaled, the value loss
    dominates the shared encoder's gradient, which PPO clips as a whole, and the policy stops learning."""
    from stable_baselines3.common.vec_env import VecNormalize

    if stats_path is not None and stats_path.is_file():
        wrapped = VecNormalize.load(str(stats_path), vec_env)
        wrapped.training = True
        return wrapped
    return VecNormalize(vec_env, norm_obs=False, norm_reward=True, gamma=gamma)


def _progress_callback(cfg: TrainConfig, env_config, meta_base: dict[str, Any], start_best: dict[str, float]):
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    from xrlflow.agents import save_checkpoint

    class TrainingProgress(BaseCallback):
        """Per-model episode speedups to TensorBoard, a progress bar with the best speedup, checkpoints."""

        def __init__(self) -> None:
            super().__init__()
            self.best: dict[str, float] = dict(start_best)
            self.best_hash: dict[str, str] = {}
            self.bar = None
            self.last_checkpoint = 0

        def _on_training_start(self) -> None:
            self.last_checkpoint = self.num_timesteps
            if cfg.progress:
                self.bar = tqdm(total=cfg.steps, initial=self.num_timesteps, unit="step", dynamic_ncols=True,
                                desc=cfg.run_name)

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
            if self.num_timesteps - self.last_checkpoint >= cfg.checkpoint_every:
                self.save()
            return True

        def save(self) -> None:
            self.last_checkpoint = self.num_timesteps
            meta = dict(meta_base, num_timesteps=int(self.num_timesteps), best_speedup=self.best,
                        best_hash=self.best_hash, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            normalizer = self.model.get_vec_normalize_env()
            if normalizer is not None:  # saved first: a policy.zip never points at missing reward statistics
                target = cfg.run_dir / REWARD_STATS_FILE
                cfg.run_dir.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                normalizer.save(str(tmp))
                os.replace(tmp, target)
            save_checkpoint(self.model, cfg.run_dir, meta)

        def _on_training_end(self) -> None:
            self.save()
            if self.bar is not None:
                self.bar.close()

    return TrainingProgress()


def train(cfg: TrainConfig, resume: bool = False, graphs=None, latency=None) -> dict[str, Any]:
    """Train (or resume) a run; returns the final checkpoint metadata. `graphs`/`latency` override the zoo
    models and the latency kind (tests, benchmarks)."""
    import torch

    from xrlflow.agents import check_fingerprint, read_meta
    from xrlflow.agents.checkpoint import POLICY_FILE

    if cfg.policy_device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--policy-device cuda: this torch build sees no CUDA device")
    torch.set_num_threads(cfg.torch_threads)
    run_dir = cfg.run_dir
    has_checkpoint = (run_dir / POLICY_FILE).is_file()
    previous: dict[str, Any] = {}
    if resume:
        if not has_checkpoint:
            raise BadInputError(f"--resume: no checkpoint in {run_dir}")
        previous = read_meta(run_dir)
        check_fingerprint(previous, where=str(run_dir))
        if list(previous.get("train_config", {}).get("models", [])) != list(cfg.models):
            raise BadInputError(f"--resume: {run_dir} trained on models {previous['train_config']['models']}, "
                                f"not {list(cfg.models)}")
    elif has_checkpoint:
        raise BadInputError(f"{run_dir} already holds a run; use --resume or another --run-name")

    graphs = graphs if graphs is not None else load_zoo_graphs(cfg.models, cfg.small)
    if cfg.ray_address is None:
        return _train_with(cfg, resume, previous, graphs,
                           latency if latency is not None else make_latency_service(cfg.latency, cfg.device))
    from xrlflow.distributed import RaySession

    with RaySession(cfg.ray_address):
        if latency is not None or cfg.latency != "measured":
            return _train_with(cfg, resume, previous, graphs,
                               latency if latency is not None else make_latency_service(cfg.latency, cfg.device))
        with make_pooled_latency_service(cfg.device, cfg.measure_workers) as pool:
            return _train_with(cfg, resume, previous, graphs, pool.client)


def _train_with(cfg: TrainConfig, resume: bool, previous: dict[str, Any], graphs, latency) -> dict[str, Any]:
    from sb3_contrib import MaskablePPO

    from xrlflow.agents import CandidateGNNPolicy, PolicyConfig, read_meta
    from xrlflow.agents.checkpoint import POLICY_FILE
    from xrlflow.rules import RULE_FINGERPRINT, rule_names

    run_dir = cfg.run_dir
    if resume:
        from xrlflow.envs import EnvConfig

        env_config = EnvConfig.from_dict(previous["env_config"])
    else:
        env_config = env_config_for(graphs, cfg)
    vec_env = normalize_rewards(make_vec_env(graphs, latency, env_config, cfg.num_envs, ray=cfg.ray_address is not None),
                                cfg.gamma, run_dir / REWARD_STATS_FILE if resume else None)
    policy_config = PolicyConfig(hidden=cfg.hidden, layers=cfg.layers)
    meta_base = {
        "rule_fingerprint": RULE_FINGERPRINT,
        "rule_names": rule_names(),
        "env_config": env_config.to_dict(),
        "policy_config": policy_config.to_dict(),
        "train_config": cfg.to_dict(),
        "latency_service": getattr(latency, "name", type(latency).__name__),
    }
    if resume:
        model = MaskablePPO.load(run_dir / POLICY_FILE, env=vec_env, device=cfg.policy_device)
        model.set_random_seed(cfg.seed + int(model.num_timesteps))
    else:
        model = MaskablePPO(
            CandidateGNNPolicy, vec_env, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps,
            batch_size=cfg.batch_size, n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
            clip_range=cfg.clip_range, ent_coef=cfg.ent_coef, seed=cfg.seed, device=cfg.policy_device,
            tensorboard_log=cfg.runs_dir, policy_kwargs={"policy_config": policy_config.to_dict()}, verbose=0,
        )
    callback = _progress_callback(cfg, env_config, meta_base, previous.get("best_speedup", {}))
    remaining = cfg.steps - int(model.num_timesteps)
    if remaining > 0:
        model.learn(remaining, callback=callback, tb_log_name=cfg.run_name, reset_num_timesteps=not resume)
    else:
        callback.init_callback(model)
        callback.save()
    vec_env.close()
    return read_meta(run_dir)


# ---- CLI ------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(models=("x",))
    p.add_argument("--models", required=True, help="comma-separated zoo models, e.g. bert-base,resnext50")
    p.add_argument("--latency", choices=LATENCY_KINDS, default=d.latency, help="reward source (default cost)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device,
                   help="device the reward is for: cpu, or cuda (measured on the GPU, or the bundled H200 table)")
    p.add_argument("--policy-device", choices=("cpu", "cuda"), default=d.policy_device, help="torch device of the policy")
    p.add_argument("--steps", type=int, default=d.steps, help=f"total env steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-name", default=d.run_name, help="checkpoints/<run-name>/ and runs/<run-name>_N/")
    p.add_argument("--small", action="store_true", help="the zoo's small variants")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--num-envs", type=int, default=d.num_envs)
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"learning rate (default {d.learning_rate})")
    p.add_argument("--n-steps", type=int, default=d.n_steps, help="env steps per env per PPO rollout")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.n_epochs)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="rewrites per episode")
    p.add_argument("--max-candidates", type=int, default=d.max_candidates)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="env steps between checkpoints")
    p.add_argument("--torch-threads", type=int, default=d.torch_threads)
    p.add_argument("--runs-dir", default=d.runs_dir)
    p.add_argument("--checkpoints-dir", default=d.checkpoints_dir)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray-address", default=None, metavar="local|auto|HOST:PORT",
                   help="run the envs as Ray actors (and measure on a Ray pool); local starts Ray here")
    p.add_argument("--measure-workers", type=int, default=None, metavar="M",
                   help="Ray measurement actors for --latency measured (default: one per GPU on cuda, else 1)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    return TrainConfig(
        models=models, latency=args.latency, device=args.device, policy_device=args.policy_device, steps=args.steps, seed=args.seed,
        run_name=args.run_name, small=args.small, num_envs=args.num_envs, learning_rate=args.lr,
        n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.epochs, max_steps=args.max_steps,
        max_candidates=args.max_candidates, hidden=args.hidden, layers=args.layers,
        checkpoint_every=args.checkpoint_every, torch_threads=args.torch_threads, runs_dir=args.runs_dir,
        checkpoints_dir=args.checkpoints_dir, progress=not args.no_progress, ray_address=args.ray_address,
        measure_workers=args.measure_workers,
    )


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if len(set(cfg.models)) != len(cfg.models):
        raise BadInputError(f"--models lists a model twice: {','.join(cfg.models)}")
    meta = train(cfg, resume=args.resume)
    print(json.dumps({"run": str(cfg.run_dir), "num_timesteps": meta["num_timesteps"],
                      "best_speedup": meta["best_speedup"]}, sort_keys=True))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a rewrite policy (MaskablePPO, GNN) on zoo models",
                       description="Train one policy across several zoo models; checkpoints in checkpoints/RUN.")
    add_arguments(p)
    p.set_defaults(handler=run_train)


def main(argv: Sequence[str] | None = None) -> int:
    from xrlflow.cli_options import OneLineParser, run_handler

    parser = OneLineParser(prog="train.py", description="Train a rewrite policy (MaskablePPO, GNN) on zoo models")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_handler(run_train, args)


if __name__ == "__main__":
    sys.exit(main())
