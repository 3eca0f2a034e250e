"""`xrlflow train` / `python train.py`: one MaskablePPO policy across several models and input shapes.

    python train.py --models bert-base,resnext50 --latency cost --steps 20000 --seed 0 --run-name demo --small
    python train.py --models bert-base,my_model.onnx --batches 1,8 --seqs 128,512 --config ppo.yaml

`--models` takes zoo names and ONNX files (a path ending in .onnx; its episodes are named by the file's stem).
`--batches` / `--seqs` export every zoo model at each batch size and (for the sequence models, up to their
position table) each sequence length; every shape is its own training graph, named MODEL@bBATCH[sSEQ].
`--config FILE` (YAML or JSON) gives any TrainConfig field, nested `env:` / `policy:` included; a run's
run.json is read as its `train_config`. Flags on the command line that differ from their defaults override
the file.

Writes TensorBoard logs under runs/<run>_N (per-model episode speedup and best speedup, SB3's entropy and
value loss), checkpoints under checkpoints/<run>/ (policy.zip + run.json with the rule fingerprint, the env,
policy and training configs). `--resume` continues a killed run from its last checkpoint; a checkpoint of
another rule registry is refused. The SB3 pieces (envs, MaskablePPO, the callback) are in `agents.training`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from xrlflow.agents.gnn_policy import PolicyConfig
from xrlflow.cli_options import OneLineParser, add_options, config_from, field_value, option, run_handler
from xrlflow.envs import EnvConfig
from xrlflow.envs.padding import training_padding
from xrlflow.errors import BadInputError
from xrlflow.services import DEVICES, LATENCY_KINDS, make_latency_service


def _model_list(text: str | Sequence[str] | None) -> tuple[str, ...]:
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(m).strip() for m in items if str(m).strip())


def _int_list(text: str | Sequence[int] | None) -> tuple[int, ...]:
    if text is None:
        return ()
    items = [t for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    try:
        return tuple(int(t) for t in items)
    except (TypeError, ValueError):
        raise BadInputError(f"expected comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class TrainConfig:
    models: tuple[str, ...] = option("comma-separated zoo models and ONNX files, e.g. bert-base,resnext50,m.onnx",
                                     (), read=_model_list)
    batches: tuple[int, ...] = option("zoo models: comma-separated batch sizes to train on (empty: the model's own)",
                                      (), read=_int_list)
    seqs: tuple[int, ...] = option("zoo sequence models: comma-separated sequence lengths (empty: the model's own)",
                                   (), read=_int_list)
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
    gamma: float = option("discount", 0.99, kind=float)
    gae_lambda: float = option("GAE lambda", 0.95, kind=float)
    clip_range: float = option("PPO clip range", 0.2, kind=float)
    # 0.03: on the two-pair toy of tests/test_learning.py 0.01 and 0.03 both learn (5 of 5 seeds, 3072 steps);
    # with a third, unprofitable pair added (a decoy chain), 4096 steps: 0.01 0 of 4 seeds, 0.03 1 of 4, 0.1 2 of 4
    # (the failures stop at once or cycle through equal-latency graphs)
    ent_coef: float = option("entropy coefficient", 0.03, kind=float)
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
            raise BadInputError("--models: give at least one zoo model or ONNX file")
        if any(b < 1 for b in self.batches) or any(q < 1 for q in self.seqs):
            raise BadInputError("--batches and --seqs must be positive integers")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and self.clip_range > 0 and self.ent_coef >= 0):
            raise BadInputError("need 0 < gamma <= 1, 0 <= gae-lambda <= 1, clip-range > 0, ent-coef >= 0")
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
        d["batches"] = list(self.batches)
        d["seqs"] = list(self.seqs)
        d["env"] = self.env.to_dict()
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        """A config from a mapping (a config file, or run.json's `train_config`); absent fields keep today's
        defaults, unknown ones are refused."""
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInputError(f"{where}: unknown training config field(s): {', '.join(unknown)}")
        values = dict(d)
        for name, cls in (("env", EnvConfig), ("policy", PolicyConfig)):
            if name in values:
                nested = values[name]
                if not isinstance(nested, Mapping):
                    raise BadInputError(f"{where}: {name} must be a mapping")
                fields = {f.name for f in dataclasses.fields(cls)}
                bad = sorted(set(nested) - fields)
                if bad:
                    raise BadInputError(f"{where}: unknown {name} field(s): {', '.join(bad)}")
                nested = dict(nested)
                if "op_vocabulary" in nested:
                    nested["op_vocabulary"] = tuple(nested["op_vocabulary"])
                values[name] = dataclasses.replace(cls(), **nested)
        for name, read in (("models", _model_list), ("batches", _int_list), ("seqs", _int_list)):
            if name in values:
                values[name] = read(values[name])
        try:
            return TrainConfig(**values)
        except TypeError as exc:
            raise BadInputError(f"{where}: {exc}") from None

    @property
    def ppo(self) -> dict[str, Any]:
        """MaskablePPO's hyperparameters, by its keyword names."""
        return {name: getattr(self, name) for name in ("learning_rate", "n_steps", "batch_size", "n_epochs", "gamma",
                                                        "gae_lambda", "clip_range", "ent_coef")}

    @property
    def training_graphs(self) -> list[tuple[str, str | None, int | None, int | None]]:
        """(episode name, zoo model or None for an ONNX file, batch, seq) of every training graph."""
        out: list[tuple[str, str | None, int | None, int | None]] = []
        for model in self.models:
            if model.endswith(".onnx"):
                out.append((Path(model).stem, None, None, None))
                continue
            out.extend(_zoo_shapes(model, self.batches, self.seqs, self.small))
        names = [name for name, *_ in out]
        if len(set(names)) != len(names):
            raise BadInputError(f"--models: two training graphs would share a name: {', '.join(names)}")
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoints_dir) / self.run_name


def _zoo_shapes(model: str, batches: Sequence[int], seqs: Sequence[int], small: bool):
    from xrlflow.zoo.registry import get_entry

    entry = get_entry(model)
    if not batches and not seqs:
        return [(model, model, None, None)]
    lengths: list[int | None] = [None]
    if entry.takes_seq and seqs:
        lengths = [q for q in seqs if entry.max_seq is None or q <= entry.max_seq] or [None]
    out = []
    for batch in batches or [None]:
        for seq in lengths:
            tag = (f"b{batch}" if batch else "") + (f"s{seq}" if seq else "")
            out.append((f"{model}@{tag}" if tag else model, model, batch, seq))
    return out


def load_zoo_graphs(models: Sequence[str], small: bool, batches: Sequence[int] = (),
                    seqs: Sequence[int] = ()) -> list[tuple[str, Any]]:
    """The training graphs as episodes start from them: in canonical form, as `xrlflow optimize` searches
    them. Zoo names (at each batch / seq) and ONNX files (`--models` entries ending in .onnx)."""
    import onnx

    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import load_graph
    from xrlflow.rules import CANONICAL_RULES, default_engine
    from xrlflow.zoo import export_model

    cfg_like = TrainConfig(models=tuple(models), batches=tuple(batches), seqs=tuple(seqs), small=small)
    engine = default_engine()
    graphs = []
    for name, zoo_name, batch, seq in cfg_like.training_graphs:
        if zoo_name is None:
            path = next(m for m in models if m.endswith(".onnx") and Path(m).stem == name)
            if not Path(path).is_file():
                raise BadInputError(f"--models: {path}: no such ONNX file")
            try:
                model = onnx.load(path)
            except Exception as exc:
                raise BadInputError(f"--models: {path}: not a readable ONNX model ({type(exc).__name__})") from None
        else:
            model = export_model(zoo_name, small=small, batch=batch, seq=seq)
        graphs.append((name, prepare_for_search(load_graph(model), engine, CANONICAL_RULES)))
    return graphs


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

    graphs = graphs if graphs is not None else load_zoo_graphs(cfg.models, cfg.small, cfg.batches, cfg.seqs)
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

    env_config = EnvConfig.from_dict(previous["env_config"]) if resume else training_padding((g for _, g in graphs), cfg.env)
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
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON training config (or a run's run.json); "
                                                      "flags that differ from their defaults override it")


def read_config_file(path: str) -> dict[str, Any]:
    """The TrainConfig fields of a YAML/JSON file; a run.json gives its `train_config`."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadInputError(f"--config {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise BadInputError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                            f"({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("train_config"), dict):
        data = data["train_config"]
    if not isinstance(data, dict):
        raise BadInputError(f"--config {path}: expected a mapping of training config fields")
    return data


def _with_flags(cfg: Any, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    """`cfg` with every option whose flag value differs from its default replaced by that value."""
    from xrlflow.cli_options import dest

    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        opt = f.metadata.get("option")
        current = getattr(cfg, f.name)
        if opt is None:
            if dataclasses.is_dataclass(current):
                changes[f.name] = _with_flags(current, values, defaults)
            continue
        name = dest(f)
        if name not in values or values[name] == defaults.get(name):
            continue
        changes[f.name] = field_value(opt, values[name])
    return dataclasses.replace(cfg, **changes)


def config_of(args: argparse.Namespace) -> TrainConfig:
    """The training config of parsed flags, on top of `--config FILE` when given."""
    path = getattr(args, "config", None)
    if not path:
        return config_from(TrainConfig, args)
    base = TrainConfig.from_dict({"models": ("placeholder",), **read_config_file(path)}, where=f"--config {path}")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    values = vars(args)
    cfg = _with_flags(base, values, defaults)
    if cfg.models == ("placeholder",):
        raise BadInputError(f"--models: give at least one zoo model or ONNX file (none in {path} either)")
    return cfg


def run_train(args: argparse.Namespace) -> int:
    cfg = config_of(args)
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
