"""The paper's weight distributions and the score init: pure functions of (key, shape, fans).

Kernels are laid out as Flax lays them out (Dense: (in, out); Conv: (*window, in/groups, out)),
so fan_in = prod(window) * in/groups and fan_out = prod(window) * out, as PyTorch computes them.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from edgepopup_jax.core.masking import check_keep_fraction

WEIGHT_INITS = ("kaiming_normal", "signed_constant", "kaiming_uniform", "xavier_normal",
                "unsigned_constant")
FAN_MODES = ("fan_in", "fan_out")
RELU_GAIN = math.sqrt(2.0)


def check_weight_init(name: str) -> str:
    if name not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {name!r}; allowed: {', '.join(WEIGHT_INITS)}")
    return name


def check_fan_mode(mode: str) -> str:
    if mode not in FAN_MODES:
        raise ValueError(f"unknown fan mode {mode!r}; allowed: {', '.join(FAN_MODES)}")
    return mode


def weight_std(name: str, fan_in: int, fan_out: int, mode: str = "fan_in",
               keep_fraction: float | None = None) -> float:
    """The standard deviation (constants: the magnitude) of distribution `name`.

    With keep_fraction set ("scaled" variants), the fan is multiplied by it: a layer that keeps
    k * fan inputs gets std = gain / sqrt(k * fan), so activations keep their scale at any k.
    """
    check_weight_init(name)
    check_fan_mode(mode)
    scale = 1.0 if keep_fraction is None else check_keep_fraction(keep_fraction)
    if name == "xavier_normal":
        return math.sqrt(2.0 / (scale * (fan_in + fan_out)))
    fan = fan_in if mode == "fan_in" else fan_out
    return RELU_GAIN / math.sqrt(scale * fan)


def weight_init(name: str, *, fan_in: int, fan_out: int, mode: str = "fan_in",
                keep_fraction: float | None = None) -> Callable[[jax.Array, tuple], jax.Array]:
    """An init function (key, shape, dtype=float32) -> weights for distribution `name`.

    kaiming_normal: N(0, std^2); kaiming_uniform: U(-sqrt(3) std, sqrt(3) std);
    xavier_normal: N(0, 2 / (fan_in + fan_out)); signed_constant: +/- std with random sign;
    unsigned_constant: +std everywhere. std = sqrt(2 / fan) (see weight_std for scaling).
    """
    std = weight_std(name, fan_in, fan_out, mode, keep_fraction)

    def init(key, shape, dtype=jnp.float32):
        if name in ("kaiming_normal", "xavier_normal"):
            return std * jax.random.normal(key, shape, dtype)
        if name == "kaiming_uniform":
            bound = math.sqrt(3.0) * std
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        if name == "signed_constant":
            sign = jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)
            return (std * sign).astype(dtype)
        return jnp.full(shape, std, dtype)  # unsigned_constant

    return init


def score_init(*, fan_in: int, a: float = math.sqrt(5.0)) -> Callable[[jax.Array, tuple], jax.Array]:
    """Kaiming-uniform(a) over fan_in; a = sqrt(5) (PyTorch's default) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
