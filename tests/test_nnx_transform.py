"""ep.edge_popup_nnx: any nnx.Module -> frozen random weights (FrozenWeight) + scores (nnx.Param).

References are numpy: the top-k by a stable argsort of |S|, W * mask computed by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import edgepopup_jax as ep
from edgepopup_jax.core import inits
from edgepopup_jax.core.masking import kept_count
from edgepopup_jax.core.nnx_layers import FrozenWeight


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 10, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(10, 7, rngs=rngs)])
        self.head = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.blocks[0](jax.nn.relu(self.hidden(x)))))


class Zoo(nnx.Module):
    """One of each maskable layer type, plus a LayerNorm and a position embedding."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((5, 8)))
        self.general = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.einsum = nnx.Einsum("btnh,nhd->btd", (2, 4, 6), rngs=rngs)
        self.conv = nnx.Conv(6, 9, kernel_size=(3,), rngs=rngs)
        self.norm = nnx.LayerNorm(9, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens) + self.pos[...]
        return self.norm(self.conv(self.einsum(self.general(h))))


def _np_topk(scores, k):
    flat = np.abs(np.asarray(scores, np.float32)).reshape(-1)
    mask = np.zeros(flat.size, np.float32)
    mask[np.argsort(-flat, kind="stable")[:kept_count(flat.size, k)]] = 1
    return mask.reshape(np.shape(scores))


def _layers(model):
    return {"hidden": model.hidden, "blocks/0": model.blocks[0], "head": model.head}


def test_layer_scope_kept_counts_and_numpy_masks():
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), keep_fraction=0.3, rngs=nnx.Rngs(1))
    masks = ep.masks(model)
    assert sorted(masks) == ["blocks/0", "head", "hidden"]
    for path, layer in _layers(model).items():
        assert isinstance(layer.kernel, FrozenWeight) and isinstance(layer.scores, nnx.Param)
        assert int(masks[path].sum()) == kept_count(layer.kernel.size, 0.3)
        np.testing.assert_array_equal(np.asarray(masks[path]), _np_topk(layer.scores[...], 0.3))


def test_global_scope_kept_count_and_numpy_mask():
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), keep_fraction=0.25, mask_scope="global",
                              rngs=nnx.Rngs(1))
    masks = ep.masks(model)
    layers = _layers(model)
    order = sorted(layers)  # the selection's order: sorted paths, ties to the earlier layer
    flat = np.concatenate([np.asarray(layers[p].scores[...]).reshape(-1) for p in order])
    expected = _np_topk(flat, 0.25)
    assert expected.sum() == kept_count(flat.size, 0.25)
    got = np.concatenate([np.asarray(masks[p]).reshape(-1) for p in order])
    np.testing.assert_array_equal(got, expected)


def test_keep_fractions_by_path_pattern():
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), keep_fraction=0.5, rngs=nnx.Rngs(1),
                              keep_fractions={"blocks/*": 0.1, "head": 1.0})
    masks = ep.masks(model)
    assert int(masks["hidden"].sum()) == kept_count(60, 0.5) == 30
    assert int(masks["blocks/0"].sum()) == kept_count(70, 0.1) == 7
    assert int(masks["head"].sum()) == 21


def test_output_is_numpy_w_times_mask():
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), keep_fraction=0.4, rngs=nnx.Rngs(1))
    x = np.asarray(jax.random.normal(jax.random.key(2), (5, 6)), np.float64)
    h = x
    for i, layer in enumerate(_layers(model).values()):
        w = np.asarray(layer.kernel[...], np.float64) * _np_topk(layer.scores[...], 0.4)
        h = h @ w + np.asarray(layer.bias[...], np.float64)
        h = np.maximum(h, 0) if i < 2 else h
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x, jnp.float32))), h, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)),
                                  np.asarray(model(x)))


def test_gradient_reaches_only_the_scores_as_edge_popup_defines_it():
    """One Linear, loss = sum(x @ (W * m) + b): dL/dS = (x^T 1) * W * sign(S), by hand."""
    layer = ep.edge_popup_nnx(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), keep_fraction=0.5,
                              rngs=nnx.Rngs(1))
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 4)))
    grads = nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, nnx.Param))(layer)
    leaves = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    assert sorted(leaves) == ["scores"]  # not the kernel, not the (frozen) bias
    w, s = np.asarray(layer.kernel[...]), np.asarray(layer.scores[...])
    expected = (x.T @ np.ones((2, 3))) * w * np.sign(s)
    np.testing.assert_allclose(np.asarray(leaves["scores"][...]), expected, rtol=1e-6)


def test_optax_step_moves_scores_only():
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), keep_fraction=0.5, rngs=nnx.Rngs(1))
    frozen = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, FrozenWeight))}
    scores = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(frozen) == 6 and len(scores) == 3  # 3 kernels + 3 frozen biases; 3 scores
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(2), (8, 6))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2),
                                         argnums=nnx.DiffState(0, nnx.Param))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(2):
        step(model, optimizer)
    for p, v in nnx.to_flat_state(nnx.state(model, FrozenWeight)):
        np.testing.assert_array_equal(np.asarray(v[...]), frozen[p])  # bit-identical
    moved = [not np.array_equal(np.asarray(v[...]), scores[p])
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(moved)


def test_learn_unmatched_patterns_keep_those_params_learned():
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), rngs=nnx.Rngs(1), learn_unmatched=("head/*",))
    assert isinstance(model.head.bias, nnx.Param)
    assert isinstance(model.hidden.bias, FrozenWeight)
    everything = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), rngs=nnx.Rngs(1), learn_unmatched=True)
    assert isinstance(everything.hidden.bias, nnx.Param)


def test_every_layer_type_fans_and_unmatched_policy():
    """signed_constant draws +/- sqrt(2 / fan_in) exactly: each layer's own fan-in."""
    model = ep.edge_popup_nnx(Zoo(nnx.Rngs(0)), keep_fraction=0.5, rngs=nnx.Rngs(1), embed=True,
                              weight_init="signed_constant")
    fans = {"embed": (model.embed.embedding, 8), "general": (model.general.kernel, 8),
            "einsum": (model.einsum.kernel, 2 * 4), "conv": (model.conv.kernel, 3 * 6)}
    masks = ep.masks(model)
    assert sorted(masks) == sorted(fans)
    for path, (weights, fan_in) in fans.items():
        assert isinstance(weights, FrozenWeight)
        np.testing.assert_allclose(np.unique(np.abs(np.asarray(weights[...]))),
                                   [inits.weight_std("signed_constant", fan_in, 1)], rtol=1e-6)
        assert int(masks[path].sum()) == kept_count(weights.size, 0.5)
    for frozen in (model.pos, model.norm.scale, model.norm.bias, model.conv.bias):
        assert isinstance(frozen, FrozenWeight)
    assert model(jnp.zeros((2, 5), jnp.int32)).shape == (2, 5, 9)
    plain = ep.edge_popup_nnx(Zoo(nnx.Rngs(0)), rngs=nnx.Rngs(1))  # embed=False: table frozen
    assert "embed" not in ep.masks(plain) and isinstance(plain.embed.embedding, FrozenWeight)


def test_binary_weights_use_alpha_sign():
    layer = ep.edge_popup_nnx(nnx.Linear(5, 4, use_bias=False, rngs=nnx.Rngs(0)),
                              keep_fraction=0.5, binary_weights=True, rngs=nnx.Rngs(1))
    kernel = np.asarray(layer.kernel[...]) * _np_topk(layer.scores[...], 0.5)
    alpha = np.abs(kernel).sum() / (kernel != 0).sum()
    x = np.eye(5, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), alpha * np.sign(kernel), rtol=1e-6)


def test_bad_input_is_named():
    import flax.linen as linen
    with pytest.raises(ValueError, match="flax.nnx Module.*ep.edge_popup"):
        ep.edge_popup_nnx(linen.Dense(3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="keep_fraction must be in"):
        ep.edge_popup_nnx(MLP(nnx.Rngs(0)), keep_fraction=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"match no maskable layer.*'blocks/0'"):
        ep.edge_popup_nnx(MLP(nnx.Rngs(0)), include="encoder/*", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rngs must be an nnx.Rngs"):
        ep.edge_popup_nnx(MLP(nnx.Rngs(0)), rngs=0)
    with pytest.raises(ValueError, match="has no method 'encode'"):
        ep.edge_popup_nnx(MLP(nnx.Rngs(0)), methods=("encode",), rngs=nnx.Rngs(0))
    model = ep.edge_popup_nnx(MLP(nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already an edge-popup module"):
        ep.edge_popup_nnx(model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="edge_popup_nnx"):
        ep.masks(MLP(nnx.Rngs(0)))
