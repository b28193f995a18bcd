"""Tests of edgepopup_jax.core.inits: the paper's weight distributions, their scaled variants,
score init."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from edgepopup_jax.core import inits
from edgepopup_jax.core.layers import SubnetConv, SubnetDense

FAN_IN, FAN_OUT = 288, 64  # e.g. a 3x3 conv 32 -> 64 (fan_out = 9 * 64 = 576 in a layer; free here)
BIG = (512, 1024)  # 524,288 samples: std error of a std estimate ~0.1%


def sample(name, mode="fan_in", keep_fraction=None, shape=BIG, seed=0, fan_in=FAN_IN, fan_out=FAN_OUT):
    init = inits.weight_init(name, fan_in=fan_in, fan_out=fan_out, mode=mode, keep_fraction=keep_fraction)
    return np.asarray(init(jax.random.PRNGKey(seed), shape), np.float64)


def expected_std(name, mode, k=None, fan_in=FAN_IN, fan_out=FAN_OUT):
    scale = 1.0 if k is None else k
    if name == "xavier_normal":
        return math.sqrt(2.0 / (scale * (fan_in + fan_out)))
    fan = fan_in if mode == "fan_in" else fan_out
    return math.sqrt(2.0 / (scale * fan))


SCALES = (None, 0.3, 0.5, 0.7)


def test_weight_std_hand_values():
    assert inits.weight_std("kaiming_normal", 288, 64) == pytest.approx(math.sqrt(2 / 288), rel=1e-12)
    assert inits.weight_std("signed_constant", 288, 64, "fan_out") == pytest.approx(math.sqrt(2 / 64), rel=1e-12)
    assert inits.weight_std("xavier_normal", 288, 64) == pytest.approx(math.sqrt(2 / 352), rel=1e-12)
    # scaled: std = gain / sqrt(k * fan); k = fraction KEPT
    assert inits.weight_std("kaiming_normal", 100, 10, keep_fraction=0.3) == pytest.approx(math.sqrt(2 / 30), rel=1e-12)
    assert inits.weight_std("signed_constant", 100, 10, keep_fraction=0.7) == pytest.approx(math.sqrt(2 / 70), rel=1e-12)
    assert inits.weight_std("kaiming_normal", 100, 10, keep_fraction=1.0) == pytest.approx(math.sqrt(2 / 100), rel=1e-12)


@pytest.mark.parametrize("k", SCALES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_signed_constant(mode, k):
    w = sample("signed_constant", mode, k)
    std = np.float32(expected_std("signed_constant", mode, k))
    assert np.all(np.abs(w) == std)  # exactly +/- std, in float32
    frac_pos = np.mean(w > 0)
    assert 0.49 < frac_pos < 0.51
    assert abs(w.mean()) < 0.01 * std


@pytest.mark.parametrize("k", SCALES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_unsigned_constant(mode, k):
    w = sample("unsigned_constant", mode, k, shape=(64, 32))
    assert np.all(w == np.float32(expected_std("unsigned_constant", mode, k)))


@pytest.mark.parametrize("k", SCALES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming_normal(mode, k):
    w = sample("kaiming_normal", mode, k)
    std = expected_std("kaiming_normal", mode, k)
    assert abs(w.std() / std - 1) < 0.03
    assert abs(w.mean()) < 0.01 * std
    # normal, not uniform/constant: ~4.55% beyond 2 sigma, some beyond 3.5 sigma
    assert 0.040 < np.mean(np.abs(w) > 2 * std) < 0.051
    assert np.any(np.abs(w) > 3.5 * std)


@pytest.mark.parametrize("k", SCALES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming_uniform(mode, k):
    w = sample("kaiming_uniform", mode, k)
    std = expected_std("kaiming_uniform", mode, k)
    bound = math.sqrt(3) * std
    assert np.all(np.abs(w) <= bound * (1 + 1e-6))
    assert np.abs(w).max() > 0.999 * bound  # fills its range
    assert abs(w.std() / std - 1) < 0.03
    assert abs(w.mean()) < 0.01 * std


@pytest.mark.parametrize("k", SCALES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_xavier_normal(mode, k):
    w = sample("xavier_normal", mode, k)
    std = math.sqrt(2.0 / ((1.0 if k is None else k) * (FAN_IN + FAN_OUT)))
    assert abs(w.std() / std - 1) < 0.03
    assert abs(w.mean()) < 0.01 * std


def test_scaled_std_is_not_the_reference_mixup():
    # the PyTorch reference scaled by (1 - k) instead of k: only k=0.5 agrees. Here k=0.3 must be
    # sqrt(2 / (0.3 fan)), clearly different from sqrt(2 / (0.7 fan)).
    w = sample("kaiming_normal", keep_fraction=0.3)
    assert abs(w.std() / math.sqrt(2 / (0.3 * FAN_IN)) - 1) < 0.03
    assert abs(w.std() / math.sqrt(2 / (0.7 * FAN_IN)) - 1) > 0.3


def test_different_keys_differ_same_key_repeats():
    a, b, a2 = (sample("kaiming_normal", shape=(16, 16), seed=s) for s in (0, 1, 0))
    assert np.any(a != b)
    np.testing.assert_array_equal(a, a2)


def test_dtype_argument():
    for name in inits.WEIGHT_INITS:
        init = inits.weight_init(name, fan_in=10, fan_out=10)
        assert init(jax.random.PRNGKey(0), (4, 4)).dtype == jnp.float32
        assert init(jax.random.PRNGKey(0), (4, 4), jnp.bfloat16).dtype == jnp.bfloat16


def test_score_init_bounds():
    for fan_in in (9, 288, 4608):
        s = np.asarray(inits.score_init(fan_in=fan_in)(jax.random.PRNGKey(1), BIG), np.float64)
        bound = 1 / math.sqrt(fan_in)
        assert np.all(np.abs(s) <= bound * (1 + 1e-6))
        assert np.abs(s).max() > 0.999 * bound
        assert abs(s.std() / (bound / math.sqrt(3)) - 1) < 0.03  # uniform on [-b, b]
        assert abs(s.mean()) < 0.01 * bound


@pytest.mark.parametrize("bad", ["foo", "kaiming", "Kaiming_Normal", ""])
def test_unknown_weight_init_raises(bad):
    for fn in (lambda: inits.weight_init(bad, fan_in=3, fan_out=3), lambda: inits.weight_std(bad, 3, 3),
               lambda: inits.check_weight_init(bad)):
        with pytest.raises(ValueError) as e:
            fn()
        for name in inits.WEIGHT_INITS:
            assert name in str(e.value)


@pytest.mark.parametrize("bad", ["fan_avg", "in", "FAN_IN"])
def test_unknown_fan_mode_raises(bad):
    with pytest.raises(ValueError) as e:
        inits.weight_init("kaiming_normal", fan_in=3, fan_out=3, mode=bad)
    assert "fan_in" in str(e.value) and "fan_out" in str(e.value)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_scaled_bad_keep_fraction(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        inits.weight_init("kaiming_normal", fan_in=3, fan_out=3, keep_fraction=bad)


# ---------------------------------------------------------------- through the layers


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_subnet_conv_signed_constant_kernel(mode):
    c_in, c_out = 5, 8
    layer = SubnetConv(c_out, (3, 3), weight_init="signed_constant", weight_init_mode=mode)
    v = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, c_in)))
    w = np.asarray(v["frozen"]["kernel"])
    assert w.shape == (3, 3, c_in, c_out)
    fan = 3 * 3 * c_in if mode == "fan_in" else 3 * 3 * c_out
    assert np.all(np.abs(w) == np.float32(math.sqrt(2 / fan)))
    assert np.any(w > 0) and np.any(w < 0)
    # scores: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    s = np.asarray(v["params"]["scores"])
    assert np.all(np.abs(s) <= 1 / math.sqrt(3 * 3 * c_in) + 1e-7)


def test_subnet_conv_grouped_fan_in():
    layer = SubnetConv(8, (3, 3), feature_group_count=2, weight_init="unsigned_constant")
    v = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 6)))
    w = np.asarray(v["frozen"]["kernel"])
    assert w.shape == (3, 3, 3, 8)
    assert np.all(w == np.float32(math.sqrt(2 / (3 * 3 * 3))))  # fan_in = 9 * 6 / 2


@pytest.mark.parametrize("k", [0.3, 0.7])
def test_subnet_scaled_kernel(k):
    layer = SubnetDense(512, weight_init="signed_constant", keep_fraction=k, scale_by_keep_fraction=True)
    v = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 200)))
    w = np.asarray(v["frozen"]["kernel"])
    assert np.all(np.abs(w) == np.float32(math.sqrt(2 / (k * 200))))
    layer = SubnetDense(512, weight_init="kaiming_normal", keep_fraction=k, scale_by_keep_fraction=True)
    w = np.asarray(layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 200)))["frozen"]["kernel"], np.float64)
    assert abs(w.std() / math.sqrt(2 / (k * 200)) - 1) < 0.03
    # without scale_by_keep_fraction the fan is not scaled
    layer = SubnetDense(16, weight_init="signed_constant", keep_fraction=k)
    w = np.asarray(layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 200)))["frozen"]["kernel"])
    assert np.all(np.abs(w) == np.float32(math.sqrt(2 / 200)))
