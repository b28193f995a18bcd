"""The compact subnetwork file: exact round trips, kept counts, sizes and rejected files."""
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgepopup_jax.core import inits, masking
from edgepopup_jax.core.inits import WEIGHT_INITS
from edgepopup_jax.models import get_model
from edgepopup_jax.subnet import io as subnet

K = 0.3


def _fans(shape):
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return receptive * shape[-2], receptive * shape[-1]


def make_variables(name, weight_init, x_shape, seed=0, **options):
    """Variables as training would leave them: random frozen kernels from the model's init,
    random (tie-free) scores, non-trivial BN statistics. Shapes from eval_shape: no compile."""
    opts = dict(keep_fraction=K, weight_init=weight_init, **options)
    model = get_model(name, **opts)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [p.key for p in path]
        shape = leaf.shape
        if names[0] == "frozen" or (names[0] == "params" and names[-1] == "kernel"):
            # the init's distribution in numpy (no per-shape compiles): the exact std / magnitude
            std = np.float32(inits.weight_std(weight_init, *_fans(shape)))
            if weight_init in ("kaiming_normal", "xavier_normal"):
                return std * rng.standard_normal(shape, np.float32)
            if weight_init == "kaiming_uniform":
                return rng.uniform(-np.sqrt(3) * std, np.sqrt(3) * std, shape).astype(np.float32)
            if weight_init == "signed_constant":
                return np.where(rng.uniform(size=shape) < 0.5, -std, std).astype(np.float32)
            return np.full(shape, std, np.float32)
        if names[-1] == "scores":
            return rng.uniform(-1, 1, shape).astype(np.float32)
        if names[-1] == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if names[-1] == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return (0.1 * rng.normal(size=shape)).astype(np.float32)  # mean, bias

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return opts, jax.tree.map(jnp.asarray, variables)


def apply_fn(name, **options):
    """One compiled apply per architecture (weight_init only matters at init)."""
    return jitted_apply(get_model(name, keep_fraction=K, **options))


def np_topk_mask(scores, k):
    """Independent numpy reference: the kept_count(n, k) largest |scores| (stable on ties)."""
    flat = np.abs(np.asarray(scores)).ravel()
    keep = np.argsort(-flat, kind="stable")[:masking.kept_count(flat.size, k)]
    m = np.zeros(flat.size, bool)
    m[keep] = True
    return m.reshape(np.shape(scores))


_JITTED = {}


def jitted_apply(model):
    """One compiled apply per model configuration (loaded models are new objects each time)."""
    model = model.clone(weight_init="kaiming_normal")  # the init plays no part in apply
    key = repr(model)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(model.apply)
    return _JITTED[key]


def inputs(x_shape, seed=1):
    return jax.random.normal(jax.random.key(seed), x_shape, jnp.float32)


def roundtrip(tmp_path, name, weight_init, x_shape, **options):
    opts, variables = make_variables(name, weight_init, x_shape, **options)
    x = inputs(x_shape)
    original = np.asarray(apply_fn(name, **options)(variables, x))
    path = tmp_path / f"{name}.subnet"
    stats = subnet.save_subnet(path, model_name=name, model_options=opts, variables=variables)
    model, loaded = subnet.load_subnet(path, expect_model=name)
    assert model.mask == "dense" and "frozen" not in loaded
    restored = np.asarray(jitted_apply(model)(loaded, x))  # compare compiled with compiled
    return variables, original, restored, stats, path


CONV4_X = (2, 16, 16, 3)  # with width=0.25 below: fast; the size test uses the full model
RESNET_X = (2, 8, 8, 3)


@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
def test_conv4_roundtrip_bit_exact(tmp_path, weight_init):
    variables, original, restored, stats, path = roundtrip(tmp_path, "conv4", weight_init, CONV4_X,
                                                           width=0.25)
    assert np.abs(original).max() > 0
    np.testing.assert_array_equal(original, restored)
    # kept counts per layer: the file's masks keep exactly kept_count(n, k) weights.
    scores = {"/".join(p): v for p, v in
              __import__("flax").traverse_util.flatten_dict(variables["params"]).items()}
    masks = subnet.subnet_masks(path)
    assert set(masks) == {"conv0", "conv1", "conv2", "conv3", "fc0", "fc1", "head"}
    for layer, m in masks.items():
        s = scores[layer + "/scores"]
        assert int(m.sum()) == masking.kept_count(s.size, K) == stats["kept_per_layer"][layer]
        np.testing.assert_array_equal(m, np_topk_mask(s, K))


@pytest.mark.parametrize("weight_init", ["signed_constant", "kaiming_normal"])
def test_cifar_resnet18_roundtrip_bit_exact(tmp_path, weight_init):
    variables, original, restored, stats, path = roundtrip(tmp_path, "cifar_resnet18", weight_init,
                                                           RESNET_X)
    assert "batch_stats" in variables
    np.testing.assert_array_equal(original, restored)
    assert len(stats["kept_per_layer"]) == 21
    assert all(v == masking.kept_count(int(np.prod(s.shape)), K) for v, s in
               zip(stats["kept_per_layer"].values(), jax.tree.leaves(variables["params"])))


def test_cifar_resnet18_loads_with_non_affine_bn(tmp_path):
    opts, variables = make_variables("cifar_resnet18", "signed_constant", RESNET_X)
    path = tmp_path / "r.subnet"
    subnet.save_subnet(path, model_name="cifar_resnet18", model_options=opts, variables=variables)
    model, loaded = subnet.load_subnet(path)
    assert model.mask == "dense" and model.bn_affine is False
    assert "stem_bn" not in loaded["params"] and "stem_bn" in loaded["batch_stats"]


def test_dense_first_last_and_dense_baseline_roundtrip(tmp_path):
    _, original, restored, stats, _ = roundtrip(tmp_path, "conv4", "signed_constant", CONV4_X,
                                                width=0.25, dense_first=True, dense_last=True)
    np.testing.assert_array_equal(original, restored)
    assert len(stats["kept_per_layer"]) == 5
    # the learned baseline: affine BN with real scale/bias, every kernel dense.
    _, original, restored, _, _ = roundtrip(tmp_path, "cifar_resnet18", "kaiming_normal", RESNET_X,
                                            mask="dense")
    np.testing.assert_array_equal(original, restored)


def test_supermask_threshold_roundtrip(tmp_path):
    opts, variables = make_variables("fc", "kaiming_normal", (2, 28, 28, 1), mask="supermask")
    x = inputs((2, 28, 28, 1))
    original = np.asarray(jax.jit(get_model("fc", **opts).apply)(variables, x))
    path = tmp_path / "fc.subnet"
    stats = subnet.save_subnet(path, model_name="fc", model_options=opts, variables=variables)
    model, loaded = subnet.load_subnet(path)
    np.testing.assert_array_equal(original, np.asarray(jax.jit(model.apply)(loaded, x)))
    kept = sum(int(np.sum(np.asarray(masking.supermask(s, rng=None, train=False)) != 0))
               for s in jax.tree.leaves(variables["params"]))
    assert stats["kept_weights"] == kept
    with pytest.raises(ValueError, match="supermask_eval='threshold'"):
        subnet.save_subnet(tmp_path / "x.subnet", model_name="fc",
                           model_options={**opts, "supermask_eval": "expectation"}, variables=variables)
    assert not (tmp_path / "x.subnet").exists()


def test_pack_unpack_encodings():
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(5, 7)) < 0.4
    for w, enc in [(np.where(rng.uniform(size=(5, 7)) < 0.5, -0.25, 0.25).astype(np.float32), "sign_scale"),
                   (np.full((5, 7), 0.125, np.float32), "constant"),
                   (rng.normal(size=(5, 7)).astype(np.float32), "values")]:
        packed = subnet.pack_layer(w, mask)
        assert packed["encoding"] == enc
        np.testing.assert_array_equal(subnet.unpack_layer(packed), w * mask)
    empty = subnet.pack_layer(np.ones((3,), np.float32), np.zeros((3,), bool))
    np.testing.assert_array_equal(subnet.unpack_layer(empty), np.zeros((3,), np.float32))


def test_size_signed_constant_conv4_is_16x_smaller(tmp_path):
    opts, variables = make_variables("conv4", "signed_constant", (1, 32, 32, 3))
    path = tmp_path / "conv4.subnet"
    stats = subnet.save_subnet(path, model_name="conv4", model_options=opts, variables=variables)
    assert stats["subnet_bytes"] == os.path.getsize(path)
    weights = sum(v.size for v in jax.tree.leaves(variables["frozen"]))
    assert weights == 2_425_024  # the reference's Conv4 count
    assert stats["float32_state_bytes"] == 8 * weights
    assert stats["float32_state_bytes"] / stats["subnet_bytes"] >= 16
    # roughly 1 mask bit + K sign bits per weight
    assert stats["bits_per_masked_weight"] < 1.0 + K + 0.05


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("subnet")
    opts, variables = make_variables("conv4", "kaiming_normal", (1, 8, 8, 3), width=0.25)
    path = tmp / "small.subnet"
    subnet.save_subnet(path, model_name="conv4", model_options=opts, variables=variables)
    return path, path.read_bytes(), variables, opts


def _write(tmp_path, data, name="bad.subnet"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_rejects_truncated(tmp_path, saved):
    _, data, _, _ = saved
    for cut in (0, 5, 30, 60, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated|bad magic"):
            subnet.load_subnet(_write(tmp_path, data[:cut]))
    with pytest.raises(ValueError, match="truncated"):
        subnet.load_subnet(_write(tmp_path, data[:len(data) - 1]))


def test_rejects_corrupt_payload_and_header(tmp_path, saved):
    _, data, _, _ = saved
    for pos in (len(data) - 1, len(data) - 1000, 60):  # payload bytes, then a header byte
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(ValueError, match="corrupt"):
            subnet.load_subnet(_write(tmp_path, bytes(bad)))
    with pytest.raises(ValueError, match="corrupt"):
        subnet.load_subnet(_write(tmp_path, data + b"\x00"))


def test_rejects_bad_magic_and_other_version(tmp_path, saved):
    _, data, _, _ = saved
    with pytest.raises(ValueError, match="bad magic"):
        subnet.load_subnet(_write(tmp_path, b"PK\x03\x04" + data[4:]))
    other = data[:8] + struct.pack("<I", subnet.FORMAT_VERSION + 1) + data[12:]
    with pytest.raises(ValueError, match=f"format version {subnet.FORMAT_VERSION + 1}, "
                                         f"this reader supports {subnet.FORMAT_VERSION}"):
        subnet.load_subnet(_write(tmp_path, other))


def test_rejects_other_architecture(saved):
    path, _, _, _ = saved
    with pytest.raises(ValueError, match="architecture mismatch.*'conv4'.*'cifar_resnet18'"):
        subnet.load_subnet(path, expect_model="cifar_resnet18")
    with pytest.raises(ValueError, match="architecture mismatch.*width"):
        subnet.load_subnet(path, expect_model="conv4", expect_options={"width": 1.0})
    model, _ = subnet.load_subnet(path, expect_model="conv4", expect_options={"width": 0.25})
    assert model.mask == "dense"


def test_failed_save_leaves_no_file(tmp_path, saved):
    _, data, variables, opts = saved
    target = tmp_path / "keep.subnet"
    target.write_bytes(data)
    broken = {"params": variables["params"]}  # no frozen kernels
    with pytest.raises(ValueError, match="no frozen kernel"):
        subnet.save_subnet(target, model_name="conv4", model_options=opts, variables=broken)
    assert target.read_bytes() == data  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["keep.subnet"]  # and no temporary left behind
    with pytest.raises(ValueError, match="unknown model"):
        subnet.save_subnet(tmp_path / "y.subnet", model_name="conv5", model_options=opts, variables=variables)
