"""The flags generated from the config dataclasses: today's spellings, the dataclass defaults, and the same
config from the command line as from the Python API."""

from __future__ import annotations

import argparse

import pytest

from xrlflow.cli_options import config_from
from xrlflow.errors import BadInputError
from xrlflow.optimize_cli import add_optimize_arguments
from xrlflow.optimizer import OptimizeConfig
from xrlflow.search import SearchConfig
from xrlflow.verify import Tolerance

OPTIMIZE_FLAGS = {
    "-h", "--help", "-o", "--output", "--policy", "--search", "--device", "--latency", "--rollouts", "--steps",
    "--budget", "--alpha", "--time-limit", "--input-shape", "--report", "--plot", "--seed", "--rules", "--disable-rules", "--inputs",
    "--rtol", "--atol", "--tolerance", "--no-shape-check", "--external-data", "--no-progress",
    # the pipeline's stages and its deployment setting (OptimizeConfig fields)
    "--no-upgrade", "--ort-fusions", "--no-ort-fusions", "--float16", "--threads", "--cuda-graph", "--ab-repeats",
}
TRAIN_FLAGS = {
    "-h", "--help", "--models", "--latency", "--device", "--policy-device", "--steps", "--seed", "--run-name",
    "--small", "--resume", "--num-envs", "--lr", "--n-steps", "--batch-size", "--epochs", "--max-steps",
    "--max-candidates", "--hidden", "--layers", "--checkpoint-every", "--torch-threads", "--runs-dir",
    "--checkpoints-dir", "--no-progress", "--ray-address", "--measure-workers",
    # issue 15: training shapes, PPO hyper-parameters, a config file
    "--batches", "--seqs", "--gamma", "--gae-lambda", "--clip-range", "--ent-coef", "--config",
}


def _optimize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_optimize_arguments(parser)
    return parser


def test_optimize_flags_keep_their_spellings_and_defaults():
    parser = _optimize_parser()
    assert {s for a in parser._actions for s in a.option_strings} == OPTIMIZE_FLAGS
    config = config_from(OptimizeConfig, parser.parse_args(["m.onnx", "-o", "o.onnx", "--search", "greedy"]))
    assert config == OptimizeConfig(search="greedy", progress=True)  # --no-progress absent: a bar (on a tty)
    with pytest.raises(SystemExit):
        parser.parse_args(["m.onnx", "--policy", "p", "--search", "greedy"])  # one or the other


def test_flags_and_api_keywords_build_the_same_config():
    args = _optimize_parser().parse_args([
        "m.onnx", "-o", "o.onnx", "--search", "random", "--rollouts", "3", "--steps", "7", "--seed", "5",
        "--input-shape", "x=1x8", "--rules", "a,b", "--rtol", "1e-3", "--tolerance", "y=1e-2,1e-3", "--no-shape-check",
        "--no-progress",
    ])
    from_cli = config_from(OptimizeConfig, args)
    from_api = config_from(OptimizeConfig, dict(
        search="random", rollouts=3, steps=7, seed=5, input_shape={"x": (1, 8)}, rules=["a", "b"], rtol=1e-3,
        tolerance={"y": (1e-2, 1e-3)}, no_shape_check=True, no_progress=True))
    assert from_cli == from_api == OptimizeConfig(
        search="random", search_config=SearchConfig(steps=7, rollouts=3, seed=5), input_shapes={"x": (1, 8)},
        rules=("a", "b"), tolerance=Tolerance(rtol=1e-3), output_tolerances={"y": Tolerance(1e-2, 1e-3)},
        check_other_shapes=False, progress=False)


def test_bad_values_are_bad_input():
    with pytest.raises(BadInputError, match="--budget"):
        config_from(OptimizeConfig, {"budget": 0})
    with pytest.raises(BadInputError, match="empty rule list"):
        config_from(OptimizeConfig, {"rules": " , "})


def test_train_flags_keep_their_spellings():
    from xrlflow.train import TrainConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert {s for a in parser._actions for s in a.option_strings} == TRAIN_FLAGS
    config = config_from(TrainConfig, parser.parse_args(["--models", "a, b", "--max-steps", "9", "--hidden", "8", "--lr", "0.01"]))
    assert config.models == ("a", "b") and config.env.max_steps == 9 and config.policy.hidden == 8
    assert config.learning_rate == 0.01 and config.env.max_candidates == TrainConfig(models=("a",)).env.max_candidates
