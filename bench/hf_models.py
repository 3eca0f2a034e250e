"""Hugging Face architectures as users export them: built from their configs with seeded random weights
(nothing downloaded), exported by torch.onnx (dynamo by default, or the legacy TorchScript exporter).

    python bench/hf_models.py bert-base -o bert.onnx [--layers 4] [--batch 1] [--seq 128] [--legacy] [--attn eager]

Needs `transformers` (pip install transformers); used by bench/pipeline_speedup.py and the tests that check
rules on real exports.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("bert-base", "vit-base", "gpt2")


@dataclass(frozen=True)
class HFExport:
    """One export: which architecture, its size, and how it was exported."""

    arch: str
    layers: int | None = None  # None: the architecture's full depth (12)
    batch: int = 1
    seq: int = 128  # tokens (BERT, GPT-2); ViT always takes 224x224 images (196 patches + CLS)
    legacy: bool = False  # the TorchScript exporter (dynamo=False) instead of dynamo
    attn: str = "sdpa"  # transformers' attn_implementation: "sdpa" or "eager"
    opset: int = 18
    hidden: int | None = None  # a smaller width for quick tests (heads scale with it)

    @property
    def name(self) -> str:
        parts = [self.arch, f"L{self.layers or 12}", f"b{self.batch}"]
        if self.arch != "vit-base":
            parts.append(f"s{self.seq}")
        if self.hidden:
            parts.append(f"h{self.hidden}")
        parts += [self.attn, "legacy" if self.legacy else "dynamo", f"op{self.opset}"]
        return "-".join(parts)


def _module_and_inputs(spec: HFExport):
    import torch
    import transformers

    torch.manual_seed(0)
    overrides = {}
    if spec.layers is not None:
        overrides["num_hidden_layers" if spec.arch != "gpt2" else "n_layer"] = spec.layers
    if spec.hidden is not None:
        heads = max(1, spec.hidden // 64)
        if spec.arch == "gpt2":
            overrides.update(n_embd=spec.hidden, n_head=heads)
        else:
            overrides.update(hidden_size=spec.hidden, num_attention_heads=heads, intermediate_size=4 * spec.hidden)
    if spec.arch == "bert-base":
        config = transformers.BertConfig(**overrides)
        model = transformers.BertModel(config, add_pooling_layer=False)
        ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq))
        inputs = (ids, torch.ones_like(ids))
        names = ["input_ids", "attention_mask"]
    elif spec.arch == "vit-base":
        config = transformers.ViTConfig(**overrides)
        model = transformers.ViTModel(config, add_pooling_layer=False)
        inputs = (torch.randn(spec.batch, 3, config.image_size, config.image_size),)
        names = ["pixel_values"]
    elif spec.arch == "gpt2":
        config = transformers.GPT2Config(**overrides)
        model = transformers.GPT2Model(config)
        ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq))
        inputs = (ids,)
        names = ["input_ids"]
    else:
        raise ValueError(f"unknown architecture {spec.arch!r}; choose from {', '.join(ARCHITECTURES)}")
    config._attn_implementation = spec.attn
    model.config._attn_implementation = spec.attn
    model.config.use_cache = False
    model.eval()
    return model, inputs, names


class _LastHiddenState:
    """Wraps a transformers model so the export has one output, the last hidden state."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, *args):
                return self.inner(*args, use_cache=False).last_hidden_state if "GPT2" in type(self.inner).__name__ \
                    else self.inner(*args).last_hidden_state

        return Wrapper(model)


def export(spec: HFExport, path: str | Path) -> Path:
    """Export `spec` to one ONNX file at `path` (static shapes)."""
    import torch

    model, inputs, names = _module_and_inputs(spec)
    wrapped = _LastHiddenState(model).eval()
    path = Path(path)
    with torch.no_grad():
        if spec.legacy:
            torch.onnx.export(wrapped, inputs, str(path), input_names=names, output_names=["last_hidden_state"],
                              opset_version=spec.opset, dynamo=False)
        else:
            torch.onnx.export(wrapped, inputs, str(path), input_names=names, output_names=["last_hidden_state"],
                              opset_version=spec.opset, dynamo=True, external_data=False)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arch", choices=ARCHITECTURES)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--legacy", action="store_true", help="TorchScript exporter (dynamo=False)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--opset", type=int, default=18)
    args = p.parse_args(argv)
    spec = HFExport(args.arch, args.layers, args.batch, args.seq, args.legacy, args.attn, args.opset, args.hidden)
    print(export(spec, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
