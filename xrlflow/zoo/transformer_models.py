"""The zoo's transformer models in plain PyTorch: BERT, GPT-2, ViT, the transformer transducer and their blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


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
