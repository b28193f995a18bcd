"""NNX Subnet layers: same outputs as the Linen layers, only scores train."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edgepopup_jax.core import layers as linen_layers
from edgepopup_jax.core import masking, nnx_layers
from edgepopup_jax.core.inits import WEIGHT_INITS

K = 0.3


def _copy_from_linen(nnx_layer, linen_vars):
    nnx_layer.kernel[...] = linen_vars["frozen"]["kernel"]
    nnx_layer.scores[...] = linen_vars["params"]["scores"]


@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
def test_dense_matches_linen(weight_init):
    x = jax.random.normal(jax.random.key(0), (4, 24))
    lin = linen_layers.SubnetDense(16, keep_fraction=K, weight_init=weight_init)
    v = lin.init(jax.random.key(1), x)
    layer = nnx_layers.SubnetDense(24, 16, keep_fraction=K, weight_init=weight_init, rngs=nnx.Rngs(2))
    assert layer.kernel[...].shape == v["frozen"]["kernel"].shape
    assert layer.scores[...].shape == v["params"]["scores"].shape
    _copy_from_linen(layer, v)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(lin.apply(v, x)))
    assert layer.kept() == masking.kept_count(24 * 16, K)


def test_conv_matches_linen_and_init_distribution():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
    kw = dict(keep_fraction=K, weight_init="signed_constant")
    lin = linen_layers.SubnetConv(8, (3, 3), strides=2, padding=[(1, 1), (1, 1)], **kw)
    v = lin.init(jax.random.key(1), x)
    layer = nnx_layers.SubnetConv(6, 8, (3, 3), strides=2, padding=[(1, 1), (1, 1)], rngs=nnx.Rngs(3), **kw)
    # same init functions: the same constant magnitude sqrt(2 / fan_in)
    np.testing.assert_allclose(np.unique(np.abs(np.asarray(layer.kernel[...]))),
                               np.unique(np.abs(np.asarray(v["frozen"]["kernel"]))))
    _copy_from_linen(layer, v)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(lin.apply(v, x)))
    assert layer.kept() == masking.kept_count(3 * 3 * 6 * 8, K)


def test_only_scores_train():
    model = nnx.Sequential(
        nnx_layers.SubnetConv(3, 4, (3, 3), keep_fraction=K, rngs=nnx.Rngs(0)),
        lambda y: y.reshape(y.shape[0], -1),
        nnx_layers.SubnetDense(4 * 6 * 6, 5, keep_fraction=K, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (3, 6, 6, 3))
    labels = jnp.array([0, 1, 2])
    # FrozenWeight is no Param: filters and the optimizer never see it
    params = nnx.state(model, nnx.Param)
    assert {p[-1] for p, _ in nnx.to_flat_state(params)} == {"scores"}
    frozen_before = jax.tree.map(np.array, nnx.state(model, nnx_layers.FrozenWeight))
    assert len(jax.tree.leaves(frozen_before)) == 2
    scores_before = jax.tree.map(np.array, params)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
    assert {p[-1] for p, _ in nnx.to_flat_state(grads)} == {"scores"}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))  # pruned edges get grads too
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    opt.update(model, grads)
    after = nnx.state(model, nnx.Param)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), scores_before, after)
    assert all(jax.tree.leaves(changed))
    frozen_after = nnx.state(model, nnx_layers.FrozenWeight)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), frozen_before, frozen_after)


def test_dense_mode_and_errors():
    layer = nnx_layers.SubnetDense(3, 2, mask="dense", rngs=nnx.Rngs(0))
    assert isinstance(layer.kernel, nnx.Param) and layer.scores is None
    with pytest.raises(ValueError, match="keep_fraction"):
        nnx_layers.SubnetDense(3, 2, keep_fraction=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weight_init"):
        nnx_layers.SubnetConv(3, 2, 3, weight_init="nope", rngs=nnx.Rngs(0))
    sm = nnx_layers.SubnetDense(3, 2, mask="supermask", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs rngs"):
        sm(jnp.ones((1, 3)), train=True)
    assert sm(jnp.ones((1, 3)), train=True, rngs=nnx.Rngs(supermask=1)).shape == (1, 2)


# ----------------------------------------------------------------------------- outputs and gradients

SAMPLE_KEY = jax.random.key(7)


@pytest.fixture
def same_mask_key(monkeypatch):
    """Both APIs derive the supermask key differently (Linen: make_rng, NNX: an Rngs stream); give
    both the same key so their sampled masks, and so outputs and gradients, can be compared."""
    layer_mask = masking.layer_mask

    def with_fixed_key(*args, rng=None, **kwargs):
        return layer_mask(*args, rng=None if rng is None else SAMPLE_KEY, **kwargs)

    monkeypatch.setattr(masking, "layer_mask", with_fixed_key)


def _hand_grad(x, w, scores, g, mask, mode):
    """float64 y = x @ (W * mask) and dL/dS (dL/dW for 'dense') of L = sum(y * g)."""
    x, w, s, g = (np.asarray(a, np.float64) for a in (x, w, scores, g))
    dw_eff = x.T @ g
    if mode == "dense":
        return x @ w, dw_eff
    y = x @ (w * mask)
    if mode == "edge_popup":  # straight-through into |S|
        return y, dw_eff * w * np.sign(s)
    p = 1 / (1 + np.exp(-s))  # supermask: straight-through as if mask = sigmoid(S)
    return y, dw_eff * w * p * (1 - p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["edge_popup", "supermask", "dense"])
def test_dense_outputs_and_gradients_match_linen(same_mask_key, mode, dtype):
    """Training forward and backward, the same frozen weights and scores in both APIs: equal
    outputs and score (dense: kernel) gradients, both equal to a float64 computation."""
    r = np.random.default_rng(0)
    x, g = jnp.asarray(r.normal(size=(5, 12)), jnp.float32), jnp.asarray(r.normal(size=(5, 8)), jnp.float32)
    kw = dict(keep_fraction=K, mask=mode, dtype=dtype)
    lin = linen_layers.SubnetDense(8, **kw)
    v = lin.init(jax.random.key(2), x)
    layer = nnx_layers.SubnetDense(12, 8, rngs=nnx.Rngs(3), **kw)
    name = "kernel" if mode == "dense" else "scores"
    if mode == "dense":
        layer.kernel[...] = v["params"]["kernel"]
        w = v["params"]["kernel"]
    else:
        _copy_from_linen(layer, v)
        w = v["frozen"]["kernel"]

    def linen_loss(params):
        y = lin.apply({**v, "params": params}, x, train=True, rngs={"supermask": jax.random.key(9)})
        return jnp.sum(y.astype(jnp.float32) * g), y

    def nnx_loss(m):
        y = m(x, train=True, rngs=nnx.Rngs(supermask=9))
        return jnp.sum(y.astype(jnp.float32) * g), y

    (_, y_lin), g_lin = jax.value_and_grad(linen_loss, has_aux=True)(v["params"])
    (_, y_nnx), g_nnx = nnx.value_and_grad(nnx_loss, argnums=nnx.DiffState(0, nnx.Param),
                                           has_aux=True)(layer)
    assert y_lin.dtype == y_nnx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y_nnx, np.float32), np.asarray(y_lin, np.float32))
    np.testing.assert_array_equal(np.asarray(getattr(g_nnx, name)[...]), np.asarray(g_lin[name]))

    scores = v["params"].get("scores")
    mask = {"edge_popup": lambda: masking.topk_mask_reference(scores, K),
            "supermask": lambda: jax.random.bernoulli(SAMPLE_KEY, jax.nn.sigmoid(scores)),
            "dense": lambda: None}[mode]()
    if mask is not None:
        assert 0 < int(np.sum(mask)) < mask.size
    y_want, grad_want = _hand_grad(x, w, scores if scores is not None else w, g,
                                   None if mask is None else np.asarray(mask, np.float64), mode)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(y_lin, np.float32), y_want, **tol)
    np.testing.assert_allclose(np.asarray(g_lin[name]), grad_want, **tol)


def test_supermask_conv_sampled_evaluation_matches_linen(same_mask_key):
    """A supermask conv evaluated with a sampled mask (supermask_eval="sample", train=False) in
    bfloat16 compute: equal outputs and score gradients in both APIs."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    kw = dict(mask="supermask", supermask_eval="sample", dtype=jnp.bfloat16)
    lin = linen_layers.SubnetConv(4, (3, 3), strides=2, **kw)
    v = lin.init({"params": jax.random.key(1), "supermask": jax.random.key(2)}, x)
    layer = nnx_layers.SubnetConv(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(3), **kw)
    _copy_from_linen(layer, v)

    def linen_loss(params):
        y = lin.apply({**v, "params": params}, x, rngs={"supermask": jax.random.key(9)})
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    def nnx_loss(m):
        y = m(x, rngs=nnx.Rngs(supermask=9))
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    (loss_lin, y), g_lin = jax.value_and_grad(linen_loss, has_aux=True)(v["params"])
    (loss_nnx, _), g_nnx = nnx.value_and_grad(nnx_loss, argnums=nnx.DiffState(0, nnx.Param),
                                              has_aux=True)(layer)
    assert float(loss_lin) > 0 and float(loss_lin) == float(loss_nnx)
    # the sampled mask, not the threshold one (S > 0), in a float32 convolution
    scores = v["params"]["scores"]
    mask = jax.random.bernoulli(SAMPLE_KEY, jax.nn.sigmoid(scores)).astype(jnp.float32)
    assert np.any(np.asarray(mask) != np.asarray(scores > 0))
    want = jax.lax.conv_general_dilated(x, v["frozen"]["kernel"] * mask, (2, 2), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=3e-2, atol=5e-2)
    np.testing.assert_array_equal(np.asarray(g_nnx.scores[...]), np.asarray(g_lin["scores"]))
    assert np.all(np.isfinite(np.asarray(g_lin["scores"]))) and np.any(np.asarray(g_lin["scores"]))
