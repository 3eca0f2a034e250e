"""Model zoo: plain-PyTorch definitions of the benchmark models, exported to ONNX and cached on disk.

Every model is written here (no torchvision, no transformers, nothing downloaded), built with seeded random
weights and exported by the TorchScript exporter at a pinned opset with static shapes, so the same name and
parameters always give the same ONNX bytes. Exports are cached under the user cache directory, keyed by
BUILDER_VERSION and every parameter, so only the first export of a configuration costs time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import torch
from torch import nn

from xrlflow.errors import BadInputError
from xrlflow.names import did_you_mean

# Bump whenever a model definition, the seeding or the export settings change: it invalidates every cache entry.
BUILDER_VERSION = 1
OPSET = 18
SEED = 0
CACHE_DIR_ENV_VAR = "XRLFLOW_CACHE_DIR"
# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**27
# BatchNorm statistics are calibrated on this many random images (more than one, so that a 1x1 feature map
# still has more than one value per channel).
CALIBRATION_BATCH = 2


# ---------------------------------------------------------------------------------------------------------------
# Transformer building blocks
# ---------------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Q, K and V projections.

    The projections are three nn.Linear layers reading the same input, so the exported graph has three parallel
    MatMuls sharing an input, which is what the optimizer merges. Shapes are static Python ints so the export
    has constant Reshape targets instead of Shape/Gather/Concat chains.
    """

    def __init__(self, dim: int, heads: int, seq_len: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.seq_len = seq_len
        self.dim = dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.seq_len, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        query = self._split_heads(self.query(x))
        key = self._split_heads(self.key(x))
        value = self._split_heads(self.value(x))
        scores = torch.matmul(query, key.transpose(-2, -1)) * self.scale
        if attention_bias is not None:
            scores = scores + attention_bias
        weights = torch.softmax(scores, dim=-1)
        context = torch.matmul(weights, value).transpose(1, 2).reshape(-1, self.seq_len, self.dim)
        return self.output(context)


class FeedForward(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.expand = nn.Linear(dim, hidden)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.contract = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.contract(self.activation(self.expand(x)))


class GatedFeedForward(nn.Module):
    """(ReLU(x W1) * (x W2)) W3: two parallel projections of the same input, gated together."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """Attention + feed-forward with residuals; post-norm (BERT) or pre-norm (GPT-2, ViT) LayerNorm placement."""

    def __init__(self, dim: int, heads: int, seq_len: int, feed_forward: nn.Module, pre_norm: bool, eps: float = 1e-5):
        super().__init__()
        self.pre_norm = pre_norm
        self.attention = SelfAttention(dim, heads, seq_len)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.feed_forward = feed_forward
        self.feed_forward_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.attention_norm(x), attention_bias)
            return x + self.feed_forward(self.feed_forward_norm(x))
        x = self.attention_norm(x + self.attention(x, attention_bias))
        return self.feed_forward_norm(x + self.feed_forward(x))


def causal_attention_bias(seq_len: int) -> torch.Tensor:
    """Additive mask: 0 on and below the diagonal, -inf above it (a position never attends to later ones)."""
    return torch.full((seq_len, seq_len), float("-inf")).triu(1)


@dataclass(frozen=True)
class TransformerDims:
    layers: int
    dim: int
    heads: int
    ffn_hidden: int
    vocab: int = 0
    max_positions: int = 0


class TransformerStack(nn.Module):
    """A stack of identical blocks sharing one (optional) causal mask, with an optional final LayerNorm."""

    def __init__(
        self,
        dims: TransformerDims,
        seq_len: int,
        *,
        pre_norm: bool,
        causal: bool = False,
        gated: bool = False,
        activation: str = "gelu",
        final_norm: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()

        def feed_forward() -> nn.Module:
            if gated:
                return GatedFeedForward(dims.dim, dims.ffn_hidden)
            return FeedForward(dims.dim, dims.ffn_hidden, activation)

        self.blocks = nn.ModuleList(
            TransformerBlock(dims.dim, dims.heads, seq_len, feed_forward(), pre_norm, eps) for _ in range(dims.layers)
        )
        self.final_norm = nn.LayerNorm(dims.dim, eps=eps) if final_norm else None
        self.causal_bias: torch.Tensor | None
        if causal:
            self.register_buffer("causal_bias", causal_attention_bias(seq_len), persistent=False)
        else:
            self.causal_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self.causal_bias)
        return self.final_norm(x) if self.final_norm is not None else x


# ---------------------------------------------------------------------------------------------------------------
# Transformer models
# ---------------------------------------------------------------------------------------------------------------


class BertEncoder(nn.Module):
    """BERT encoder: token + position embeddings, LayerNorm, post-norm blocks with GELU; returns hidden states."""

    def __init__(self, dims: TransformerDims, seq_len: int):
        super().__init__()
        self.token_embedding = nn.Embedding(dims.vocab, dims.dim)
        self.position_embedding = nn.Embedding(dims.max_positions, dims.dim)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.embedding_norm = nn.LayerNorm(dims.dim, eps=1e-12)
        self.encoder = TransformerStack(dims, seq_len, pre_norm=False, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.position_embedding(self.positions)
        return self.encoder(self.embedding_norm(x))


class GPT2(nn.Module):
    """GPT-2: token + position embeddings, causal pre-norm blocks with GELU, final LayerNorm; returns hidden states."""

    def __init__(self, dims: TransformerDims, seq_len: int):
        super().__init__()
        self.token_embedding = nn.Embedding(dims.vocab, dims.dim)
        self.position_embedding = nn.Embedding(dims.max_positions, dims.dim)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.decoder = TransformerStack(dims, seq_len, pre_norm=True, causal=True, final_norm=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.token_embedding(input_ids) + self.position_embedding(self.positions))


class VisionTransformer(nn.Module):
    """ViT: strided-conv patch embedding, class token, learned positions, pre-norm blocks, linear classifier."""

    def __init__(self, dims: TransformerDims, image_size: int, patch_size: int, batch: int, num_classes: int):
        super().__init__()
        patches = (image_size // patch_size) ** 2
        self.batch = batch
        self.dim = dims.dim
        self.patches = patches
        self.patch_embedding = nn.Conv2d(3, dims.dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.randn(1, 1, dims.dim) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1, patches + 1, dims.dim) * 0.02)
        self.encoder = TransformerStack(dims, patches + 1, pre_norm=True, final_norm=True, eps=1e-6)
        self.head = nn.Linear(dims.dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Static sizes: flatten(2), expand() and repeat() export as Shape/Where/Tile chains; this cat constant-folds.
        patches = self.patch_embedding(images).reshape(self.batch, self.dim, self.patches).transpose(1, 2)
        class_tokens = torch.cat([self.class_token] * self.batch, dim=0)
        x = torch.cat([class_tokens, patches], dim=1) + self.position_embedding
        return self.head(self.encoder(x)[:, 0])


class TransformerTransducer(nn.Module):
    """Transformer-Transducer: audio encoder, causal label encoder, and a joint network over all (frame, label) pairs."""

    def __init__(
        self,
        audio_dims: TransformerDims,
        label_layers: int,
        features: int,
        frames: int,
        label_len: int,
        joint_dim: int,
    ):
        super().__init__()
        label_dims = TransformerDims(label_layers, audio_dims.dim, audio_dims.heads, audio_dims.ffn_hidden)
        self.feature_projection = nn.Linear(features, audio_dims.dim)
        self.audio_positions = nn.Parameter(torch.randn(1, frames, audio_dims.dim) * 0.02)
        self.audio_encoder = TransformerStack(audio_dims, frames, pre_norm=True, activation="relu", final_norm=True)
        self.label_embedding = nn.Embedding(audio_dims.vocab, audio_dims.dim)
        self.label_positions = nn.Parameter(torch.randn(1, label_len, audio_dims.dim) * 0.02)
        self.label_encoder = TransformerStack(
            label_dims, label_len, pre_norm=True, causal=True, activation="relu", final_norm=True
        )
        self.joint_audio = nn.Linear(audio_dims.dim, joint_dim)
        self.joint_label = nn.Linear(audio_dims.dim, joint_dim)
        self.joint_output = nn.Linear(joint_dim, audio_dims.vocab)

    def forward(self, audio_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        audio = self.audio_encoder(self.feature_projection(audio_features) + self.audio_positions)
        label = self.label_encoder(self.label_embedding(labels) + self.label_positions)
        # (batch, frames, 1, joint) + (batch, 1, labels, joint) -> logits for every (frame, label) pair.
        joint = self.joint_audio(audio).unsqueeze(2) + self.joint_label(label).unsqueeze(1)
        return self.joint_output(torch.tanh(joint))


# ---------------------------------------------------------------------------------------------------------------
# CNN building blocks and models
# ---------------------------------------------------------------------------------------------------------------


def conv_bn(in_ch: int, out_ch: int, kernel, stride=1, padding=0, groups: int = 1, eps: float = 1e-5, relu=True):
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=eps),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet/ResNeXt bottleneck: 1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand, residual add."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, groups: int, width_per_group: int):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_ch = planes * self.expansion
        self.reduce = conv_bn(in_ch, width, 1)
        self.spatial = conv_bn(width, width, 3, stride, 1, groups=groups)
        self.expand = conv_bn(width, out_ch, 1, relu=False)
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride, relu=False) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.expand(self.spatial(self.reduce(x))) + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        stage_planes: tuple[int, ...],
        stem_channels: int,
        groups: int,
        width_per_group: int,
        num_classes: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_channels, 7, 2, 3), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        in_ch = stem_channels
        for stage, (blocks, planes) in enumerate(zip(blocks_per_stage, stage_planes)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(Bottleneck(in_ch, planes, stride, groups, width_per_group))
                in_ch = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.stages(self.stem(images))), 1))


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then parallel 1x1 and 3x3 expand convs on the same input, concatenated."""

    def __init__(self, in_ch: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.out_channels = expand1x1 + expand3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], dim=1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1 with every channel count divided by `width_divisor`."""

    def __init__(self, width_divisor: int, num_classes: int):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, channels // width_divisor)

        def pool() -> nn.Module:
            return nn.MaxPool2d(3, 2, ceil_mode=True)

        fire_specs = [(16, 64), (16, 64), None, (32, 128), (32, 128), None, (48, 192), (48, 192), (64, 256), (64, 256)]
        layers: list[nn.Module] = [nn.Conv2d(3, w(64), 3, stride=2), nn.ReLU(), pool()]
        in_ch = w(64)
        for spec in fire_specs:
            if spec is None:
                layers.append(pool())
                continue
            fire = Fire(in_ch, w(spec[0]), w(spec[1]), w(spec[1]))
            layers.append(fire)
            in_ch = fire.out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Conv2d(in_ch, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        # Without BatchNorm, PyTorch's default init shrinks activations layer after layer; He init keeps them O(1).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(images)), 1)


def inception_conv(in_ch: int, out_ch: int, kernel, stride=1, padding=0) -> nn.Module:
    return conv_bn(in_ch, out_ch, kernel, stride, padding, eps=0.001)


class InceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int, w: Callable[[int], int]):
        super().__init__()
        self.branch1x1 = inception_conv(in_ch, w(64), 1)
        self.branch5x5 = nn.Sequential(inception_conv(in_ch, w(48), 1), inception_conv(w(48), w(64), 5, padding=2))
        self.branch3x3dbl = nn.Sequential(
            inception_conv(in_ch, w(64), 1),
            inception_conv(w(64), w(96), 3, padding=1),
            inception_conv(w(96), w(96), 3, padding=1),
        )
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(in_ch, pool_features, 1))
        self.out_channels = w(64) + w(64) + w(96) + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5(x), self.branch3x3dbl(x), self.branch_pool(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, in_ch: int, w: Callable[[int], int]):
        super().__init__()
        self.branch3x3 = inception_conv(in_ch, w(384), 3, stride=2)
        self.branch3x3dbl = nn.Sequential(
            inception_conv(in_ch, w(64), 1),
            inception_conv(w(64), w(96), 3, padding=1),
            inception_conv(w(96), w(96), 3, stride=2),
        )
        self.branch_pool = nn.MaxPool2d(3, 2)
        self.out_channels = w(384) + w(96) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), self.branch_pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_ch: int, channels_7x7: int, w: Callable[[int], int]):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = inception_conv(in_ch, w(192), 1)
        self.branch7x7 = nn.Sequential(
            inception_conv(in_ch, c7, 1),
            inception_conv(c7, c7, (1, 7), padding=(0, 3)),
            inception_conv(c7, w(192), (7, 1), padding=(3, 0)),
        )
        self.branch7x7dbl = nn.Sequential(
            inception_conv(in_ch, c7, 1),
            inception_conv(c7, c7, (7, 1), padding=(3, 0)),
            inception_conv(c7, c7, (1, 7), padding=(0, 3)),
            inception_conv(c7, c7, (7, 1), padding=(3, 0)),
            inception_conv(c7, w(192), (1, 7), padding=(0, 3)),
        )
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(in_ch, w(192), 1))
        self.out_channels = 4 * w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch7x7(x), self.branch7x7dbl(x), self.branch_pool(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int, w: Callable[[int], int]):
        super().__init__()
        self.branch3x3 = nn.Sequential(inception_conv(in_ch, w(192), 1), inception_conv(w(192), w(320), 3, stride=2))
        self.branch7x7x3 = nn.Sequential(
            inception_conv(in_ch, w(192), 1),
            inception_conv(w(192), w(192), (1, 7), padding=(0, 3)),
            inception_conv(w(192), w(192), (7, 1), padding=(3, 0)),
            inception_conv(w(192), w(192), 3, stride=2),
        )
        self.branch_pool = nn.MaxPool2d(3, 2)
        self.out_channels = w(320) + w(192) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch7x7x3(x), self.branch_pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_ch: int, w: Callable[[int], int]):
        super().__init__()
        self.branch1x1 = inception_conv(in_ch, w(320), 1)
        self.branch3x3_reduce = inception_conv(in_ch, w(384), 1)
        self.branch3x3_a = inception_conv(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_b = inception_conv(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_reduce = nn.Sequential(
            inception_conv(in_ch, w(448), 1), inception_conv(w(448), w(384), 3, padding=1)
        )
        self.branch3x3dbl_a = inception_conv(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_b = inception_conv(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(in_ch, w(192), 1))
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_reduce(x)
        b3dbl = self.branch3x3dbl_reduce(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_a(b3),
                self.branch3x3_b(b3),
                self.branch3x3dbl_a(b3dbl),
                self.branch3x3dbl_b(b3dbl),
                self.branch_pool(x),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """Inception-v3 (no auxiliary head). `channels_7x7` lists the InceptionC blocks; `blocks_a`/`blocks_e` count
    the InceptionA/E blocks; every channel count is divided by `width_divisor`."""

    def __init__(
        self, width_divisor: int, blocks_a: int, channels_7x7: tuple[int, ...], blocks_e: int, num_classes: int
    ):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, channels // width_divisor)

        layers: list[nn.Module] = [
            inception_conv(3, w(32), 3, stride=2),
            inception_conv(w(32), w(32), 3),
            inception_conv(w(32), w(64), 3, padding=1),
            nn.MaxPool2d(3, 2),
            inception_conv(w(64), w(80), 1),
            inception_conv(w(80), w(192), 3),
            nn.MaxPool2d(3, 2),
        ]
        in_ch = w(192)
        for index in range(blocks_a):
            block = InceptionA(in_ch, w(32) if index == 0 else w(64), w)
            layers.append(block)
            in_ch = block.out_channels
        blocks: list[nn.Module] = [InceptionB(in_ch, w)]
        in_ch = blocks[-1].out_channels
        for c7 in channels_7x7:
            blocks.append(InceptionC(in_ch, w(c7), w))
            in_ch = blocks[-1].out_channels
        blocks.append(InceptionD(in_ch, w))
        in_ch = blocks[-1].out_channels
        for _ in range(blocks_e):
            blocks.append(InceptionE(in_ch, w))
            in_ch = blocks[-1].out_channels
        self.features = nn.Sequential(*layers, *blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(images)), 1))


class SeparableConv(nn.Module):
    """NASNet separable conv: (ReLU, depthwise kxk, pointwise 1x1, BatchNorm) applied twice; stride on the first."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        super().__init__()
        pad = kernel // 2
        self.layers = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_ch, in_ch, kernel, stride, pad, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-3),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, kernel, 1, pad, groups=out_ch, bias=False),
            nn.Conv2d(out_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def relu_conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Module:
    """1x1 projection of a cell input; stride 2 when the previous cell's output is at twice the resolution."""
    return nn.Sequential(nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch, eps=1e-3))


class NASNetNormalCell(nn.Module):
    """NASNet-A normal cell: five pairwise-added branches over the two previous cell outputs, concatenated."""

    def __init__(self, prev_ch: int, cur_ch: int, ch: int, prev_at_double_resolution: bool):
        super().__init__()
        self.prev_projection = relu_conv_bn(prev_ch, ch, 2 if prev_at_double_resolution else 1)
        self.cur_projection = relu_conv_bn(cur_ch, ch)
        self.comb0_sep3x3_cur = SeparableConv(ch, ch, 3)
        self.comb1_sep3x3_prev = SeparableConv(ch, ch, 3)
        self.comb1_sep5x5_cur = SeparableConv(ch, ch, 5)
        self.avg_pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.comb4_sep5x5_prev = SeparableConv(ch, ch, 5)
        self.comb4_sep3x3_prev = SeparableConv(ch, ch, 3)
        self.out_channels = 6 * ch

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        prev = self.prev_projection(prev)
        cur = self.cur_projection(cur)
        comb0 = self.comb0_sep3x3_cur(cur) + cur
        comb1 = self.comb1_sep3x3_prev(prev) + self.comb1_sep5x5_cur(cur)
        comb2 = self.avg_pool(cur) + prev
        comb3 = self.avg_pool(prev) + self.avg_pool(prev)
        comb4 = self.comb4_sep5x5_prev(prev) + self.comb4_sep3x3_prev(prev)
        return torch.cat([prev, comb0, comb1, comb2, comb3, comb4], 1)


class NASNetReductionCell(nn.Module):
    """NASNet-A reduction cell: strided separable convs and pools, halving the resolution."""

    def __init__(self, prev_ch: int, cur_ch: int, ch: int, prev_at_double_resolution: bool):
        super().__init__()
        self.prev_projection = relu_conv_bn(prev_ch, ch, 2 if prev_at_double_resolution else 1)
        self.cur_projection = relu_conv_bn(cur_ch, ch)
        self.comb0_sep7x7_prev = SeparableConv(ch, ch, 7, 2)
        self.comb0_sep5x5_cur = SeparableConv(ch, ch, 5, 2)
        self.comb1_sep7x7_prev = SeparableConv(ch, ch, 7, 2)
        self.comb2_sep5x5_prev = SeparableConv(ch, ch, 5, 2)
        self.comb3_sep3x3_comb0 = SeparableConv(ch, ch, 3)
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        self.strided_avg_pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.avg_pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.out_channels = 4 * ch

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        prev = self.prev_projection(prev)
        cur = self.cur_projection(cur)
        comb0 = self.comb0_sep7x7_prev(prev) + self.comb0_sep5x5_cur(cur)
        comb1 = self.max_pool(cur) + self.comb1_sep7x7_prev(prev)
        comb2 = self.strided_avg_pool(cur) + self.comb2_sep5x5_prev(prev)
        comb3 = self.max_pool(cur) + self.comb3_sep3x3_comb0(comb0)
        comb4 = self.avg_pool(comb0) + comb1
        return torch.cat([comb1, comb2, comb3, comb4], 1)


class NASNetA(nn.Module):
    """NASNet-A (mobile layout): stem conv, two stem reduction cells, then three stages of `cells_per_stage`
    normal cells separated by reduction cells that double the channels."""

    def __init__(self, stem_channels: int, channels: int, cells_per_stage: int, num_classes: int):
        super().__init__()
        self.stem = conv_bn(3, stem_channels, 3, 2, 1, eps=1e-3, relu=False)
        cells: list[nn.Module] = []
        prev_ch = cur_ch = stem_channels
        prev_at_double_resolution = False

        def add(cell_type, ch: int) -> None:
            nonlocal prev_ch, cur_ch, prev_at_double_resolution
            cell = cell_type(prev_ch, cur_ch, ch, prev_at_double_resolution)
            cells.append(cell)
            prev_ch, cur_ch = cur_ch, cell.out_channels
            prev_at_double_resolution = cell_type is NASNetReductionCell

        add(NASNetReductionCell, channels // 4)
        add(NASNetReductionCell, channels // 2)
        for stage in range(3):
            if stage:
                add(NASNetReductionCell, channels * 2**stage)
            for _ in range(cells_per_stage):
                add(NASNetNormalCell, channels * 2**stage)
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cur_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prev = cur = self.stem(images)
        for cell in self.cells:
            prev, cur = cur, cell(prev, cur)
        return self.classifier(torch.flatten(self.pool(torch.relu(cur)), 1))


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
class InputSpec:
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
    make_input_specs: Callable[[ModelConfig], list[InputSpec]]
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


def _image_input(config: ModelConfig) -> list[InputSpec]:
    return [InputSpec("images", (config.batch, 3, config.image_size, config.image_size))]


def _hidden_input(dim: TransformerDims, small_dim: TransformerDims):
    return lambda c: [InputSpec("hidden_states", (c.batch, c.seq, _pick(c, dim, small_dim).dim))]


def _ids_input(dims: TransformerDims, small_dims: TransformerDims):
    return lambda c: [InputSpec("input_ids", (c.batch, c.seq), integer_high=_pick(c, dims, small_dims).vocab)]


def _transducer_inputs(config: ModelConfig) -> list[InputSpec]:
    dims = _pick(config, TRANSDUCER, TRANSDUCER_SMALL)
    return [
        InputSpec("audio_features", (config.batch, config.seq, _pick(config, AUDIO_FEATURES, 16))),
        InputSpec("labels", (config.batch, _transducer_label_len(config)), integer_high=dims.vocab),
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


def input_specs(config: ModelConfig) -> list[InputSpec]:
    return get_entry(config.name).make_input_specs(config)


def _example_inputs(specs: list[InputSpec], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    tensors = []
    for spec in specs:
        if spec.integer_high is None:
            tensors.append(torch.randn(spec.shape, generator=generator))
        else:
            tensors.append(torch.randint(0, spec.integer_high, spec.shape, generator=generator))
    return tuple(tensors)


def _calibrate_batchnorm(module: nn.Module, specs: list[InputSpec], generator: torch.Generator) -> None:
    """Set BatchNorm running statistics from one forward pass on random images.

    With the default statistics (mean 0, variance 1) a deep random CNN's activations shrink or blow up layer after
    layer; calibrated statistics keep them O(1), which keeps the exported model numerically meaningful.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    calibration_specs = [InputSpec(s.name, (CALIBRATION_BATCH, *s.shape[1:]), s.integer_high) for s in specs]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass sets the statistics exactly
    module.train()
    with torch.no_grad():
        module(*_example_inputs(calibration_specs, generator))
    for norm in norms:
        norm.momentum = 0.1
    module.eval()


def _build(config: ModelConfig) -> BuiltModel:
    entry = get_entry(config.name)
    torch.manual_seed(SEED)
    module = entry.make_module(config)
    specs = entry.make_input_specs(config)
    generator = torch.Generator().manual_seed(SEED)
    _calibrate_batchnorm(module, specs, generator)
    module.eval()
    inputs = _example_inputs(specs, generator)
    return BuiltModel(config, module, inputs, [s.name for s in specs], [entry.output_name])


def build_model(name: str, small: bool = False, batch: int | None = None, seq: int | None = None) -> BuiltModel:
    """The eval-mode PyTorch module with seeded weights and its seeded example inputs (what export_model exports)."""
    return _build(resolve_config(name, small, batch, seq))


def count_parameters(config: ModelConfig) -> int:
    """Parameter count, from a module built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        module = get_entry(config.name).make_module(config)
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Export and cache
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_DIR_ENV_VAR)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xrlflow" / "zoo"


def _inline_initializer_identities(graph: onnx.GraphProto) -> None:
    """The TorchScript exporter deduplicates equal initializers by routing one through Identity nodes; point the
    consumers at the initializer itself so the graph holds only real operators."""
    initializers = {init.name for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in graph_outputs:
            renamed[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if not renamed:
        return
    for node in kept:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    value_infos = [info for info in graph.value_info if info.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(value_infos)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(init.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        for init in model.graph.initializer
    )


def _export_onnx(built: BuiltModel, work_dir: Path) -> onnx.ModelProto:
    raw_path = work_dir / "torch_export.onnx"
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated and that PRESERVE mode should not constant-fold; the
        # module is in eval mode, so folding is safe, and PRESERVE keeps BatchNorm instead of fusing it into Conv.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            built.module,
            built.inputs,
            str(raw_path),
            opset_version=OPSET,
            dynamo=False,
            input_names=built.input_names,
            output_names=built.output_names,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )
    model = onnx.load(str(raw_path))
    _inline_initializer_identities(model.graph)
    config = built.config
    metadata = {"xrlflow.zoo.model": config.name, "xrlflow.zoo.config": json.dumps(asdict(config), sort_keys=True)}
    metadata["xrlflow.zoo.builder_version"] = str(BUILDER_VERSION)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model


def _save_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write `path` (and `path`.data for models over the protobuf limit) via temp files and os.replace, data first,
    so a reader that sees the .onnx file always sees complete data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        tmp_model = Path(tmp) / path.name
        data_name = path.name + ".data"
        if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            tmp_model.write_bytes(model.SerializeToString())
        os.replace(tmp_model, path)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it atomically replaces `path`."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        tmp_path = Path(tmp) / path.name
        yield tmp_path
        os.replace(tmp_path, path)


def cached_export_path(config: ModelConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached export of `config`, exporting it first if it is not cached yet."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / (config.file_stem() + ".onnx")
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = _build(config)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-export-") as tmp:
        model = _export_onnx(built, Path(tmp))
    _save_atomically(model, path)
    summary = {
        "config": asdict(config),
        "nodes": len(model.graph.node),
        "params": sum(p.numel() for p in built.module.parameters()),
        "export_seconds": round(time.perf_counter() - started, 3),
    }
    with _replacing(path.with_suffix(".json")) as summary_path:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def cached_summary(config: ModelConfig, cache_dir: str | os.PathLike[str] | None = None) -> dict | None:
    """The summary written next to a cached export (nodes, params, export time), or None if it is not cached."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    summary_path = directory / (config.file_stem() + ".json")
    if not summary_path.is_file() or not summary_path.with_suffix(".onnx").is_file():
        return None
    try:
        return json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None


def export_model(
    name: str,
    small: bool = False,
    batch: int | None = None,
    seq: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> onnx.ModelProto:
    """The ONNX export of a zoo model (external data loaded), from the cache when it is there."""
    return onnx.load(str(cached_export_path(resolve_config(name, small, batch, seq), cache_dir)))


def export_model_to_file(
    name: str,
    path: str | os.PathLike[str],
    small: bool = False,
    batch: int | None = None,
    seq: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a zoo model to `path` atomically (with `path`.data next to it for models over 2 GB)."""
    source = cached_export_path(resolve_config(name, small, batch, seq), cache_dir)
    target = Path(path)
    if target.is_dir():
        raise BadInputError(f"{target}: is a directory; give the output file name")
    if not target.parent.is_dir():
        raise BadInputError(f"{target.parent}: no such directory")
    if source.with_name(source.name + ".data").is_file():
        _save_atomically(onnx.load(str(source)), target)
    else:
        with _replacing(target) as tmp_target:
            shutil.copyfile(source, tmp_target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def add_zoo_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `zoo list` and `zoo export`; dispatch the parsed arguments to run_zoo_cli."""
    zoo = subparsers.add_parser("zoo", help="the benchmark model zoo: list the models, export one to ONNX")
    commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{list,export}")
    list_parser = commands.add_parser("list", help="print the models: name, parameters, nodes (if cached), shape")
    list_parser.add_argument("--small", action="store_true", help="describe the small variants")
    export = commands.add_parser("export", help="export a model to an ONNX file (cached after the first time)")
    export.add_argument("name", help="model name, see `xrlflow zoo list`")
    export.add_argument("-o", "--output", required=True, help="ONNX file to write")
    export.add_argument("--small", action="store_true", help="the small variant (fewer layers/channels)")
    export.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    export.add_argument("--seq", type=int, default=None, help="sequence length, sequence models only")
    return zoo


def _format_count(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1_000_000 else f"{count / 1e3:.1f}K"


def format_model_table(small: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> str:
    rows = [("name", "params", "nodes", "input shape", "description")]
    for entry in _ENTRIES:
        config = resolve_config(entry.name, small)
        summary = cached_summary(config, cache_dir)
        shape = ", ".join(spec.shape_text() for spec in input_specs(config))
        nodes = str(summary["nodes"]) if summary else "-"
        rows.append((entry.name, _format_count(count_parameters(config)), nodes, shape, entry.description))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_zoo_cli(args: argparse.Namespace) -> int:
    """Handle `zoo list` / `zoo export`; BadInputError propagates for the CLI to report (exit code 2)."""
    if args.zoo_command == "list":
        print(format_model_table(small=args.small))
        return 0
    if args.zoo_command == "export":
        path = export_model_to_file(args.name, args.output, small=args.small, batch=args.batch, seq=args.seq)
        config = resolve_config(args.name, args.small, args.batch, args.seq)
        summary = cached_summary(config) or {}
        print(f"wrote {path} ({summary.get('nodes', '?')} nodes, {path.stat().st_size / 1e6:.1f} MB)")
        return 0
    raise BadInputError(f"unknown zoo command {args.zoo_command!r}")
