"""Options every model shares, and the layer settings they imply."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from edgepopup_jax.core.options import FIELDS, EdgePopupOptions, check_options


class MaskedModel(nn.Module, EdgePopupOptions):
    """Base of the paper's models: every conv/dense layer is a Subnet layer with these options.

    The edge-popup fields (keep_fraction, mask, ...) are options.EdgePopupOptions' (nn.Module
    first in the bases, as in layers._SubnetLayer).
    dense_first / dense_last make the first / last layer a learned dense layer (mask="dense").
    compute_dtype is the dtype of activations and matmuls (e.g. "bfloat16"); scores and
    weights are always stored in float32 and logits returned in float32.
    """

    _: dataclasses.KW_ONLY
    num_classes: int = 10
    dense_first: bool = False
    dense_last: bool = False
    compute_dtype: Any = "float32"

    def __post_init__(self):
        check_options(self)
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
        options = {name: getattr(self, name) for name in FIELDS}
        return {**options, "mask": "dense" if dense else self.mask, "dtype": self.dtype}
