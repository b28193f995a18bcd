"""Issue 18's model options against numpy references: binary weights (biprop), learned BN
affine, the score inits, per-role keep fractions; every default as it was before them."""
import hashlib
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from edgepopup_jax.core import binary, inits, layers, masking, nnx_layers, selection, summary
from edgepopup_jax.models import get_model
from edgepopup_jax.subnet import io as subnet

K = 0.5
TINY = {"fc": ({"width": 0.05}, (2, 6, 6, 1)), "conv2": ({"width": 0.05}, (2, 8, 8, 3)),
        "cifar_resnet18": ({"width": 0.0625, "stage_sizes": (1,)}, (2, 8, 8, 3))}


def np_topk(scores, k):
    flat = np.abs(np.asarray(scores)).ravel()
    keep = np.argsort(-flat, kind="stable")[:masking.kept_count(flat.size, k)]
    m = np.zeros(flat.size, np.float32)
    m[keep] = 1
    return m.reshape(np.shape(scores))


def digest(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()):
        h.update("/".join(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def tiny(name, **options):
    opts, shape = TINY[name]
    model = get_model(name, **opts, **options)
    x = jax.random.normal(jax.random.key(1), shape)
    return model, model.init(jax.random.key(0), x), x


# --------------------------------------------------------------------------------------------
# defaults: bit for bit what the code at the branch point (c261acf) built and computed

# The init variables are integer-like (RNG draws, signed constants): their sha256 (first 16 hex)
# is portable and stays bit-exact. The logits are float32 sums whose order XLA picks per CPU
# (AVX2 vs AVX-512 kernels), so they are stored as values and compared to GOLDEN_RTOL. The
# digits were printed on an AMD EPYC (AVX2) by code whose variables hash equals the branch
# point's (c261acf); its Intel Xeon logits differ from them in the last bits only.
GOLDEN_VARIABLES = {"fc": "946bfc08cabb31b9", "conv2": "9feb05b840ee1ca8",
                    "cifar_resnet18": "8355beeed9c79cb8"}
GOLDEN_LOGITS = {
    "fc": [[-0.03976237, 0.092640184, -0.88736314, 0.0, -0.1092219, -1.0548762, -0.195013,
            0.67019629, 0.39566484, -0.29802802],
           [-0.12182107, 0.28382429, -0.99613702, 0.0, -0.12261043, -1.1841841, -0.59746671,
            0.75234962, 0.44416583, -0.3345606]],
    "conv2": [[0.18177518, -0.17507692, -0.34913307, -0.10570817, -0.10416857, 0.13637747,
               -0.36138633, 0.14957127, -0.15444075, -0.098014154],
              [0.085634105, -0.23051034, -0.40109885, -0.10786177, -0.041551329, 0.025110431,
               -1.117288, -0.2435142, -0.40534618, -0.11001815]],
    "cifar_resnet18": [[0.99509162, 0.22699514, -0.34711367, 0.0, -0.65766788, -0.50931239,
                        -0.18382248, -0.063922845, -0.054684866, 0.19497076],
                       [0.80007738, 0.2771956, -0.48467198, 0.0, -0.58140552, -0.66227382,
                        -0.34853706, 0.093144909, 0.035298187, 0.099386163]]}
GOLDEN_RTOL, GOLDEN_ATOL = 1e-5, 1e-6  # float32 reorderings move these logits by ~1e-7


def folded_logits(model, variables, x):
    return np.asarray(model.apply(selection.with_masks(variables, model, fold=True), x))


@pytest.mark.parametrize("name", list(TINY))
def test_defaults_give_the_branch_points_variables_and_logits(name):
    model, variables, x = tiny(name)
    assert digest(variables) == GOLDEN_VARIABLES[name]
    logits = folded_logits(model, variables, x)
    np.testing.assert_allclose(logits, GOLDEN_LOGITS[name], rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
    # The default score init is the branch point's code path: inits.score_init over each
    # layer's fan_in (passed here as an init function, which the layers use as it is).
    def legacy(key, shape, dtype=jnp.float32):
        return inits.score_init(fan_in=int(np.prod(shape[:-1])))(key, shape, dtype)
    old = model.clone(score_init=legacy)
    old_vars = old.init(jax.random.key(0), x)
    assert digest(old_vars) == digest(variables)
    np.testing.assert_array_equal(folded_logits(old, old_vars, x), logits)  # same machine: bits


@pytest.mark.parametrize("name", list(TINY))
def test_the_logits_golden_is_tight_enough_to_catch_a_perturbed_init(name):
    """Every frozen weight scaled by 1 + 1e-4 cos(i) must fail the golden. (Scaling the scores
    would not do: the top-k mask, and so the folded logits, are invariant to it.)"""
    model, variables, x = tiny(name)
    perturbed = {**variables, "frozen": jax.tree.map(
        lambda w: w * (1 + 1e-4 * jnp.cos(jnp.arange(w.size, dtype=jnp.float32).reshape(w.shape))),
        variables["frozen"])}
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        np.testing.assert_allclose(folded_logits(model, perturbed, x), GOLDEN_LOGITS[name],
                                   rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)


def test_nnx_defaults_are_the_branch_points():
    d = nnx_layers.SubnetDense(5, 3, rngs=nnx.Rngs(0))
    c = nnx_layers.SubnetConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    blob = b"".join(np.asarray(a[...]).tobytes() for a in (d.scores, d.kernel, c.scores, c.kernel))
    assert hashlib.sha256(blob).hexdigest()[:16] == "c967588ec3b3c8a9"


def test_default_score_init_is_inits_score_init():
    key = jax.random.key(3)
    for fan_in in (1, 27, 300):
        np.testing.assert_array_equal(
            inits.score_initializer("kaiming_uniform", fan_in=fan_in)(key, (fan_in, 7)),
            inits.score_init(fan_in=fan_in)(key, (fan_in, 7)))


# --------------------------------------------------------------------------------------------
# binary weights (biprop)

def _dense_case(seed=0, n_in=6, n_out=4, batch=3):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, n_in)).astype(np.float32),
            rng.normal(size=(n_in, n_out)).astype(np.float32),
            rng.uniform(-1, 1, (n_in, n_out)).astype(np.float32),
            rng.normal(size=(batch, n_out)).astype(np.float32))


def test_binary_dense_forward_and_alpha_match_numpy():
    x, w, s, _ = _dense_case()
    layer = layers.SubnetDense(4, keep_fraction=K, binary_weights=True)
    variables = {"params": {"scores": s}, "frozen": {"kernel": w}}
    m = np_topk(s, K)
    alpha = np.sum(np.abs(w * m)) / np.sum(m)
    np.testing.assert_allclose(binary.binary_scale(jnp.asarray(w * m)), alpha, rtol=1e-6)
    w_eff = alpha * np.sign(w) * m
    assert set(np.unique(np.abs(w_eff))) == {0.0, np.float32(alpha)}
    np.testing.assert_allclose(layer.apply(variables, x), x @ w_eff, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["own", "masks"])
def test_binary_gradient_to_the_scores_matches_numpy(path):
    """dL/dS = dL/dW_eff * W * sign(S), with dL/dW_eff from the binary forward (biprop's
    straight-through), through the layer's own mask and through the `masks` collection."""
    x, w, s, g = _dense_case(seed=1)
    model = layers.SubnetDense(4, keep_fraction=K, binary_weights=True)

    def loss(scores):
        variables = {"params": {"scores": scores}, "frozen": {"kernel": w}}
        if path == "masks":
            variables[selection.MASKS] = selection.edge_popup_masks(variables["params"], K)
        return jnp.sum(model.apply(variables, x) * g)

    grad = jax.grad(loss)(jnp.asarray(s))
    expected = (x.T @ g) * w * np.sign(s)  # dL/dW_eff = x^T g
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(grad) == grad.size  # pruned weights get gradients too


def test_binary_conv_gradient_matches_a_finite_difference_free_reference():
    """A conv layer: the binary forward equals the conv with alpha * sign(W) * mask, and the
    score gradient is the plain edge-popup one taken at that kernel (times W)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
    w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    s = rng.uniform(-1, 1, w.shape).astype(np.float32)
    layer = layers.SubnetConv(3, (3, 3), keep_fraction=0.3, binary_weights=True)
    dense_conv = layers.SubnetConv(3, (3, 3), mask="dense")
    m = np_topk(s, 0.3)
    w_eff = (np.sum(np.abs(w * m)) / np.sum(m)) * np.sign(w) * m
    y = layer.apply({"params": {"scores": s}, "frozen": {"kernel": w}}, x)
    np.testing.assert_allclose(y, dense_conv.apply({"params": {"kernel": w_eff}}, x), rtol=1e-5,
                               atol=1e-6)
    g = rng.normal(size=y.shape).astype(np.float32)
    grad_s = jax.grad(lambda sc: jnp.sum(layer.apply(
        {"params": {"scores": sc}, "frozen": {"kernel": w}}, x) * g))(jnp.asarray(s))
    grad_w = jax.grad(lambda k: jnp.sum(dense_conv.apply({"params": {"kernel": k}}, x) * g))(
        jnp.asarray(w_eff))
    np.testing.assert_allclose(grad_s, np.asarray(grad_w) * w * np.sign(s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["conv2", "cifar_resnet18"])
def test_binary_every_kernel_path_gives_the_same_logits(name):
    """The layer's own mask, the `masks` collection and the folded eval kernel: bit for bit."""
    model, variables, x = tiny(name, binary_weights=True, keep_fraction=0.3)
    own = model.apply(variables, x)
    np.testing.assert_array_equal(model.apply(selection.with_masks(variables, model), x), own)
    np.testing.assert_array_equal(model.apply(selection.with_masks(variables, model, fold=True), x), own)
    plain = get_model(name, **TINY[name][0], keep_fraction=0.3)
    assert not np.array_equal(plain.apply(variables, x), own)


def test_binary_nnx_layer_equals_the_linen_layer():
    d = nnx_layers.SubnetDense(6, 4, keep_fraction=K, binary_weights=True, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    linen = layers.SubnetDense(4, keep_fraction=K, binary_weights=True)
    variables = {"params": {"scores": d.scores[...]}, "frozen": {"kernel": d.kernel[...]}}
    np.testing.assert_array_equal(d(x), linen.apply(variables, x))


def test_dense_first_last_layers_stay_real_valued_under_binary_weights():
    model, variables, x = tiny("conv2", binary_weights=True, dense_first=True, dense_last=True)
    assert "kernel" in variables["params"]["conv0"] and "kernel" in variables["params"]["head"]
    assert np.isfinite(model.apply(selection.with_masks(variables, model, fold=True), x)).all()


@pytest.mark.parametrize("mask", ["dense", "supermask"])
def test_binary_weights_without_edge_popup_is_refused_naming_both_fields(mask):
    for build in (lambda: get_model("fc", binary_weights=True, mask=mask),
                  lambda: layers.SubnetDense(3, binary_weights=True, mask=mask),
                  lambda: nnx_layers.SubnetDense(3, 2, binary_weights=True, mask=mask,
                                                 rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=f"binary_weights=True needs mask='edge_popup'.*mask='{mask}'"):
            build()
    with pytest.raises(ValueError, match="binary_weights must be False or True"):
        get_model("fc", binary_weights="yes")


@pytest.mark.parametrize("name, width, shape", [("conv2", 0.05, (2, 8, 8, 3)),
                                                ("fc", 1.0, (2, 28, 28, 1))])
def test_binary_export_loads_to_the_same_logits_at_about_2_bits_per_weight(tmp_path, name, width,
                                                                           shape):
    options = {"width": width, "keep_fraction": 0.3, "binary_weights": True}
    model = get_model(name, **options)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)  # trained-looking scores: tie-free, not the init's
    variables = {**variables, "params": jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape), jnp.float32), variables["params"])}
    trained = jax.jit(model.apply)(selection.with_masks(variables, model, fold=True), x)
    np.testing.assert_array_equal(model.apply(variables, x), trained)
    path = tmp_path / "binary.subnet"
    stats = subnet.save_subnet(path, model_name=name, model_options=options, variables=variables)
    loaded, loaded_vars = subnet.load_subnet(path)
    assert loaded.mask == "dense" and not loaded.binary_weights
    np.testing.assert_array_equal(jax.jit(loaded.apply)(loaded_vars, x), trained)
    sf = subnet.read_subnet(path)
    masked = [e for e in sf.layers if e.kind == "masked"]
    assert masked and all(e.encoding == "sign_scale" for e in masked)  # alpha + 1 sign bit per kept
    for e in masked:  # the stored alpha is the layer's: sum |W * mask| / sum(mask)
        w = np.asarray(variables["frozen"][e.path[0]]["kernel"])
        m = sf.layer_mask(e)
        np.testing.assert_allclose(float.fromhex(e.value), np.abs(w[m]).mean(), rtol=1e-6)
    # 1 mask bit per weight + 1 sign bit per kept weight, + alpha: the payload is 1 + k bits per
    # weight, 1 + 1/k per kept weight; with the header (a few kB), at FC's 266,200 weights,
    # under 1.35 bits per weight (the float32 values: 1 + 32 k = 10.6).
    n, kept = stats["masked_weights"], stats["kept_weights"]
    payload_bits = 8 * (stats["subnet_bytes"] - stats["header_bytes"] - 52)
    assert payload_bits <= n + kept + 8 * 4 * len(masked) + 8 * 8 * len(masked)  # byte padding
    if name == "fc":
        assert stats["bits_per_masked_weight"] < 1.35 and stats["bits_per_kept_weight"] < 4.5


# --------------------------------------------------------------------------------------------
# score inits

@pytest.mark.parametrize("a", [0.05, 1.0, 3.0])
def test_uniform_score_init_fills_minus_a_to_a(a):
    s = np.asarray(inits.score_initializer("uniform", fan_in=50, scale=a)(jax.random.key(0), (200, 50)))
    assert s.min() >= -a and s.max() <= a
    assert s.max() > 0.99 * a and s.min() < -0.99 * a  # the whole range, not a part of it
    assert abs(s.mean()) < 0.02 * a


def test_iterand_score_init_bound_is_sqrt_6_over_fan_in_times_the_scale():
    fan_in = 3 * 3 * 16
    for scale in (1.0, 0.25):
        s = np.asarray(inits.score_initializer("iterand", fan_in=fan_in, scale=scale)(
            jax.random.key(1), (3, 3, 16, 400)))
        bound = scale * math.sqrt(6.0 / fan_in)
        assert s.max() <= bound and s.min() >= -bound and s.max() > 0.99 * bound


def test_score_init_options_reach_every_layer():
    model, variables, _ = tiny("conv2", score_init="uniform", score_init_scale=0.01)
    for layer in variables["params"].values():
        assert np.abs(layer["scores"]).max() <= 0.01
    with pytest.raises(ValueError, match="unknown score_init 'normal'; allowed: kaiming_uniform, uniform, iterand"):
        get_model("fc", score_init="normal")
    with pytest.raises(ValueError, match="score_init_scale must be a number > 0"):
        get_model("fc", score_init_scale=0.0)


# --------------------------------------------------------------------------------------------
# per-role keep fractions

# name -> (layer -> its keep fraction with keep_fraction=0.5, first_last=0.8, linear=0.2)
ROLES = {"fc": {"fc0": 0.8, "fc1": 0.2, "head": 0.8},
         "conv2": {"conv0": 0.8, "conv1": 0.5, "fc0": 0.2, "fc1": 0.2, "head": 0.8},
         "cifar_resnet18": {"stem_conv": 0.8, "head": 0.8}}  # every other layer a conv: 0.5


@pytest.mark.parametrize("name", list(TINY))
def test_first_last_and_linear_keep_fractions_keep_exact_counts_per_layer(name):
    model, variables, x = tiny(name, keep_fraction=0.5, first_last_keep_fraction=0.8,
                               linear_keep_fraction=0.2)
    ks = model.keep_fractions(variables["params"])
    assert ks == {layer: ROLES[name].get(layer, 0.5) for layer in ks}
    rows = summary.layer_stats(variables, ks)
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    for r in rows:
        assert r.kept == masking.kept_count(r.total, ks[r.name])
        assert r.kept == np_topk(flat[r.name + "/scores"], ks[r.name]).sum()
    # The layers' own masks (each layer's keep_fraction, from layer_options) are the same masks.
    np.testing.assert_array_equal(model.apply(variables, x),
                                  model.apply(selection.with_masks(variables, model), x))
    # linear_keep_fraction alone: the dense layers, the last (dense) one included.
    only = model.clone(first_last_keep_fraction=None)
    assert only.keep_fractions(variables["params"])["head"] == 0.2


def test_the_trainers_kept_count_check_uses_each_layers_fraction():
    from edgepopup_jax.training import train

    model, variables, _ = tiny("conv2", first_last_keep_fraction=0.8, linear_keep_fraction=0.2)
    state = train.TrainState(step=0, params=variables["params"], frozen=variables["frozen"],
                             batch_stats={}, opt_state=None, rng=None)
    rows = train.check_kept_counts(state, model)
    assert {r.name: r.kept for r in rows} == {
        r.name: masking.kept_count(r.total, ROLES["conv2"].get(r.name, 0.5)) for r in rows}


@pytest.mark.parametrize("field", ["first_last_keep_fraction", "linear_keep_fraction"])
def test_per_role_keep_fractions_are_refused_with_the_global_scope_and_in_a_layer(field):
    with pytest.raises(ValueError, match=f"{field} needs mask_scope='layer'"):
        get_model("fc", mask_scope="global", **{field: 0.3})
    with pytest.raises(ValueError, match=f"{field} is a model option"):
        layers.SubnetDense(3, **{field: 0.3})
    with pytest.raises(ValueError, match=f"{field}: keep_fraction must be in"):
        get_model("fc", **{field: 0.0})


def test_per_layer_kept_counts_on_the_device_path():
    """parallel.make_group gives each layer its own kept count."""
    from edgepopup_jax.training import parallel

    model, variables, x = tiny("conv2", first_last_keep_fraction=0.8, linear_keep_fraction=0.2)
    fractions = parallel._layer_fractions(model, x.shape[1:])
    sizes = parallel._layer_sizes(model, x.shape[1:])
    flat = flax.traverse_util.flatten_dict(variables["params"])
    paths = selection.score_paths(variables["params"])
    assert fractions == tuple(ROLES["conv2"].get(p[0], 0.5) for p in paths)
    counts = selection.kept_counts(sizes, fractions)
    masks = selection.select_masks_for_counts([flat[p] for p in paths], jnp.asarray(counts))
    assert [int(m.sum()) for m in masks] == list(counts)


# --------------------------------------------------------------------------------------------
# learned BatchNorm affine

def test_bn_affine_scale_and_bias_train_with_the_scores_and_are_decayed():
    from edgepopup_jax.training import optim

    model, variables, x = tiny("cifar_resnet18", bn_affine=True)
    bns = {p[:-1] for p in flax.traverse_util.flatten_dict(variables["batch_stats"])}
    flat = flax.traverse_util.flatten_dict(variables["params"])
    assert bns and all(bn + ("scale",) in flat and bn + ("bias",) in flat for bn in bns)
    default, default_vars, _ = tiny("cifar_resnet18")
    assert not any(p[-1] in ("scale", "bias") for p in flax.traverse_util.flatten_dict(default_vars["params"]))

    labels = jnp.arange(x.shape[0]) % 10

    def loss(params):
        v = selection.with_masks({**variables, "params": params}, model)
        logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels])

    params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 1 else p, variables["params"])  # scale != 1
    grads = jax.grad(loss)(params)
    g = flax.traverse_util.flatten_dict(grads)
    assert all(np.abs(g[bn + (leaf,)]).max() > 0 for bn in bns for leaf in ("scale", "bias"))
    cfg = ml_collections.ConfigDict({"name": "sgd", "momentum": 0.0, "nesterov": False,
                                     "weight_decay": 0.1})
    tx = optim.make_optimizer(cfg, lambda step: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    p, u = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(updates)
    for path in [bn + (leaf,) for bn in bns for leaf in ("scale", "bias")] + [("head", "scores")]:
        # SGD with L2: update = -lr * (grad + wd * param), for BN as for the scores
        np.testing.assert_allclose(u[path], -(g[path] + 0.1 * p[path]), rtol=1e-5, atol=1e-7)


def test_bn_affine_export_round_trips(tmp_path):
    name = "cifar_resnet18"
    options = {**TINY[name][0], "bn_affine": True}
    model, variables, x = tiny(name, bn_affine=True)
    variables = {**variables, "params": jax.tree.map(lambda p: p + 0.3, variables["params"])}
    expected = model.apply(selection.with_masks(variables, model, fold=True), x)
    subnet.save_subnet(tmp_path / "bn.subnet", model_name=name, model_options=options,
                       variables=variables)
    loaded, loaded_vars = subnet.load_subnet(tmp_path / "bn.subnet")
    assert loaded.bn_affine is True
    np.testing.assert_array_equal(loaded.apply(loaded_vars, x), expected)


def test_bn_affine_value_check_and_models_without_bn():
    with pytest.raises(ValueError, match="bn_affine must be None"):
        get_model("cifar_resnet18", bn_affine="yes")
    with pytest.raises(ValueError, match="bn_affine"):  # a conv net has no BatchNorm
        get_model("conv2", bn_affine=True)
