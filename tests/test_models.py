"""Tests of edgepopup_jax.models: exact weight counts of the paper's models, collections, forward passes.

Big models are only traced (jax.eval_shape): nothing is compiled or allocated for them.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from edgepopup_jax.models import MODEL_NAMES, ResNet, get_model

KEY = jax.random.PRNGKey(0)
MNIST = (1, 28, 28, 1)
CIFAR = (1, 32, 32, 3)
IMAGENET = (1, 224, 224, 3)

# (name, input shape, num_classes, conv + linear weights, masked layers): REFERENCE.md
COUNTS = [
    ("fc", MNIST, 10, 266_200, 3),
    ("conv2", CIFAR, 10, 4_300_992, 5),
    ("conv4", CIFAR, 10, 2_425_024, 7),
    ("conv6", CIFAR, 10, 2_261_184, 9),
    ("conv8", CIFAR, 10, 5_275_840, 11),
    ("cifar_resnet18", CIFAR, 10, 11_164_352, 21),
    ("resnet18", IMAGENET, 1000, 11_678_912, 21),
    ("resnet50", IMAGENET, 1000, 25_502_912, 54),
    ("resnet101", IMAGENET, 1000, 44_442_816, 105),
    ("wide_resnet50_2", IMAGENET, 1000, 68_814_016, 54),
    ("wide_resnet101_2", IMAGENET, 1000, 126_747_840, 105),
]


def abstract_init(model, shape, **kwargs):
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros(shape), **kwargs), KEY)


def flat(tree):
    return {"/".join(str(getattr(p, "key", p)) for p in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def size(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_variables(abstract, seed=0):
    """Concrete variables with the abstract structure: normal draws, BN stats mean 0 / var 1."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for k, (path, leaf) in zip(keys, leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "var":
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        elif name == "mean":
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            out.append(jax.random.normal(k, leaf.shape, leaf.dtype) * 0.1)
    return jax.tree.unflatten(jax.tree.structure(abstract), out)


@pytest.mark.parametrize("name,shape,classes,weights,layers", COUNTS, ids=[c[0] for c in COUNTS])
def test_weight_counts(name, shape, classes, weights, layers):
    model = get_model(name, num_classes=classes, keep_fraction=0.3)
    v = abstract_init(model, shape)
    assert size(v["frozen"]) == weights
    params = flat(v["params"])
    frozen = flat(v["frozen"])
    assert all(p.endswith("/scores") for p in params), sorted(params)
    assert len(params) == layers
    assert len(frozen) == layers
    assert {p[: -len("scores")] for p in params} == {p[: -len("kernel")] for p in frozen}
    for p, leaf in params.items():
        assert leaf.shape == frozen[p[: -len("scores")] + "kernel"].shape
        assert leaf.dtype == jnp.float32
    expected_collections = {"params", "frozen"} | ({"batch_stats"} if "resnet" in name else set())
    assert set(v) == expected_collections
    if weights > 20_000_000:
        return  # tracing the big ones twice is slow; their apply is covered by the resnet50 test
    out = jax.eval_shape(lambda v_: model.apply(v_, jnp.zeros(shape)), v)
    assert out.shape == (shape[0], classes) and out.dtype == jnp.float32


def test_other_registered_models_build():
    assert set(MODEL_NAMES) >= {c[0] for c in COUNTS}
    for name in set(MODEL_NAMES) - {c[0] for c in COUNTS} - {"resnet152"}:  # e.g. resnet34
        v = abstract_init(get_model(name, num_classes=1000), (1, 64, 64, 3))
        assert size(v["frozen"]) > 0
        assert all(p.endswith("/scores") for p in flat(v["params"]))


def test_conv4_width_multiplier_two():
    v = abstract_init(get_model("conv4", width=2), CIFAR)
    # convs 3->128->128, pool, 128->256->256, pool; then 8*8*256 -> 512 -> 512 -> 10
    convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256)
    dense = 8 * 8 * 256 * 512 + 512 * 512 + 512 * 10
    assert size(v["frozen"]) == convs + dense == 9_691_520
    assert len(jax.tree.leaves(v["params"])) == 7
    v = abstract_init(get_model("conv4", width=0.5), CIFAR)
    assert size(v["frozen"]) == 9 * (3 * 32 + 32 * 32 + 32 * 64 + 64 * 64) + 8 * 8 * 64 * 128 + 128 * 128 + 128 * 10


@pytest.mark.parametrize("name,shape", [("fc", MNIST), ("conv4", CIFAR), ("cifar_resnet18", CIFAR)])
def test_dense_first_and_last(name, shape):
    base = abstract_init(get_model(name), shape)
    for opts, moved in (({"dense_first": True}, "first"), ({"dense_last": True}, "last"),
                        ({"dense_first": True, "dense_last": True}, "both")):
        v = abstract_init(get_model(name, **opts), shape)
        params, frozen = flat(v["params"]), flat(v["frozen"])
        kernels = [p for p in params if p.endswith("/kernel")]
        n_layers = len(flat(base["params"]))
        assert len(kernels) == (2 if moved == "both" else 1)
        assert len([p for p in params if p.endswith("/scores")]) == n_layers - len(kernels)
        assert len(frozen) == n_layers - len(kernels)
        # same total number of weights, now split between learned and frozen kernels
        assert size(v["frozen"]) + sum(int(np.prod(params[p].shape)) for p in kernels) == size(base["frozen"])
        if moved in ("last", "both"):
            assert "head/kernel" in params and "head/kernel" not in frozen
        if moved in ("first", "both"):
            first = {"fc": "fc0", "conv4": "conv0", "cifar_resnet18": "stem_conv"}[name]
            assert f"{first}/kernel" in params and f"{first}/kernel" not in frozen


@pytest.fixture(scope="module")
def conv4_run():
    """conv4 (k=0.3): variables, input, f32 logits, loss and grads from one compile."""
    model = get_model("conv4", keep_fraction=0.3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    v = jax.tree.map(lambda t: t * 10, random_variables(abstract_init(model, CIFAR)))  # logits O(1)
    labels = jnp.array([1, 7])

    @jax.jit
    def loss_and_grad(params):
        def loss(p):
            logits = model.apply({**v, "params": p}, x, train=True)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (loss, logits), g = loss_and_grad(v["params"])
    return v, x, loss, logits, g


def test_grad_only_scores_conv4(conv4_run):
    v, x, loss, logits, g = conv4_run
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits))) and np.isfinite(float(loss))
    g_flat = flat(g)
    assert len(g_flat) == 7 and all(p.endswith("/scores") for p in g_flat)
    for p, leaf in g_flat.items():
        assert leaf.shape == flat(v["params"])[p].shape
        assert np.all(np.isfinite(np.asarray(leaf)))
        assert np.any(np.asarray(leaf) != 0), p


def test_grad_only_scores_resnet_abstract():
    model = get_model("cifar_resnet18")
    v = abstract_init(model, CIFAR)
    x = jnp.zeros((2, 32, 32, 3))

    def loss(p, rest):
        logits, updates = model.apply({**rest, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits), updates

    rest = {k: val for k, val in v.items() if k != "params"}
    g, updates = jax.eval_shape(jax.grad(loss, has_aux=True), v["params"], rest)
    g_flat = flat(g)
    assert len(g_flat) == 21 and all(p.endswith("/scores") for p in g_flat)
    assert set(updates) == {"batch_stats"}
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(v["batch_stats"])
    # no BN scale/bias anywhere: BN is non-affine
    assert not any("bn" in p for p in flat(v["params"]))


def test_cifar_resnet18_forward_train_and_eval():
    model = get_model("cifar_resnet18", keep_fraction=0.5)
    v = random_variables(abstract_init(model, CIFAR))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))

    @jax.jit
    def run(v_):
        logits, updates = model.apply(v_, x, train=True, mutable=["batch_stats"])
        return logits, updates

    logits, updates = run(v)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    # running statistics moved
    old, new = flat(v["batch_stats"]), flat(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert any(np.any(np.asarray(old[p]) != np.asarray(new[p])) for p in old)


def test_resnet50_tiny_input_forward():
    # traced, not compiled: compiling 54 masked convs costs tens of seconds on 2 CPU cores
    x = jnp.zeros((2, 64, 64, 3))
    model = get_model("resnet50", num_classes=1000, keep_fraction=0.3)
    v = abstract_init(model, (1, 64, 64, 3))
    out = jax.eval_shape(lambda v_: model.apply(v_, x), v)
    assert out.shape == (2, 1000) and out.dtype == jnp.float32
    out, upd = jax.eval_shape(lambda v_: model.apply(v_, x, train=True, mutable=["batch_stats"]), v)
    assert out.shape == (2, 1000) and set(upd) == {"batch_stats"}


def test_conv4_bfloat16_compute(conv4_run):
    v, x, _, y32, _ = conv4_run
    m16 = get_model("conv4", keep_fraction=0.3, compute_dtype="bfloat16")
    a16 = abstract_init(m16, CIFAR)
    assert jax.tree.structure(a16) == jax.tree.structure(v)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(a16))  # stored in f32
    y16 = jax.jit(lambda v_: m16.apply(v_, x, train=True))(v)
    assert y16.dtype == jnp.float32 and y16.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(y16)))
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=0.05 * scale)
    # the convolutions and matmuls really run in bfloat16
    jaxpr = jax.make_jaxpr(lambda v_: m16.apply(v_, x))(v)
    ops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(ops) == 7
    assert all(var.aval.dtype == jnp.bfloat16 for e in ops for var in e.invars)


def test_resnet_bfloat16_compute_is_bf16():
    model = get_model("cifar_resnet18", compute_dtype="bfloat16")
    v = abstract_init(model, CIFAR)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
    jaxpr = jax.make_jaxpr(lambda v_: model.apply(v_, jnp.zeros(CIFAR)))(v)
    ops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(ops) == 21
    assert all(var.aval.dtype == jnp.bfloat16 for e in ops for var in e.invars)
    assert jax.eval_shape(lambda v_: model.apply(v_, jnp.zeros(CIFAR)), v).dtype == jnp.float32


@pytest.mark.parametrize("name,shape", [("cifar_resnet18", CIFAR), ("resnet50", (1, 64, 64, 3))])
def test_dense_resnet_has_affine_bn(name, shape):
    v = abstract_init(get_model(name, mask="dense"), shape)
    assert "frozen" not in v
    params = flat(v["params"])
    assert not any(p.endswith("scores") for p in params)
    kernels = [p for p in params if p.endswith("/kernel")]
    scales = [p for p in params if p.endswith("/scale")]
    biases = [p for p in params if p.endswith("/bias")]
    assert len(kernels) == (21 if name == "cifar_resnet18" else 54)
    n_bn = len(flat(v["batch_stats"])) // 2
    assert len(scales) == n_bn and len(biases) == n_bn and n_bn == len(kernels) - 1  # every conv has a BN
    masked = abstract_init(get_model(name), shape)
    assert size({p: params[p] for p in kernels}) == size(masked["frozen"])


def test_supermask_model_needs_mask_rng():
    model = get_model("conv4", mask="supermask")
    v = abstract_init(model, CIFAR)
    assert all(p.endswith("/scores") for p in flat(v["params"]))
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(Exception, match="mask"):
        jax.eval_shape(lambda v_: model.apply(v_, x, train=True), v)
    out = jax.eval_shape(lambda v_: model.apply(v_, x, train=True, rngs={"supermask": KEY}), v)
    assert out.shape == (1, 10)
    assert jax.eval_shape(lambda v_: model.apply(v_, x), v).shape == (1, 10)  # eval: no rng


def test_get_model_errors():
    with pytest.raises(ValueError) as e:
        get_model("resnet9000")
    for name in ("conv4", "cifar_resnet18", "resnet50", "wide_resnet50_2", "fc"):
        assert name in str(e.value)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            get_model("conv4", keep_fraction=bad)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            get_model("resnet50", keep_fraction=bad)
    with pytest.raises(ValueError):
        get_model("conv4", weight_init="foo")
    with pytest.raises(ValueError):
        get_model("conv4", mask="foo")
    with pytest.raises(ValueError):
        get_model("conv4", not_an_option=3)
    with pytest.raises(ValueError):
        get_model("conv4", num_classes=0)
    with pytest.raises(ValueError):
        get_model("conv4", compute_dtype="float99")


def test_resnet_bn_running_var_option():
    """bn_running_var="unbiased" reaches every BN of a ResNet: each running variance moves by
    n / (n - 1) times the biased one's move, n = batch x height x width at that layer."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    rng = np.random.default_rng(0)
    fill = {"var": np.ones, "mean": np.zeros, "scale": np.ones, "bias": np.zeros}
    runs, v = {}, None
    for kind in ("biased", "unbiased"):  # small and dense: cheap to compile, the same BN code
        model = ResNet(stage_sizes=(1, 1), cifar_stem=True, width=0.125, mask="dense",
                       bn_running_var=kind)
        v = v or jax.tree_util.tree_map_with_path(  # numpy draws: no compile per shape
            lambda p, a: fill.get(p[-1].key, lambda s, d: rng.normal(0, 0.3, s).astype(d))(
                a.shape, a.dtype), abstract_init(model, x.shape))
        _, updates = jax.jit(lambda v_, m=model: m.apply(v_, x, train=True,
                                                         mutable=["batch_stats"]))(v)
        runs[kind] = {p: np.asarray(a, np.float64) for p, a in flat(updates["batch_stats"]).items()
                      if p.endswith("/var")}
    assert len(runs["biased"]) == 6  # stem, 2 x 2 block BNs, 1 shortcut BN
    for path, biased in runs["biased"].items():
        stage = int(path.split("stage")[1][0]) if "stage" in path else 0
        n = 2 * (8 // 2 ** stage) ** 2  # stage i is 8 / 2**i wide (its first conv has the stride)
        np.testing.assert_allclose(runs["unbiased"][path] - 0.9, (biased - 0.9) * n / (n - 1),
                                   rtol=1e-4, atol=3e-7, err_msg=path)
    with pytest.raises(ValueError, match="allowed: unbiased, biased"):
        get_model("cifar_resnet18", bn_running_var="torch")
