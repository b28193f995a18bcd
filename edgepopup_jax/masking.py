"""Masks over a score tensor: the straight-through top-k mask and the sampled supermask.

Pure jnp, no Flax. The top-k threshold is found exactly by bisection on the bit pattern of
|scores| (for non-negative IEEE floats, the integer order of the bits is the float order), so a
mask costs ~31 counting passes over the scores instead of a sort.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def check_keep_fraction(keep_fraction) -> float:
    """Returns keep_fraction as a float, or raises if it is outside (0, 1]."""
    try:
        k = float(keep_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"keep_fraction must be a number in (0, 1], got {keep_fraction!r}") from None
    if not 0.0 < k <= 1.0:
        raise ValueError(
            f"keep_fraction must be in (0, 1] (the fraction of weights KEPT), got {keep_fraction!r}")
    return k


def kept_count(n: int, keep_fraction: float) -> int:
    """How many of n weights a layer keeps: n - int((1 - k) * n), the PyTorch reference's count."""
    k = check_keep_fraction(keep_fraction)
    return n - int((1.0 - k) * n)


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys whose order is the order of |x| (non-negative float32 bit patterns); NaN counts as largest."""
    a = jnp.abs(x.astype(jnp.float32))
    return jax.lax.bitcast_convert_type(a, jnp.int32)


def _threshold_key(keys: jax.Array, count: int) -> jax.Array:
    """The largest key t with #(keys >= t) >= count, i.e. the count-th largest key. Exact, 31 passes."""
    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: #(keys >= lo) >= count > #(keys >= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys >= mid, dtype=jnp.int32) >= count
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.int32(0)
    hi = jnp.int32(2**31 - 1)  # above every finite or infinite |x| (0x7f800000); NaN keys are > inf
    lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return lo


def topk_mask_forward(scores: jax.Array, keep_fraction: float) -> jax.Array:
    """The 0/1 mask of the top kept_count(n, k) entries of |scores| (whole tensor), in scores.dtype.

    Ties at the threshold are broken towards the lower flat index, deterministically.
    """
    n = scores.size
    count = kept_count(n, keep_fraction)
    if count == n:
        return jnp.ones_like(scores)
    keys = _order_keys(scores).reshape(-1)
    t = _threshold_key(keys, count)
    above = keys > t
    at = keys == t
    room = count - jnp.sum(above, dtype=jnp.int32)
    take_tie = at & (jnp.cumsum(at, dtype=jnp.int32) <= room)
    return (above | take_tie).reshape(scores.shape).astype(scores.dtype)


def topk_mask_reference(scores: jax.Array, keep_fraction: float) -> jax.Array:
    """The same mask by a full (stable) sort: the slow reference the fast one is tested against."""
    n = scores.size
    count = kept_count(n, keep_fraction)
    flat = jnp.abs(scores.astype(jnp.float32)).reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    mask = jnp.zeros((n,), scores.dtype).at[order[:count]].set(1)
    return mask.reshape(scores.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _straight_through_topk(abs_scores, keep_fraction):
    return topk_mask_forward(abs_scores, keep_fraction)


def _st_fwd(abs_scores, keep_fraction):
    return topk_mask_forward(abs_scores, keep_fraction), None


def _st_bwd(keep_fraction, _, g):
    return (g,)


_straight_through_topk.defvjp(_st_fwd, _st_bwd)


def topk_mask(scores: jax.Array, keep_fraction: float) -> jax.Array:
    """Straight-through top-k mask of |scores| (edge-popup's h(|S|)).

    Forward: 1 for the top kept_count(scores.size, keep_fraction) entries of |scores|, else 0.
    Backward: the identity into |scores|, so d mask/d scores = sign(scores); inside a layer
    W_eff = W * mask this gives dL/dS = dL/dW_eff * W * sign(S), as in the reference.
    """
    keep_fraction = check_keep_fraction(keep_fraction)
    return _straight_through_topk(jnp.abs(scores), keep_fraction)


SUPERMASK_EVAL_MODES = ("threshold", "expectation", "sample")


def supermask(scores: jax.Array, *, rng: jax.Array | None, train: bool,
              eval_mode: str = "threshold") -> jax.Array:
    """Zhou et al.'s supermask: Bernoulli(sigmoid(S)), with a straight-through gradient.

    Training samples a fresh mask from `rng` every call; the gradient flows through sigmoid(S)
    as if the sample were its expectation. At eval, eval_mode picks sigmoid(S) > 0.5
    ("threshold"), sigmoid(S) itself ("expectation") or a sample ("sample", needs rng).
    """
    if eval_mode not in SUPERMASK_EVAL_MODES:
        raise ValueError(f"supermask eval_mode must be one of {SUPERMASK_EVAL_MODES}, got {eval_mode!r}")
    p = jax.nn.sigmoid(scores.astype(jnp.float32))
    if train or eval_mode == "sample":
        if rng is None:
            raise ValueError("supermask sampling needs an rng (pass rngs={'mask': key} to apply)")
        sample = jax.random.bernoulli(rng, p).astype(p.dtype)
        mask = p + jax.lax.stop_gradient(sample - p)
    elif eval_mode == "threshold":
        mask = (p > 0.5).astype(p.dtype)
    else:
        mask = p
    return mask.astype(scores.dtype)
