"""The per-candidate GNN policy: slot-free scoring, padding independence, checkpoints, training and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_env import inception_pair, projections
from xrlflow.agents import CandidateGNNPolicy, PolicyConfig, load_policy, save_checkpoint
from xrlflow.costmodel import CostModel
from xrlflow.envs import EnvConfig, GraphRewriteEnv
from xrlflow.errors import BadInputError
from xrlflow.rules import RULE_FINGERPRINT
from xrlflow.train import TrainConfig, train


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(max_candidates: int) -> GraphRewriteEnv:
    return GraphRewriteEnv({"proj": projections(n=3)}, CostModel("cpu"),
                           EnvConfig(max_nodes=64, max_edges=128, max_candidates=max_candidates))


def _policy(env: GraphRewriteEnv, seed: int = 0) -> CandidateGNNPolicy:
    torch.manual_seed(seed)
    return CandidateGNNPolicy(env.observation_space, env.action_space, lambda _: 1e-3,
                              policy_config={"hidden": 32, "layers": 4})


def _batch(obs):
    return {k: torch.as_tensor(np.asarray(v)[None], dtype=torch.float32) for k, v in obs.items()}


def test_permuting_candidates_permutes_logits():
    env = _env(16)
    obs, info = env.reset()
    n = info["num_candidates"]
    assert n >= 3
    policy = _policy(env)
    with torch.no_grad():
        logits, value = policy.features_extractor.scores(_batch(obs))
    perm = np.random.default_rng(0).permutation(n)
    assert (perm != np.arange(n)).any()
    shuffled = {k: v.copy() for k, v in obs.items()}
    shuffled["candidate_rules"][:n] = obs["candidate_rules"][:n][perm]
    shuffled["candidate_nodes"][:n] = obs["candidate_nodes"][:n][perm]
    shuffled["candidate_features"][:n] = obs["candidate_features"][:n][perm]
    with torch.no_grad():
        logits_p, value_p = policy.features_extractor.scores(_batch(shuffled))
    assert torch.allclose(logits_p[0, :n], logits[0, :n][perm], atol=1e-5)
    assert torch.allclose(logits_p[0, -1], logits[0, -1]) and torch.allclose(value_p, value)
    assert len(set(np.round(logits[0, :n].numpy(), 5))) > 1, "distinct candidates should score differently"


def test_policy_for_64_candidates_runs_with_256(tmp_path):
    from sb3_contrib import MaskablePPO

    small, large = _env(64), _env(256)
    model = MaskablePPO(CandidateGNNPolicy, small, policy_kwargs={"policy_config": {"hidden": 32}}, n_steps=8,
                        batch_size=8, seed=0)
    save_checkpoint(model, tmp_path / "run", {"rule_fingerprint": RULE_FINGERPRINT,
                                               "env_config": small.config.to_dict()})
    loaded = load_policy(tmp_path / "run")
    obs_s, info = small.reset()
    obs_l, _ = large.reset()
    n = info["num_candidates"]
    p_small = loaded.action_probabilities(obs_s, small.action_masks())
    p_large = loaded.action_probabilities(obs_l, large.action_masks())
    assert p_small.shape == (65,) and p_large.shape == (257,)
    assert np.allclose(p_small[:n], p_large[:n], atol=1e-6) and np.isclose(p_small[-1], p_large[-1], atol=1e-6)
    assert p_large[n:-1].sum() == 0.0  # padding never chosen
    # the loaded policy computes what the SB3 model computes
    with torch.no_grad():
        dist = model.policy.get_distribution(_batch(obs_s), action_masks=small.action_masks()[None])
    assert np.allclose(dist.distribution.probs[0].numpy(), p_small, atol=1e-6)
    action = loaded.act(obs_l, large.action_masks(), deterministic=True)
    assert action == int(np.argmax(p_large)) and large.action_masks()[action]
    assert loaded.predict(obs_l, action_masks=large.action_masks(), deterministic=True)[0] == action
    assert isinstance(loaded.value(obs_l), float)


def test_load_policy_refuses_other_registry_and_missing_files(tmp_path):
    from sb3_contrib import MaskablePPO

    env = _env(8)
    model = MaskablePPO(CandidateGNNPolicy, env, policy_kwargs={"policy_config": {"hidden": 16}}, n_steps=8,
                        batch_size=8)
    save_checkpoint(model, tmp_path / "run", {"rule_fingerprint": "0123456789abcdef",
                                               "env_config": env.config.to_dict()})
    with pytest.raises(BadInputError, match="rule registry"):
        load_policy(tmp_path / "run")
    with pytest.raises(BadInputError, match="no checkpoint"):
        load_policy(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    model.save(tmp_path / "bare" / "policy.zip")
    with pytest.raises(BadInputError, match="run.json"):
        load_policy(tmp_path / "bare")


def test_train_checkpoints_and_resumes(tmp_path):
    graph = inception_pair()
    cfg = TrainConfig(models=("pair",), steps=64, num_envs=2, n_steps=16, batch_size=16, n_epochs=1,
                      policy=PolicyConfig(hidden=16), env=EnvConfig(max_steps=4, max_candidates=8),
                      checkpoint_every=32, run_name="r",
                      runs_dir=str(tmp_path / "runs"), checkpoints_dir=str(tmp_path / "ck"), progress=False)
    meta = train(cfg, graphs=[("pair", graph)], latency=CostModel("cpu"))
    run = tmp_path / "ck" / "r"
    assert {"policy.zip", "run.json", "reward_normalization.pkl"} <= {p.name for p in run.iterdir()}
    assert meta["num_timesteps"] >= 64 and meta["rule_fingerprint"] == RULE_FINGERPRINT
    assert meta["env_config"]["max_candidates"] == 8 and meta["train_config"]["models"] == ["pair"]
    assert list((tmp_path / "runs").iterdir()), "TensorBoard logs are written"

    with pytest.raises(BadInputError, match="--resume"):
        train(cfg, graphs=[("pair", graph)], latency=CostModel("cpu"))
    import dataclasses

    longer = dataclasses.replace(cfg, steps=128)
    resumed = train(longer, resume=True, graphs=[("pair", graph)], latency=CostModel("cpu"))
    assert resumed["num_timesteps"] >= 128 > meta["num_timesteps"]

    data = json.loads((run / "run.json").read_text())
    data["rule_fingerprint"] = "ffffffffffffffff"
    (run / "run.json").write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="rule registry"):
        train(dataclasses.replace(cfg, steps=192), resume=True, graphs=[("pair", graph)], latency=CostModel("cpu"))
    with pytest.raises(BadInputError, match="no checkpoint"):
        train(dataclasses.replace(cfg, run_name="other"), resume=True, graphs=[("pair", graph)],
              latency=CostModel("cpu"))


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from xrlflow.cli import main

    code = main(["train", "--models", "no-such-model", "--steps", "8", "--checkpoints-dir", str(tmp_path),
                 "--runs-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xrlflow: error:") and "no-such-model" in err and "\n" not in err
    assert main(["train", "--models", "pair", "--num-envs", "0", "--checkpoints-dir", str(tmp_path)]) == 2
    assert "num-envs" in capsys.readouterr().err
