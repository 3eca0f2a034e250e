"""`xrlflow train` / `python train.py`: one MaskablePPO policy across several zoo models.

    python train.py --models bert-base,resnext50 --latency cost --steps 20000 --seed 0 --run-name demo --small

Writes TensorBoard logs under runs/<run>_N (per-model episode speedup and best speedup, SB3's entropy and
value loss), checkpoints under checkpoints/<run>/ (policy.zip + run.json with the rule fingerprint, the env,
policy and training configs). `--resume` continues a killed run from its last checkpoint; a checkpoint of
another rule registry is refused. The SB3 pieces (envs, MaskablePPO, the callback) are in `agents.training`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from xrlflow.agents.gnn_policy import PolicyConfig
from xrlflow.cli_options import OneLineParser, add_options, config_from, option, run_handler
from xrlflow.envs import EnvConfig
from xrlflow.errors import BadInputError
from xrlflow.services import DEVICES, LATENCY_KINDS, make_latency_service


def _model_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


@dataclass(frozen=True)
class TrainConfig:
    models: tuple[str, ...] = option("comma-separated zoo models, e.g. bert-base,resnext50", read=_model_list)
    latency: str = option("reward source", "cost", choices=LATENCY_KINDS)
    device: str = option("device the reward is for: cpu, or cuda (measured on the GPU, or the bundled H200 table)",
                         "cpu", choices=DEVICES)
    policy_device: str = option("torch device of the policy", "cpu", choices=DEVICES)  # GNN training is small
    steps: int = option("total env steps", 20_000, kind=int)
    seed: int = option("seed of PPO, the envs and the model picks", 0, kind=int)
    run_name: str = option("checkpoints/<run-name>/ and runs/<run-name>_N/", "run")
    small: bool = option("the zoo's small variants", False, switch=True)
    num_envs: int = option("environments stepped together", 4, kind=int)
    learning_rate: float = option("learning rate", 1e-3, kind=float, flag="--lr")
    n_steps: int = option("env steps per env per PPO rollout", 64, kind=int)
    batch_size: int = option("PPO minibatch size", 64, kind=int)
    n_epochs: int = option("PPO epochs per rollout", 4, kind=int, flag="--epochs")
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    env: EnvConfig = EnvConfig()  # max_steps, max_candidates; the padding is sized to the models at the start
    policy: PolicyConfig = PolicyConfig()  # hidden, layers
    checkpoint_every: int = option("env steps between checkpoints", 2048, kind=int)
    # one intra-op thread: a thread pool on a shared 2-core machine is 10x slower
    torch_threads: int = option("torch intra-op threads", 1, kind=int)
    runs_dir: str = option("TensorBoard logs go here", "runs")
    checkpoints_dir: str = option("checkpoints go here", "checkpoints")
    progress: bool = option("no progress bar", True, flag="--no-progress", negate=True)
    ray_address: str | None = option("run the envs as Ray actors (and measure on a Ray pool); local starts Ray here",
                                     None, metavar="local|auto|HOST:PORT")  # None: envs in this process
    measure_workers: int | None = option(
        "Ray measurement actors for --latency measured (default: one per GPU on cuda, else 1)", None, kind=int,
        metavar="M")

    def __post_init__(self) -> None:
        if not self.models:
            raise BadInputError("--models: give at least one zoo model")
        if self.latency not in LATENCY_KINDS:
            raise BadInputError(f"--latency {self.latency!r}: use one of {', '.join(LATENCY_KINDS)}")
        if self.device not in DEVICES:
            raise BadInputError(f"--device {self.device!r}: use cpu or cuda")
        for name in ("steps", "num_envs", "n_steps", "batch_size", "n_epochs", "checkpoint_every", "torch_threads"):
            if int(getattr(self, name)) < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("hidden", "layers"):
            if int(getattr(self.policy, name)) < 1:
                raise BadInputError(f"{name} must be at least 1, got {getattr(self.policy, name)}")
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
        d["env"] = self.env.to_dict()
        return d

    @property
    def ppo(self) -> dict[str, Any]:
        """MaskablePPO's hyperparameters, by its keyword names."""
        return {name: getattr(self, name) for name in ("learning_rate", "n_steps", "batch_size", "n_epochs", "gamma",
                                                        "gae_lambda", "clip_range", "ent_coef")}

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoints_dir) / self.run_name


def load_zoo_graphs(models: Sequence[str], small: bool) -> list[tuple[str, Any]]:
    """The zoo models as episodes start from them: in canonical form, as `xrlflow optimize` searches them."""
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import load_graph
    from xrlflow.rules import CANONICAL_RULES, default_engine
    from xrlflow.zoo import export_model

    engine = default_engine()
    return [(name, prepare_for_search(load_graph(export_model(name, small=small)), engine, CANONICAL_RULES))
            for name in models]


def env_config_for(graphs: Sequence[tuple[str, Any]], cfg: TrainConfig) -> EnvConfig:
    """Padding sized to the largest graph with room to grow (rewrites add Concat/Split nodes)."""
    def room(n: int) -> int:
        return max(64, int(math.ceil(n * 1.25 / 64.0)) * 64)

    nodes = max(len(g.nodes) for _, g in graphs)
    edges = max(sum(1 for n in g.nodes.values() for v in n.inputs if v and v in g.producer) for _, g in graphs)
    return dataclasses.replace(cfg.env, max_nodes=room(nodes), max_edges=room(edges))


def train(cfg: TrainConfig, resume: bool = False, graphs=None, latency=None) -> dict[str, Any]:
    """Train (or resume) a run; returns the final checkpoint metadata. `graphs`/`latency` override the zoo
    models and the latency kind (tests, benchmarks)."""
    import torch

    from xrlflow.agents import check_fingerprint, read_meta
    from xrlflow.agents.checkpoint import POLICY_FILE

    if cfg.policy_device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--policy-device cuda: this torch build sees no CUDA device")
    torch.set_num_threads(cfg.torch_threads)
    has_checkpoint = (cfg.run_dir / POLICY_FILE).is_file()
    previous: dict[str, Any] = {}
    if resume:
        if not has_checkpoint:
            raise BadInputError(f"--resume: no checkpoint in {cfg.run_dir}")
        previous = read_meta(cfg.run_dir)
        check_fingerprint(previous, where=str(cfg.run_dir))
        if list(previous.get("train_config", {}).get("models", [])) != list(cfg.models):
            raise BadInputError(f"--resume: {cfg.run_dir} trained on models {previous['train_config']['models']}, "
                                f"not {list(cfg.models)}")
    elif has_checkpoint:
        raise BadInputError(f"{cfg.run_dir} already holds a run; use --resume or another --run-name")

    graphs = graphs if graphs is not None else load_zoo_graphs(cfg.models, cfg.small)
    if cfg.ray_address is None:
        return _train_with(cfg, resume, previous, graphs, latency if latency is not None else make_latency_service(cfg.latency, cfg.device))
    from xrlflow.measure_pool import MeasurementPool, PoolConfig
    from xrlflow.ray_session import RaySession
    from xrlflow.measure import MeasureConfig

    with RaySession(cfg.ray_address):
        if latency is not None or cfg.latency != "measured":
            return _train_with(cfg, resume, previous, graphs, latency if latency is not None else make_latency_service(cfg.latency, cfg.device))
        # the measured service on a Ray measurement pool (one actor per GPU on cuda)
        with MeasurementPool(PoolConfig(MeasureConfig.create(device=cfg.device), workers=cfg.measure_workers)) as pool:
            return _train_with(cfg, resume, previous, graphs, pool.client)


def _train_with(cfg: TrainConfig, resume: bool, previous: dict[str, Any], graphs, latency) -> dict[str, Any]:
    from xrlflow.agents import read_meta
    from xrlflow.agents.training import REWARD_STATS_FILE, TrainingProgress, build_ppo, learn, make_vec_env, normalize_rewards
    from xrlflow.rules import RULE_FINGERPRINT, rule_names

    env_config = EnvConfig.from_dict(previous["env_config"]) if resume else env_config_for(graphs, cfg)
    vec_env = make_vec_env(graphs, latency, env_config, cfg.num_envs, ray=cfg.ray_address is not None)
    vec_env = normalize_rewards(vec_env, cfg.gamma, cfg.run_dir / REWARD_STATS_FILE if resume else None)
    meta_base = {
        "rule_fingerprint": RULE_FINGERPRINT,
        "rule_names": rule_names(),
        "env_config": env_config.to_dict(),
        "policy_config": cfg.policy.to_dict(),
        "train_config": cfg.to_dict(),
        "latency_service": latency.name,
    }
    model = build_ppo(vec_env, cfg.ppo, cfg.policy, cfg.seed, cfg.policy_device, cfg.runs_dir,
                      resume_from=cfg.run_dir if resume else None)
    callback = TrainingProgress(cfg.run_dir, meta_base, previous.get("best_speedup", {}), cfg.checkpoint_every,
                                cfg.steps, cfg.run_name if cfg.progress else None)
    learn(model, callback, cfg.steps, cfg.run_name, resume)
    vec_env.close()
    return read_meta(cfg.run_dir)


# ---- CLI ------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from(TrainConfig, args)
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
    parser = OneLineParser(prog="train.py", description="Train a rewrite policy (MaskablePPO, GNN) on zoo models")
    add_arguments(parser)
    return run_handler(run_train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
