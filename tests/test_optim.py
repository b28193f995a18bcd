"""edgepopup_jax.training.optim: learning rates at chosen steps, hand-computed from the reference's
formulas, and weight decay applied to the scores only.

The reference (allenai/hidden-networks, utils/schedulers.py, called at the start of each epoch in
main.py) sets lr = base * (epoch + 1) / warmup during warm-up, then
0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup))) * base.
"""
import math

import jax
import numpy as np
import pytest

from edgepopup_jax.configs.base import get_base
from edgepopup_jax.training import optim


def optim_config(**overrides):
    c = get_base().optim
    for k, v in overrides.items():
        c[k] = v
    return c


def lrs(cfg, total_steps, steps_per_epoch, steps):
    schedule = optim.learning_rate_schedule(cfg, total_steps, steps_per_epoch)
    return np.array([float(schedule(s)) for s in steps])


def cos_lr(base, e, es):
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def test_cosine_set_once_per_epoch():
    """The paper's CIFAR recipe: 0.1, 10 epochs of 4 steps, no warm-up; constant within an epoch."""
    cfg = optim_config(learning_rate=0.1)
    assert cfg.schedule_unit == "epoch" and cfg.warmup_style == "reference"  # the defaults
    steps = [0, 3, 4, 7, 20, 23, 36, 39]
    want = [0.1, 0.1,                                   # epoch 0: cos(0) = 1
            cos_lr(0.1, 1, 10), cos_lr(0.1, 1, 10),     # epoch 1: 0.0975528...
            0.05, 0.05,                                 # epoch 5: cos(pi / 2) = 0
            cos_lr(0.1, 9, 10), cos_lr(0.1, 9, 10)]     # last epoch: 0.0024472..., not 0
    np.testing.assert_allclose(lrs(cfg, 40, 4, steps), want, rtol=1e-6)
    assert abs(cos_lr(0.1, 9, 10) - 0.0024471741852423) < 1e-15


def test_reference_warmup_then_cosine_per_epoch():
    """ImageNet's recipe: 0.256, 5 warm-up epochs, 100 epochs (2 steps each)."""
    cfg = optim_config(learning_rate=0.256, warmup_epochs=5.0)
    steps = [0, 1, 2, 8, 9, 10, 11, 12, 199]
    want = [0.0512, 0.0512,        # epoch 0: 0.256 * 1 / 5, not 0
            0.1024,                # epoch 1: 0.256 * 2 / 5
            0.256, 0.256,          # epoch 4: 0.256 * 5 / 5
            0.256, 0.256,          # epoch 5: the cosine's start, e = 0
            cos_lr(0.256, 1, 95),  # epoch 6
            cos_lr(0.256, 94, 95)]  # epoch 99
    np.testing.assert_allclose(lrs(cfg, 200, 2, steps), want, rtol=1e-6)


def test_per_step_schedules():
    """schedule_unit="step": 100 steps, 10 per epoch, 1 warm-up epoch = 10 steps, cosine over 90."""
    from_zero = optim_config(learning_rate=0.1, warmup_epochs=1.0, schedule_unit="step",
                             warmup_style="from_zero")
    want = [0.0, 0.05, 0.09, 0.1, cos_lr(0.1, 1, 90), 0.05, cos_lr(0.1, 89, 90)]
    np.testing.assert_allclose(lrs(from_zero, 100, 10, [0, 5, 9, 10, 11, 55, 99]), want, rtol=1e-6)
    reference = optim_config(learning_rate=0.1, warmup_epochs=1.0, schedule_unit="step")
    np.testing.assert_allclose(lrs(reference, 100, 10, [0, 4, 9, 10]), [0.01, 0.05, 0.1, 0.1],
                               rtol=1e-6)
    no_warmup = optim_config(learning_rate=0.1, schedule_unit="step")
    np.testing.assert_allclose(lrs(no_warmup, 100, 10, [0, 1, 50, 99]),
                               [0.1, cos_lr(0.1, 1, 100), 0.05, cos_lr(0.1, 99, 100)], rtol=1e-6)


def test_constant_schedule_with_warmup():
    cfg = optim_config(learning_rate=0.5, schedule="constant", warmup_epochs=2.0)
    np.testing.assert_allclose(lrs(cfg, 30, 3, [0, 2, 3, 5, 6, 29]),
                               [0.25, 0.25, 0.5, 0.5, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("schedule_unit", "iteration", "allowed: epoch, step"),
    ("warmup_style", "linear", "allowed: reference, from_zero"),
    ("schedule", "step", "allowed: cosine, constant"),
    ("warmup_epochs", 2.5, "whole number"),
    ("warmup_epochs", -1.0, ">= 0"),
])
def test_bad_schedule_options(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        optim.learning_rate_schedule(optim_config(**{field: value}), 100, 10)
    assert f"optim.{field}" in str(e.value)


def test_weight_decay_reaches_the_scores_only():
    """One real train step of the trainer with SGD, weight decay 0.1 vs 0: the frozen weights
    come back bit-identical, and the scores differ by exactly lr * wd * scores (same gradient)."""
    from edgepopup_jax.configs import default
    from edgepopup_jax.training import input_pipeline, step as step_lib
    lr, wd = 0.1, 0.1
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, (8,)).astype(np.int32)}
    start, out = None, {}
    for decay in (wd, 0.0):
        c = default.get_config()
        c.model.keep_fraction, c.batch_size, c.num_train_steps = 0.5, 8, 10
        c.optim.update(learning_rate=lr, weight_decay=decay, schedule="constant", momentum=0.9)
        c.data.mean, c.data.std = (0.5,), (0.5,)
        init, step = step_lib.run_of_one(c, input_pipeline.get_info(c.data), jax.devices()[:1])
        start = start or init(0)
        out[decay] = step(start, batch)[0]
    decayed, plain = out[wd], out[0.0]
    names = ["/".join(k.key for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(start.params)[0]]
    assert names and all(n.endswith("/scores") for n in names), names  # nothing else trains
    for a, b in zip(jax.tree.leaves(start.frozen), jax.tree.leaves(decayed.frozen)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    for s0, s_wd, s_0 in zip(*(jax.tree.leaves(t.params) for t in (start, decayed, plain))):
        s0, s_wd, s_0 = (np.asarray(a, np.float64) for a in (s0, s_wd, s_0))
        assert not np.array_equal(s_0, s0)  # the gradient moved them
        # s_wd = s0 - lr * (g + wd * s0) and s_0 = s0 - lr * g; float32 rounding of s ~ 1e-7 |s|
        np.testing.assert_allclose(s_wd - s_0, -lr * wd * s0, rtol=1e-4, atol=1e-9)
