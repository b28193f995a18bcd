"""NNX Subnet layers: same outputs as the Linen layers, only scores train."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edgepopup_jax import layers as linen_layers
from edgepopup_jax import masking, nnx_layers
from edgepopup_jax.inits import WEIGHT_INITS

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
    assert sm(jnp.ones((1, 3)), train=True, rngs=nnx.Rngs(mask=1)).shape == (1, 2)
