"""Tests of edgepopup_jax.core.layers: SubnetDense, SubnetConv, NonAffineBatchNorm."""
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from edgepopup_jax.core import layers
from edgepopup_jax.core.layers import NonAffineBatchNorm, SubnetConv, SubnetDense
from edgepopup_jax.core.masking import kept_count


def np_topk_mask(scores, k):
    s = np.abs(np.asarray(scores, np.float64)).reshape(-1)
    count = s.size - int((1.0 - k) * s.size)
    mask = np.zeros(s.size)
    mask[np.argsort(-s, kind="stable")[:count]] = 1
    return mask.reshape(np.shape(scores))


def init_apply(layer, x, **kwargs):
    """(variables, output) from one compiled init + apply (eager calls would compile op by op)."""
    @jax.jit
    def f(key, x_):
        v = layer.init(key, x_)
        return v, layer.apply(v, x_, **kwargs)
    return f(jax.random.PRNGKey(0), x)


def random_variables(layer, x, seed=0):
    """Variables with the structure init gives, filled with normal draws (no compile of init)."""
    structure = shapes(layer, x)
    leaves, treedef = jax.tree.flatten(structure)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def shapes(layer, x):
    """The variables' shapes and dtypes, without running anything."""
    return jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)


# ---------------------------------------------------------------- variable collections


@pytest.mark.parametrize("mask", ["edge_popup", "supermask"])
def test_collections_masked(mask):
    for layer, x in ((SubnetDense(7, mask=mask), jnp.ones((2, 5))),
                     (SubnetConv(6, (3, 3), mask=mask), jnp.ones((1, 4, 4, 3)))):
        v = shapes(layer, x)
        assert set(v) == {"params", "frozen"}
        assert set(v["params"]) == {"scores"}
        assert set(v["frozen"]) == {"kernel"}
        assert v["params"]["scores"].shape == v["frozen"]["kernel"].shape
        assert v["params"]["scores"].dtype == jnp.float32 and v["frozen"]["kernel"].dtype == jnp.float32
    assert v["frozen"]["kernel"].shape == (3, 3, 3, 6)


def test_collections_dense():
    for layer, x in ((SubnetDense(7, mask="dense"), jnp.ones((2, 5))),
                     (SubnetConv(6, (3, 3), mask="dense"), jnp.ones((1, 4, 4, 3)))):
        v = shapes(layer, x)
        assert set(v) == {"params"}
        assert set(v["params"]) == {"kernel"}
    v = shapes(SubnetDense(7, mask="dense", use_bias=True), jnp.ones((2, 5)))
    assert set(v["params"]) == {"kernel", "bias"}


# ---------------------------------------------------------------- forward = lax reference


def test_dense_forward_equals_masked_matmul():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 20))
    ks = (0.1, 0.5, 1.0)
    v, _ = init_apply(SubnetDense(9), x)
    ys = jax.jit(lambda v_, x_: [SubnetDense(9, keep_fraction=k).apply(v_, x_) for k in ks])(v, x)
    w = np.asarray(v["frozen"]["kernel"], np.float64)
    for k, y in zip(ks, ys):
        m = np_topk_mask(v["params"]["scores"], k)
        assert m.sum() == kept_count(180, k)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ (w * m), rtol=1e-5, atol=1e-5)
        assert y.shape == (4, 9) and y.dtype == jnp.float32


def test_dense_batch_dims():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6))
    v, y = init_apply(SubnetDense(4), x)
    w_eff = v["frozen"]["kernel"] * np_topk_mask(v["params"]["scores"], 0.5).astype(np.float32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w_eff), rtol=1e-5, atol=1e-6)


CONV_CASES = [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2),
    dict(kernel_size=(3, 3), strides=(2, 1), padding="VALID"),
    dict(kernel_size=(3, 2), padding=1),
    dict(kernel_size=(3, 3), padding=((1, 2), (0, 1))),
    dict(kernel_size=(3, 3), padding=(2, 0)),
    dict(kernel_size=(3, 3), kernel_dilation=2),
    dict(kernel_size=(3, 3), kernel_dilation=(2, 1), padding="VALID"),
    dict(kernel_size=(1, 1), strides=2),
    dict(kernel_size=(3, 3), feature_group_count=2),
    dict(kernel_size=(3, 3), feature_group_count=4, strides=2, padding="SAME"),
]


def _pad_for_lax(padding):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_forward_equals_lax_conv(case):
    c_in, c_out, k = 4, 8, 0.3
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 8, c_in))
    layer = SubnetConv(c_out, keep_fraction=k, **case)
    v = random_variables(layer, x)
    y = jax.jit(layer.apply)(v, x)
    w = v["frozen"]["kernel"]
    groups = case.get("feature_group_count", 1)
    assert w.shape == tuple(case["kernel_size"]) + (c_in // groups, c_out)
    mask = np_topk_mask(v["params"]["scores"], k).astype(np.float32)
    strides = case.get("strides", 1)
    strides = (strides, strides) if isinstance(strides, int) else strides
    dil = case.get("kernel_dilation", 1)
    dil = (dil, dil) if isinstance(dil, int) else dil
    ref = jax.lax.conv_general_dilated(
        x, w * mask, window_strides=strides, padding=_pad_for_lax(case.get("padding", "SAME")),
        rhs_dilation=dil, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST)
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_conv_same_padding_shape_and_1d():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 10, 3))  # 1 spatial dim
    layer = SubnetConv(5, (3,), strides=2)
    v = random_variables(layer, x)
    y = jax.jit(layer.apply)(v, x)
    assert v["frozen"]["kernel"].shape == (3, 3, 5)
    assert y.shape == (2, 5, 5)
    ref = jax.lax.conv_general_dilated(
        x, v["frozen"]["kernel"] * np_topk_mask(v["params"]["scores"], 0.5).astype(np.float32), (2,), "SAME",
        dimension_numbers=("NWC", "WIO", "NWC"), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_conv_bad_groups_raises():
    with pytest.raises(ValueError, match="feature_group_count"):
        shapes(SubnetConv(8, (3, 3), feature_group_count=3), jnp.ones((1, 4, 4, 4)))


# ---------------------------------------------------------------- gradients


def test_dense_grad_only_scores_and_hand_formula():
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    x = jax.random.normal(keys[0], (5, 12))
    c = jax.random.normal(keys[1], (5, 6))
    layer = SubnetDense(6, keep_fraction=0.3)
    v = random_variables(layer, x)

    def loss(params):
        return jnp.sum(c * layer.apply({**v, "params": params}, x))

    g = jax.jit(jax.grad(loss))(v["params"])
    assert set(g) == {"scores"}
    w = np.asarray(v["frozen"]["kernel"], np.float64)
    s = np.asarray(v["params"]["scores"], np.float64)
    dl_dweff = np.asarray(x, np.float64).T @ np.asarray(c, np.float64)
    np.testing.assert_allclose(np.asarray(g["scores"]), dl_dweff * w * np.sign(s), rtol=1e-4, atol=1e-6)


def test_conv_grad_hand_formula():
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    x = jax.random.normal(keys[0], (2, 6, 6, 3))
    layer = SubnetConv(4, (3, 3), strides=2, keep_fraction=0.5)
    v = random_variables(layer, x)
    c = jax.random.normal(keys[1], (2, 3, 3, 4))

    def loss(params):
        return jnp.sum(c * jnp.tanh(layer.apply({**v, "params": params}, x)))

    g = jax.jit(jax.grad(loss))(v["params"])
    assert set(g) == {"scores"}
    w, s = v["frozen"]["kernel"], v["params"]["scores"]
    mask = np_topk_mask(s, 0.5).astype(np.float32)

    def loss_of_weff(weff):
        y = jax.lax.conv_general_dilated(x, weff, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(c * jnp.tanh(y))

    dl_dweff = np.asarray(jax.grad(loss_of_weff)(w * mask), np.float64)
    ref = dl_dweff * np.asarray(w, np.float64) * np.sign(np.asarray(s, np.float64))
    np.testing.assert_allclose(np.asarray(g["scores"]), ref, rtol=1e-4, atol=1e-6)
    # pruned weights get a gradient too
    assert np.all(np.asarray(g["scores"])[np.asarray(mask) == 0] != 0)


def test_sgd_momentum_keeps_frozen_weights():
    x = jax.random.normal(jax.random.PRNGKey(6), (8, 6, 6, 3))
    layer = SubnetConv(4, (3, 3), keep_fraction=0.5)
    v = random_variables(layer, x)
    frozen0 = jax.tree.map(np.array, v["frozen"])
    scores0 = np.array(v["params"]["scores"])
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9))
    params, frozen = v["params"], v["frozen"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            return jnp.mean((layer.apply({"params": p, "frozen": frozen}, x) - 1.0) ** 2)
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    masks = [np_topk_mask(params["scores"], 0.5)]
    for _ in range(5):
        params, opt_state = step(params, opt_state)
        masks.append(np_topk_mask(params["scores"], 0.5))
    assert set(params) == {"scores"}
    np.testing.assert_array_equal(np.asarray(frozen["kernel"]), frozen0["kernel"])
    assert np.asarray(frozen["kernel"]).tobytes() == frozen0["kernel"].tobytes()
    assert np.any(np.asarray(params["scores"]) != scores0)
    assert all(m.sum() == kept_count(scores0.size, 0.5) for m in masks)
    assert any(np.any(m != masks[0]) for m in masks[1:])  # edges popped up


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, "bfloat16"])
def test_bf16_compute(dtype):
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 16))
    conv32, conv16 = SubnetConv(16, (3, 3)), SubnetConv(16, (3, 3), dtype=dtype)
    dense32, dense16 = SubnetDense(5), SubnetDense(5, dtype=dtype)
    xd = x.reshape(2, -1)

    @jax.jit
    def run(key):
        v, v16, vd = conv32.init(key, x), conv16.init(key, x), dense16.init(key, xd)
        return (v, v16, vd, conv32.apply(v, x), conv16.apply(v, x), dense32.apply(vd, xd),
                dense16.apply(vd, xd))

    v, v16, vd, y32, y16, yd32, yd16 = run(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v16)):
        assert b.dtype == jnp.float32  # stored in float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(vd))
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32 and yd16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32),
                               atol=0.03 * float(jnp.abs(y32).max()))
    np.testing.assert_allclose(np.asarray(yd16, np.float32), np.asarray(yd32),
                               atol=0.03 * float(jnp.abs(yd32).max()))
    assert not np.array_equal(np.asarray(y16, np.float32), np.asarray(y32))  # really computed in bf16


def test_default_dtype_follows_input():
    x = jnp.ones((2, 4), jnp.bfloat16)
    layer = SubnetDense(3)
    v = shapes(layer, x)
    assert v["frozen"]["kernel"].dtype == jnp.float32
    # default: result_type(input, param_dtype) = float32
    assert jax.eval_shape(layer.apply, v, x).dtype == jnp.float32


# ---------------------------------------------------------------- supermask


def test_supermask_layer_needs_rng_and_samples_differ():
    x = jax.random.normal(jax.random.PRNGKey(8), (4, 30))
    layer = SubnetDense(20, mask="supermask")
    v = layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(Exception, match="mask"):
        jax.eval_shape(lambda v_: layer.apply(v_, x, train=True), v)
    y1 = layer.apply(v, x, train=True, rngs={"supermask": jax.random.PRNGKey(1)})
    y2 = layer.apply(v, x, train=True, rngs={"supermask": jax.random.PRNGKey(2)})
    y1b = layer.apply(v, x, train=True, rngs={"supermask": jax.random.PRNGKey(1)})
    assert np.any(np.asarray(y1) != np.asarray(y2))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1b))
    # eval (threshold) needs no rng: W * (S > 0)
    y_eval = layer.apply(v, x, train=False)
    w, s = v["frozen"]["kernel"], v["params"]["scores"]
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(x @ (w * (s > 0))), rtol=1e-5, atol=1e-5)
    # the training forward uses a 0/1 sample of W
    y_exp = SubnetDense(20, mask="supermask", supermask_eval="expectation").apply(v, x)
    np.testing.assert_allclose(np.asarray(y_exp), np.asarray(x @ (w * jax.nn.sigmoid(s))), rtol=1e-5, atol=1e-5)


def test_supermask_layer_grad_straight_through():
    x = jax.random.normal(jax.random.PRNGKey(9), (3, 6))
    layer = SubnetDense(4, mask="supermask")
    v = layer.init(jax.random.PRNGKey(0), x)
    g = jax.grad(lambda p: jnp.sum(layer.apply({**v, "params": p}, x, train=True,
                                               rngs={"supermask": jax.random.PRNGKey(3)})))(v["params"])
    assert set(g) == {"scores"}
    w = np.asarray(v["frozen"]["kernel"], np.float64)
    sig = 1 / (1 + np.exp(-np.asarray(v["params"]["scores"], np.float64)))
    ref = (np.asarray(x, np.float64).T @ np.ones((3, 4))) * w * sig * (1 - sig)
    np.testing.assert_allclose(np.asarray(g["scores"]), ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("cls", [SubnetDense, SubnetConv])
def test_bad_arguments_raise_at_construction(cls):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cls(4, keep_fraction=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cls(4, keep_fraction=1.5)
    with pytest.raises(ValueError) as e:
        cls(4, weight_init="foo")
    assert "kaiming_normal" in str(e.value) and "signed_constant" in str(e.value)
    with pytest.raises(ValueError) as e:
        cls(4, mask="foo")
    for m in layers.MASK_MODES:
        assert m in str(e.value)
    with pytest.raises(ValueError, match="dense"):
        cls(4, use_bias=True)
    with pytest.raises(ValueError, match="dense"):
        cls(4, use_bias=True, mask="supermask")
    with pytest.raises(ValueError) as e:
        cls(4, weight_init_mode="fan_avg")
    assert "fan_in" in str(e.value)
    with pytest.raises(ValueError) as e:
        cls(4, supermask_eval="foo")
    assert "threshold" in str(e.value) and "expectation" in str(e.value)
    cls(4, use_bias=True, mask="dense")  # fine


# ---------------------------------------------------------------- NonAffineBatchNorm


def test_non_affine_batchnorm():
    x = jax.random.normal(jax.random.PRNGKey(10), (16, 5, 5, 6)) * 3.0 + jnp.arange(6.0)
    bn = NonAffineBatchNorm(use_running_average=False)
    v = bn.init(jax.random.PRNGKey(0), x)
    assert set(v) == {"batch_stats"}
    assert set(v["batch_stats"]) == {"mean", "var"}
    y, new = bn.apply(v, x, mutable=["batch_stats"])
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, atol=1e-3)
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["var"]), 0.9 + 0.1 * var, rtol=1e-4)
    # eval mode uses the running statistics
    bn_eval = NonAffineBatchNorm(use_running_average=True)
    y_eval = np.asarray(bn_eval.apply(new, x), np.float64)
    ref = (x64 - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5)
    np.testing.assert_allclose(y_eval, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unbiased", [False, True])
def test_batchnorm_running_var_as_torch_batchnorm2d(unbiased):
    """Two training updates and an eval pass against a float64 hand computation of
    torch.nn.BatchNorm2d(affine=False) (momentum 0.1, eps 1e-5; running_var updated with the
    unbiased batch variance) with unbiased_running_var=True; flax's biased update otherwise."""
    xs = [np.asarray(jax.random.normal(jax.random.PRNGKey(i), (4, 3, 3, 5)) * (2.0 + i) + i,
                     np.float32) for i in (1, 2)]
    bn = NonAffineBatchNorm(use_running_average=False, unbiased_running_var=unbiased)
    v = bn.init(jax.random.PRNGKey(0), xs[0])
    mean, var = np.zeros(5), np.ones(5)  # torch's initial running statistics
    for x in xs:
        y, v = bn.apply(v, x, mutable=["batch_stats"])
        x64 = x.astype(np.float64)
        m, vb = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
        n = x64.size // 5  # 36 values per feature: n / (n - 1) = 1.029
        mean = 0.9 * mean + 0.1 * m
        var = 0.9 * var + 0.1 * (vb * n / (n - 1) if unbiased else vb)
        np.testing.assert_allclose(np.asarray(y), (x64 - m) / np.sqrt(vb + 1e-5), atol=2e-5)
        np.testing.assert_allclose(np.asarray(v["batch_stats"]["mean"]), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v["batch_stats"]["var"]), var, rtol=1e-6)
    bn_eval = NonAffineBatchNorm(use_running_average=True, unbiased_running_var=unbiased)
    y_eval = bn_eval.apply(v, xs[1])
    np.testing.assert_allclose(np.asarray(y_eval), (xs[1] - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-5, atol=1e-5)
