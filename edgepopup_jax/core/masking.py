"""Masks over a score tensor: the straight-through top-k mask and the sampled supermask.

Pure jnp, no Flax. The top-k threshold is found exactly on the int32 bit pattern of |scores| (for
non-negative IEEE floats, the integer order of the bits is the float order): by a two-pass radix
select on CPU, or by a 31-pass counting bisection elsewhere, instead of a sort.
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


# Exact selection of the count-th largest key. Two methods, both exact and tested equal:
#  - "radix": radix select, one histogram (scatter-add) pass per digit of the 31-bit key, top digit
#    first; each pass keeps only the keys whose higher digits equal the selected prefix: 2 passes
#    (16 + 15 bits) from 2**20 keys on, 3 passes (11 + 11 + 9 bits, smaller histograms) below.
#    Fast on CPU, where a scatter-add into a cache-resident histogram is cheap.
#  - "bisect": bisection on the key, 31 counting passes. Memory-bound reductions only (no scatter),
#    which suits GPU/TPU, where scatter-adds with many collisions are slow, and tiny tensors.
_TIE_BLOCK = 1024
_RADIX_MIN_SIZE = 2**14  # on CPU, below this many keys the bisection's fixed cost is lower
SELECTION_METHODS = ("radix", "bisect")




def _radix_digits(n: int) -> tuple[int, ...]:
    return (16, 15) if n >= 2**20 else (11, 11, 9)


def _threshold_key_radix(keys: jax.Array, count: int):
    """(t, room, ties): t is the count-th largest key, ties = #(keys == t), room = count - #(keys > t)
    (so 1 <= room <= ties)."""
    rank = jnp.int32(count)  # rank of the wanted key among the keys sharing `prefix`, from the top
    prefix = jnp.int32(0)
    shift = 31
    for i, width in enumerate(_radix_digits(keys.size)):
        shift -= width
        bins = 1 << width
        digit = (keys >> shift) & (bins - 1)
        if i:  # keys outside the selected prefix go to the out-of-range bin, which is dropped
            digit = jnp.where((keys >> (shift + width)) == prefix, digit, bins)
        hist = jnp.zeros((bins,), jnp.int32).at[digit].add(1, mode="drop")
        at_or_above = jnp.cumsum(hist[::-1])[::-1]  # at_or_above[b] = #(digit >= b), non-increasing
        b = jnp.sum(at_or_above >= rank, dtype=jnp.int32) - 1  # the last bin holding >= rank keys
        rank = rank - (at_or_above[b] - hist[b])  # minus the keys in bins above b
        prefix = (prefix << width) | b
    return prefix, rank, hist[b]


def _threshold_key_bisect(keys: jax.Array, count: int):
    """(t, room, ties) as _threshold_key_radix, by bisection: 31 counting passes plus one."""
    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: #(keys >= lo) >= count > #(keys >= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys >= mid, dtype=jnp.int32) >= count
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.int32(0)
    hi = jnp.int32(2**31 - 1)  # above every finite or infinite |x| (0x7f800000); NaN keys are > inf
    t, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return t, count - jnp.sum(keys > t, dtype=jnp.int32), jnp.sum(keys == t, dtype=jnp.int32)


def _tie_cut(keys: jax.Array, t: jax.Array, room: jax.Array) -> jax.Array:
    """The flat index just past the room-th key equal to t (room >= 1 such keys exist).

    Instead of a cumsum over the whole tensor: count the ties per block of _TIE_BLOCK keys (one
    reduction), find the block holding the room-th tie, and cumsum inside that block only.
    """
    n = keys.size
    nblocks = -(-n // _TIE_BLOCK)
    padded = jnp.pad(keys, (0, nblocks * _TIE_BLOCK - n), constant_values=-1)  # -1 never equals t
    blocks = padded.reshape(nblocks, _TIE_BLOCK)
    ties_through = jnp.cumsum(jnp.sum(blocks == t, axis=1, dtype=jnp.int32))  # ties in blocks <= j
    j = jnp.sum(ties_through < room, dtype=jnp.int32)  # the first block with >= room ties through it
    before = jnp.where(j > 0, ties_through[jnp.maximum(j - 1, 0)], 0)
    row = jax.lax.dynamic_index_in_dim(blocks, j, axis=0, keepdims=False)
    within = jnp.sum(jnp.cumsum(row == t, dtype=jnp.int32) < room - before, dtype=jnp.int32)
    return j * _TIE_BLOCK + within + 1


def _topk_mask_forward(scores: jax.Array, keep_fraction: float, method: str | None = None) -> jax.Array:
    """topk_mask_forward with an explicit selection method (None: by backend). For tests/benchmarks."""
    n = scores.size
    if method not in (None, *SELECTION_METHODS):
        raise ValueError(f"unknown selection method {method!r}; allowed: {', '.join(SELECTION_METHODS)}")
    count = kept_count(n, keep_fraction)
    if count == n:
        return jnp.ones_like(scores)
    keys = _order_keys(scores).reshape(-1)
    if method is None and n >= _RADIX_MIN_SIZE:
        # Chosen for the platform the step is compiled for (not the host's default backend), so
        # an ahead-of-time compile for a GPU/TPU holds the path that accelerator will run.
        t, room, ties = jax.lax.platform_dependent(
            keys, cpu=lambda k: _threshold_key_radix(k, count),
            default=lambda k: _threshold_key_bisect(k, count))
    else:
        select = _threshold_key_radix if method == "radix" else _threshold_key_bisect
        t, room, ties = select(keys, count)
    return _keep_from_threshold(keys, t, room, ties).reshape(scores.shape).astype(scores.dtype)


def _keep_from_threshold(keys: jax.Array, t, room, ties) -> jax.Array:
    """Keys above t, then the first `room` keys equal to t in flat order (ties to the lower index)."""
    n = keys.size
    # Usually every key equal to t is kept (room == ties) and no tie-break pass is needed.
    cut = jax.lax.cond(room == ties, lambda: jnp.int32(n), lambda: _tie_cut(keys, t, room))
    return (keys > t) | ((keys == t) & (jnp.arange(n, dtype=jnp.int32) < cut))


def topk_mask_for_count(scores: jax.Array, count) -> jax.Array:
    """The 0/1 mask of the top `count` entries of |scores|, count an int32 scalar that may be
    traced (vmapped runs of different keep fractions): the CPU's radix select (bisection below
    _RADIX_MIN_SIZE keys). Equals topk_mask_forward(scores, k) for count = kept_count(n, k)."""
    keys = _order_keys(scores).reshape(-1)
    select = _threshold_key_radix if keys.size >= _RADIX_MIN_SIZE else _threshold_key_bisect
    t, room, ties = select(keys, count)
    return _keep_from_threshold(keys, t, room, ties).reshape(scores.shape).astype(scores.dtype)


def topk_mask_forward(scores: jax.Array, keep_fraction: float) -> jax.Array:
    """The 0/1 mask of the top kept_count(n, k) entries of |scores| (whole tensor), in scores.dtype.

    Ties at the threshold are broken towards the lower flat index, deterministically.
    """
    return _topk_mask_forward(scores, keep_fraction)


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
SAMPLE_RNG = "supermask"  # the rng stream supermask sampling draws its masks from


def supermask(scores: jax.Array, *, rng: jax.Array | None, train: bool,
              eval_mode: str = "threshold") -> jax.Array:
    """Zhou et al.'s supermask: Bernoulli(sigmoid(S)), with a straight-through gradient.

    Training samples a fresh mask from `rng` every call; the gradient flows through sigmoid(S)
    as if the sample were its expectation. At eval, eval_mode picks S > 0, i.e. sigmoid(S) > 0.5
    computed exactly ("threshold"), sigmoid(S) itself ("expectation") or a sample ("sample", needs rng).
    """
    if eval_mode not in SUPERMASK_EVAL_MODES:
        raise ValueError(f"supermask eval_mode must be one of {SUPERMASK_EVAL_MODES}, got {eval_mode!r}")
    p = jax.nn.sigmoid(scores.astype(jnp.float32))
    if train or eval_mode == "sample":
        if rng is None:
            raise ValueError(f"supermask sampling needs an rng (pass rngs={{'{SAMPLE_RNG}': key}} to apply)")
        sample = jax.random.bernoulli(rng, p).astype(p.dtype)
        mask = p + jax.lax.stop_gradient(sample - p)
    elif eval_mode == "threshold":
        mask = (scores > 0).astype(p.dtype)  # not p > 0.5: sigmoid rounds to 0.5 for tiny S
    else:
        mask = p
    return mask.astype(scores.dtype)


def layer_mask(scores: jax.Array, mode: str, keep_fraction: float, *, train: bool = False,
               rng: jax.Array | None = None, supermask_eval: str = "threshold") -> jax.Array:
    """The mask a layer of mask mode `mode` ("edge_popup" or "supermask") multiplies its weights by.

    train=False gives the eval-time mask: for edge-popup the top-k mask, for the supermask
    (supermask_eval="threshold") S > 0. Straight-through gradients in both modes.
    """
    if mode == "edge_popup":
        return topk_mask(scores, keep_fraction)
    if mode == "supermask":
        return supermask(scores, rng=rng, train=train, eval_mode=supermask_eval)
    raise ValueError(f"mask mode {mode!r} has no mask; masked modes: edge_popup, supermask")
