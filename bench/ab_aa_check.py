"""A/A check of the final A/B `xrlflow optimize` runs (`guarantee.repeated_ab`): how often its interval holds
1.0 when both models are the same file, against how often one compare's own interval does.

    python -m bench.ab_aa_check [--trials 20] [--repeats 6] [--threads 0]

Run from the repository root: the model comes from tests/.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from tests.test_search import attention_like_model
    from xrlflow.guarantee import repeated_ab
    from xrlflow.measure import MeasureConfig, MeasuredLatency, device_name, input_specs
    from xrlflow.onnx_io import load_graph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="0: onnxruntime's default")
    args = parser.parse_args()
    model = attention_like_model(layers=2, width=64)
    data, specs = model.SerializeToString(), input_specs(load_graph(model))
    single = held = 0
    with MeasuredLatency(MeasureConfig.create(intra_op_threads=args.threads, cache_path="", max_seconds=2.0)) as service:
        for trial in range(args.trials):
            compares = []

            def compare(swapped: bool):
                compares.append(service.compare_models(data, specs, data, specs))
                return compares[-1]

            ab = repeated_ab(compare, args.repeats)
            single += sum(c.low <= 1.0 <= c.high for c in compares)
            held += ab.low <= 1.0 <= ab.high
            print(f"{trial}: {ab.speedup:.4f} [{ab.low:.4f}, {ab.high:.4f}]", flush=True)
    print(f"{device_name('cpu')}, threads {args.threads or 'default'}: one compare's CI held 1.0 in "
          f"{single}/{args.trials * args.repeats}; the repeated A/B's interval in {held}/{args.trials}")


if __name__ == "__main__":
    main()
