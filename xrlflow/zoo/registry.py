"""The zoo's registry: every model's name, configuration, inputs and seeded construction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from xrlflow.errors import BadInputError
from xrlflow.names import did_you_mean
from xrlflow.zoo.conv_models import InceptionV3, NASNetA, ResNet, SqueezeNet11
from xrlflow.zoo.transformer_models import (
    BertEncoder, GPT2, TransformerDims, TransformerStack, TransformerTransducer, VisionTransformer,
)

# Bump whenever a model definition, the seeding or the export settings change: it invalidates every cache entry.
BUILDER_VERSION = 1
OPSET = 18
SEED = 0
# BatchNorm statistics are calibrated on this many random images (more than one, so that a 1x1 feature map
# still has more than one value per channel).
CALIBRATION_BATCH = 2


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines an export (and therefore its cache key)."""

    name: str
    small: bool
    batch: int
    seq: int | None  # sequence length (frames for the transducer); None for image models
    image_size: int | None  # None for sequence models

    def cache_key(self) -> str:
        fields = dict(asdict(self), builder_version=BUILDER_VERSION, opset=OPSET, seed=SEED, torch=torch.__version__)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def file_stem(self) -> str:
        size = f"s{self.seq}" if self.seq is not None else f"i{self.image_size}"
        return f"{self.name}{'-small' if self.small else ''}-b{self.batch}-{size}-{self.cache_key()}"


@dataclass(frozen=True)
class ModelInput:
    name: str
    shape: tuple[int, ...]
    integer_high: int | None = None  # token ids are drawn from [0, integer_high); None means float32 normal

    def shape_text(self) -> str:
        return "x".join(map(str, self.shape)) + (" ids" if self.integer_high is not None else "")


@dataclass
class BuiltModel:
    """An eval-mode module with seeded weights plus the seeded example inputs it is exported with."""

    config: ModelConfig
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    default_shape: str  # the description of the default input, e.g. "batch 1, seq 128"
    default_seq: int | None
    small_seq: int | None
    default_image_size: int | None
    small_image_size: int | None
    make_module: Callable[[ModelConfig], nn.Module]
    make_model_inputs: Callable[[ModelConfig], list[ModelInput]]
    max_seq: int | None = None
    output_name: str = "logits"

    @property
    def takes_seq(self) -> bool:
        return self.default_seq is not None


def _pick(config: ModelConfig, full, small):
    return small if config.small else full


BERT_BASE = TransformerDims(layers=12, dim=768, heads=12, ffn_hidden=3072, vocab=30522, max_positions=512)
BERT_SMALL = TransformerDims(layers=2, dim=64, heads=4, ffn_hidden=256, vocab=1000, max_positions=512)
BERT_XRL = TransformerDims(layers=8, dim=1024, heads=16, ffn_hidden=4096)
BERT_XRL_SMALL = TransformerDims(layers=2, dim=64, heads=4, ffn_hidden=256)
VIT_BASE = TransformerDims(layers=12, dim=768, heads=12, ffn_hidden=3072)
VIT_SMALL = TransformerDims(layers=2, dim=64, heads=4, ffn_hidden=256)
MINI_DALLE = TransformerDims(layers=8, dim=768, heads=12, ffn_hidden=2048)
MINI_DALLE_SMALL = TransformerDims(layers=2, dim=64, heads=4, ffn_hidden=128)
TRANSDUCER = TransformerDims(layers=12, dim=512, heads=8, ffn_hidden=2048, vocab=1024)
TRANSDUCER_SMALL = TransformerDims(layers=2, dim=64, heads=4, ffn_hidden=256, vocab=64)
GPT2_SMALL_MODEL = TransformerDims(layers=12, dim=768, heads=12, ffn_hidden=3072, vocab=50257, max_positions=1024)
GPT2_TINY = TransformerDims(layers=2, dim=64, heads=4, ffn_hidden=256, vocab=1000, max_positions=1024)
NUM_CLASSES = 1000
SMALL_NUM_CLASSES = 10
AUDIO_FEATURES = 80  # log-mel bins per frame
VIT_PATCH, VIT_SMALL_PATCH = 16, 8


def _transducer_label_len(config: ModelConfig) -> int:
    return _pick(config, 16, 4)


def _image_input(config: ModelConfig) -> list[ModelInput]:
    return [ModelInput("images", (config.batch, 3, config.image_size, config.image_size))]


def _hidden_input(dim: TransformerDims, small_dim: TransformerDims):
    return lambda c: [ModelInput("hidden_states", (c.batch, c.seq, _pick(c, dim, small_dim).dim))]


def _ids_input(dims: TransformerDims, small_dims: TransformerDims):
    return lambda c: [ModelInput("input_ids", (c.batch, c.seq), integer_high=_pick(c, dims, small_dims).vocab)]


def _transducer_inputs(config: ModelConfig) -> list[ModelInput]:
    dims = _pick(config, TRANSDUCER, TRANSDUCER_SMALL)
    return [
        ModelInput("audio_features", (config.batch, config.seq, _pick(config, AUDIO_FEATURES, 16))),
        ModelInput("labels", (config.batch, _transducer_label_len(config)), integer_high=dims.vocab),
    ]


def _make_transducer(config: ModelConfig) -> nn.Module:
    dims = _pick(config, TRANSDUCER, TRANSDUCER_SMALL)
    return TransformerTransducer(
        dims,
        label_layers=2,
        features=_pick(config, AUDIO_FEATURES, 16),
        frames=config.seq,
        label_len=_transducer_label_len(config),
        joint_dim=dims.dim,
    )


def _make_resnet(groups: int, width_per_group: int, small_groups: int, small_width_per_group: int):
    def make(config: ModelConfig) -> nn.Module:
        if config.small:
            return ResNet((1, 1, 1, 1), (16, 32, 64, 128), 16, small_groups, small_width_per_group, SMALL_NUM_CLASSES)
        return ResNet((3, 4, 6, 3), (64, 128, 256, 512), 64, groups, width_per_group, NUM_CLASSES)

    return make


_ENTRIES = [
    ZooEntry(
        "bert-base",
        "BERT-base encoder: token+position embeddings, 12 post-norm layers, 768 wide, 12 heads",
        "batch 1, seq 128 (token ids)",
        128, 16, None, None,
        lambda c: BertEncoder(_pick(c, BERT_BASE, BERT_SMALL), c.seq),
        _ids_input(BERT_BASE, BERT_SMALL),
        max_seq=BERT_BASE.max_positions,
        output_name="last_hidden_state",
    ),
    ZooEntry(
        "bert-xrl",
        "X-RLflow's BERT: 8 post-norm layers, 1024 wide, 16 heads, fed hidden states",
        "64 tokens x 1024 (hidden states)",
        64, 16, None, None,
        lambda c: TransformerStack(_pick(c, BERT_XRL, BERT_XRL_SMALL), c.seq, pre_norm=False),
        _hidden_input(BERT_XRL, BERT_XRL_SMALL),
        output_name="last_hidden_state",
    ),
    ZooEntry(
        "vit-base",
        "ViT-B/16: 16x16 patches, 12 pre-norm layers, 768 wide, 12 heads, 1000 classes",
        "1x3x224x224",
        None, None, 224, 32,
        lambda c: VisionTransformer(
            _pick(c, VIT_BASE, VIT_SMALL), c.image_size, _pick(c, VIT_PATCH, VIT_SMALL_PATCH), c.batch,
            _pick(c, NUM_CLASSES, SMALL_NUM_CLASSES),
        ),
        _image_input,
    ),
    ZooEntry(
        "vit-xrl",
        "X-RLflow's ViT: 12 pre-norm layers, 768 wide, 12 heads, MLP 3072, fed patch embeddings",
        "64 patches x 768 (patch embeddings)",
        64, 16, None, None,
        lambda c: TransformerStack(_pick(c, VIT_BASE, VIT_SMALL), c.seq, pre_norm=True, final_norm=True, eps=1e-6),
        _hidden_input(VIT_BASE, VIT_SMALL),
        output_name="last_hidden_state",
    ),
    ZooEntry(
        "mini-dalle",
        "mini-DALL-E decoder: 8 causal pre-norm layers, 768 wide, 12 heads, gated FFN (ReLU(xW1)*xW2)W3 2048",
        "16 tokens x 768 (hidden states)",
        16, 8, None, None,
        lambda c: TransformerStack(
            _pick(c, MINI_DALLE, MINI_DALLE_SMALL), c.seq, pre_norm=True, causal=True, gated=True, final_norm=True
        ),
        _hidden_input(MINI_DALLE, MINI_DALLE_SMALL),
        output_name="last_hidden_state",
    ),
    ZooEntry(
        "transformer-transducer",
        "Transformer-Transducer: 12 audio + 2 causal label layers, 512 wide, 8 heads, FFN 2048, joint network",
        "80 frames x 80 features + 16 labels",
        80, 16, None, None,
        _make_transducer,
        _transducer_inputs,
    ),
    ZooEntry(
        "gpt2",
        "GPT-2 small decoder: 12 causal pre-norm layers, 768 wide, 12 heads (hidden states, no LM head)",
        "batch 1, seq 128 (token ids)",
        128, 16, None, None,
        lambda c: GPT2(_pick(c, GPT2_SMALL_MODEL, GPT2_TINY), c.seq),
        _ids_input(GPT2_SMALL_MODEL, GPT2_TINY),
        max_seq=GPT2_SMALL_MODEL.max_positions,
        output_name="last_hidden_state",
    ),
    ZooEntry(
        "resnet50",
        "ResNet-50: bottleneck blocks [3, 4, 6, 3], BatchNorm, 1000 classes",
        "1x3x224x224",
        None, None, 224, 64,
        _make_resnet(groups=1, width_per_group=64, small_groups=1, small_width_per_group=64),
        _image_input,
    ),
    ZooEntry(
        "resnext50",
        "ResNeXt-50 32x4d: grouped 3x3 bottleneck blocks [3, 4, 6, 3], 1000 classes",
        "1x3x224x224",
        None, None, 224, 64,
        _make_resnet(groups=32, width_per_group=4, small_groups=8, small_width_per_group=8),
        _image_input,
    ),
    ZooEntry(
        "inception-v3",
        "Inception-v3 (no aux head): parallel-branch Inception A-E blocks, BatchNorm, 1000 classes",
        "1x3x299x299",
        None, None, 299, 75,
        lambda c: InceptionV3(1, 3, (128, 160, 160, 192), 2, NUM_CLASSES)
        if not c.small
        else InceptionV3(8, 1, (128,), 1, SMALL_NUM_CLASSES),
        _image_input,
    ),
    ZooEntry(
        "squeezenet",
        "SqueezeNet 1.1: fire modules with parallel 1x1/3x3 expand convs, 1000 classes",
        "1x3x224x224",
        None, None, 224, 64,
        lambda c: SqueezeNet11(_pick(c, 1, 4), _pick(c, NUM_CLASSES, SMALL_NUM_CLASSES)),
        _image_input,
    ),
    ZooEntry(
        "nasnet-a",
        "NASNet-A mobile-style cell stack: separable convs, parallel branches, adds, concat (N=4, 44 channels)",
        "1x3x224x224",
        None, None, 224, 64,
        lambda c: NASNetA(32, 44, 4, NUM_CLASSES) if not c.small else NASNetA(8, 16, 1, SMALL_NUM_CLASSES),
        _image_input,
    ),
]
_REGISTRY = {entry.name: entry for entry in _ENTRIES}


def list_models() -> list[ZooEntry]:
    return list(_ENTRIES)


def get_entry(name: str) -> ZooEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadInputError(f"unknown zoo model {name!r}{did_you_mean(name, _REGISTRY)}; known models: {', '.join(_REGISTRY)}") from None


def resolve_config(name: str, small: bool = False, batch: int | None = None, seq: int | None = None) -> ModelConfig:
    """Validate the user's parameters and fill in the defaults of the model (or of its small variant)."""
    entry = get_entry(name)
    for flag, value in (("batch", batch), ("seq", seq)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise BadInputError(f"--{flag} must be a positive integer, got {value!r}")
    if seq is not None and not entry.takes_seq:
        raise BadInputError(f"--seq does not apply to {name}: it is an image model with a fixed input size")
    if entry.max_seq is not None and seq is not None and seq > entry.max_seq:
        raise BadInputError(f"--seq {seq} is longer than {name}'s {entry.max_seq} position embeddings")
    if entry.takes_seq:
        return ModelConfig(name, small, batch or 1, seq or (entry.small_seq if small else entry.default_seq), None)
    image_size = entry.small_image_size if small else entry.default_image_size
    return ModelConfig(name, small, batch or 1, None, image_size)


def model_inputs(config: ModelConfig) -> list[ModelInput]:
    return get_entry(config.name).make_model_inputs(config)


def _example_inputs(specs: list[ModelInput], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    tensors = []
    for spec in specs:
        if spec.integer_high is None:
            tensors.append(torch.randn(spec.shape, generator=generator))
        else:
            tensors.append(torch.randint(0, spec.integer_high, spec.shape, generator=generator))
    return tuple(tensors)


def _calibrate_batchnorm(module: nn.Module, specs: list[ModelInput], generator: torch.Generator) -> None:
    """Set BatchNorm running statistics from one forward pass on random images.

    With the default statistics (mean 0, variance 1) a deep random CNN's activations shrink or blow up layer after
    layer; calibrated statistics keep them O(1), which keeps the exported model numerically meaningful.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    calibration_specs = [ModelInput(s.name, (CALIBRATION_BATCH, *s.shape[1:]), s.integer_high) for s in specs]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass sets the statistics exactly
    module.train()
    with torch.no_grad():
        module(*_example_inputs(calibration_specs, generator))
    for norm in norms:
        norm.momentum = 0.1
    module.eval()


def build_from_config(config: ModelConfig) -> BuiltModel:
    entry = get_entry(config.name)
    torch.manual_seed(SEED)
    module = entry.make_module(config)
    specs = entry.make_model_inputs(config)
    generator = torch.Generator().manual_seed(SEED)
    _calibrate_batchnorm(module, specs, generator)
    module.eval()
    inputs = _example_inputs(specs, generator)
    return BuiltModel(config, module, inputs, [s.name for s in specs], [entry.output_name])


def build_model(name: str, small: bool = False, batch: int | None = None, seq: int | None = None) -> BuiltModel:
    """The eval-mode PyTorch module with seeded weights and its seeded example inputs (what export_model exports)."""
    return build_from_config(resolve_config(name, small, batch, seq))


def count_parameters(config: ModelConfig) -> int:
    """Parameter count, from a module built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        module = get_entry(config.name).make_module(config)
    return sum(p.numel() for p in module.parameters())
