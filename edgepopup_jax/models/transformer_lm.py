"""A small decoder-only Transformer language model, written with plain flax.linen layers; the
zoo's `transformer_lm` is it after core.transform.edge_popup (models/transformed.py)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from edgepopup_jax.models.vit import EncoderBlock


class TransformerLM(nn.Module):
    """Token embedding + learned positions, `depth` causal pre-norm blocks, a final LayerNorm
    and an untied output layer: tokens [batch, length] (int) -> logits [batch, length, vocab]."""

    vocab_size: int = 256  # bytes
    max_len: int = 128
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        del train
        if tokens.shape[-1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[-1]} > max_len {self.max_len}")
        x = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype, name="embed")(tokens)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.dim))
        x = x + pos[:tokens.shape[-1]].astype(x.dtype)
        causal = nn.make_causal_mask(tokens)
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, self.dtype, name=f"block{i}")(x, causal)
        x = nn.LayerNorm(dtype=self.dtype, name="ln")(x)
        return nn.Dense(self.vocab_size, dtype=self.dtype, name="unembed")(x).astype(jnp.float32)
