"""`search_with_policy`: `xrlflow optimize --policy`'s search, a trained policy's rollouts over one graph.

It lives in the agent's room because it loads a checkpoint and runs torch; the optimizer is handed it as its
`policy_searcher` by the entry points (`xrlflow optimize`, `xrlflow.optimize`), so the core never imports agents.
"""

from __future__ import annotations

import sys

import torch

from xrlflow.agents.checkpoint import load_policy, policy_device
from xrlflow.engine import RewriteEngine
from xrlflow.errors import BadInputError
from xrlflow.ir import Graph
from xrlflow.latency import LatencyService
from xrlflow.search import SearchConfig, SearchResult, policy_search
from xrlflow.trajectory import StepCallback


def search_with_policy(policy_path: str, graph: Graph, engine: RewriteEngine, service: LatencyService,
                       config: SearchConfig, device: str = "cpu", on_step: StepCallback | None = None) -> SearchResult:
    """The policy's deterministic rollout plus `config.rollouts` sampled ones (`search.policy_search`); with
    --rules/--disable-rules the trained action layout stays and only the selected rules' matches are offered.
    The rollouts walk on the device's cost model; `service` (when it is not that cost model) is asked only
    about each rollout's final and best graph, each distinct graph once. With `on_step` (progress on) a
    second bar counts rollouts, then measurements."""
    from xrlflow.rules import default_engine
    from xrlflow.services import make_latency_service

    policy = load_policy(policy_path, device=policy_device(device))
    if engine.fingerprint != policy.rule_fingerprint:
        engine = default_engine().restricted(r.name for r in engine.rules)
    if engine.fingerprint != policy.rule_fingerprint:
        raise BadInputError(f"--policy {policy_path}: trained on another rule registry")
    make_env = policy.env_maker(graph, engine, config.rollout_steps)
    predictor = service if service.deterministic else make_latency_service("cost", device)
    bar = None
    progress = None
    if on_step is not None:
        from tqdm import tqdm

        bar = tqdm(total=config.rollouts + 1, desc="rollouts", unit="rollout", leave=False, file=sys.stderr,
                   dynamic_ncols=True, position=1)

        def progress(phase: str, done: int, total: int) -> None:
            if phase == "measure" and bar.desc != "measuring":
                bar.reset(total=total)
                bar.set_description_str("measuring")
            bar.n = done
            bar.refresh()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the GNN on one graph: a thread pool costs more than it brings (2x on 2 cores)
    try:
        return policy_search(graph, service, make_env, policy.choose, config, on_step, predictor=predictor,
                             progress=progress)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


__all__ = ["search_with_policy"]
