"""ep.edge_popup on plain Flax models: parity with the hand-written layers, exact kept counts,
the unmatched-parameter policy, and a masked attention against numpy float64."""
from __future__ import annotations

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from edgepopup_jax import models
from edgepopup_jax.core import masking, selection, transform
from edgepopup_jax.core.transform import edge_popup


def flat(tree, sep="/"):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=sep)


class PlainConv4(nn.Module):
    """models.Conv4 written with plain nn.Conv / nn.Dense (no bias), same layer names."""

    width: float = 1.0
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = lambda n: max(1, int(n * self.width))  # noqa: E731
        for i, f in enumerate((64, 64, "M", 128, 128, "M")):
            if f == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.relu(nn.Conv(w(f), (3, 3), use_bias=False, name=f"conv{i - (i > 2)}")(x))
        x = x.reshape((x.shape[0], -1))
        for i in range(2):
            x = nn.relu(nn.Dense(w(256), use_bias=False, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, use_bias=False, name="head")(x)


WIDTH, K = 0.125, 0.3


def _init(model, *args, **kwargs):
    """model.init, jitted (eager, every layer's mask selection dispatches op by op: minutes)."""
    return jax.jit(lambda key, *a: model.init(key, *a, **kwargs))(jax.random.key(0), *args)


def _apply(model, variables, *args, **kwargs):
    return jax.jit(lambda v, *a: model.apply(v, *a, **kwargs))(variables, *args)


def _check_step(hand, plain, variables, x, y, train_kwargs=None):
    """Both models on the same variables, in one jitted program each: the masks, the logits
    (trainer's masks collection or none), the score gradients, the batch_stats updates and one
    SGD step; all compared."""
    tx = optax.sgd(0.5, momentum=0.9)
    train_kwargs = train_kwargs or {}

    def run(model, variables):
        """(the transformed model also without the masks collection: it selects its own)"""
        def loss(params):
            v = selection.with_masks({**variables, "params": params}, model)
            logits, updates = model.apply(v, x, mutable=["batch_stats"], **train_kwargs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, updates)

        (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, _ = tx.update(grads, tx.init(grads), variables["params"])
        stepped = {**variables, "params": optax.apply_updates(variables["params"], changes)}
        out = dict(masks=transform.masks(variables, model), logits=logits, grads=grads,
                   updates=updates, stepped=stepped["params"],
                   after=model.apply(selection.with_masks(stepped, model), x))
        if transform.is_transformed(model):
            out["unmasked"] = model.apply(variables, x, mutable=["batch_stats"], **train_kwargs)[0]
        return out

    got = {name: jax.jit(functools.partial(run, model))(variables)
           for name, model in (("hand", hand), ("plain", plain))}
    hand_out, plain_out = got["hand"], got["plain"]
    assert hand_out["masks"].keys() == plain_out["masks"].keys()
    for name, m in hand_out["masks"].items():
        np.testing.assert_array_equal(plain_out["masks"][name], m)
    for key in ("logits", "unmasked"):
        np.testing.assert_allclose(plain_out[key], hand_out["logits"], rtol=1e-6, atol=1e-6)
    for key in ("grads", "updates", "stepped"):
        for path, g in flat(hand_out[key]).items():
            np.testing.assert_allclose(flat(plain_out[key])[path], g, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{key} {path}")
    np.testing.assert_allclose(plain_out["after"], hand_out["after"], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(flat(plain_out["grads"])["head/scores"]).sum()) > 0
    return {name: (int(m.sum()), m.size) for name, m in plain_out["masks"].items()}


def _check_counts(kept, scope, k):
    if scope == "layer":
        assert kept == {name: (masking.kept_count(n, k), n) for name, (_, n) in kept.items()}
    else:
        total = sum(n for _, n in kept.values())
        assert sum(c for c, _ in kept.values()) == masking.kept_count(total, k)


@functools.lru_cache(maxsize=None)
def _conv4_variables():
    plain = edge_popup(PlainConv4(width=WIDTH), keep_fraction=K, weight_init="signed_constant")
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    return x, _init(plain, x)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_conv4_equals_hand_written(scope):
    hand = models.Conv4(width=WIDTH, keep_fraction=K, mask_scope=scope, weight_init="signed_constant")
    plain = edge_popup(PlainConv4(width=WIDTH), keep_fraction=K, mask_scope=scope,
                       weight_init="signed_constant")
    x, vt = _conv4_variables()
    vh = jax.eval_shape(hand.init, jax.random.key(0), x)
    # The same layout: scores in params, kernels in frozen, at the same paths and shapes; the
    # transform's own draw is signed constant with the hand-written layers' magnitude per layer.
    assert jax.tree.map(jnp.shape, vh) == jax.tree.map(jnp.shape, vt)
    for path, w in flat(vt["frozen"]).items():
        fan_in = int(np.prod(w.shape[:-1]))
        np.testing.assert_allclose(np.abs(w), math.sqrt(2 / fan_in), rtol=1e-6, err_msg=path)
    kept = _check_step(hand, plain, vt, x, jnp.array([0, 3, 7, 9]))
    assert set(kept) == {"conv0", "conv1", "conv2", "conv3", "fc0", "fc1", "head"}
    _check_counts(kept, scope, K)


class PlainBlock(nn.Module):
    filters: int
    strides: int

    @nn.compact
    def __call__(self, x, train):
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), strides=s, padding=[((k - 1) // 2, k // 2)] * 2, use_bias=False, name=name)
        norm = lambda name: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=0.9, epsilon=1e-5, use_scale=False,
            use_bias=False, name=name)
        y = nn.relu(norm("bn0")(conv(self.filters, 3, self.strides, "conv0")(x)))
        y = norm("bn1")(conv(self.filters, 3, 1, "conv1")(y))
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = norm("shortcut_bn")(conv(self.filters, 1, self.strides, "shortcut_conv")(x))
        return nn.relu(y + x)


class PlainCifarResNet18(nn.Module):
    width: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(int(64 * self.width), (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                    name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 use_scale=False, use_bias=False, name="stem_bn")(x))
        for i in range(4):
            for j in range(2):
                x = PlainBlock(int(64 * 2**i * self.width), 2 if i and not j else 1,
                               name=f"stage{i}_block{j}")(x, train)
        return nn.Dense(10, use_bias=False, name="head")(jnp.mean(x, axis=(1, 2)))


@functools.lru_cache(maxsize=None)
def _resnet_variables():
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    return x, _init(edge_popup(PlainCifarResNet18(width=0.125), keep_fraction=K), x)


@pytest.mark.slow  # 21 layers and BatchNorm: minutes of compiling on a 2-core CPU
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cifar_resnet18_equals_hand_written(scope):
    hand = models.get_model("cifar_resnet18", width=0.125, keep_fraction=K, mask_scope=scope)
    plain = edge_popup(PlainCifarResNet18(width=0.125), keep_fraction=K, mask_scope=scope)
    x, variables = _resnet_variables()
    assert (jax.tree.map(jnp.shape, jax.eval_shape(hand.init, jax.random.key(0), x))
            == jax.tree.map(jnp.shape, variables))
    kept = _check_step(hand, plain, variables, x, jnp.array([1, 2, 3, 4]), {"train": True})
    assert len(kept) == 21
    _check_counts(kept, scope, K)


# A small ViT and a small decoder-only Transformer, as users write them.
class Block(nn.Module):
    dim: int
    heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(nn.LayerNorm(name="ln0")(x),
                                                                          mask=mask)
        y = nn.gelu(nn.Dense(2 * self.dim, name="mlp_in")(nn.LayerNorm(name="ln1")(x)))
        return x + nn.Einsum((2 * self.dim, self.dim), "btf,fd->btd", name="mlp_out")(y)


class TinyViT(nn.Module):
    dim: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (4, 4), strides=4, padding="VALID", name="patch")(x)
        x = x.reshape((x.shape[0], -1, self.dim))
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), x.shape[1:])
        for i in range(2):
            x = Block(self.dim, 2, name=f"block{i}")(x)
        return nn.Dense(10, name="head")(nn.LayerNorm(name="ln")(x[:, 0]))


class TinyLM(nn.Module):
    vocab: int = 17
    dim: int = 8

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (tokens.shape[1], self.dim))
        x = Block(self.dim, 2, causal=True, name="block0")(x)
        return nn.DenseGeneral(self.vocab, name="unembed")(nn.LayerNorm(name="ln")(x))


VIT_KERNELS = {"patch", "head"} | {f"block{i}/{n}" for i in range(2) for n in (
    "attn/query", "attn/key", "attn/value", "attn/out", "mlp_in", "mlp_out")}
LM_KERNELS = {"embed", "unembed", "block0/attn/query", "block0/attn/key", "block0/attn/value",
              "block0/attn/out", "block0/mlp_in", "block0/mlp_out"}


def _models():
    image = jnp.ones((2, 8, 8, 3))
    tokens = jnp.arange(10).reshape(2, 5) % 17
    return {"vit": (TinyViT(), image, VIT_KERNELS, {}),
            "lm": (TinyLM(), tokens, LM_KERNELS, {"embed": True})}


def _kept(variables, model):
    return {name: (int(m.sum()), m.size) for name, m in transform.masks(variables, model).items()}


@pytest.mark.parametrize("name", ["vit", "lm"])
def test_kept_counts_exact(name):
    module, x, kernels, extra = _models()[name]
    layer = edge_popup(module, keep_fraction=0.3, **extra)
    v = _init(layer, x)
    assert {p[: -len("/scores")] for p in flat(v["params"])} == kernels
    assert _kept(v, layer) == {n: (masking.kept_count(s, 0.3), s) for n, (_, s) in _kept(v, layer).items()}

    glob = edge_popup(module, keep_fraction=0.3, mask_scope="global", **extra)
    kept = _kept(v, glob)
    total = sum(s for _, s in kept.values())
    assert sum(k for k, _ in kept.values()) == masking.kept_count(total, 0.3)
    assert len({k / s for k, s in kept.values()}) > 1  # one threshold, not one fraction per layer

    fractions = {"*/attn/*": 0.2, "head": 1.0, "unembed": 0.9, "embed": 0.7}
    per_path = edge_popup(module, keep_fraction=0.4, keep_fractions=fractions, **extra)
    expected = {}
    for n, (_, s) in kept.items():
        k = next((f for p, f in fractions.items() if __import__("fnmatch").fnmatchcase(n, p)), 0.4)
        expected[n] = (masking.kept_count(s, k), s)
    assert _kept(v, per_path) == expected


def test_fans_and_layout_of_matched_kernels():
    """Each kernel drawn from its own fans (signed constant: +-sqrt(2 / fan_in)); unmatched leaves
    frozen at the module's own init; include/exclude choose the layers."""
    module, x, _, _ = _models()["lm"]
    model = edge_popup(module, weight_init="signed_constant", embed=True, exclude="unembed")
    v = _init(model, x)
    frozen = flat(v["frozen"])
    fan_in = {"embed/embedding": 8, "block0/attn/query/kernel": 8, "block0/attn/key/kernel": 8,
              "block0/attn/value/kernel": 8, "block0/attn/out/kernel": 8,
              "block0/mlp_in/kernel": 8, "block0/mlp_out/kernel": 16}
    for path, fan in fan_in.items():
        np.testing.assert_allclose(np.abs(frozen[path]), math.sqrt(2 / fan), rtol=1e-6)
        assert set(np.unique(np.sign(frozen[path]))) == {-1.0, 1.0}
    assert "unembed/scores" not in flat(v["params"])
    plain = _init(module, x)
    np.testing.assert_array_equal(frozen["unembed/kernel"], flat(plain["params"])["unembed/kernel"])
    for path in ("pos_embed", "ln/scale", "block0/attn/query/bias", "block0/ln0/bias"):
        np.testing.assert_array_equal(frozen[path], flat(plain["params"])[path])
    assert set(flat(v["params"])) == {p.rsplit("/", 1)[0] + "/scores" for p in fan_in}
    # Einsum: contracted axes are the fan-in, output-only axes the fan-out, shared ones neither.
    assert transform.kernel_fans(nn.Einsum((2, 3, 4), "bti,hid->bthd"), "kernel", (2, 3, 4)) == (3, 8)
    assert transform.kernel_fans(nn.Einsum((2, 3, 4), "bhi,hid->bhd"), "kernel", (2, 3, 4)) == (3, 4)


@pytest.mark.parametrize("learn", [False, ("*/bias", "cls")])
def test_unmatched_policy_after_a_step(learn):
    module, x, _, _ = _models()["vit"]
    model = edge_popup(module, keep_fraction=0.5, learn_unmatched=learn)
    v = _init(model, x)
    tx = optax.sgd(0.1, momentum=0.9)
    step = jax.jit(transform.train_step(
        model, tx, lambda logits, _, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()))
    new, _, loss, _ = step(v, tx.init(v["params"]), x, jnp.array([1, 2]))
    assert np.isfinite(float(loss))
    for path, w in flat(v["frozen"]).items():
        np.testing.assert_array_equal(flat(new["frozen"])[path], w, err_msg=path)
    learned = {p for p in flat(v["params"]) if not p.endswith("/scores")}
    if learn:
        biases = {p for p in flat(_init(module, x)["params"]) if p.endswith("/bias")}
        assert len(biases) == 2 * 8 + 3  # per block 4 attention, 2 MLP, 2 LayerNorm; patch, ln, head
        assert learned == biases | {"cls"}
        assert "pos_embed" in flat(v["frozen"]) and "block0/ln0/scale" in flat(v["frozen"])
        assert not np.array_equal(flat(new["params"])["head/bias"], flat(v["params"])["head/bias"])
    else:
        assert not learned
    for path, s in flat(v["params"]).items():
        if path.endswith("/scores"):
            assert not np.array_equal(flat(new["params"])[path], s), path


def test_masked_attention_equals_numpy_float64():
    dim, heads, head_dim, k = 6, 2, 4, 0.4
    attn = edge_popup(nn.MultiHeadDotProductAttention(heads, qkv_features=heads * head_dim),
                      keep_fraction=k, weight_init="kaiming_uniform")
    q = jax.random.normal(jax.random.key(1), (2, 5, dim))
    kv = jax.random.normal(jax.random.key(2), (2, 7, dim))
    causal = jnp.tril(jnp.ones((5, 7), bool))[None, None]
    v = _init(attn, q, kv, mask=causal)
    # Non-zero biases, so the test sees them added after the masked kernels.
    v = {**v, "frozen": jax.tree.map(lambda w: w + 0.1 if w.ndim <= 2 else w, v["frozen"])}
    got = _apply(attn, v, q, kv, mask=causal)

    fz, sc = flat(v["frozen"]), flat(v["params"])
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731

    def masked(name):
        s = np.abs(f64(sc[f"{name}/scores"])).ravel()
        order = np.argsort(-s, kind="stable")
        m = np.zeros(s.size)
        m[order[:masking.kept_count(s.size, k)]] = 1
        return f64(fz[f"{name}/kernel"]) * m.reshape(sc[f"{name}/scores"].shape)

    def project(x, name):
        return np.einsum("btd,dhk->bthk", f64(x), masked(name)) + f64(fz[f"{name}/bias"])

    qh, kh, vh = project(q, "query"), project(kv, "key"), project(kv, "value")
    logits = np.einsum("bqhk,bthk->bhqt", qh / np.sqrt(head_dim), kh)
    logits = np.where(np.asarray(causal), logits, np.finfo(np.float32).min)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqt,bthk->bqhk", w, vh)
    expected = np.einsum("bqhk,hkd->bqd", out, masked("out")) + f64(fz["out/bias"])
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-5, atol=2e-6)
    assert {n: int(m.sum()) for n, m in transform.masks(v, attn).items()} == {
        n: masking.kept_count(dim * heads * head_dim, k) for n in ("key", "out", "query", "value")}


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="keep_fraction"):
        edge_popup(TinyViT(), keep_fraction=0.0)
    with pytest.raises(ValueError, match="mask_scope"):
        edge_popup(TinyViT(), mask_scope="model")
    with pytest.raises(ValueError, match="keep_fractions.*mask_scope='layer'"):
        edge_popup(TinyViT(), mask_scope="global", keep_fractions={"head": 0.9})
    with pytest.raises(ValueError, match="keep_fractions"):
        edge_popup(TinyViT(), keep_fractions={"head": 2.0})
    with pytest.raises(ValueError, match="include"):
        edge_popup(TinyViT(), include=3)
    with pytest.raises(ValueError, match="weight_init"):
        edge_popup(TinyViT(), weight_init="glorot")
    with pytest.raises(ValueError, match="methods"):
        edge_popup(TinyViT(), methods=("encode",))


TINY_VIT = dict(dim=16, depth=1, heads=2, mlp_dim=32)


def test_zoo_vit_takes_a_step_of_the_trainer():
    """get_model("vit") through the trainer's own state, step and kept-count check."""
    from edgepopup_jax.configs import default
    from edgepopup_jax.training import input_pipeline, step as step_lib, train

    c = default.get_config()
    c.model = ml_collections.ConfigDict({**c.model.to_dict(), "name": "vit", **TINY_VIT,
                                         "keep_fraction": 0.3, "first_last_keep_fraction": 0.9,
                                         "dense_last": True})
    c.batch_size, c.data.mean, c.data.std = 2, (0.5,) * 3, (0.25,) * 3
    info = input_pipeline.DatasetInfo(10, (32, 32, 3), 100, 10)
    model = train.build_model(c, 10)
    init, step = step_lib.run_of_one(c, info, jax.devices()[:1])
    state = init(0)
    assert "head/kernel" in flat(state.params) and "head/bias" in flat(state.params)
    assert "patch_embed/scores" in flat(state.params) and "cls" in flat(state.frozen)
    assert model.keep_fractions(state.params)["patch_embed"] == 0.9
    assert model.keep_fractions(state.params)["block0/attn/query"] == 0.3
    batch = {"image": np.zeros((2, 32, 32, 3), np.uint8) + np.arange(2, dtype=np.uint8)[:, None, None, None],
             "label": np.array([1, 2], np.int32)}
    new, metrics = step(state, batch)
    assert bool(metrics["finite"])
    rows = train.check_kept_counts(new, model)
    assert {r.name: r.mode for r in rows}["head"] == "dense"
    for path, w in flat(state.frozen).items():
        np.testing.assert_array_equal(flat(new.frozen)[path], w, err_msg=path)
    assert any(not np.array_equal(flat(new.params)[p], v) for p, v in flat(state.params).items())


def test_register_and_zoo_options():
    models.register("my_vit", lambda **options: models.vit(**TINY_VIT, **options))
    with pytest.raises(ValueError, match="registered already"):
        models.register("my_vit", models.vit)
    with pytest.raises(ValueError, match="callable"):
        models.register("other", 3)
    model = models.get_model("my_vit", num_classes=7, keep_fraction=0.25, mask_scope="global")
    assert (model.keep_fraction, model.mask_scope, model.num_classes) == (0.25, "global", 7)
    dense = models.get_model("my_vit", mask="dense")
    shapes = jax.eval_shape(dense.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert "frozen" not in shapes and "head/kernel" in flat(shapes["params"])
    lm = models.get_model("transformer_lm", num_classes=31, dim=16, depth=1, heads=2, mlp_dim=32)
    shapes = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert {p for p in flat(shapes["params"])} >= {"embed/scores", "unembed/scores"}
    with pytest.raises(ValueError, match="supermask"):
        models.get_model("vit", mask="supermask")
    with pytest.raises(ValueError, match="unknown model 'nope'.*my_vit"):
        models.get_model("nope")
    by_path = models.get_model("edgepopup_jax.models.transformed:vit", **TINY_VIT, keep_fraction=0.2)
    assert type(by_path).__name__ == "EdgePopupViT" and by_path.keep_fraction == 0.2
    with pytest.raises(ValueError, match="cannot import"):
        models.get_model("edgepopup_jax.models:no_such_factory")
    del models.MODELS["my_vit"]


def test_library_md_example_runs():
    """The own-loop example of docs/library.md (the README's), as printed there."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
    start = text.index("```python\nimport flax.linen as nn, jax, jax.numpy as jnp, optax, edgepopup_jax")
    code = text[start + len("```python\n"):text.index("```\n", start + 10)]
    assert code.count("\n") <= 15
    namespace = {}
    exec(compile(code, "docs/library.md", "exec"), namespace)  # prints the table
    variables, model = namespace["variables"], namespace["model"]
    assert np.isfinite(float(namespace["value"]))
    assert {n: int(m.sum()) for n, m in transform.masks(variables, model).items()} == {
        "Dense_0": masking.kept_count(3000, 0.3), "Dense_1": masking.kept_count(235200, 0.3)}


def test_subnet_round_trip_of_a_transformed_model(tmp_path):
    """save_subnet(model=...) stores per-path entries; load_subnet(path, module=...) rebuilds
    the user's plain module, whose logits equal the trainer's eval logits (W * mask folded)
    bit for bit."""
    from edgepopup_jax import subnet

    module, x, kernels, _ = _models()["vit"]
    model = edge_popup(module, keep_fraction=0.3, learn_unmatched=("*/bias",),
                       weight_init="signed_constant")
    v = _init(model, x)
    v = {**v, "params": jax.tree.map(lambda a: a + 0.01 * jnp.arange(a.size).reshape(a.shape),
                                     v["params"])}  # trained-like scores and biases
    path = tmp_path / "vit.subnet"
    stats = subnet.save_subnet(path, model=model, variables=v)
    kept = {n: int(m.sum()) for n, m in transform.masks(v, model).items()}
    leaf = lambda n: n + ("/kernel" if n != "embed" else "/embedding")  # noqa: E731
    assert stats["kept_per_layer"] == {leaf(n): k for n, k in kept.items()}
    assert set(kept) == kernels
    for given in (module, model):
        plain, loaded = subnet.load_subnet(path, module=given)
        assert type(plain) is type(module) and "frozen" not in loaded
        np.testing.assert_array_equal(
            _apply(plain, loaded, x),
            _apply(model, selection.with_masks(v, model, fold=True), x))
    assert subnet.read_subnet(path).model_name == "module:TinyViT"
    with pytest.raises(ValueError, match="pass module="):
        subnet.load_subnet(path)


def test_a_transformed_submodule():
    """Inside a parent module: only the child's kernels are masked, at the child's paths."""
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = edge_popup(MLP(parent=None), keep_fraction=0.5, name="inner")(x)
            return nn.Dense(2, name="proj")(y)

    class Adopted(nn.Module):
        @nn.compact
        def __call__(self, x):
            return edge_popup(MLP(name="inner"))(x)

    x = jnp.ones((2, 3))
    v = _init(Outer(), x)
    assert set(flat(v["params"])) == {"inner/Dense_0/scores", "inner/Dense_1/scores",
                                      "proj/kernel", "proj/bias"}
    assert set(flat(v["frozen"])) == {"inner/Dense_0/kernel", "inner/Dense_0/bias",
                                      "inner/Dense_1/kernel", "inner/Dense_1/bias"}
    # The child's output is its plain module's on W * mask.
    masked = {"params": {n: {"kernel": v["frozen"]["inner"][n]["kernel"] * masking.topk_mask(
        v["params"]["inner"][n]["scores"], 0.5), "bias": v["frozen"]["inner"][n]["bias"]}
        for n in ("Dense_0", "Dense_1")}}
    expected = nn.Dense(2).apply({"params": v["params"]["proj"]}, MLP().apply(masked, x))
    np.testing.assert_allclose(_apply(Outer(), v, x), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="parent=None"):
        Adopted().init(jax.random.key(0), x)


def test_iterand_and_finetune_leave_unmasked_frozen_leaves_alone():
    """A transformed model's frozen bias beside a masked kernel, and a frozen LayerNorm: IteRand
    redraws only the kernel's pruned weights; fine-tuning's mask is zero for the others."""
    from edgepopup_jax.training import finetune, iterand

    w, fresh = jnp.arange(6.0).reshape(2, 3) + 1, -jnp.ones((2, 3))
    mask = jnp.array([[1.0, 0, 0], [0, 1, 0]])
    frozen = {"l": {"kernel": w, "bias": jnp.ones(3)}, "ln": {"scale": jnp.ones(3)}}
    fresh_tree = {"l": {"kernel": fresh, "bias": jnp.zeros(3)}, "ln": {"scale": jnp.zeros(3)}}
    out = iterand.redraw(frozen, {"l": {"scores": mask}}, fresh_tree, jax.random.key(0),
                         mode="manual", rate=1.0, lam=0.0, mu=1.0)
    np.testing.assert_array_equal(out["l"]["kernel"], jnp.where(mask > 0, w, fresh))
    np.testing.assert_array_equal(out["l"]["bias"], jnp.ones(3))
    np.testing.assert_array_equal(out["ln"]["scale"], jnp.ones(3))
    kernel_masks = finetune.kernel_masks({"l": {"scores": mask}}, frozen)
    np.testing.assert_array_equal(kernel_masks["l"]["kernel"], mask)
    np.testing.assert_array_equal(kernel_masks["l"]["bias"], jnp.zeros(3))
    np.testing.assert_array_equal(kernel_masks["ln"]["scale"], jnp.zeros(3))


def test_subnet_of_a_registered_transformed_model(tmp_path):
    """The export command's path (save_subnet(model_name="vit", ...)) for a zoo model built with
    the transform; load_subnet(path) then needs no module: the registry gives the plain ViT."""
    from edgepopup_jax import subnet
    from edgepopup_jax.models.vit import ViT

    options = dict(TINY_VIT, keep_fraction=0.3, mask_scope="global")
    model = models.get_model("vit", **options)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    v = _init(model, x)
    subnet.save_subnet(tmp_path / "vit.subnet", model_name="vit", model_options=options, variables=v)
    plain, loaded = subnet.load_subnet(tmp_path / "vit.subnet", expect_model="vit")
    assert type(plain) is ViT
    np.testing.assert_array_equal(_apply(plain, loaded, x),
                                  _apply(model, selection.with_masks(v, model, fold=True), x))


def test_transformed_vit_trains_with_a_schedule_iterand_and_finetune(tmp_path):
    """The zoo's vit (tiny, through config overrides) in the trainer's group path with a
    keep-fraction schedule, IteRand and fine-tuning together, on the MNIST-5k digits held on
    the device: exact kept counts at the end, the scores fixed while fine-tuning, the frozen
    weights untouched by the scores' phase, and the exported subnet scoring as the trainer did."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from edgepopup_jax.subnet import evaluate, export
    from edgepopup_jax.training import checkpoint as ckpt_lib, loop
    from tests.test_parallel import config, one_device

    c = config(**{"model.name": "vit", "model.dim": 16, "model.depth": 1, "model.heads": 2,
                  "model.mlp_dim": 32, "model.patch": 4, "model.keep_fraction": 0.3,
                  "model.keep_fraction_anneal_epochs": 4 / 62, "model.rerand_every": 3,
                  "model.rerand_rate": 0.2, "num_train_steps": 6, "finetune_epochs": 3 / 62,
                  "checkpoint_every_steps": 3, "keep_checkpoints": None, "eval_every_steps": 9})
    workdir = str(tmp_path / "vit")
    result = loop.train_group([c], [workdir], devices=one_device())[0]
    assert np.all(np.isfinite([h["loss"] for h in result["train_history"]]))
    assert result["step"] == result["total_steps"] == 9
    assert result["finetune"]["steps"] == 3 and result["finetune"]["from_step"] == 6
    assert result["iterand"] is not None and result["keep_fraction_schedule"] is not None
    layers = {row["name"]: row for row in result["layers"]}
    assert "block0/attn/query" in layers and "head" in layers and "patch_embed" in layers
    for row in result["layers"]:
        assert row["kept"] == masking.kept_count(row["total"], 0.3), row

    def state(step):
        checkpointer = ckpt_lib.Checkpointer(str(pathlib.Path(workdir) / "checkpoints"))
        raw, _ = checkpointer.restore_raw(step)
        checkpointer.close()
        return raw

    first, scores_end, tuned = state(3), state(6), state(9)
    for path, value in flat(scores_end["params"]).items():  # fine-tuning: the mask is fixed
        np.testing.assert_array_equal(flat(tuned["params"])[path], value, err_msg=path)
    for path in ("cls", "pos_embed", "block0/ln_attn/scale", "head/bias"):  # not by the scores
        np.testing.assert_array_equal(flat(scores_end["frozen"])[path], flat(first["frozen"])[path])
    subnet = str(tmp_path / "vit.subnet")
    export.export(workdir, subnet)
    metrics, _ = evaluate.evaluate(c, subnet_path=subnet, devices=one_device())
    assert metrics["count"] == 1000 and metrics["top1"] == result["eval"]["top1"]
