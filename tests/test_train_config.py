"""Training configuration: config files (YAML, JSON, a run's run.json), flags over the file, ONNX files and
shapes in --models, hyper-parameters from the dataclass."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.test_env import inception_pair
from xrlflow.errors import BadInputError
from xrlflow.onnx_io import to_model
from xrlflow.train import TrainConfig, add_arguments, config_of, load_zoo_graphs


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_json_reads_back_as_the_same_config(tmp_path):
    cfg = TrainConfig(models=("bert-base", "m.onnx"), batches=(1, 8), seqs=(128,), gamma=0.97, gae_lambda=0.9,
                      clip_range=0.1, ent_coef=0.05, learning_rate=3e-4)
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rule_fingerprint": "x", "train_config": cfg.to_dict()}))
    assert config_of(_args("--config", str(run))) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_config_with_flags_over_it(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("models: [squeezenet, bert-base]\ngamma: 0.95\nent_coef: 0.02\nenv:\n  max_steps: 12\n"
                    "policy:\n  hidden: 16\n")
    cfg = config_of(_args("--config", str(path), "--ent-coef", "0.07", "--hidden", "24"))
    assert cfg.models == ("squeezenet", "bert-base") and cfg.gamma == 0.95 and cfg.env.max_steps == 12
    assert cfg.ent_coef == 0.07 and cfg.policy.hidden == 24  # the flags win
    assert cfg.ppo["gamma"] == 0.95 and cfg.ppo["ent_coef"] == 0.07


@pytest.mark.parametrize("text, message", [
    ("models: [a]\nbogus: 1\n", "unknown training config field"),
    ("models: [a]\nenv:\n  nope: 1\n", "unknown env field"),
    ("- a\n- b\n", "expected a mapping"),
    ("models: [a\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError, match=message):
        config_of(_args("--config", str(path)))
    with pytest.raises(BadInputError, match="cannot read"):
        config_of(_args("--config", str(tmp_path / "missing.yaml")))


def test_shapes_and_onnx_files_name_the_training_graphs(tmp_path):
    cfg = TrainConfig(models=("bert-base", "squeezenet", str(tmp_path / "mine.onnx")), batches=(1, 8),
                      seqs=(128, 4096))
    names = [name for name, *_ in cfg.training_graphs]
    # bert-base has 512 positions: seq 4096 is left out for it; squeezenet takes no seq
    assert names == ["bert-base@b1s128", "bert-base@b8s128", "squeezenet@b1", "squeezenet@b8", "mine"]
    with pytest.raises(BadInputError, match="no such ONNX file"):
        load_zoo_graphs((str(tmp_path / "mine.onnx"),), small=True)
    import onnx

    onnx.save(to_model(inception_pair()), str(tmp_path / "mine.onnx"))
    ((name, graph),) = load_zoo_graphs((str(tmp_path / "mine.onnx"),), small=True)
    assert name == "mine" and len(graph.nodes) == 3


def test_hyper_parameters_are_checked():
    for bad in (dict(gamma=0.0), dict(gae_lambda=1.5), dict(clip_range=0.0), dict(ent_coef=-0.1)):
        with pytest.raises(BadInputError):
            TrainConfig(models=("a",), **bad)
    with pytest.raises(BadInputError, match="batches"):
        TrainConfig(models=("a",), batches=(0,))
