"""A ViT-Tiny-style classifier for 32x32 images, written with plain flax.linen layers; the
zoo's `vit` is it after core.transform.edge_popup (models/transformed.py)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class EncoderBlock(nn.Module):
    """Pre-norm: x + MHA(LN(x)), then x + MLP(LN(x)), GELU."""

    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="attn")(y, mask=mask)
        y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y))
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(y)


class ViT(nn.Module):
    """Patches (a stride-`patch` conv) + a class token + learned position embeddings, `depth`
    pre-norm encoder blocks, a final LayerNorm and a dense head on the class token. The
    defaults are ViT-Tiny's (dim 192, 12 blocks, 3 heads, MLP 768) with patch 4 for CIFAR."""

    num_classes: int = 10
    patch: int = 4
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_dim: int = 768
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout, no batch norm: the same in training and evaluation
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID",
                    dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
        x = x.reshape((x.shape[0], -1, self.dim))
        cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)).astype(x.dtype), x], 1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, self.dtype, name=f"block{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="ln")(x[:, 0])
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
