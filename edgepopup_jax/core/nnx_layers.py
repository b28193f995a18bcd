"""Flax NNX versions of SubnetDense / SubnetConv, on the same masking and init functions.

The random weights live in a `FrozenWeight` variable (attribute `kernel`), a subclass of
nnx.Variable that is NOT an nnx.Param, so `nnx.Optimizer(model, tx, wrt=nnx.Param)` and
`nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))` never see them; the scores are the only
nnx.Param (mask="dense": a learned nnx.Param `kernel` and no scores). Shapes and layouts are the
Linen layers' (Dense (in, out), Conv (*window, in/groups, out)), so variables copy over 1:1:
Linen frozen/kernel <-> `.kernel`, Linen params/scores <-> `.scores`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from edgepopup_jax.core import binary, inits, masking, options
from edgepopup_jax.core.layers import _padding, _tuple, conv_channels_last


class FrozenWeight(nnx.Variable):
    """Frozen random weights: a Variable type no nnx.Param filter matches."""


class _SubnetLayer(nnx.Module):
    def _init_kernel(self, shape, fan_in, fan_out, edge_popup_options: dict, *, score_init,
                     param_dtype, rngs):
        if score_init is not None:
            edge_popup_options = {**edge_popup_options, "score_init": score_init}
        opts = options.parse(edge_popup_options)
        options.check_layer_options(opts)
        if opts.mask_scope != "layer":
            raise ValueError(f"the NNX layers select their mask per layer: mask_scope must be "
                             f"'layer', got {opts.mask_scope!r} (global selection: the Linen models "
                             "with selection.edge_popup_masks)")
        self.keep_fraction = float(opts.keep_fraction)
        self.mask = opts.mask
        self.supermask_eval = opts.supermask_eval
        self.binary_weights = opts.binary_weights
        init = inits.weight_init(opts.weight_init, fan_in=fan_in, fan_out=fan_out,
                                 mode=opts.weight_init_mode,
                                 keep_fraction=self.keep_fraction if opts.scale_by_keep_fraction else None)
        if opts.mask == "dense":
            self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
            self.scores = None
        else:
            self.kernel = FrozenWeight(init(rngs.params(), shape, param_dtype))
            self.scores = nnx.Param(inits.score_initializer(
                opts.score_init, fan_in=fan_in, scale=opts.score_init_scale)(
                rngs.params(), shape, param_dtype))

    def masked_kernel(self, train: bool = False, rngs: nnx.Rngs | None = None):
        """W * mask(S) (binary_weights: binary.binarize(W * mask(S)); mask='dense': the learned
        kernel)."""
        if self.mask == "dense":
            return self.kernel[...]
        sampling = self.mask == "supermask" and (train or self.supermask_eval == "sample")
        if sampling and rngs is None:
            raise ValueError("supermask sampling needs rngs: call layer(x, train=True, rngs=nnx.Rngs(supermask=...))")
        kernel = self.kernel[...] * masking.layer_mask(
            self.scores[...], self.mask, self.keep_fraction, train=train,
            rng=rngs[masking.SAMPLE_RNG]() if sampling else None, supermask_eval=self.supermask_eval)
        return binary.binarize(kernel) if self.binary_weights else kernel

    def kept(self) -> int:
        """How many weights the current mask keeps."""
        if self.mask == "dense":
            return int(np.prod(self.kernel[...].shape))
        return int(jnp.sum(masking.layer_mask(self.scores[...], self.mask, self.keep_fraction) != 0))


class SubnetDense(_SubnetLayer):
    """y = x @ (W * mask(S)); W frozen (FrozenWeight), S learned (nnx.Param).

    **edge_popup_options: keep_fraction, weight_init, ... (options.EdgePopupOptions).
    """

    def __init__(self, in_features: int, out_features: int, *, score_init: Callable | str | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 **edge_popup_options):
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"SubnetDense needs positive features, got {in_features}, {out_features}")
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self._init_kernel((in_features, out_features), in_features, out_features,
                          edge_popup_options, score_init=score_init, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x, train: bool = False, rngs: nnx.Rngs | None = None):
        kernel = self.masked_kernel(train, rngs)
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        return jnp.dot(x.astype(dtype), kernel.astype(dtype))


class SubnetConv(_SubnetLayer):
    """A channels-last convolution with kernel W * mask(S); arguments as nnx.Conv plus
    **edge_popup_options (options.EdgePopupOptions)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int] = 3,
                 strides: int | Sequence[int] = 1, padding: str | int | Sequence = "SAME",
                 input_dilation: int | Sequence[int] = 1, kernel_dilation: int | Sequence[int] = 1,
                 feature_group_count: int = 1, *, score_init: Callable | str | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 **edge_popup_options):
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"SubnetConv needs positive features, got {in_features}, {out_features}")
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(f"feature_group_count={feature_group_count} must divide the input "
                             f"({in_features}) and output ({out_features}) features")
        n = 2 if isinstance(kernel_size, int) else len(tuple(kernel_size))
        if not 1 <= n <= 3:
            raise ValueError(f"SubnetConv supports 1 to 3 spatial dimensions, got {n}")
        self.window = _tuple(kernel_size, n, "kernel_size")
        self.strides = _tuple(strides, n, "strides")
        self.padding = _padding(padding, n)
        self.input_dilation = _tuple(input_dilation, n, "input_dilation")
        self.kernel_dilation = _tuple(kernel_dilation, n, "kernel_dilation")
        self.feature_group_count = feature_group_count
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        shape = self.window + (in_features // feature_group_count, out_features)
        receptive = int(np.prod(self.window))
        self._init_kernel(shape, receptive * shape[-2], receptive * out_features,
                          edge_popup_options, score_init=score_init, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x, train: bool = False, rngs: nnx.Rngs | None = None):
        kernel = self.masked_kernel(train, rngs)
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        return conv_channels_last(x, kernel, strides=self.strides, padding=self.padding,
                                  input_dilation=self.input_dilation,
                                  kernel_dilation=self.kernel_dilation,
                                  feature_group_count=self.feature_group_count, dtype=dtype)


__all__ = ["FrozenWeight", "SubnetDense", "SubnetConv"]
