"""The agent learns a rewrite sequence that needs temporary slowdowns, where greedy search stops at once.

Graph: a 3x3 conv and a 1x1 conv sibling on one small input (4x4 spatial, so kernel launches dominate),
concatenated on channels. Best sequence under the cost model: enlarge-conv-kernel (the 1x1 becomes a
zero-padded 3x3: slower), merge-parallel-conv (one conv + Split, feeding the Concat: still slower than the
input), cancel-split-concat (the Split/Concat pair vanishes: one conv left, faster than the input). Greedy
search only ever sees the slower enlarge step and stops at the input graph.

Episodes are 4 rewrites long, so the merge <-> split-merged-conv loop (which costs nothing but time under
gamma 0.99) cannot also reach the end: the policy has to take cancel-split-concat at the first chance.
Budget: 3072 env steps (about 15 s on one core); 1024 steps already gave the right argmax on seeds 0-3.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_env import inception_pair
from xrlflow.agents import load_policy
from xrlflow.costmodel import CostModel
from xrlflow.envs import EnvConfig, GraphRewriteEnv
from xrlflow.rules import default_engine
from xrlflow.search import SearchConfig, greedy_search
from xrlflow.train import TrainConfig, train

ENGINE = default_engine()


def optimum(graph, service, depth=5):
    """The fastest graph reachable in `depth` rewrites (exhaustive, dedup by structural hash)."""
    best = graph
    frontier, seen = [graph], {graph.structural_hash()}
    for _ in range(depth):
        nxt = []
        for g in frontier:
            for m in ENGINE.matches(g):
                child = ENGINE.apply(g, m)
                h = child.structural_hash()
                if h in seen:
                    continue
                seen.add(h)
                nxt.append(child)
                if service.latency(child).ms < service.latency(best).ms:
                    best = child
        frontier = nxt
    return best


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _path_latencies(graph, service, rules):
    out = [service.latency(graph).ms]
    for rule in rules:
        (match,) = [m for m in ENGINE.matches(graph) if m.rule == rule]
        graph = ENGINE.apply(graph, match)
        out.append(service.latency(graph).ms)
    return graph, out


@pytest.mark.slow
def test_policy_learns_sequence_with_temporary_slowdown(tmp_path, one_torch_thread):
    graph = inception_pair()
    service = CostModel("cpu")

    # The premise, so the test documents it: enlarging is slower, merging is still slower, the end is faster,
    # and it is the best graph reachable.
    final, (l0, l_enlarged, l_merged, l_final) = _path_latencies(
        graph, service, ["enlarge-conv-kernel", "merge-parallel-conv", "cancel-split-concat"])
    assert l_enlarged > l0 and l_merged > l0 and l_final < l0
    best = optimum(graph, service)
    assert service.latency(best).ms == pytest.approx(l_final)
    assert [m.rule for m in ENGINE.matches(graph)] == ["enlarge-conv-kernel"]

    greedy = greedy_search(graph, ENGINE, service, SearchConfig(steps=10))
    assert greedy.best.structural_hash() == graph.structural_hash() and greedy.speedup == 1.0

    cfg = TrainConfig(
        models=("pair",), steps=3072, seed=0, run_name="learn", num_envs=2, n_steps=64, batch_size=64, n_epochs=4,
        learning_rate=1e-3, ent_coef=0.01, env=EnvConfig(max_steps=4, max_candidates=16), checkpoint_every=10**6,
        runs_dir=str(tmp_path / "runs"), checkpoints_dir=str(tmp_path / "checkpoints"), progress=False,
    )
    meta = train(cfg, graphs=[("pair", graph)], latency=service)
    assert meta["best_speedup"]["pair"] == pytest.approx(l0 / l_final)

    policy = load_policy(tmp_path / "checkpoints" / "learn")
    env = GraphRewriteEnv({"pair": graph}, service, EnvConfig(max_nodes=64, max_edges=128, max_candidates=32,
                                                              max_steps=4))
    obs, info = env.reset()
    done = False
    rules = []
    while not done:
        obs, reward, terminated, truncated, info = env.step(policy.act(obs, env.action_masks(), deterministic=True))
        rules.append(info["rule"])
        done = terminated or truncated
    assert env.best_graph.structural_hash() == best.structural_hash(), f"deterministic rollout took {rules}"
    assert info["best_speedup"] > 1.0
