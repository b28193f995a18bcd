"""Flax Linen layers whose random weights are frozen and whose scores are learned.

Collections: the random kernel lives in `frozen` (never given to an optimizer), the scores in
`params`. mask="dense" is the baseline: a learned kernel in `params` and no scores.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgepopup_jax.core import binary, inits, masking, selection
from edgepopup_jax.core.options import EdgePopupOptions, check_layer_options, check_options
from edgepopup_jax.core.options import MASK_MODES  # noqa: F401 (re-exported: layers.MASK_MODES)

FROZEN = "frozen"


class _SubnetLayer(nn.Module, EdgePopupOptions):
    """Fields and kernel logic shared by SubnetDense and SubnetConv (keyword-only fields).

    The edge-popup fields come from options.EdgePopupOptions; nn.Module comes first in the bases
    so that its __post_init__ and __repr__ are the ones used (hence check_options here).
    """

    _: dataclasses.KW_ONLY
    use_bias: bool = False
    dtype: Any = None  # compute dtype; None: that of the inputs
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_options(self)
        check_layer_options(self)
        if self.use_bias and self.mask != "dense":
            raise ValueError("use_bias=True needs mask='dense': edge-popup and supermask train no bias")
        super().__post_init__()

    def masked_kernel(self, shape: tuple[int, ...], fan_in: int, fan_out: int, train: bool):
        """W * mask(S) for the masked modes (binary_weights: binary.binarize(W * mask(S))), the
        learned kernel for mask='dense'."""
        kernel = self._masked_kernel(shape, fan_in, fan_out, train)
        return binary.binarize(kernel) if self.binary_weights else kernel

    def _masked_kernel(self, shape, fan_in, fan_out, train):
        scale_k = self.keep_fraction if self.scale_by_keep_fraction else None
        init = inits.weight_init(self.weight_init, fan_in=fan_in, fan_out=fan_out,
                                 mode=self.weight_init_mode, keep_fraction=scale_k)
        if self.mask == "dense":
            return self.param("kernel", init, shape, self.param_dtype)
        weights = self.variable(FROZEN, "kernel",
                                lambda: init(self.make_rng("params"), shape, self.param_dtype)).value
        scores = self.param("scores", inits.score_initializer(
            self.score_init, fan_in=fan_in, scale=self.score_init_scale), shape, self.param_dtype)
        if self.mask == "edge_popup" and self.has_variable(selection.MASKS, "kernel"):
            return self.get_variable(selection.MASKS, "kernel")  # W * mask, folded once per eval
        if self.mask == "edge_popup" and self.has_variable(selection.MASKS, "scores"):
            # Selected for all layers at once (selection.edge_popup_masks), as the trainer does.
            return weights * self.get_variable(selection.MASKS, "scores").astype(weights.dtype)
        if self.mask == "edge_popup" and self.mask_scope == "global" and not self.is_initializing():
            raise ValueError("mask_scope='global' selects over all layers together: apply the model "
                             "with the 'masks' collection, e.g. {**variables, 'masks': "
                             "selection.edge_popup_masks(variables['params'], k, 'global')}")
        sampling = self.mask == "supermask" and (train or self.supermask_eval == "sample")
        return weights * masking.layer_mask(scores, self.mask, self.keep_fraction, train=train,
                                            rng=self.make_rng(masking.SAMPLE_RNG) if sampling else None,
                                            supermask_eval=self.supermask_eval)

    def add_bias(self, y, features: int):
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.initializers.zeros_init(), (features,), self.param_dtype)
        return y + bias.astype(y.dtype)

    def compute_dtype(self, x):
        return self.dtype or jnp.result_type(x.dtype, self.param_dtype)


class SubnetDense(_SubnetLayer):
    """A dense layer y = x @ (W * mask(S)); fields as flax.linen.Dense plus the edge-popup ones."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.features <= 0:
            raise ValueError(f"SubnetDense needs features > 0, got {self.features}")
        fan_in = x.shape[-1]
        kernel = self.masked_kernel((fan_in, self.features), fan_in, self.features, train)
        dtype = self.compute_dtype(x)
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        return self.add_bias(y, self.features)


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} values (one per spatial dimension), got {value}")
    return value


def _padding(padding, n: int):
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or per-dimension pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != n:
        raise ValueError(f"padding needs {n} entries, got {padding!r}")
    return pads


def conv_channels_last(x, kernel, *, strides, padding, input_dilation, kernel_dilation,
                       feature_group_count, dtype):
    """lax.conv_general_dilated on (*batch, *spatial, C) inputs and (*window, C_in/groups, C_out)
    kernels (also used by the NNX layers)."""
    n = kernel.ndim - 2
    if not 1 <= n <= 3:
        raise ValueError(f"convolutions support 1 to 3 spatial dimensions, got {n}")
    batch_shape = x.shape[:-(n + 1)]
    x = x.reshape((-1,) + x.shape[-(n + 1):])
    spatial = "HWD"[:n]
    dims = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), window_strides=strides, padding=padding,
        lhs_dilation=input_dilation, rhs_dilation=kernel_dilation, dimension_numbers=dims,
        feature_group_count=feature_group_count)
    return y.reshape(batch_shape + y.shape[1:])


class SubnetConv(_SubnetLayer):
    """A convolution with kernel W * mask(S), channels last (NHWC); fields as flax.linen.Conv."""

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.features <= 0:
            raise ValueError(f"SubnetConv needs features > 0, got {self.features}")
        n = len(self.kernel_size) if not isinstance(self.kernel_size, int) else x.ndim - 2
        window = _tuple(self.kernel_size, n, "kernel_size")
        in_features = x.shape[-1]
        groups = self.feature_group_count
        if in_features % groups or self.features % groups:
            raise ValueError(f"feature_group_count={groups} must divide the input ({in_features}) "
                             f"and output ({self.features}) features")
        shape = window + (in_features // groups, self.features)
        receptive = int(np.prod(window))
        kernel = self.masked_kernel(shape, receptive * shape[-2], receptive * self.features, train)

        y = conv_channels_last(x, kernel, strides=_tuple(self.strides, n, "strides"),
                               padding=_padding(self.padding, n),
                               input_dilation=_tuple(self.input_dilation, n, "input_dilation"),
                               kernel_dilation=_tuple(self.kernel_dilation, n, "kernel_dilation"),
                               feature_group_count=groups, dtype=self.compute_dtype(x))
        return self.add_bias(y, self.features)


class NonAffineBatchNorm(nn.BatchNorm):
    """BatchNorm with no scale and no shift (nothing to learn); running statistics still tracked.

    unbiased_running_var: update the running variance with the unbiased batch variance
    (times n / (n - 1), n values per feature), as torch.nn.BatchNorm2d does; normalisation in
    training always uses the biased batch variance (as torch does too).
    """

    use_scale: bool = False
    use_bias: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        train = not nn.merge_param("use_running_average", self.use_running_average,
                                   use_running_average)
        fix = self.unbiased_running_var and train and not self.is_initializing()
        before = self.get_variable("batch_stats", "var") if fix else None
        y = super().__call__(x, use_running_average)
        if fix:  # the batch variance as flax computes it (XLA shares the reductions), rescaled
            axes = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
            n = int(np.prod([x.shape[i] for i in axes]))
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.maximum(0.0, (x32 * x32).mean(axes) - mean * mean) * (n / max(n - 1, 1))
            self.put_variable("batch_stats", "var",
                              self.momentum * before + (1 - self.momentum) * var)
        return y
