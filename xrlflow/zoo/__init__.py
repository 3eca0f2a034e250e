"""Model zoo: plain-PyTorch definitions of the benchmark models, exported to ONNX and cached on disk.

Every model is written here (no torchvision, no transformers, nothing downloaded), built with seeded random
weights and exported by the TorchScript exporter at a pinned opset with static shapes, so the same name and
parameters always give the same ONNX bytes. Exports are cached under the user cache directory, keyed by
BUILDER_VERSION and every parameter, so only the first export of a configuration costs time.

    transformer_models, conv_models   the model definitions
    registry                          names, configurations, inputs, seeded construction
    export                            ONNX export and the on-disk cache
    cli                               `xrlflow zoo list|export`

Names are resolved on first use, so importing the package (or `add_zoo_cli`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    **dict.fromkeys((
        "SelfAttention", "FeedForward", "GatedFeedForward", "TransformerBlock", "causal_attention_bias",
        "TransformerDims", "TransformerStack", "BertEncoder", "GPT2", "VisionTransformer",
        "TransformerTransducer",
    ), "transformer_models"),
    **dict.fromkeys((
        "conv_bn", "Bottleneck", "ResNet", "Fire", "SqueezeNet11", "inception_conv", "InceptionA",
        "InceptionB", "InceptionC", "InceptionD", "InceptionE", "InceptionV3", "SeparableConv", "relu_conv_bn",
        "NASNetNormalCell", "NASNetReductionCell", "NASNetA",
    ), "conv_models"),
    **dict.fromkeys((
        "BUILDER_VERSION", "OPSET", "SEED", "CALIBRATION_BATCH", "ModelConfig", "ModelInput", "BuiltModel",
        "ZooEntry", "BERT_BASE", "BERT_SMALL", "BERT_XRL", "BERT_XRL_SMALL", "VIT_BASE", "VIT_SMALL",
        "MINI_DALLE", "MINI_DALLE_SMALL", "TRANSDUCER", "TRANSDUCER_SMALL", "GPT2_SMALL_MODEL", "GPT2_TINY",
        "NUM_CLASSES", "SMALL_NUM_CLASSES", "AUDIO_FEATURES", "list_models", "get_entry", "resolve_config",
        "model_inputs", "build_from_config", "build_model", "count_parameters",
    ), "registry"),
    **dict.fromkeys((
        "CACHE_DIR_ENV_VAR", "EXTERNAL_DATA_THRESHOLD_BYTES", "default_cache_dir", "cached_export_path",
        "cached_summary", "export_model", "export_model_to_file",
    ), "export"),
    **dict.fromkeys((
        "add_zoo_cli", "format_model_table", "run_zoo_cli",
    ), "cli"),
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'xrlflow.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xrlflow.zoo.{home}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
