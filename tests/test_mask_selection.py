"""Both exact threshold-selection methods behind topk_mask_forward ("radix", "bisect") give the
sort reference's mask: every size regime, heavy ties, bf16, inf, jit and vmap."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from edgepopup_jax.core import masking
from edgepopup_jax.core.masking import SELECTION_METHODS, kept_count, topk_mask_reference

KEEPS = (0.01, 0.3, 0.5, 0.99)
# tiny, tie blocks of 1024 (+1), 3-digit radix; 2-digit radix (>= 2**20) in the large test
SIZES = (1, 7, 1000, 1025, 70001)


def make_scores(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=n).astype(np.float32)
    if kind == "uniform_grid":  # jax.random.uniform-like: a 2**-23 grid, +/-v ties in |s|
        return (rng.integers(-2**23, 2**23, size=n) * 2.0**-23).astype(np.float32)
    if kind == "signed_ints":
        return rng.integers(-3, 4, size=n).astype(np.float32)
    if kind == "two_values":
        return np.where(rng.random(n) < 0.5, 1.0, -2.0).astype(np.float32)
    if kind == "zeros":
        return np.zeros(n, np.float32)
    if kind == "inf":
        s = rng.normal(size=n).astype(np.float32)
        s[rng.integers(0, n, size=max(1, n // 50))] = np.inf
        s[rng.integers(0, n, size=max(1, n // 50))] = -np.inf
        return s
    raise ValueError(kind)


def check(scores, keeps=KEEPS):
    n = scores.size
    for k in keeps:
        ref = np.asarray(topk_mask_reference(scores, k))
        for method in SELECTION_METHODS:
            m = masking._topk_mask_forward(scores, k, method)
            assert m.dtype == scores.dtype and m.shape == scores.shape
            m = np.asarray(m, np.float64)
            assert int(m.sum()) == kept_count(n, k), (method, n, k)
            np.testing.assert_array_equal(m, np.asarray(ref, np.float64), err_msg=f"{method} n={n} k={k}")


@pytest.mark.parametrize("kind", ["normal", "uniform_grid", "signed_ints", "two_values", "zeros", "inf"])
@pytest.mark.parametrize("n", SIZES)
def test_methods_match_reference(kind, n):
    check(jnp.asarray(make_scores(kind, n, seed=n)))


@pytest.mark.parametrize("kind", ["normal", "signed_ints"])
def test_methods_match_reference_bf16(kind):
    for n in (1000, 2**14 + 1, 70001):
        s = jnp.asarray(make_scores(kind, n, seed=n)).astype(jnp.bfloat16)  # few distinct values
        check(s)


@pytest.mark.parametrize("kind", ["uniform_grid", "two_values"])
def test_methods_match_reference_large(kind):
    # >= 2**20 keys: the two-digit radix; two_values puts ~n/2 ties at the threshold
    n = 2**20 + 3
    check(jnp.asarray(make_scores(kind, n)), keeps=(0.3, 0.5))


def test_ties_break_to_lower_index_across_blocks():
    # ties at the threshold spread over many tie blocks; the cut falls at every kind of place
    n = 5 * 1024 + 17
    s = np.full(n, 0.5, np.float32)
    s[::3] = 2.0
    for k in (0.34, 0.4, 0.5, 0.8, 0.999):
        check(jnp.asarray(s), keeps=(k,))
    check(jnp.asarray(s).reshape(-1, 11, 1), keeps=(0.5,))  # n-D shapes too


def test_methods_under_jit_and_vmap():
    batch = jnp.asarray(np.stack([make_scores(kind, 20000, seed=i) for i, kind in
                                  enumerate(["normal", "uniform_grid", "signed_ints", "zeros"])]))
    for method in SELECTION_METHODS:
        for k in (0.1, 0.5):
            f = jax.jit(jax.vmap(lambda s: masking._topk_mask_forward(s, k, method)))
            out = np.asarray(f(batch))
            for i in range(batch.shape[0]):
                np.testing.assert_array_equal(out[i], np.asarray(topk_mask_reference(batch[i], k)))


@pytest.mark.parametrize("platform, radix", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_selection_is_chosen_for_the_platform_compiled_for(platform, radix):
    # Lowered for a platform this host does not have (as the preflight does), the step must hold
    # that platform's path: the radix select's scatter-add on CPU, the bisection elsewhere.
    s = jnp.asarray(make_scores("normal", 2**15))
    hlo = jax.jit(masking.topk_mask_forward, static_argnums=1).trace(s, 0.3).lower(
        lowering_platforms=(platform,)).as_text()
    assert ("scatter" in hlo) == radix
    assert ("while" in hlo) != radix


def test_public_function_and_method_check():
    s = jnp.asarray(make_scores("uniform_grid", 50000))
    np.testing.assert_array_equal(np.asarray(masking.topk_mask_forward(s, 0.3)),
                                  np.asarray(topk_mask_reference(s, 0.3)))
    with pytest.raises(ValueError, match="selection method"):
        masking._topk_mask_forward(s, 0.3, "sort")
