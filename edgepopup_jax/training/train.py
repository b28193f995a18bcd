"""What a config means for a data set: the model, the train state, the optimizer and the step
counts, checked before anything is written. The loop that trains it is loop.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from edgepopup_jax.core import masking, summary
from edgepopup_jax.models import get_model
from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import finetune, input_pipeline, iterand, optim, sharding, sparsity


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # what the optimizer trains: scores (and a baseline's learned weights)
    frozen: Any  # the random weights: never given to the optimizer
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step keys are fold_in(rng, step), so resuming is exact

    def variables(self) -> dict:
        """The model's variables, as model.apply takes them."""
        return {"params": self.params, "frozen": self.frozen, "batch_stats": self.batch_stats}


# config.model fields the trainer acts on, not the model: the sparsity schedule, IteRand
TRAINER_MODEL_FIELDS = sparsity.FIELDS + iterand.FIELDS


def model_options(model_config: dict) -> dict:
    """config.model (as a dict) without TRAINER_MODEL_FIELDS: what get_model takes."""
    return {k: v for k, v in dict(model_config).items() if k not in TRAINER_MODEL_FIELDS}


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    options = {k: tuple(v) if isinstance(v, list) else v  # (a model is hashed: jit's static key)
               for k, v in model_options(config.model.to_dict()).items()}
    name = options.pop("name")
    return get_model(name, num_classes=num_classes, **options)


def create_state(model, tx, image_shape, seed: int) -> TrainState:
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": init_key, masking.SAMPLE_RNG: init_key},
                           jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=variables.get("frozen", {}), batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng)


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; no such state is ever saved."""


def diverged_message(step: int, loss: float, last_saved: int | None) -> str:
    saved = (f"the latest checkpoint (step {last_saved}) is from before it and intact"
             if last_saved is not None else "no checkpoint was saved")
    return (f"training diverged at step {step}: loss {loss}, non-finite loss or gradients; "
            f"stopped without saving that state ({saved}). Lower optim.learning_rate or add "
            "warm-up (optim.warmup_epochs), then resume or restart")


def check_kept_counts(state: TrainState, model, at=None) -> list[summary.LayerStats]:
    """Every edge-popup layer of model keeps exactly kept_count(n, k) weights, k its own keep
    fraction (all layers together for mask_scope "global"), or at(k) under a sparsity
    schedule (the step's k for that target); raises if not."""
    ks, scope = model.keep_fractions(state.params), model.mask_scope
    if at is not None:
        ks = {name: at(k) for name, k in ks.items()}
    rows = summary.layer_stats({"params": state.params}, ks, model.mask, mask_scope=scope)
    masked = [r for r in rows if r.mode == "edge_popup"]
    groups = [masked] if scope == "global" and masked else [[r] for r in masked]
    for group in groups:
        total, kept, k = sum(r.total for r in group), sum(r.kept for r in group), ks[group[0].name]
        if kept != masking.kept_count(total, k):
            raise RuntimeError(f"layers {[r.name for r in group]} keep {kept} of {total} weights, "
                               f"expected {masking.kept_count(total, k)}")
    return rows


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a config means for a data set: the model, optimizer and step counts."""
    model: Any
    tx: Any
    schedule: Any
    total_steps: int
    steps_per_epoch: int


def _check_count(name: str, value, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}{note}, got {value!r}")


def check_run_options(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo) -> None:
    """Raises ValueError naming the field for counts and normalisation constants that would
    otherwise fail mid-run (a zero log interval or shuffle buffer), or run wrongly (no checkpoint
    kept, a zero std, mean/std for another number of channels)."""
    _check_count("batch_size", config.batch_size, 1)
    _check_count("log_every_steps", config.get("log_every_steps", 50), 1)
    _check_count("eval_every_steps", config.get("eval_every_steps", 0), 0, " (0: once per epoch)")
    _check_count("checkpoint_every_steps", config.get("checkpoint_every_steps", 0), 0,
                 " (0: once per epoch)")
    if config.get("keep_checkpoints", 3) is not None:
        _check_count("keep_checkpoints", config.get("keep_checkpoints", 3), 1, " (None: keep all)")
    if config.eval_batch_size is not None and config.eval_batch_size < 0:
        raise ValueError(f"eval_batch_size must be positive (0 or None: batch_size), got "
                         f"{config.eval_batch_size}")
    _check_count("data.shuffle_buffer", config.data.get("shuffle_buffer", 1), 1)
    sharding.check_state_sharding(config.get("state_sharding", "replicated"))
    ckpt_lib.check_on_corrupt(on_corrupt(config))
    sparsity.check(config.model)
    iterand.check(config.model)
    finetune.check(config)
    channels = info.image_shape[-1]
    for field in ("mean", "std"):
        values = tuple(config.data[field])
        if len(values) not in (1, channels):
            allowed = "1 value" if channels == 1 else f"1 value or {channels}"
            raise ValueError(f"data.{field} has {len(values)} values, but {config.data.name} images "
                             f"have {channels} channel(s): give {allowed}")
    if min(config.data.std) <= 0:
        raise ValueError(f"data.std must be > 0 for every channel, got {tuple(config.data.std)}")


def on_corrupt(config: ml_collections.ConfigDict) -> str:
    """config.checkpoint.on_corrupt (configs without the field: "fall_back")."""
    return config.get("checkpoint", {}).get("on_corrupt", "fall_back")


def corrupt_record(corrupt: list[int], resumed_from: int | None) -> dict | None:
    """results.json's `corrupt_checkpoint`: the newest corrupt step moved aside, all of them,
    and the step the run resumed from (None: it started over)."""
    if not corrupt:
        return None
    return {"corrupt_step": corrupt[0], "corrupt_steps": corrupt, "resumed_from": resumed_from}


def make_plan(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo) -> Plan:
    check_run_options(config, info)
    model = build_model(config, info.num_classes)
    steps_per_epoch = input_pipeline.steps_per_epoch(info, config.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training split "
                         f"({info.num_train} examples)")
    total_steps = config.num_train_steps if config.get("num_train_steps", 0) > 0 \
        else int(config.num_epochs * steps_per_epoch)
    if total_steps < 1:
        raise ValueError(f"the run has no training step: num_epochs {config.num_epochs} x "
                         f"{steps_per_epoch} steps per epoch gives {total_steps}; set num_epochs "
                         "or num_train_steps > 0")
    schedule = optim.learning_rate_schedule(config.optim, total_steps, steps_per_epoch)
    return Plan(model, optim.make_optimizer(config.optim, schedule), schedule, total_steps,
                steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class Intervals:
    """When the loop's periodic actions run: every `n` steps and at the last step."""
    total: int
    log: int
    eval: int
    checkpoint: int

    def due(self, step: int, n: int) -> bool:
        return step % n == 0 or step == self.total
