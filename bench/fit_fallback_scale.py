"""Fit a per-kernel table's fallback scale (see OpTable.fallback_scale) on the zoo and random rewrites.

    python bench/fit_fallback_scale.py xrlflow/data/h200_cuda_ort1.31.1.json --profile h200

Uses the canonical zoo models and up to `--sequences` random rewrite sequences of each, so the ratios cover
the kernels searches produce; rewrites the table in place (atomically) and prints the factors.
"""

from __future__ import annotations

import argparse
import random

from xrlflow.costmodel import OpTable, fit_fallback_scale
from xrlflow.engine import prepare_for_search
from xrlflow.onnx_io import load_graph
from xrlflow.rules import CANONICAL_RULES, default_engine
from xrlflow.zoo import export_model, list_models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("table")
    parser.add_argument("--profile", default="h200")
    parser.add_argument("--sequences", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    engine = default_engine()
    rng = random.Random(args.seed)
    graphs = []
    for entry in list_models():
        graph = prepare_for_search(load_graph(export_model(entry.name)), engine, CANONICAL_RULES)
        graphs.append(graph)
        for _ in range(args.sequences):
            g = graph
            for _ in range(rng.randint(1, 8)):
                matches = engine.matches(g)
                if not matches:
                    break
                g = engine.apply(g, rng.choice(matches))
            graphs.append(g)
    table = fit_fallback_scale(OpTable.load(args.table), graphs, args.profile)
    table.save(args.table)
    for op, factor in sorted(table.fallback_scale.items()):
        print(f"{op:<24} {factor:.3f}")


if __name__ == "__main__":
    main()
