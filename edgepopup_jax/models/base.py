"""Options every model shares, and the layer settings they imply."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from edgepopup_jax import layers, selection


class MaskedModel(nn.Module):
    """Base of the paper's models: every conv/dense layer is a Subnet layer with these options.

    dense_first / dense_last make the first / last layer a learned dense layer (mask="dense").
    compute_dtype is the dtype of activations and matmuls (e.g. "bfloat16"); scores and
    weights are always stored in float32 and logits returned in float32.
    """

    _: dataclasses.KW_ONLY
    num_classes: int = 10
    keep_fraction: float = 0.5
    weight_init: str = "kaiming_normal"
    weight_init_mode: str = "fan_in"
    scale_by_keep_fraction: bool = False
    mask: str = "edge_popup"
    mask_scope: str = "layer"  # "layer" (the paper's) or "global": one threshold over all layers
    supermask_eval: str = "threshold"
    dense_first: bool = False
    dense_last: bool = False
    compute_dtype: Any = "float32"

    def __post_init__(self):
        layers.check_options(mask=self.mask, keep_fraction=self.keep_fraction,
                             weight_init=self.weight_init, weight_init_mode=self.weight_init_mode,
                             supermask_eval=self.supermask_eval)
        selection.check_mask_scope(self.mask_scope)
        if self.num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        try:
            floating = jnp.issubdtype(jnp.dtype(self.compute_dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:  # an integer dtype would truncate activations and kill the gradients
            raise ValueError(f"compute_dtype must be a floating dtype, got {self.compute_dtype!r}; "
                             "use e.g. 'float32' or 'bfloat16'")
        super().__post_init__()

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def layer_options(self, role: str = "hidden") -> dict:
        """Keyword arguments for a Subnet layer; role is "first", "hidden" or "last"."""
        dense = (role == "first" and self.dense_first) or (role == "last" and self.dense_last)
        return dict(keep_fraction=self.keep_fraction, weight_init=self.weight_init,
                    weight_init_mode=self.weight_init_mode,
                    scale_by_keep_fraction=self.scale_by_keep_fraction,
                    mask="dense" if dense else self.mask, mask_scope=self.mask_scope,
                    supermask_eval=self.supermask_eval,
                    dtype=self.dtype)
