"""Session fixtures: tiny Hugging Face models (random weights, built from configs, nothing downloaded) and
the zoo's small transformers, exported once per test session into a temporary folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

SEQ = 8
BATCH = 2


def export_hf(family: str, attn: str, path: Path, dynamo: bool = True, opset: int = 14, dynamic: bool = False) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, attn_implementation=attn)
    if family == "bert":
        config = transformers.BertConfig(hidden_size=64, vocab_size=100, max_position_embeddings=64, **small)
        module = transformers.BertModel(config)
        args = (torch.randint(0, 100, (BATCH, SEQ)), torch.ones(BATCH, SEQ, dtype=torch.int64))
        names = ["input_ids", "attention_mask"]
    elif family == "vit":
        config = transformers.ViTConfig(hidden_size=64, image_size=32, patch_size=8, **small)
        module = transformers.ViTModel(config)
        args, names = (torch.randn(BATCH, 3, 32, 32),), ["pixel_values"]
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                         use_cache=False, attn_implementation=attn)
        module = transformers.GPT2Model(config)
        args, names = (torch.randint(0, 100, (BATCH, SEQ)),), ["input_ids"]
    else:
        raise ValueError(family)
    module.eval()
    if not dynamo:
        module = _LastHiddenState(module, names)  # TorchScript tracing wants positional tensors and a tensor out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = dict(external_data=False) if dynamo else dict(opset_version=opset)
        if dynamic:  # symbolic batch and sequence on every token input
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
            options["dynamic_shapes"] = tuple({0: batch, 1: seq} for _ in args)
        torch.onnx.export(module, args, str(path), dynamo=dynamo, input_names=names, **options)
    return path


def _LastHiddenState(model, names):
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(names, tensors))).last_hidden_state

    return LastHiddenState()


@pytest.fixture(scope="session")
def hf_exports(tmp_path_factory):
    cache: dict[tuple[str, str, bool, int, bool], Path] = {}
    folder = tmp_path_factory.mktemp("hf-exports")

    def get(family: str, attn: str, dynamo: bool = True, opset: int = 14, dynamic: bool = False) -> Path:
        key = (family, attn, dynamo, opset, dynamic)
        if key not in cache:
            path = folder / f"{family}-{attn}-{'dynamo' if dynamo else f'legacy{opset}'}{'-dynamic' * dynamic}.onnx"
            cache[key] = export_hf(family, attn, path, dynamo, opset, dynamic)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def zoo_exports(tmp_path_factory):
    pytest.importorskip("torch")
    from xrlflow import zoo

    folder = tmp_path_factory.mktemp("zoo-exports")

    def get(name: str) -> Path:
        return zoo.cached_export_path(zoo.resolve_config(name, small=True), cache_dir=folder)

    return get
