"""Do onnxruntime's transformers fusions pay on the CPU EP? (decides `--ort-fusions auto` on the CPU)

A small Hugging Face BERT (random weights, nothing downloaded: hidden 256, 4 layers, 4 heads, seq 128,
batch 1), exported by torch dynamo and by the legacy TorchScript exporter; each export against itself after
xrlflow's onnxruntime-fusions stage (`ort_stages.ort_transformer_fusions`), verified, then timed with the
final A/B `xrlflow optimize` uses (`guarantee.repeated_ab`: independent interleaved compares, 95% t-interval)
at one intra-op thread and at onnxruntime's default threads.

    python bench/ort_fusions_cpu.py --out bench/results/ort_fusions_cpu.md [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path


def export(dynamo: bool, path: Path, seq: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, vocab_size=1000, max_position_embeddings=seq,
                                     attn_implementation="eager")
    bert = transformers.BertModel(config).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    args = (torch.randint(0, 1000, (1, seq)), torch.ones(1, seq, dtype=torch.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = dict(dynamo=True, external_data=False) if dynamo else dict(dynamo=False, opset_version=14)
        torch.onnx.export(LastHiddenState(), args, str(path), input_names=["input_ids", "attention_mask"], **options)


def main() -> None:
    import onnx

    from xrlflow.guarantee import repeated_ab
    from xrlflow.measure import MeasureConfig, MeasuredLatency, device_name
    from xrlflow.measure_worker import InputSpec
    from xrlflow.ort_stages import ort_transformer_fusions
    from xrlflow.verify import Tolerance, verify_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    specs = (InputSpec("input_ids", onnx.TensorProto.INT64, (1, args.seq)),
             InputSpec("attention_mask", onnx.TensorProto.INT64, (1, args.seq)))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dynamo in (True, False):
            path = Path(folder) / ("dynamo.onnx" if dynamo else "legacy.onnx")
            export(dynamo, path, args.seq)
            model = onnx.load(str(path))
            stage = ort_transformer_fusions(model)
            check = verify_models(model, stage.model, tolerance=Tolerance(1e-3, 1e-4))
            for threads in (1, 0):
                service = MeasuredLatency(MeasureConfig.create(device="cpu", intra_op_threads=threads, cache_path="",
                                                               max_seconds=3.0))
                a, b = model.SerializeToString(), stage.model.SerializeToString()
                ab = repeated_ab(lambda swapped: service.compare_models(*((b, specs, a, specs) if swapped
                                                                          else (a, specs, b, specs))), args.repeats)
                service.close()
                rows.append(f"| {'dynamo' if dynamo else 'legacy'} | {threads or 'default'} | "
                            f"{', '.join(f'{n} {op}' for op, n in stage.fused.items()) or '-'} | {check.ok} | "
                            f"{ab.before_ms:.3f} | {ab.before_ms / ab.speedup:.3f} | "
                            f"{ab.speedup:.3f}x [{ab.low:.3f}, {ab.high:.3f}] |")
                print(rows[-1], flush=True)
    text = [
        "# onnxruntime's transformers fusions on the CPU EP", "",
        f"`python bench/ort_fusions_cpu.py --repeats {args.repeats}`; {device_name('cpu')}; HF BERT hidden 256, "
        f"4 layers, 4 heads, seq {args.seq}, batch 1, random weights; A/B: {args.repeats} independent interleaved "
        "compares, 95% t-interval; a shared machine (other processes ran beside it).", "",
        "| export | threads | fused | verified | before (ms) | after (ms) | speedup |",
        "|---|---|---|---|---|---|---|", *rows, "",
    ]
    Path(args.out).write_text("\n".join(text))


if __name__ == "__main__":
    main()
