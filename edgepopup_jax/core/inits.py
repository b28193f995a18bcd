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
SCORE_INITS = ("kaiming_uniform", "uniform", "iterand")
RELU_GAIN = math.sqrt(2.0)


def check_weight_init(name: str) -> str:
    if name not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {name!r}; allowed: {', '.join(WEIGHT_INITS)}")
    return name


def check_fan_mode(mode: str) -> str:
    if mode not in FAN_MODES:
        raise ValueError(f"unknown fan mode {mode!r}; allowed: {', '.join(FAN_MODES)}")
    return mode


def check_score_init(init):
    """A score init: one of SCORE_INITS, or an init function (key, shape, dtype) -> scores."""
    if not callable(init) and init not in SCORE_INITS:
        raise ValueError(f"unknown score_init {init!r}; allowed: {', '.join(SCORE_INITS)} "
                         "(or an init function)")
    return init


def check_score_init_scale(scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        s = math.nan
    if not (math.isfinite(s) and s > 0) or isinstance(scale, bool):
        raise ValueError(f"score_init_scale must be a number > 0, got {scale!r}")
    return s


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


def score_bound(name: str, fan_in: int) -> float:
    """The half-width b of the U(-b, b) score init `name` at scale 1:

    kaiming_uniform: edge-popup's Kaiming-uniform(a=sqrt(5)), b = 1 / sqrt(fan_in);
    uniform: b = 1 (IteRand's "uniform(-1,1)");
    iterand: IteRand's score init (Chijiwa et al., NeurIPS 2021, "Pruning Randomly Initialized
      Neural Networks with Iterative Randomization", repo dchiji-ntt/iterand: init_mode_mask
      "kaiming_uniform", torch's kaiming_uniform_ with the ReLU gain and mode fan_in, then times
      init_scale_score), b = sqrt(6 / fan_in), sqrt(6) times edge-popup's. (IteRand keeps the
      top scores by signed value, not |S|; here the mask stays edge-popup's top-|S|, so only
      the init is IteRand's. Its re-randomisation of pruned weights is not implemented.)
    """
    check_score_init(name)
    if name == "kaiming_uniform":  # as score_init computes it, so scale 1 gives its scores exactly
        a = math.sqrt(5.0)
        return math.sqrt(3.0) * math.sqrt(2.0 / (1.0 + a * a)) / math.sqrt(fan_in)
    if name == "uniform":
        return 1.0
    return math.sqrt(3.0) * RELU_GAIN / math.sqrt(fan_in)


def score_initializer(init, *, fan_in: int, scale: float = 1.0) -> Callable[[jax.Array, tuple], jax.Array]:
    """The score init of option `score_init` with `score_init_scale`: U(-scale * b, scale * b),
    b = score_bound(init, fan_in) (kaiming_uniform at scale 1: score_init(fan_in=fan_in)'s scores).
    A callable `init` is returned as it is (scale must be 1 then)."""
    check_score_init(init)
    scale = check_score_init_scale(scale)
    if callable(init):
        if scale != 1.0:
            raise ValueError("score_init_scale scales the named score inits; give the init "
                             "function its own scale")
        return init
    bound = scale * score_bound(init, fan_in)

    def init_fn(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init_fn
