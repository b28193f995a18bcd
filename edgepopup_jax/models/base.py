"""Options every model shares, and the layer settings they imply."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from edgepopup_jax.core import options as options_lib
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

    def layer_options(self, role: str = "hidden", linear: bool = False) -> dict:
        """Keyword arguments for a Subnet layer; role is "first", "hidden" or "last", linear
        says a dense layer. The layer gets its own keep_fraction (options.keep_fraction_for:
        first_last_keep_fraction, linear_keep_fraction), and a learned dense layer
        (dense_first / dense_last) no binary weights."""
        dense = (role == "first" and self.dense_first) or (role == "last" and self.dense_last)
        options = {name: getattr(self, name) for name in FIELDS}
        options.update({name: None for name in options_lib.PER_LAYER_KEEP_FRACTIONS})
        options["keep_fraction"] = options_lib.keep_fraction_for(
            self, first_or_last=role in ("first", "last"), linear=linear)
        if dense:
            options["binary_weights"] = False
        return {**options, "mask": "dense" if dense else self.mask, "dtype": self.dtype}

    def first_and_last_layers(self) -> tuple[str, str]:
        """The names of the model's first and last layers (those layer_options calls with role
        "first" and "last")."""
        raise NotImplementedError

    def keep_fractions(self, params) -> dict[str, float]:
        """Each masked layer's keep fraction, by "/"-joined layer path (the path of its `scores`
        without "scores"): what layer_options gives that layer (a dense layer: scores of rank 2)."""
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        ends = self.first_and_last_layers()
        return {"/".join(p[:-1]): options_lib.keep_fraction_for(
                    self, first_or_last=p[:-1] in [(name,) for name in ends],
                    linear=len(flat[p].shape) == 2)
                for p in sorted(flat) if p[-1] == "scores"}

    def uniform_keep_fraction(self) -> bool:
        """Whether every layer keeps keep_fraction (no per-role fraction is set)."""
        return all(getattr(self, name) is None for name in options_lib.PER_LAYER_KEEP_FRACTIONS)
