"""The optimizer and learning-rate schedule from config.optim."""
from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
SCHEDULE_UNITS = ("epoch", "step")  # epoch: the reference's, lr set once per epoch
WARMUP_STYLES = ("reference", "from_zero")  # lr * (i + 1) / W, or lr * i / W


def _check(cfg, field: str, allowed: tuple) -> str:
    value = cfg.get(field, allowed[0])
    if value not in allowed:
        raise ValueError(f"unknown optim.{field} {value!r}; allowed: {', '.join(allowed)}")
    return value


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int,
                           learning_rate=None):
    """Warm-up over warmup_epochs, then cosine to 0 (or constant), as a function of the step.

    With i the index of the current unit (schedule_unit "epoch": i = step // steps_per_epoch, as
    the reference sets its lr at the start of each epoch; "step": i = step), W the warm-up and N
    the run's length in units: lr * (i + 1) / W ("reference" warm-up) or lr * i / W ("from_zero")
    while i < W, then 0.5 * (1 + cos(pi * (i - W) / (N - W))) * lr.
    learning_rate: lr instead of cfg.learning_rate; may be traced (runs of different learning
    rates vmapped in one program).
    """
    schedule = _check(cfg, "schedule", SCHEDULES)
    per_epoch = _check(cfg, "schedule_unit", SCHEDULE_UNITS) == "epoch"
    offset = 1.0 if _check(cfg, "warmup_style", WARMUP_STYLES) == "reference" else 0.0
    unit = steps_per_epoch if per_epoch else 1
    warmup = cfg.warmup_epochs if per_epoch else int(cfg.warmup_epochs * steps_per_epoch)
    if warmup < 0 or (per_epoch and warmup != int(warmup)):
        raise ValueError(f"optim.warmup_epochs must be a whole number >= 0 with schedule_unit "
                         f"'epoch' (>= 0 with 'step'), got {cfg.warmup_epochs}")
    length = max(total_steps / unit - warmup, 1e-9)  # the cosine's length in units
    lr = cfg.learning_rate if learning_rate is None else learning_rate

    def lr_at(step):
        i = (jnp.asarray(step) // unit).astype(jnp.float32)
        if schedule == "constant":
            after = jnp.full_like(i, lr)
        else:
            # = 0.5 * (1 + cos(pi * e / length)), without float32's cancellation near the end
            left = (length - jnp.minimum(i - warmup, length)) / length
            after = lr * jnp.sin(0.5 * math.pi * left) ** 2
        if warmup == 0:
            return after
        return jnp.where(i < warmup, lr * (i + offset) / warmup, after)

    return lr_at


def make_optimizer(cfg: ml_collections.ConfigDict, schedule,
                   weight_decay=None) -> optax.GradientTransformation:
    """SGD (momentum, nesterov) or Adam, with L2 weight decay added to the gradient (as PyTorch's
    SGD weight_decay does), applied to everything in params: the scores, or a baseline's weights.
    weight_decay: instead of cfg.weight_decay, and always applied (so the optimizer state has
    one structure whatever its value); may be traced (vmapped runs of different decays)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name {cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    else:
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if weight_decay is not None:
        return optax.chain(optax.add_decayed_weights(weight_decay), opt)
    if cfg.weight_decay:
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    return opt
