"""The optimizer and learning-rate schedule from config.optim."""
from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
    """Linear warm-up from 0 over warmup_epochs, then cosine to 0 (or constant), per step."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps - warmup, 1))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    """SGD (momentum, nesterov) or Adam, with L2 weight decay added to the gradient (as PyTorch's
    SGD weight_decay does), applied to everything in params: the scores, or a baseline's weights."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name {cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    else:
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.weight_decay:
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    return opt
