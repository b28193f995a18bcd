"""Tests of edgepopup_jax.core.masking: the exact top-k mask, its straight-through gradient,
supermask."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from edgepopup_jax.core import masking
from edgepopup_jax.core.masking import (kept_count, supermask, topk_mask, topk_mask_forward,
                                   topk_mask_reference)

KEEPS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0)
SHAPES = ((1,), (2,), (7,), (100,), (1000,), (12345,), (3, 3, 64, 64))


@jax.jit
def all_k_masks(scores):
    """The fast masks for every k in KEEPS, stacked: one compile per shape/dtype."""
    return jnp.stack([topk_mask_forward(scores, k) for k in KEEPS])


@jax.jit
def all_k_reference(scores):
    return jnp.stack([topk_mask_reference(scores, k) for k in KEEPS])


def check_all_k(scores, jnp_reference=True):
    """Asserts, for every k in KEEPS: exact count, equal to the numpy float64 stable-sort reference
    and (jnp_reference) to masking.topk_mask_reference."""
    scores = jnp.asarray(scores)
    fast = all_k_masks(scores)
    assert fast.dtype == scores.dtype and fast.shape == (len(KEEPS),) + scores.shape
    fast = np.asarray(fast, np.float32)
    ref = np.asarray(all_k_reference(scores), np.float32) if jnp_reference else None
    a = np.abs(np.asarray(scores, np.float64))
    for i, k in enumerate(KEEPS):
        m = fast[i]
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert int(m.sum()) == kept_count(scores.size, k), (scores.shape, k)
        if ref is not None:
            np.testing.assert_array_equal(m, ref[i], err_msg=f"k={k}")
        np.testing.assert_array_equal(m, np_topk_mask(scores, k), err_msg=f"k={k}")
        if 0 < m.sum() < m.size:  # every kept |s| >= every dropped |s|
            assert a[m == 1].min() >= a[m == 0].max()
    return fast


def np_topk_mask(scores, k):
    """Independent float64 numpy reference: stable sort of -|s|, ties to the lower flat index."""
    s = np.abs(np.asarray(scores, np.float64)).reshape(-1)
    count = s.size - int((1.0 - k) * s.size)
    order = np.argsort(-s, kind="stable")
    mask = np.zeros(s.size)
    mask[order[:count]] = 1
    return mask.reshape(np.shape(scores))


# ---------------------------------------------------------------- kept_count


def test_kept_count_formula():
    for n in (1, 2, 3, 7, 10, 99, 100, 1000, 12345, 36864):
        for k in KEEPS + (0.25, 0.33, 0.9):
            c = kept_count(n, k)
            assert c == n - int((1 - k) * n)
            assert 1 <= c <= n


def test_kept_count_hand_values():
    assert kept_count(10, 0.3) == 3
    assert kept_count(100, 0.3) == 30
    assert kept_count(7, 0.5) == 4  # 7 - int(3.5)
    assert kept_count(1, 0.01) == 1
    assert kept_count(2, 0.5) == 1
    assert kept_count(36864, 1.0) == 36864
    assert kept_count(1000, 0.01) == 10


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 1.0000001, "abc", None, float("nan")])
def test_bad_keep_fraction_raises(bad):
    for fn in (lambda: kept_count(10, bad), lambda: topk_mask(jnp.ones(4), bad),
               lambda: topk_mask_forward(jnp.ones(4), bad), lambda: masking.check_keep_fraction(bad)):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            fn()


# ---------------------------------------------------------------- exact counts / reference


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_topk_exact_count_and_matches_reference(shape):
    n = int(np.prod(shape))
    scores = jax.random.normal(jax.random.PRNGKey(n), shape)
    check_all_k(scores, jnp_reference=n <= 1000)
    # the single-call API agrees with the stacked one
    np.testing.assert_array_equal(np.asarray(topk_mask_forward(scores, 0.3)),
                                  np_topk_mask(scores, 0.3))


@pytest.mark.parametrize("kind", ["small_ints", "all_equal", "zeros", "two_values", "signed_ints"])
def test_topk_heavy_ties(kind):
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 1000):  # sizes shared with SHAPES: compiled once
        if kind == "small_ints":
            s = rng.integers(0, 4, size=n).astype(np.float32)
        elif kind == "signed_ints":
            s = rng.integers(-3, 4, size=n).astype(np.float32)  # |s| ties between +/- values
        elif kind == "all_equal":
            s = np.full(n, 0.37, np.float32)
        elif kind == "zeros":
            s = np.zeros(n, np.float32)
        else:
            s = np.where(rng.random(n) < 0.5, 1.0, -2.0).astype(np.float32)
        check_all_k(s)


def test_topk_ties_go_to_lower_index():
    s = jnp.array([1.0, 5.0, 1.0, 1.0, 5.0, 1.0, 0.5, 1.0, 1.0, 1.0])
    # k=0.5 keeps 5: the two 5s, then the first three 1s (flat indices 0, 2, 3)
    m = np.asarray(topk_mask_forward(s, 0.5))
    np.testing.assert_array_equal(m, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    # all equal: the first count entries
    m = np.asarray(topk_mask_forward(jnp.zeros((3, 4)), 0.25))
    np.testing.assert_array_equal(m.reshape(-1), [1, 1, 1] + [0] * 9)


def test_topk_hand_example_uses_abs():
    s = jnp.array([0.1, -3.0, 2.0, -0.5, 0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(topk_mask_forward(s, 0.5)), [0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(topk_mask_forward(s, 0.34)), [0, 1, 1, 0, 0, 1])  # 6-int(3.96)=3
    np.testing.assert_array_equal(np.asarray(topk_mask_forward(s, 0.2)), [0, 1, 1, 0, 0, 0])  # 6-int(4.8)=2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_random_and_negative_scores(dtype):
    for seed, n in enumerate((100, 1000)):
        s = (jax.random.normal(jax.random.PRNGKey(seed), (n,)) * 3).astype(dtype)
        m_pos = check_all_k(jnp.abs(s))
        m_neg = check_all_k(-jnp.abs(s))
        m_mix = check_all_k(s)
        # the mask depends on |s| only
        np.testing.assert_array_equal(m_pos, m_neg)
        np.testing.assert_array_equal(m_pos, m_mix)
    # bf16 has few distinct values: many ties, still exact
    s = jnp.round(jax.random.normal(jax.random.PRNGKey(9), (1000,)) * 8).astype(dtype) / 8
    check_all_k(s)


def test_topk_inf_values():
    s = np.array(jax.random.normal(jax.random.PRNGKey(3), (100,)), np.float32)
    s[[3, 10, 40]] = np.inf
    s[[7, 20]] = -np.inf
    s[[30, 31]] = np.finfo(np.float32).max
    masks = check_all_k(s)
    # k=0.05 keeps 5: exactly the five infinities (not in KEEPS: use the direct call)
    m = np.asarray(topk_mask_forward(jnp.asarray(s), 0.05))
    np.testing.assert_array_equal(np.flatnonzero(m), [3, 7, 10, 20, 40])
    assert masks[KEEPS.index(0.1)][[3, 7, 10, 20, 40, 30, 31]].sum() == 7


def test_topk_subnormal_and_tiny_values():
    s = np.zeros(100, np.float32)
    s[:8] = [1e-45, 2e-45, 1e-40, 0.0, -1e-44, 1e-38, 3e-45, -0.0]
    # only the numpy reference: XLA's CPU sort flushes subnormals to zero, so topk_mask_reference
    # sees them all as ties of 0, while the fast bit-pattern search orders them exactly.
    check_all_k(s, jnp_reference=False)


def test_topk_under_jit():
    s = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 16))
    for k in (0.1, 1.0):
        f = jax.jit(lambda x: topk_mask_forward(x, k))
        np.testing.assert_array_equal(np.asarray(f(s)), np.asarray(topk_mask_reference(s, k)))
        g = jax.jit(lambda x: topk_mask(x, k))
        np.testing.assert_array_equal(np.asarray(g(s)), np.asarray(topk_mask_reference(s, k)))


def test_topk_under_vmap():
    batch = jax.random.normal(jax.random.PRNGKey(2), (6, 10, 13))
    batch = batch.at[2].set(jnp.round(batch[2]))  # one member with heavy ties
    for k in (0.01, 0.7):
        out = np.asarray(jax.vmap(lambda s: topk_mask_forward(s, k))(batch))
        out_jit = np.asarray(jax.jit(jax.vmap(lambda s: topk_mask(s, k)))(batch))
        for i in range(batch.shape[0]):
            ref = np_topk_mask(batch[i], k)
            assert out[i].sum() == kept_count(130, k)  # per member, not over the batch
            np.testing.assert_array_equal(out[i], ref)
            np.testing.assert_array_equal(out_jit[i], ref)


# ---------------------------------------------------------------- gradients


def test_topk_gradient_elementwise_loss():
    key_w, key_s, key_c = jax.random.split(jax.random.PRNGKey(4), 3)
    shape = (3, 3, 4, 5)
    w = jax.random.normal(key_w, shape)
    s = jax.random.normal(key_s, shape)
    c = jax.random.normal(key_c, shape)
    for k in (0.1, 0.5, 1.0):
        loss = lambda s_: jnp.sum(c * (w * topk_mask(s_, k)))  # noqa: E731
        g = np.asarray(jax.jit(jax.grad(loss))(s), np.float64)
        ref = np.asarray(c, np.float64) * np.asarray(w, np.float64) * np.sign(np.asarray(s, np.float64))
        np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-7)
        # pruned edges get gradients too
        mask = np_topk_mask(s, k)
        if k < 1:
            assert np.all(np.abs(g[mask == 0]) > 0)


def test_topk_gradient_small_layer_float64_reference():
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    x = jax.random.normal(keys[0], (8, 12))
    w = jax.random.normal(keys[1], (12, 6)) / np.sqrt(12)
    s = jax.random.normal(keys[2], (12, 6))
    c = jax.random.normal(keys[3], (8, 6))
    k = 0.3

    def loss(s_):
        return jnp.sum(c * jnp.tanh(x @ (w * topk_mask(s_, k))))

    loss_and_grad = jax.jit(jax.value_and_grad(loss))
    value, g = loss_and_grad(s)
    g = np.asarray(g, np.float64)
    x64, w64, s64, c64 = (np.asarray(a, np.float64) for a in (x, w, s, c))
    m = np_topk_mask(s64, k)
    y = x64 @ (w64 * m)
    dl_dweff = x64.T @ (c64 * (1 - np.tanh(y) ** 2))
    ref = dl_dweff * w64 * np.sign(s64)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
    # forward value too
    np.testing.assert_allclose(float(value), np.sum(c64 * np.tanh(y)), rtol=1e-5)


def test_topk_gradient_under_vmap():
    w = jax.random.normal(jax.random.PRNGKey(6), (4, 20))
    s = jax.random.normal(jax.random.PRNGKey(7), (4, 20))
    g = jax.vmap(jax.grad(lambda s_, w_: jnp.sum(w_ * topk_mask(s_, 0.5))))(s, w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w * jnp.sign(s)), rtol=1e-6)


# ---------------------------------------------------------------- supermask


def test_supermask_training_samples_depend_on_rng():
    s = jax.random.normal(jax.random.PRNGKey(0), (1000,))
    a = supermask(s, rng=jax.random.PRNGKey(1), train=True)
    b = supermask(s, rng=jax.random.PRNGKey(2), train=True)
    a2 = supermask(s, rng=jax.random.PRNGKey(1), train=True)
    assert set(np.unique(np.asarray(a))) <= {0.0, 1.0}
    assert np.any(np.asarray(a) != np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert a.dtype == s.dtype and a.shape == s.shape


def test_supermask_mean_is_sigmoid():
    s = jnp.linspace(-4.0, 4.0, 17)
    rngs = jax.random.split(jax.random.PRNGKey(3), 4000)
    samples = jax.vmap(lambda r: supermask(s, rng=r, train=True))(rngs)
    mean = np.asarray(samples).mean(axis=0)
    p = 1 / (1 + np.exp(-np.asarray(s, np.float64)))
    # binomial std <= 0.5/sqrt(4000) ~ 0.008; allow ~4.5 sigma
    np.testing.assert_allclose(mean, p, atol=0.035)


def test_supermask_straight_through_gradient():
    s = jax.random.normal(jax.random.PRNGKey(4), (7, 9)) * 2
    c = jax.random.normal(jax.random.PRNGKey(5), (7, 9))
    for seed in (0, 1):
        g = jax.grad(lambda s_: jnp.sum(c * supermask(s_, rng=jax.random.PRNGKey(seed), train=True)))(s)
        s64 = np.asarray(s, np.float64)
        sig = 1 / (1 + np.exp(-s64))
        np.testing.assert_allclose(np.asarray(g), np.asarray(c, np.float64) * sig * (1 - sig),
                                   rtol=1e-5, atol=1e-7)


def test_supermask_eval_modes():
    s = jnp.array([-3.0, -0.5, -0.01, 0.01, 0.5, 3.0, 0.0])
    thr = supermask(s, rng=None, train=False)  # default: threshold
    np.testing.assert_array_equal(np.asarray(thr), np.asarray(s > 0, np.float32))
    thr2 = supermask(s, rng=None, train=False, eval_mode="threshold")
    np.testing.assert_array_equal(np.asarray(thr2), np.asarray(thr))
    exp = supermask(s, rng=None, train=False, eval_mode="expectation")
    np.testing.assert_allclose(np.asarray(exp), 1 / (1 + np.exp(-np.asarray(s, np.float64))), rtol=1e-6)
    smp = supermask(s, rng=jax.random.PRNGKey(0), train=False, eval_mode="sample")
    assert set(np.unique(np.asarray(smp))) <= {0.0, 1.0}


def test_supermask_threshold_equals_positive_scores_for_tiny_scores():
    s = jnp.array([1e-9, 1e-30, -1e-9, 1e-7])
    np.testing.assert_array_equal(np.asarray(supermask(s, rng=None, train=False)),
                                  np.asarray(s > 0, np.float32))


def test_supermask_errors():
    s = jnp.ones((3,))
    with pytest.raises(ValueError, match="rng"):
        supermask(s, rng=None, train=True)
    with pytest.raises(ValueError, match="rng"):
        supermask(s, rng=None, train=False, eval_mode="sample")
    with pytest.raises(ValueError) as e:
        supermask(s, rng=None, train=False, eval_mode="median")
    for mode in ("threshold", "expectation", "sample"):
        assert mode in str(e.value)


def test_layer_mask_dispatches_by_mode():
    from edgepopup_jax.core.masking import layer_mask
    s = jax.random.normal(jax.random.PRNGKey(3), (7, 9))
    np.testing.assert_array_equal(np.asarray(layer_mask(s, "edge_popup", 0.3)),
                                  np.asarray(topk_mask_reference(s, 0.3)))
    np.testing.assert_array_equal(np.asarray(layer_mask(s, "supermask", 0.3)),
                                  np.asarray(s > 0, np.float32))
    with pytest.raises(ValueError, match="edge_popup, supermask"):
        layer_mask(s, "dense", 0.3)
