"""Env and training throughput.

    python bench/env_throughput.py                       # both parts, markdown table on stdout
    python bench/env_throughput.py --part env --env-steps 200
    python bench/env_throughput.py --part train --train-steps 1024 --models bert-base,resnext50,inception-v3,squeezenet

Part `env`: env steps/s on the full-size BERT-base of the zoo with the cost-model reward, random valid actions
(seeded), resets included; split into time in the latency service and the rest (matching, applying,
observation). Part `train`: `xrlflow.train.train` with 4 environments over small zoo models, env steps/s of
the whole loop (rollouts and PPO updates) and the peak RSS of that process. Each part runs in its own process
so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def part_env(model: str, steps: int, seed: int, features: bool = True) -> dict:
    import numpy as np

    from xrlflow.costmodel import CostModel
    from xrlflow.envs import EnvConfig, GraphRewriteEnv
    from xrlflow.envs.features import edge_count
    from xrlflow.onnx_io import load_graph
    from xrlflow.zoo import export_model

    t0 = time.perf_counter()
    graph = load_graph(export_model(model))
    load_s = time.perf_counter() - t0
    service = CostModel("cpu")

    class Timed:
        name = service.name
        deterministic = True
        seconds = 0.0

        def __init__(self):
            self.seconds = 0.0

        def latency(self, g):
            start = time.perf_counter()
            try:
                return service.latency(g)
            finally:
                self.seconds += time.perf_counter() - start

        def node_costs(self, g):
            return service.node_costs(g)

    edges = edge_count(graph)
    # the default padding (or a quarter above the graph): the same arrays as the committed results were timed on
    cfg = EnvConfig(max_nodes=max(2048, len(graph.nodes) * 5 // 4), max_edges=max(4096, edges * 5 // 4),
                    max_candidates=256, max_steps=50, macro_actions=features, cost_features=features)
    reward_service, predictor = Timed(), Timed()
    env = GraphRewriteEnv({model: graph}, reward_service, cfg, predictor=predictor)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed)
    first_reset_s = time.perf_counter() - t0
    candidates = [info["num_candidates"]]
    t0 = time.perf_counter()
    reward_service.seconds = predictor.seconds = 0.0
    for _ in range(steps):
        valid = np.flatnonzero(env.action_masks()[:-1])
        action = int(rng.choice(valid)) if len(valid) else cfg.max_candidates
        obs, reward, terminated, truncated, info = env.step(action)
        candidates.append(info["num_candidates"])
        if terminated or truncated:
            obs, info = env.reset()
    elapsed = time.perf_counter() - t0
    return {
        "model": model, "nodes": len(graph.nodes), "edges": edges, "load_s": load_s, "first_reset_s": first_reset_s,
        "features": features, "steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed,
        "latency_service_s": reward_service.seconds, "predictor_s": predictor.seconds,
        "mean_candidates": float(np.mean(candidates)), "peak_rss_mb": _peak_rss_mb(),
    }


def part_train(models: list[str], steps: int, num_envs: int, seed: int) -> dict:
    from xrlflow.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(models=tuple(models), small=True, steps=steps, num_envs=num_envs, seed=seed,
                          run_name="bench", runs_dir=f"{tmp}/runs", checkpoints_dir=f"{tmp}/ck", progress=False,
                          checkpoint_every=10**9)
        t0 = time.perf_counter()
        meta = train(cfg)
        elapsed = time.perf_counter() - t0
    return {
        "models": models, "num_envs": num_envs, "steps": meta["num_timesteps"], "seconds": elapsed,
        "steps_per_s": meta["num_timesteps"] / elapsed, "n_steps": cfg.n_steps, "epochs": cfg.n_epochs,
        "env_config": {k: meta["env_config"][k] for k in ("max_nodes", "max_edges", "max_candidates")},
        "best_speedup": meta["best_speedup"], "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("env", "train", "all"), default="all")
    p.add_argument("--model", default="bert-base")
    p.add_argument("--env-steps", type=int, default=200)
    p.add_argument("--models", default="bert-base,resnext50,inception-v3,squeezenet")
    p.add_argument("--train-steps", type=int, default=1024)
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the raw result of one part")
    p.add_argument("--no-features", action="store_true",
                   help="env part: no macro slots and no predicted-gain features (the env before them)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    if args.part == "env":
        print(json.dumps(part_env(args.model, args.env_steps, args.seed, features=not args.no_features)))
        return 0
    if args.part == "train":
        print(json.dumps(part_train(args.models.split(","), args.train_steps, args.num_envs, args.seed)))
        return 0

    results = {}
    for part, extra in (("env", []), ("env-plain", ["--no-features"]), ("train", [])):
        out = subprocess.run(
            [sys.executable, __file__, "--part", part.split("-")[0], "--model", args.model, "--env-steps",
             str(args.env_steps), "--models", args.models, "--train-steps", str(args.train_steps), "--num-envs",
             str(args.num_envs), "--seed", str(args.seed), *extra], check=True, capture_output=True, text=True)
        results[part] = json.loads(out.stdout.strip().splitlines()[-1])
    e, plain, t = results["env"], results["env-plain"], results["train"]
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, torch {torch.__version__}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| measurement | value |\n|---|---|")
    print(f"| env: model | {e['model']} (full size, {e['nodes']} nodes, {e['edges']} edges) |")
    print(f"| env: steps/s (random valid actions, cost-model reward) | {e['steps_per_s']:.1f} ({e['steps']} steps in {e['seconds']:.1f} s) |")
    print(f"| env: time in the cost model (reward) | {e['latency_service_s']:.1f} s of {e['seconds']:.1f} s |")
    print(f"| env: time pricing candidates (predicted gain, local cost delta) | {e['predictor_s']:.1f} s of {e['seconds']:.1f} s |")
    print(f"| env: ms per step (macro slots + predicted gain) | {1e3 * e['seconds'] / e['steps']:.1f} |")
    print(f"| env without macro slots and predicted gain: steps/s, ms per step | {plain['steps_per_s']:.1f}, {1e3 * plain['seconds'] / plain['steps']:.1f} |")
    print(f"| env: first reset (matching + features) | {e['first_reset_s']:.2f} s |")
    print(f"| env: mean candidates per step | {e['mean_candidates']:.1f} |")
    print(f"| env: peak RSS | {e['peak_rss_mb']:.0f} MB |")
    print(f"| train: models (small) | {', '.join(t['models'])} |")
    print(f"| train: env steps/s, {t['num_envs']} envs, n_steps {t['n_steps']}, {t['epochs']} epochs | {t['steps_per_s']:.1f} ({t['steps']} steps in {t['seconds']:.1f} s) |")
    print(f"| train: padding | {t['env_config']} |")
    print(f"| train: peak RSS | {t['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
