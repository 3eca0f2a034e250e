"""The graph rewrite env's contract: checkers, masks vs the engine, candidate cap, truncation, bad actions."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

from tests.rulecheck import ModelBuilder
from xrlflow.costmodel import CostModel
from xrlflow.envs import ENV_ID, EnvConfig, GraphRewriteEnv, select_candidates
from xrlflow.errors import BadInputError
from xrlflow.latency import Latency
from xrlflow.onnx_io import load_graph
from xrlflow.rules import default_engine

ENGINE = default_engine()
# The single-rewrite contract (no macro slots, no revisit penalty, no patience); the tests at the end cover those.
PLAIN = dict(macro_actions=False, revisit_penalty=0.0, mask_taken=False, patience=0)
SMALL = EnvConfig(max_nodes=64, max_edges=128, max_candidates=16, max_steps=10, **PLAIN)


def inception_pair():
    """A 3x3 and a 1x1 conv on one input, concatenated (3x3 first)."""
    b = ModelBuilder(0)
    x = b.input("x", [1, 8, 4, 4])
    y1 = b.op("Conv", [x, b.const((8, 8, 1, 1)), b.const((8,))], kernel_shape=[1, 1])
    y3 = b.op("Conv", [x, b.const((8, 8, 3, 3)), b.const((8,))], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output(b.op("Concat", [y3, y1], axis=1))
    return load_graph(b.model())


def projections(n: int = 3, seed: int = 1):
    """Two groups of n MatMuls (+bias, Relu) sharing an input, and an input used twice with one weight."""
    b = ModelBuilder(seed)
    x = b.input("x", [4, 16])
    y = b.input("y", [4, 16])
    z = b.input("z", [4, 16])
    outs = [b.op("Relu", [b.op("Add", [b.op("MatMul", [v, b.const((16, 8))]), b.const((8,))])])
            for v in (x, y) for _ in range(n)]
    w = b.const((16, 8))
    outs += [b.op("MatMul", [z, w]), b.op("MatMul", [b.op("Relu", [z]), w])]
    b.output(*outs)
    return load_graph(b.model())


def make_env(config: EnvConfig = SMALL, latency=None, **graphs):
    graphs = graphs or {"pair": inception_pair(), "proj": projections()}
    return GraphRewriteEnv(graphs, latency or CostModel("cpu"), config)


def test_checkers_pass():
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 recommends flattening 2-D observations; the GNN needs them
        gym_check(make_env())
        sb3_check(make_env())


def test_registered_and_spec_determinism():
    env = gym.make(ENV_ID, graphs={"pair": inception_pair()}, latency=CostModel("cpu"), config=SMALL)
    assert env.spec.nondeterministic is False
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)

    class Measured:  # stands for a measured service
        name = "measured:cpu"
        deterministic = False

        def latency(self, graph):
            return Latency(1.0, 0.9, 1.1, 10, "measured")

    env = gym.make(ENV_ID, graphs={"pair": inception_pair()}, latency=Measured(), config=SMALL)
    assert env.spec.nondeterministic is True


def _rows(graph):
    return {name: i for i, name in enumerate(graph.topological_order())}


def test_masks_and_candidates_match_engine():
    env = make_env()
    rng = np.random.default_rng(0)
    for episode in range(4):
        obs, info = env.reset(seed=episode, options={"model": episode % 2})
        done = False
        while not done:
            matches = ENGINE.matches(env.graph)
            n = len(matches)
            mask = env.action_masks()
            assert mask.dtype == bool and mask.shape == (SMALL.max_candidates + 1,)
            assert mask[:n].all() and not mask[n:-1].any() and mask[-1]
            assert obs["counts"].tolist() == [len(env.graph.nodes), obs["counts"][1], n]
            rows = _rows(env.graph)
            for i, m in enumerate(matches):
                assert obs["candidate_rules"][i] == ENGINE.rule_index[m.rule]
                bound = obs["candidate_nodes"][i]
                assert bound[: len(m.nodes)].tolist() == [rows[v] for v in m.nodes][: SMALL.max_bound]
                assert (bound[len(m.nodes):] == -1).all()
            assert (obs["candidate_rules"][n:] == -1).all()
            edges = int(obs["counts"][1])
            assert edges == sum(1 for nd in env.graph.nodes.values() for v in nd.inputs if v in env.graph.producer)
            assert (obs["edge_index"][:, edges:] == -1).all() and (obs["edge_index"][:, :edges] >= 0).all()
            action = int(rng.choice(np.flatnonzero(mask)))
            obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated


def test_reward_telescopes_and_best_graph_is_kept():
    service = CostModel("cpu")
    env = make_env(latency=service)
    obs, info = env.reset(options={"model": "pair"})
    l0 = service.latency(env.graph).ms
    # enlarge (slower), merge (slower), cancel-split-concat (faster), then stop
    total = 0.0
    for rule in ("enlarge-conv-kernel", "merge-parallel-conv", "cancel-split-concat"):
        slot = [m.rule for m in env.candidates].index(rule)
        obs, reward, terminated, truncated, info = env.step(slot)
        assert info["rule"] == rule and not truncated
        total += reward
    final = service.latency(env.graph).ms
    assert total == pytest.approx(100.0 * (l0 - final) / l0)
    assert info["speedup"] == pytest.approx(l0 / final) and info["speedup"] > 1.0
    assert env.best_graph is env.graph and info["best_hash"] == env.graph.structural_hash()
    if not terminated:
        obs, reward, terminated, truncated, info = env.step(SMALL.max_candidates)  # stop
        assert terminated and reward == 0.0 and not info["invalid_action"]
    assert info["best_latency_ms"] == pytest.approx(final)


def test_slower_rewrite_does_not_replace_best_graph():
    env = make_env()
    env.reset(options={"model": "pair"})
    start = env.graph
    obs, reward, *_ , info = env.step([m.rule for m in env.candidates].index("enlarge-conv-kernel"))
    assert reward < 0 and env.best_graph is start and info["best_speedup"] == 1.0


def test_truncation_is_flagged():
    env = make_env(EnvConfig(max_nodes=64, max_edges=128, max_candidates=16, max_steps=1, **PLAIN))
    env.reset(options={"model": "pair"})
    obs, reward, terminated, truncated, info = env.step(0)  # enlarge-conv-kernel leaves candidates
    assert info["num_candidates"] > 0
    assert truncated and not terminated


def test_masked_action_is_treated_as_stop():
    env = make_env()
    env.reset(options={"model": "pair"})
    n = len(env.candidates)
    obs, reward, terminated, truncated, info = env.step(n)  # first padding slot
    assert terminated and not truncated and reward == 0.0 and info["invalid_action"]
    env.reset(options={"model": "pair"})
    obs, reward, terminated, truncated, info = env.step(SMALL.max_candidates)  # stop
    assert terminated and not info["invalid_action"]


def test_terminates_exactly_when_no_candidate_is_left():
    env = make_env(EnvConfig(max_nodes=64, max_edges=128, max_candidates=16, max_steps=50, **PLAIN))
    rng = np.random.default_rng(1)
    for episode in range(6):
        env.reset(seed=episode)
        while True:
            n = len(env.candidates)
            obs, reward, terminated, truncated, info = env.step(int(rng.integers(n)) if n else 16)
            if n == 0:
                assert terminated
                break
            assert terminated == (info["num_candidates"] == 0)
            if terminated or truncated:
                break
    b = ModelBuilder(3)
    x = b.input("x", [2, 4])
    b.output(b.op("Relu", [x]))
    env = make_env(only=load_graph(b.model()))
    obs, info = env.reset()
    assert info["num_candidates"] == 0 and env.action_masks().tolist() == [False] * 16 + [True]


def test_candidate_cap_round_robin_keeps_every_rule():
    graph = projections(n=3)
    matches = ENGINE.matches(graph)
    rules = {m.rule for m in matches}
    assert len(matches) > len(rules) >= 2, "the fixture must have more matches than rules"
    cap = len(rules)
    env = make_env(EnvConfig(max_nodes=64, max_edges=128, max_candidates=cap, max_steps=5, **PLAIN), only=graph)
    obs, info = env.reset()
    assert info["candidates_dropped"] == len(matches) - cap
    assert {m.rule for m in env.candidates} == rules
    positions = [matches.index(m) for m in env.candidates]
    assert positions == sorted(positions)  # engine order kept
    assert select_candidates(matches, cap, ENGINE.rule_index) == env.candidates  # deterministic


def test_failed_measurement_ends_episode_with_penalty():
    class FailsAfterRewrite:
        name = "flaky"
        deterministic = True

        def __init__(self, first):
            self.first = first

        def latency(self, graph):
            if graph is self.first:
                return Latency(1.0, 1.0, 1.0, 1, "cost-model")
            return Latency.failed("session creation failed")

    graph = inception_pair()
    env = GraphRewriteEnv({"pair": graph}, FailsAfterRewrite(graph), SMALL)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(0)
    assert terminated and reward == SMALL.failure_penalty and info["measurement_failed"]
    assert env.graph is graph and env.best_graph is graph


def test_bad_input_is_reported_by_config_field():
    with pytest.raises(BadInputError, match="max_nodes"):
        make_env(EnvConfig(max_nodes=4, max_edges=128, max_candidates=4))
    with pytest.raises(BadInputError, match="max_edges"):
        make_env(EnvConfig(max_nodes=64, max_edges=2, max_candidates=4))
    env = make_env()
    with pytest.raises(BadInputError, match="unknown model"):
        env.reset(options={"model": "nope"})
    with pytest.raises(BadInputError, match="out of range"):
        env.reset(options={"model": 7})
    obs, info = env.reset(options={"model": "proj"})
    assert info["model"] == "proj"


def test_graph_growing_past_padding_ends_episode():
    graph = projections(n=3)
    fits = len(graph.nodes)
    edges = sum(1 for nd in graph.nodes.values() for v in nd.inputs if v in graph.producer)
    env = make_env(EnvConfig(max_nodes=fits, max_edges=edges, max_candidates=16), only=graph)
    env.reset()
    merge = [m.rule for m in env.candidates].index("merge-parallel-matmul")  # adds Concat/Split nodes
    obs, reward, terminated, truncated, info = env.step(merge)
    assert terminated and info["graph_too_large"] and env.graph is graph and reward == 0.0


def test_training_padding_fits_the_largest_graph_with_a_quarter_to_grow_in_steps_of_64():
    from xrlflow.envs.features import edge_count
    from xrlflow.envs.padding import training_padding

    small, large = inception_pair(), projections(n=40)
    padded = training_padding([small, large], SMALL)
    assert padded.max_nodes % 64 == 0 and padded.max_edges % 64 == 0
    assert len(large) * 1.25 <= padded.max_nodes < len(large) * 1.25 + 64
    assert edge_count(large) * 1.25 <= padded.max_edges < edge_count(large) * 1.25 + 64
    assert training_padding([small], SMALL).max_nodes == 64  # never below one step
    assert padded.max_candidates == SMALL.max_candidates and padded.max_steps == SMALL.max_steps


def test_rollout_padding_never_shrinks_the_trained_one_and_leaves_double_room():
    from xrlflow.envs.features import edge_count
    from xrlflow.envs.padding import rollout_padding

    graph = projections(n=40)
    padded = rollout_padding(graph, ENGINE, SMALL)
    assert padded.max_nodes == 2 * len(graph) + 64 and padded.max_edges == 2 * edge_count(graph) + 128
    assert padded.max_candidates == 2 * len(ENGINE.matches(graph)) + 16
    roomy = EnvConfig(max_nodes=100_000, max_edges=100_000, max_candidates=100_000)
    assert rollout_padding(graph, ENGINE, roomy) == roomy


def test_cost_column_holds_the_cost_models_node_costs_on_bert():
    from xrlflow.envs.features import GraphFeaturizer
    from xrlflow.zoo import export_model

    graph = load_graph(export_model("bert-base", small=True))
    service = CostModel.for_device("h200")
    config = EnvConfig(max_nodes=256, max_edges=512, max_candidates=64)
    obs, _ = GraphRewriteEnv({"bert": graph}, service, config).reset(seed=0)
    n = int(obs["counts"][0])
    column = obs["node_features"][:n, GraphFeaturizer(config.op_vocabulary).cost_column]
    costs = service.node_costs(graph)
    order = graph.topological_order()
    computed = [i for i, name in enumerate(order) if graph.nodes[name].op_type != "Constant"]
    assert len(computed) > 50 and (column[computed] > 0).all(), "every node that runs is part of a kernel with a cost"
    assert sum(costs.values()) == pytest.approx(service.latency(graph).ms)  # the kernels' costs, spread over their nodes
    row = {name: i for i, name in enumerate(order)}
    matmul = graph.by_op("MatMul")[0]
    assert column[row[matmul.name]] == pytest.approx(np.log1p(costs[matmul.name] * 1000.0) / 12.0, rel=1e-5)
    # A checkpoint's env config from before the column was filled keeps it at 0 (what its policy trained on).
    old = EnvConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "node_costs"})
    obs_old, _ = GraphRewriteEnv({"bert": graph}, service, old).reset(seed=0)
    assert not obs_old["node_features"][:n, GraphFeaturizer(config.op_vocabulary).cost_column].any()


# ---- macro slots, predicted gain, revisits, patience -----------------------------------------------------------
def identical_blocks(n: int = 3):
    """n identical Relu(MatMul + bias) blocks on n inputs of one shape, each with its own weights."""
    b = ModelBuilder(3)
    outs = []
    for i in range(n):
        x = b.input(f"x{i}", [4, 16])
        outs.append(b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.const((16, 8))]), b.const((8,))])]))
    b.output(*outs)
    return load_graph(b.model())


def test_macro_slot_applies_the_rule_at_every_identical_site():
    from xrlflow.sites import site_groups

    graph = identical_blocks(3)
    env = make_env(EnvConfig(max_nodes=64, max_edges=128, max_candidates=16), only=graph)
    env.reset()
    singles = env.candidates
    macros = [i for i, slot in enumerate(env.slots) if len(slot) > 1]
    assert macros, "three identical blocks give a macro slot"
    assert env.slots[: len(singles)] == [(m,) for m in singles]
    groups = site_groups(graph, ENGINE.matches(graph))
    assert [env.slots[i] for i in macros] == [g for g in groups if len(g) > 1]
    i = macros[0]
    slot = env.slots[i]
    assert len(slot) == 3 and len({m.rule for m in slot}) == 1
    assert env.candidate_features[i, 3] == 1.0 and env.candidate_features[: len(singles), 3].sum() == 0
    _, reward, _, _, info = env.step(i)
    assert info["sites"] == 3 and env.applied == list(slot)
    # the path replays, and it equals applying the three single rewrites one by one
    assert ENGINE.apply_sequence(graph, env.applied).structural_hash() == env.graph.structural_hash()


def test_predicted_gain_matches_the_cost_models_whole_graph_difference():
    from xrlflow.sites import local_cost_delta

    service = CostModel("cpu")
    for graph in (projections(), inception_pair(), identical_blocks(2)):
        base = service.latency(graph).ms
        for m in ENGINE.matches(graph):
            child = ENGINE.apply(graph, m)
            assert local_cost_delta(service, graph, child) == pytest.approx(service.latency(child).ms - base, abs=1e-12)
    env = make_env(EnvConfig(max_nodes=64, max_edges=128, max_candidates=16), only=inception_pair())
    env.reset()
    (enlarge,) = [i for i, m in enumerate(env.candidates) if m.rule == "enlarge-conv-kernel"]
    feats = env.candidate_features[enlarge]
    assert feats[0] < 0 and feats[1] == 0 and feats[2] == 1  # enlarging alone is slower


def test_measured_service_without_predictor_leaves_gain_at_zero():
    class Measured:
        name, deterministic = "fake", False

        def latency(self, g):
            return Latency(1.0, 1.0, 1.0, 1, "fake")

    env = make_env(EnvConfig(max_nodes=64, max_edges=128, max_candidates=16), latency=Measured(), only=inception_pair())
    env.reset()
    assert env.predictor is None and not env.candidate_features[:, :3].any()


def test_revisit_is_penalised_and_the_way_out_is_masked():
    config = EnvConfig(max_nodes=64, max_edges=128, max_candidates=32, max_steps=20, revisit_penalty=2.5, patience=0,
                       macro_actions=False)
    env = make_env(config, only=projections())
    env.reset()
    start = env.graph.structural_hash()
    first = [m.rule for m in env.candidates].index("matmul-add-to-gemm")
    site = env.candidates[first]
    _, r1, *_, info = env.step(first)
    assert not info["revisit"]
    _, r2, *_, info = env.step([m.rule for m in env.candidates].index("gemm-to-matmul-add"))
    assert info["revisit"] and env.graph.structural_hash() == start
    assert r1 + r2 == pytest.approx(-2.5, abs=1e-9)  # the round trip's latency change is 0
    # back at the start: the same way out is masked (other sites of the rule and stop are not)
    mask = env.action_masks()
    closed = [i for i in range(len(env.slots)) if not mask[i]]
    assert len(closed) == 1 and env.slots[closed[0]][0].rule == site.rule and mask[-1]
    assert sum(m.rule == site.rule for m in env.candidates) > 1  # the rule's other sites stay open
    _, _, terminated, _, info = env.step(closed[0])
    assert terminated and info["invalid_action"]


def test_patience_truncates_a_walk_without_improvement():
    config = EnvConfig(max_nodes=64, max_edges=128, max_candidates=16, max_steps=50, patience=2, macro_actions=False)
    env = make_env(config, only=inception_pair())
    env.reset()
    _, _, terminated, truncated, _ = env.step([m.rule for m in env.candidates].index("enlarge-conv-kernel"))
    assert not terminated and not truncated
    _, _, terminated, truncated, info = env.step([m.rule for m in env.candidates].index("merge-parallel-conv"))
    assert truncated and not terminated and info["episode_steps"] == 2


def test_old_env_config_dicts_keep_the_old_behaviour():
    old = {k: v for k, v in EnvConfig().to_dict().items()
           if k not in ("node_costs", "macro_actions", "cost_features", "revisit_penalty", "mask_taken", "patience")}
    config = EnvConfig.from_dict(old)
    assert (config.node_costs, config.macro_actions, config.cost_features, config.revisit_penalty, config.mask_taken,
            config.patience) == (False, False, False, 0.0, False, 0)


def test_policy_search_polishes_its_best_graph_greedily():
    """A policy that stops at once leaves the input; with polish (the default, on a deterministic predictor)
    greedy continues from the rollouts' best graph, so the result is greedy's local optimum, and its path
    replays to it."""
    from tests.test_search import attention_like_model
    from xrlflow.search import SearchConfig, policy_search, run_search

    graph = load_graph(attention_like_model(layers=2, width=16))
    engine, cost = default_engine(), CostModel()
    config = EnvConfig(max_nodes=256, max_edges=512, max_candidates=64, max_steps=8)

    def make_env(latency, predictor):
        return GraphRewriteEnv({"m": graph}, latency, config, engine, predictor=predictor)

    def stop_at_once(obs, mask, rng):
        return config.max_candidates  # the stop action

    unpolished = policy_search(graph, cost, make_env, stop_at_once, SearchConfig(rollouts=1, polish=False))
    assert unpolished.best.structural_hash() == graph.structural_hash() and not unpolished.applied
    polished = policy_search(graph, cost, make_env, stop_at_once, SearchConfig(rollouts=1))
    greedy = run_search("greedy", graph, engine, cost, SearchConfig())
    assert polished.best.structural_hash() == greedy.best.structural_hash()
    assert polished.best_latency.ms == pytest.approx(greedy.best_latency.ms)
    assert polished.best_latency.ms < cost.latency(graph).ms
    assert engine.apply_sequence(graph, polished.applied).structural_hash() == polished.best.structural_hash()
