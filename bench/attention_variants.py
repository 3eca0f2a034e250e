"""What the attention block of a pipeline-optimised HF BERT costs on the GPU, variant by variant.

`build` (CPU, here) derives hand-made variants of a pipeline output (weights stripped, as
`bench/pipeline_speedup.py prepare` writes them):

- `packed`: Reshape -> Gemm(W, b) -> Reshape -> Split -> MultiHeadAttention becomes one
  com.microsoft.Attention(X, W, b, attention_bias): exact (same weights, same bias, same attention_bias).
- `noguard`: the Where(IsNaN(context), 0, context) guard after each attention is dropped. NOT exact (it is
  what keeps a fully masked row at 0); built only to price the guard.
- `packed-noguard`: both.

`time` (GPU machine) times every variant and the peers against the pipeline output with
`xrlflow/paired_timing.py` (paired ABBA), and lists the CUDA kernels of one plain run of each model with
torch.profiler (CUPTI traces every kernel of the process, onnxruntime's included).

    python bench/attention_variants.py build --pipeline bench/out/pipeline/hf-bert-base.pipeline.onnx --out bench/out/attn
    python bench/attention_variants.py time --dir bench/out/attn --out $OUT/attn.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
from onnx import helper



def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def pack_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Reshape->Gemm->Reshape->Split->MultiHeadAttention as one com.microsoft.Attention."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = _producers(graph)
    drop, packed = set(), 0
    new_nodes = []
    replacement: dict[int, onnx.NodeProto] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "MultiHeadAttention" or any(node.input[i] for i in (3, 4) if i < len(node.input)):
            continue
        split = producer.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]):
            continue
        reshape_out = producer.get(split.input[0])
        gemm = producer.get(reshape_out.input[0]) if reshape_out is not None and reshape_out.op_type == "Reshape" else None
        if gemm is None or gemm.op_type != "Gemm" or any(a.name in ("transA", "transB") and a.i for a in gemm.attribute):
            continue
        reshape_in = producer.get(gemm.input[0])
        if reshape_in is None or reshape_in.op_type != "Reshape":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias_input = node.input[5] if len(node.input) > 5 else ""
        attention = helper.make_node(
            "Attention", [reshape_in.input[0], gemm.input[1], gemm.input[2], "", "", bias_input], [node.output[0]],
            name=f"packed/{node.name}", domain="com.microsoft", num_heads=attrs["num_heads"],
            **({"scale": attrs["scale"]} if "scale" in attrs else {}))
        replacement[index] = attention
        drop.update(id(n) for n in (split, reshape_out, gemm, reshape_in))
        packed += 1
    for index, node in enumerate(graph.node):
        if id(node) in drop:
            continue
        new_nodes.append(replacement.get(index, node))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return out, packed


def drop_guards(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Where(IsNaN(x), c, x) -> x for every x produced by an attention op (not exact: pricing only)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = _producers(graph)
    rename, drop = {}, set()
    for node in graph.node:
        if node.op_type != "Where":
            continue
        isnan = producer.get(node.input[0])
        if isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != node.input[2]:
            continue
        source = producer.get(node.input[2])
        if source is None or source.op_type not in ("MultiHeadAttention", "Attention"):
            continue
        rename[node.output[0]] = node.input[2]
        drop.update((id(node), id(isnan)))
    kept = [n for n in graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for value in graph.output:
        if value.name in rename:
            raise SystemExit("a guard feeds a graph output; not handled")
    del graph.node[:]
    graph.node.extend(kept)
    return out, len(drop) // 2


def build(pipeline: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = onnx.load(str(pipeline), load_external_data=False)
    stem = pipeline.name.removesuffix(".onnx")
    packed, n_packed = pack_attention(base)
    noguard, n_guards = drop_guards(base)
    packed_noguard, _ = drop_guards(packed)
    for name, model in (("base", base), ("packed", packed), ("noguard", noguard), ("packed-noguard", packed_noguard)):
        onnx.save(model, str(folder / f"{stem}.{name}.onnx"))
    print(f"{stem}: {n_packed} attentions packed, {n_guards} guards")


def time_all(folder: Path, out: Path, cuda_graph_too: bool) -> None:
    from xrlflow.paired_timing import TimingSetting, fill_weights, paired_timing

    filled = folder / "filled"
    filled.mkdir(exist_ok=True)
    for path in sorted(folder.glob("*.onnx")):
        model = fill_weights(onnx.load(str(path)))
        onnx.save(model, str(filled / path.name))
    results = {}
    settings = [TimingSetting(cuda_graph=True)] + ([TimingSetting(cuda_graph=False)] if cuda_graph_too else [])
    groups = sorted({p.name.split(".")[0] + "." + p.name.split(".")[1] for p in filled.glob("*.base.onnx")})
    for setting in settings:
        for group in groups:
            base = filled / f"{group}.base.onnx"
            for other in sorted(filled.glob("*.onnx")):
                if other == base or not (other.name.startswith(group + ".") or other.name.startswith("peer.")):
                    continue
                try:
                    timing = paired_timing(str(base), str(other), setting)
                    results[f"{setting.label} | {base.name} -> {other.name}"] = timing.as_dict()
                except Exception as error:  # a variant onnxruntime refuses is a row that says so
                    results[f"{setting.label} | {base.name} -> {other.name}"] = {"error": str(error)[:300]}
                print(json.dumps({other.name: results[f"{setting.label} | {base.name} -> {other.name}"]}), flush=True)
    results["kernels"] = {p.name: kernel_profile(str(p)) for p in sorted(filled.glob("*.onnx"))}
    out.write_text(json.dumps(results, indent=1))


def kernel_profile(path: str) -> list:
    """(kernel name, count, total us) of one plain CUDA run, after warm-up, longest first."""
    import onnxruntime as ort
    import torch
    from xrlflow.paired_timing import random_feeds

    session = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    feeds = random_feeds(path)
    for _ in range(5):
        session.run(None, feeds)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            session.run(None, feeds)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA or getattr(event, "self_device_time_total", 0) > 0:
            rows.append((event.key[:90], event.count // 3, round(event.self_device_time_total / 3, 1)))
    rows.sort(key=lambda r: -r[2])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pipeline", type=Path, action="append", required=True)
    b.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("time")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--plain-too", action="store_true")
    args = parser.parse_args()
    if args.command == "build":
        for path in args.pipeline:
            build(path, args.out)
    else:
        time_all(args.dir, args.out, args.plain_too)


if __name__ == "__main__":
    main()
