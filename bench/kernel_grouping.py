"""Does the cost model's kernel grouping match the graph onnxruntime runs? Per zoo model, the kernels
`xrlflow.costmodel.group_kernels` prices against the nodes onnxruntime keeps after its graph optimisations
(ORT_ENABLE_EXTENDED, on the chosen execution provider; memory re-labels such as Reshape not counted).

    .venv/bin/python bench/kernel_grouping.py                                  # CPU EP
    python3 bench/kernel_grouping.py --device cuda --out $OUT/kernel_grouping_cuda.md   # GPU machine

The default profile is h200 on both: its fusions are the graph-level ones both execution providers perform at
ORT_ENABLE_EXTENDED. `--profile cpu` adds the CPU-only Conv + Add + Relu fusion, which onnxruntime performs
only at ORT_ENABLE_ALL (with its NCHWc layout), so at EXTENDED the residual CNNs then differ.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from xrlflow.costmodel import PROFILES, group_kernels
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import graph_to_bytes, load_graph
    from xrlflow.rules import CANONICAL_RULES
    from xrlflow.rules.registry import default_engine
    from xrlflow.testing import onnxruntime_nodes
    from xrlflow.zoo import export_model, list_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--profile", choices=("h200", "cpu"), default="h200")
    p.add_argument("--full", action="store_true", help="full-size zoo models (default: the small variants)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import onnxruntime

    profile = PROFILES[args.profile]
    engine = default_engine()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for entry in list_models():
            name = entry.name
            graph = prepare_for_search(load_graph(export_model(name, small=not args.full)), engine, CANONICAL_RULES)
            ours = collections.Counter("+".join(k.ops) for k in group_kernels(graph, profile) if not k.alias)
            theirs = onnxruntime_nodes(graph_to_bytes(graph), args.device, folder)
            n_ours, n_theirs = sum(ours.values()), sum(theirs.values())
            top = ", ".join(f"{op} {n}" for op, n in theirs.most_common(6))
            rows.append(f"| {name} | {n_ours} | {n_theirs} | {'yes' if n_ours == n_theirs else f'{n_ours - n_theirs:+d}'} | {top} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        f"# Kernel grouping against onnxruntime ({args.device})",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- onnxruntime {onnxruntime.__version__}, {'CUDA' if args.device == 'cuda' else 'CPU'} EP, ORT_ENABLE_EXTENDED; "
        f"cost-model profile {profile.name}; {'full-size' if args.full else 'small'} zoo models, canonical form",
        f"- command: `python bench/kernel_grouping.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "| model | kernels priced | nodes onnxruntime keeps | same count | onnxruntime's largest op groups |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    out = Path(args.out or Path(__file__).parent / "results" / f"kernel_grouping_{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
