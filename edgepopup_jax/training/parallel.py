"""Groups: what R >= 1 configs trained together mean (a single run is a group of one).

The runs are stacked on a leading runs axis and trained by one jitted step (step.py, `jax.vmap`
over the runs): one forward and backward pass, one batched mask selection for all runs and all
layers, one optimizer update. A group's runs share the model architecture, the data, the batch
size and the schedule; they may differ in the fields of VARYING (seed, keep fraction, the weight
init options, learning rate and weight decay). Here: checking that configs form a group, their
per-run hyperparameters and kept counts, the (runs, data) mesh, and the seeds of parallel_runs.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from edgepopup_jax.core import masking, selection
from edgepopup_jax.training import device_data, finetune, input_pipeline, sharding, sparsity, train

RUNS_AXIS, DATA_AXIS = sharding.RUNS_AXIS, sharding.DATA_AXIS
# The config fields the runs of one group may differ in; every other field must be equal.
VARYING = ("seed", "model.keep_fraction", "model.weight_init", "model.weight_init_mode",
           "model.scale_by_keep_fraction", "model.mask_scope", "optim.learning_rate",
           "optim.weight_decay", "model.keep_fraction_start", "model.keep_fraction_anneal_epochs",
           "model.keep_fraction_anneal")
HYPER = ("learning_rate", "weight_decay", "counts", "global")  # Group.hyper's keys


class GroupError(ValueError):
    """Configs that cannot train as one group (names the field that differs)."""


def _flat(config: ml_collections.ConfigDict) -> dict:
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def group_key(config: ml_collections.ConfigDict) -> str:
    """Configs with equal keys can train as one group: every field but VARYING."""
    return repr(sorted((k, v) for k, v in _flat(config).items() if k not in VARYING))


def check_group(configs: list) -> None:
    """Raises GroupError naming the first field (outside VARYING) in which two configs differ."""
    if not configs:
        raise GroupError("a group needs at least one run")
    first = _flat(configs[0])
    for i, config in enumerate(configs[1:], 1):
        other = _flat(config)
        for key in sorted(set(first) | set(other)):
            if key not in VARYING and first.get(key) != other.get(key):
                raise GroupError(
                    f"runs 0 and {i} differ in {key} ({first.get(key)!r} vs {other.get(key)!r}); "
                    f"the runs of one group may differ only in {', '.join(VARYING)}")


@dataclasses.dataclass(frozen=True)
class Group:
    """What a group's configs mean for its data: the models, step counts and hyperparameters."""
    configs: tuple
    models: tuple  # each run's model (its init options); models[0] applies them all
    info: input_pipeline.DatasetInfo
    total_steps: int
    steps_per_epoch: int
    # per-run arrays: learning_rate, weight_decay [R] float32; counts {scope: [R, groups]}, the
    # kept counts of each scope a run of the group uses (at step 0); global [R] bool: the run's scope
    hyper: dict
    schedules: tuple = ()  # per run: its sparsity.Schedule
    sizes: tuple = ()  # the score arrays' sizes, in selection order
    fractions: tuple = ()  # per run: its target keep fraction, or one per score array
    finetune_steps: int = 0  # after total_steps: the kept weights train, the mask fixed

    def keep_fractions(self, step: int) -> list[float]:
        """Each run's k at `step` (its sparsity schedule's, or its fixed keep_fraction)."""
        return [s.keep_fraction(step) for s in self.schedules]

    def counts(self, step: int) -> dict:
        """{scope: [R, groups]} int32: each run's kept counts at `step`, exact (on the host)."""
        return _counts(self.sizes, [_scheduled(s, f, step) for s, f in zip(self.schedules, self.fractions)],
                       sorted(self.hyper["counts"]))

    @property
    def annealing_steps(self) -> int:
        return max((s.steps for s in self.schedules), default=0)

    @property
    def scopes(self) -> tuple:
        return tuple(sorted(self.hyper["counts"]))

    @property
    def size(self) -> int:
        return len(self.configs)


def _layer_sizes(model, image_shape) -> list[int]:
    """Sizes of the model's score arrays, in selection order."""
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0),
                                                masking.SAMPLE_RNG: jax.random.PRNGKey(0)},
                                               jnp.zeros((1,) + tuple(image_shape)), train=False))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes["params"]))
    return [int(np.prod(flat[p].shape)) for p in selection.score_paths(shapes["params"])]


def _layer_fractions(model, image_shape):
    """The model's keep fraction, or (first_last / linear_keep_fraction set) one per score array."""
    if model.uniform_keep_fraction():
        return model.keep_fraction
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape)))
    return tuple(model.keep_fractions(shapes["params"]).values())  # sorted: selection order


def make_group(configs: list, info: input_pipeline.DatasetInfo) -> Group:
    """Checks the configs (each as the trainer would, then that they form a group)."""
    check_group(configs)
    for i, config in enumerate(configs):
        try:
            plan = train.make_plan(config, info)
        except ValueError as e:
            raise ValueError(f"run {i}: {e}") from None
    models = tuple(train.build_model(c, info.num_classes) for c in configs)
    sizes = _layer_sizes(models[0], info.image_shape)
    # Each run selects in its own scope; a group of both scopes selects both ways for every run
    # and keeps each run's own (jnp.where), so a run's masks are those it would have alone.
    schedules = tuple(sparsity.schedule(c.model, plan.steps_per_epoch) for c in configs)
    fractions = tuple(_layer_fractions(m, info.image_shape) for m in models)
    counts = _counts(sizes, [_scheduled(s, f, 0) for s, f in zip(schedules, fractions)],
                     sorted({m.mask_scope for m in models}))
    hyper = {"learning_rate": np.array([c.optim.learning_rate for c in configs], np.float32),
             "weight_decay": np.array([c.optim.weight_decay for c in configs], np.float32),
             "counts": counts, "global": np.array([m.mask_scope == "global" for m in models])}
    return Group(tuple(configs), models, info, plan.total_steps, plan.steps_per_epoch, hyper,
                 schedules, tuple(sizes), fractions,
                 finetune.num_steps(configs[0], plan.steps_per_epoch))


def _scheduled(schedule: sparsity.Schedule, fractions, step: int):
    """A run's keep fraction(s) at `step`: each layer's target through its schedule."""
    if isinstance(fractions, tuple):
        return tuple(schedule.keep_fraction(step, k) for k in fractions)
    return schedule.keep_fraction(step, fractions)


def _counts(sizes, keep_fractions, scopes) -> dict:
    return {scope: np.stack([selection.kept_counts(sizes, k, scope) if sizes
                             else np.zeros((1,), np.int32) for k in keep_fractions])
            for scope in scopes}


def config_summary(configs: list) -> str:
    """The VARYING fields that differ between the runs, with their values."""
    flats = [_flat(c) for c in configs]
    parts = []
    for key in VARYING:
        values = [f.get(key) for f in flats]
        if len(set(map(repr, values))) > 1:
            parts.append(f"{key} in {sorted(set(values), key=repr)}")
    return "; ".join(parts) or "identical configs"


def pipeline_for(config: ml_collections.ConfigDict, devices=None) -> str:
    """The source a config trains from: config.data.pipeline, with "auto" resolved ("device"
    when the data fits in memory; with several processes, whose shares of a stream need no
    copy of the whole data set on each host, "tf_data")."""
    if config.data.pipeline == "auto" and jax.process_count() > 1:
        logging.info("data.pipeline='auto' -> 'tf_data': %d processes", jax.process_count())
        return "tf_data"
    return device_data.resolve_pipeline(config.data, None, devices)


def _with_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    config.seed = seed
    return config


def seed_workdirs(config: ml_collections.ConfigDict, workdir: str) -> tuple[list, list]:
    """config.parallel_runs configs with seeds seed, seed + 1, ..., and their workdir/seed_<s>."""
    n = config.get("parallel_runs", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"parallel_runs must be a whole number >= 1, got {n!r}")
    seeds = [config.seed + i for i in range(n)]
    return ([_with_seed(config, s) for s in seeds],
            [os.path.join(str(workdir), f"seed_{s}") for s in seeds])
