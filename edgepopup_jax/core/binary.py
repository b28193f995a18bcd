"""Binary weights under a learned mask: biprop (Diffenderfer & Kailkhura, ICLR 2021, "Multi-Prize
Lottery Ticket Hypothesis").

A masked layer's kernel K = W * mask becomes W_eff = alpha * sign(W) * mask, with one scale per
layer, alpha = sum(|W * mask|) / sum(mask): the mean magnitude of the kept weights, recomputed
from the current mask on every forward pass, as biprop defines it. The gradient is straight
through (d W_eff / d K = identity), so the scores get edge-popup's gradient,
dL/dS = dL/dW_eff * W * sign(S), as biprop's backward (g * |W| into the mask, times sign(W)).

Everything here is a function of K alone: a kept weight that is exactly 0 (measure zero for the
normal and uniform inits, never for the constant ones) has sign 0, stays 0 and is not counted
in alpha's denominator. So the layer's own mask, the `masks` collection and the folded kernel of
an evaluation (selection.fold_into_kernels: K itself) all give the same W_eff, bit for bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def binary_scale(kernel: jax.Array) -> jax.Array:
    """alpha = sum(|K|) / #(K != 0) (0 for a layer that keeps nothing), as a float32 scalar."""
    k = kernel.astype(jnp.float32)
    kept = jnp.sum(k != 0, dtype=jnp.int32)
    return jnp.sum(jnp.abs(k)) / jnp.maximum(kept, 1).astype(jnp.float32)


def _binarize(kernel):
    return (binary_scale(kernel) * jnp.sign(kernel.astype(jnp.float32))).astype(kernel.dtype)


@jax.custom_vjp
def binarize(kernel: jax.Array) -> jax.Array:
    """alpha * sign(K) for a masked kernel K = W * mask (see the module docstring); the gradient
    passes straight through to K."""
    return _binarize(kernel)


def _fwd(kernel):
    return _binarize(kernel), None


def _bwd(_, g):
    return (g,)


binarize.defvjp(_fwd, _bwd)
