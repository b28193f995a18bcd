"""Many runs in one program: a group of R runs trained together, the data on the device.

The runs are stacked on a leading runs axis and trained by one jitted step (`jax.vmap` over the
runs): one forward and backward pass, one batched mask selection for all runs and all layers,
one optimizer update. The data set lives on the device as uint8 arrays (device_data): each
step gathers every run's batch by its own permutation and augments it there.

A group's runs share the model architecture, the data, the batch size and the schedule; they may
differ in the fields of VARYING (seed, keep fraction, the weight init options, learning rate and
weight decay). Each run behaves as if it trained alone: its batches, augmentation and random
numbers follow from its own seed and the step only, so it trains the same in a group of 1 or of
50, and it has its own run directory with its checkpoints, results.json and TensorBoard events.

A run whose loss or gradients stop being finite is frozen at its last good state and recorded
as diverged (never saved after it); the others go on. A group resumes from the newest step
that every run of it saved.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edgepopup_jax.core import masking, selection, summary
from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import workdir_lock
from edgepopup_jax.training import (device_data, evaluation, files, finetune, input_pipeline,
                                    iterand, optim, sparsity, train)
from edgepopup_jax.training.metric_writer import MetricWriter
from edgepopup_jax.training.preemption import Preemption

RUNS_AXIS, DATA_AXIS = "runs", "data"
# The config fields the runs of one group may differ in; every other field must be equal.
VARYING = ("seed", "model.keep_fraction", "model.weight_init", "model.weight_init_mode",
           "model.scale_by_keep_fraction", "model.mask_scope", "optim.learning_rate",
           "optim.weight_decay", "model.keep_fraction_start", "model.keep_fraction_anneal_epochs",
           "model.keep_fraction_anneal")
SPLITS = ("runs", "data")
HYPER = ("learning_rate", "weight_decay", "counts", "global")  # Group.hyper's keys  # what the devices split: the runs (default) or every run's batch


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


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown parallel_split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


def make_mesh(num_runs: int, batch_size: int, devices=None, split: str = "runs") -> Mesh:
    """A 2-D (runs, data) mesh over the devices. split="runs": as many devices on the runs axis
    as divide both the device count and the number of runs (gcd), the rest split each run's
    batch; "data": every device splits the batch, each holds every run."""
    check_split(split)
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    on_runs = math.gcd(num_runs, n) if split == "runs" else 1
    on_data = n // on_runs
    if batch_size % on_data:
        raise ValueError(f"batch_size {batch_size} cannot be split over the {on_data} devices of the "
                         f"data axis ({n} devices, {on_runs} on the runs axis): use a multiple of "
                         f"{on_data}")
    return Mesh(devices.reshape(on_runs, on_data), (RUNS_AXIS, DATA_AXIS))


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


def run_optimizer(config, group: Group, learning_rate, weight_decay) -> optax.GradientTransformation:
    """config's optimizer with this run's learning rate and weight decay (traced under vmap)."""
    schedule = optim.learning_rate_schedule(config.optim, group.total_steps, group.steps_per_epoch,
                                            learning_rate=learning_rate)
    return optim.make_optimizer(config.optim, schedule, weight_decay=weight_decay)


def _masks(params, hyper, group: Group):
    """One run's masks for its kept counts and scope (vmapped over the runs)."""
    masks = {scope: selection.edge_popup_masks_for_counts(params, hyper["counts"][scope], scope)
             for scope in group.scopes}
    if len(masks) == 1:
        return masks[group.scopes[0]]
    return jax.tree.map(lambda g, l: jnp.where(hyper["global"], g, l), masks["global"],
                        masks["layer"])


def _train_loss(variables, batch, rng, *, group: Group):
    """One run's mean loss on its batch in train mode, with (logits, updated batch_stats)."""
    config, model = group.configs[0], group.models[0]
    images = input_pipeline.normalize(batch["image"], tuple(config.data.mean), tuple(config.data.std))
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={masking.SAMPLE_RNG: rng})
    loss = evaluation.cross_entropy(logits, batch["label"], group.info.num_classes,
                                    config.optim.get("label_smoothing", 0.0)).mean()
    return loss, (logits, updates.get("batch_stats", variables["batch_stats"]))


def _keep_if_finite(new, state, loss, grads, logits, batch, alive):
    """(new, or state where the run is not alive or its loss or gradients are not finite;
    alive after the step; the step's metrics)."""
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                                     for g in jax.tree.leaves(grads)]))
    keep = alive & finite
    new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new, keep, {"loss": loss, "accuracy": accuracy, "finite": finite}


def _run_step(state: train.TrainState, batch, hyper, alive, step, *, group: Group):
    """One run's train step (vmapped over the runs): as train.train_step, with the masks
    selected for this run's kept counts. A run that is not alive, or whose loss or gradients
    are not finite, keeps its state."""
    rng = jax.random.fold_in(state.rng, step)
    tx = run_optimizer(group.configs[0], group, hyper["learning_rate"], hyper["weight_decay"])

    def loss_fn(params):
        variables = {**state.variables(), "params": params}
        if group.models[0].mask == "edge_popup":
            variables[selection.MASKS] = _masks(params, hyper, group)
        return _train_loss(variables, batch, rng, group=group)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
    return _keep_if_finite(new, state, loss, grads, logits, batch, alive)


def _finetune_tx(config, group: Group, learning_rate, weight_decay):
    return finetune.optimizer(config, group.finetune_steps, group.steps_per_epoch, learning_rate,
                              weight_decay)


def _start_finetune(state: train.TrainState, *, group: Group) -> train.TrainState:
    """One run's state at the start of fine-tuning: the optimizer now over the frozen weights."""
    return state.replace(opt_state=_finetune_tx(group.configs[0], group, 1.0, 0.0).init(state.frozen))


def _finetune_run_step(state: train.TrainState, batch, hyper, alive, step, *, group: Group):
    """One run's fine-tuning step (training/finetune.py): the mask its final scores select,
    fixed; the kept weights trained; the scores, and every pruned weight, left as they are."""
    rng = jax.random.fold_in(state.rng, step)
    tx = _finetune_tx(group.configs[0], group, hyper["learning_rate"], hyper["weight_decay"])
    masks = jax.lax.stop_gradient(_masks(state.params, hyper, group))
    keep_mask = finetune.kernel_masks(masks, state.frozen)

    def loss_fn(frozen):
        variables = {**state.variables(), "frozen": frozen, selection.MASKS: masks}
        return _train_loss(variables, batch, rng, group=group)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.frozen)
    updates, opt_state = tx.update(finetune.masked(grads, keep_mask), state.opt_state, state.frozen)
    frozen = optax.apply_updates(state.frozen, finetune.masked(updates, keep_mask))
    new = state.replace(step=step + 1, frozen=frozen, batch_stats=batch_stats, opt_state=opt_state)
    return _keep_if_finite(new, state, loss, grads, logits, batch, alive)


def group_pruned_weights(states, hyper, *, group: Group):
    """Every run's pruned weights (kept ones zeroed), for the check that fine-tuning left them."""
    def one(state, hyper_r):
        mask = finetune.kernel_masks(_masks(state.params, hyper_r, group), state.frozen)
        return finetune.pruned_weights(state.frozen, mask)
    return jax.vmap(one)(states, hyper)


def gather_batches(images, labels, permutations, seeds, step, *, group: Group):
    """Every run's batch of step `step`: its slice of this epoch's permutation, gathered and
    augmented (device_data.train_batch, vmapped over the runs)."""
    config = group.configs[0]
    epoch, index = step // group.steps_per_epoch, step % group.steps_per_epoch
    gather = functools.partial(device_data.train_batch, batch_size=config.batch_size,
                               augment=config.data.augment)
    return jax.vmap(gather, in_axes=(None, None, 0, 0, None, None))(
        images, labels, permutations, seeds, epoch, index)


def group_step(states, alive, permutations, step, data, *, group: Group, mesh: Mesh,
               run_step=None):
    """All runs' step `step`: each run's batch (gathered here from the data on the device, or
    given as data["batch"] when the data set stays in host memory), then _run_step vmapped
    over the runs."""
    if "batch" in data:
        batches = data["batch"]
    else:
        batches = gather_batches(data["image"], data["label"], permutations, data["seed"], step,
                                 group=group)
    batches = jax.lax.with_sharding_constraint(
        batches, NamedSharding(mesh, PartitionSpec(RUNS_AXIS, DATA_AXIS)))
    hyper = {k: data[k] for k in HYPER}
    run_step = run_step or _run_step  # (looked up here, so that tests can replace it)
    return jax.vmap(functools.partial(run_step, group=group), in_axes=(0, 0, 0, 0, None))(
        states, batches, hyper, alive, step)


def _eval_run(variables, hyper, eval_data, *, group: Group):
    """One run's sums over the eval split (vmapped over the runs): masks selected and folded
    once, then the eval step over every batch."""
    model = group.models[0]
    if model.mask == "edge_popup":
        masks = _masks(variables["params"], hyper, group)
        variables = {**variables, selection.MASKS: selection.fold_into_kernels(variables["frozen"], masks)}
    step = functools.partial(evaluation.eval_step, model=model, num_classes=group.info.num_classes,
                             mean=tuple(group.configs[0].data.mean),
                             std=tuple(group.configs[0].data.std))

    def body(i, totals):
        sums = step(variables, {k: v[i] for k, v in eval_data.items()})
        return jax.tree.map(jnp.add, totals, sums)

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}
    return jax.lax.fori_loop(0, eval_data["label"].shape[0], body, zeros)


def group_redraw(states, alive, hyper, step, *, group: Group):
    """IteRand's redraw for every alive run (training/iterand.py): each run's pruned weights,
    from its own init distribution (the fresh draw is made with every distinct model of the
    group, and each run takes its own model's) and its own key."""
    config = group.configs[0].model
    keys = jax.vmap(iterand.redraw_key, in_axes=(0, None))(states.rng, step)
    distinct = list(dict.fromkeys(group.models))
    index = jnp.asarray([distinct.index(m) for m in group.models])
    fresh = None
    for d, m in enumerate(distinct):
        drawn = jax.vmap(lambda k: iterand.fresh_weights(m, k, group.info.image_shape))(keys)
        fresh = drawn if fresh is None else jax.tree.map(
            lambda a, b: jnp.where((index == d).reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
            drawn, fresh)

    def one(state, fresh_frozen, key, hyper_r):
        masks = _masks(state.params, hyper_r, group)
        return iterand.redraw(state.frozen, masks, fresh_frozen, key, mode=config.rerand_mode,
                              rate=config.rerand_rate, lam=config.rerand_lambda, mu=config.rerand_mu)

    frozen = jax.vmap(one)(states, fresh, keys, hyper)
    frozen = jax.tree.map(lambda new, old: jnp.where(
        alive.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), frozen, states.frozen)
    return states.replace(frozen=frozen)


def group_eval(variables, hyper, eval_data, *, group: Group):
    return jax.vmap(functools.partial(_eval_run, group=group), in_axes=(0, 0, None))(
        variables, hyper, eval_data)


@dataclasses.dataclass(frozen=True)
class GroupSteps:
    init: tuple  # per run: seed -> TrainState (jitted, one per distinct model)
    train: Any  # (states, alive, permutations, step, data) -> (states, alive, metrics)
    eval: Any  # (variables, hyper, eval_data) -> per-run sums
    permutations: Any  # (seeds, epoch) -> [R, N] this epoch's order of every run
    state_sharding: Any
    redraw: Any = None  # IteRand: (states, alive, hyper, step) -> states; None when off
    start_finetune: Any = None  # fine-tuning: one run's state -> its fine-tuning state
    finetune: Any = None  # as train, for the fine-tuning steps; None when off
    pruned: Any = None  # (states, hyper) -> every run's pruned weights


def make_steps(group: Group, mesh: Mesh, on_host: bool = False) -> GroupSteps:
    config, shape = group.configs[0], tuple(group.info.image_shape)
    template_tx = run_optimizer(config, group, 1.0, 0.0)  # init builds the same structure
    inits = {}
    for model in group.models:
        if model not in inits:
            inits[model] = jax.jit(functools.partial(train.create_state, model, template_tx, shape))
    runs = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
    repl = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(inits[group.models[0]], 0)
    state_sh = jax.tree.map(lambda _: runs, abstract)
    data_sh = {"seed": runs, **{k: runs for k in HYPER}}
    if on_host:  # each step's batches come from the host, already gathered and augmented
        data_sh["batch"] = NamedSharding(mesh, PartitionSpec(RUNS_AXIS, DATA_AXIS))
    else:
        data_sh.update(image=repl, label=repl)
    train_fn = jax.jit(functools.partial(group_step, group=group, mesh=mesh),
                       in_shardings=(state_sh, runs, runs, repl, data_sh),
                       out_shardings=(state_sh, runs, runs), donate_argnums=(0, 1))
    eval_fn = jax.jit(functools.partial(group_eval, group=group), out_shardings=runs)
    n = group.info.num_train
    perms = jax.jit(jax.vmap(lambda seed, epoch: device_data.epoch_permutation(seed, epoch, n),
                             in_axes=(0, None)), out_shardings=runs)
    redraw = None
    if iterand.active(config.model):
        redraw = jax.jit(functools.partial(group_redraw, group=group),
                         in_shardings=(state_sh, runs, {k: runs for k in HYPER}, None),
                         out_shardings=state_sh, donate_argnums=0)
    start_ft = finetune_fn = pruned = None
    if group.finetune_steps:
        start_ft = jax.jit(functools.partial(_start_finetune, group=group))
        # Every leaf of a fine-tuning state is split over the runs, as the training state's
        finetune_fn = jax.jit(functools.partial(group_step, group=group, mesh=mesh,
                                                run_step=_finetune_run_step),
                              in_shardings=(runs, runs, runs, repl, data_sh),
                              out_shardings=(runs, runs, runs), donate_argnums=(0, 1))
        pruned = jax.jit(functools.partial(group_pruned_weights, group=group), out_shardings=runs)
    return GroupSteps(tuple(inits[m] for m in group.models), train_fn, eval_fn, perms, state_sh,
                      redraw, start_ft, finetune_fn, pruned)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, r: int):
    return jax.tree.map(lambda x: x[r], tree)


def _common_step(checkpointers) -> int | None:
    """The newest step every run saved (None: some run has none)."""
    steps = [set(c.manager.all_steps()) for c in checkpointers]
    common = set.intersection(*steps) if steps else set()
    return max(common) if common else None


def _set_aside_newer(checkpointer, step: int | None) -> None:
    """Checkpoints of a run newer than the group's common step are moved aside (never deleted):
    the group retrains those steps, and orbax must not find a newer step when it saves them."""
    for s in checkpointer.manager.all_steps():
        if step is None or s > step:
            moved = checkpointer.set_aside(s, f"ahead_of_group.{int(time.time())}")
            logging.warning("moved checkpoint %d aside to %s: the group resumes from step %s", s,
                            moved, step)


def _restore_group(checkpointers, template_for, identities, on_corrupt: str, say):
    """Every run's state and meta at the newest step all runs saved, as
    (step, [(state, meta)], corrupt steps per run); (None, None, corrupt) when there is none.
    A corrupt checkpoint is moved aside to <step>.corrupt (on_corrupt "fall_back") and the
    group falls back to the next common step, or raises (on_corrupt "refuse").
    template_for(step, r): run r's state template for a checkpoint of `step`."""
    corrupt = [[] for _ in checkpointers]
    while (step := _common_step(checkpointers)) is not None:
        for c in checkpointers:
            _set_aside_newer(c, step)
        restored = []
        for r, c in enumerate(checkpointers):
            try:
                restored.append(c.restore(template_for(step, r), identities[r], step=step,
                                          added_defaults={"model": ckpt_lib.ADDED_MODEL_OPTIONS}))
            except ckpt_lib.CorruptCheckpoint as e:
                if on_corrupt == "refuse":
                    raise
                moved = c.set_aside(step, "corrupt")
                corrupt[r].append(step)
                say(f"{e}. Moved it aside to {moved} (checkpoint.on_corrupt='fall_back'); "
                    "the group falls back to the previous checkpoint")
                break
        else:
            return step, restored, corrupt
    for c in checkpointers:
        _set_aside_newer(c, None)
    return None, None, corrupt


def train_group(configs: list, workdirs: list, *, devices=None, cache_dir: str | None = None,
                stop_after_steps: int | None = None, say=None) -> list[dict]:
    """Trains configs' runs as one group, run i into workdirs[i].

    Args:
      configs: full configs (see configs/base.py) that differ only in VARYING fields.
      workdirs: one directory per run: its checkpoints/, TensorBoard events and results.json.
      devices: the mesh's devices (default: all); config.parallel_split says what they split.
      cache_dir: where a decoded image folder is cached (default: beside the first workdir).
      stop_after_steps: stop after this many steps, saving every run's checkpoint (as SIGTERM).
      say: called with one line per group event (default: absl logging).

    Returns:
      Per run, the results written to its results.json (as train.train_and_evaluate's, plus
      "group": its size and index), or {"status": "diverged", "message", "step"} for a run
      that diverged.

    Raises:
      ValueError: a bad config, configs that cannot form a group (GroupError), a data set that
        the device path cannot hold, or a checkpoint that belongs to another run.
      workdir_lock.WorkdirBusy: another live job trains in one of workdirs (nothing is touched).
    """
    if len(configs) != len(workdirs) or len(set(map(str, workdirs))) != len(workdirs):
        raise ValueError("train_group needs one distinct workdir per config")
    with workdir_lock.hold(*map(str, workdirs)):
        return _train_group(configs, workdirs, devices, cache_dir, stop_after_steps, say)


def _train_group(configs, workdirs, devices, cache_dir, stop_after_steps, say) -> list[dict]:
    say = say or (lambda line: logging.info("%s", line))
    if jax.process_count() > 1:
        raise ValueError("the device data path (and so parallel runs) runs in one process; use "
                         "data.pipeline='tf_data' for a multi-host job")
    base = configs[0]
    device_data.check_device_augment(base.data.augment)
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(str(workdirs[0]))),
                                          ".data_cache")
    info = device_data.get_info(base.data, cache_dir)
    group = make_group(list(configs), info)
    bad = input_pipeline.BadExamples(base.data)  # every image is decoded here, before training
    train_images, train_labels = device_data.load_split(base.data, base.data.train_split, cache_dir, bad)
    eval_images, eval_labels = device_data.load_split(base.data, base.data.eval_split, cache_dir, bad)
    if bad.count:  # the epochs are those of the examples that decoded
        info = dataclasses.replace(info, num_train=len(train_labels), num_eval=len(eval_labels))
        group = make_group(list(configs), info)
    mesh = make_mesh(group.size, base.batch_size, devices, base.get("parallel_split", "runs"))
    # A data set that does not fit in data.device_memory_fraction of a device's memory stays in
    # host memory: every step's batches are gathered and augmented there (by the same functions,
    # on the host's CPU device) and sent, so a run sees the same batches either way.
    fits, why = device_data.fits_on_device(base.data, info, mesh.devices)
    on_host = not fits
    if on_host:
        say(f"the data stays in host memory ({why}); each step's batches are gathered there")
    steps = make_steps(group, mesh, on_host)
    runs_sh = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
    repl = NamedSharding(mesh, PartitionSpec())

    eval_batch = base.get("eval_batch_size") or base.batch_size
    eval_data = jax.device_put(device_data.eval_batches(eval_images, eval_labels, eval_batch), repl)
    seeds = np.array([c.seed for c in configs], np.int32)
    data = jax.device_put({"seed": seeds, **group.hyper}, runs_sh)
    if on_host:
        host = jax.device_put({"image": train_images, "label": train_labels, "seed": seeds},
                              jax.devices("cpu")[0])
        host_batches = jax.jit(functools.partial(gather_batches, group=group))
        batch_sh = NamedSharding(mesh, PartitionSpec(RUNS_AXIS, DATA_AXIS))
    else:
        data.update(jax.device_put({"image": train_images, "label": train_labels}, repl))

    # Each run's initial state exactly as it would be alone; restored where the group saved.
    states = [init(c.seed) for init, c in zip(steps.init, configs)]
    frozen_hashes = [ckpt_lib.tree_hash(s.frozen) for s in states]
    metas = [ckpt_lib.RunMeta(model=c.model.to_dict(), seed=c.seed, dataset=c.data.name,
                              batch_size=c.batch_size, num_classes=info.num_classes,
                              process_count=1) for c in configs]
    for w in workdirs:
        epath.Path(w).mkdir(parents=True, exist_ok=True)
    keep = base.get("keep_checkpoints", 3)
    checkpointers = [ckpt_lib.Checkpointer(os.path.join(str(w), "checkpoints"), max_to_keep=keep)
                     for w in workdirs]
    rerand = steps.redraw is not None
    phase_end = group.total_steps  # the scores' training ends here; fine-tuning (if any) follows
    end = phase_end + group.finetune_steps

    def template_for(at: int, r: int):  # a fine-tuning step's checkpoint holds its optimizer
        return steps.start_finetune(states[r]) if at > phase_end else states[r]

    start, restored, corrupt = _restore_group(checkpointers, template_for,
                                              [m.identity() for m in metas],
                                              train.on_corrupt(base), say)
    fine_tuning = start is not None and start > phase_end
    if start is not None:
        for r, c in enumerate(checkpointers):
            states[r], saved = restored[r]
            metas[r] = dataclasses.replace(metas[r], history=ckpt_lib.RunMeta.from_json(saved).history)
            # (IteRand's redraws and fine-tuning change them: the checksums vouch for them then)
            if not (rerand or fine_tuning) and ckpt_lib.tree_hash(states[r].frozen) != frozen_hashes[r]:
                raise ckpt_lib.CheckpointError(f"{c.directory}: the frozen weights differ from "
                                               "this seed's")
        say(f"group of {group.size}: resumed from step {start}")
    histories = [m.history for m in metas]
    states = jax.device_put(_stack(states), runs_sh if fine_tuning else steps.state_sharding)
    alive = jax.device_put(np.ones((group.size,), bool), runs_sh)
    # The frozen weights as the last redraw left them (per leaf, all runs): nothing else may
    # change them, and the end of the run checks that nothing did.
    frozen_after_redraw = ckpt_lib.checksum(states.frozen) if rerand else None
    # Fine-tuning's invariant: the weights the fixed mask prunes never move.
    pruned_at_start = (ckpt_lib.checksum(steps.pruned(states, {k: data[k] for k in HYPER}))
                       if fine_tuning else None)
    writers = [MetricWriter(str(w), tensorflow=False) for w in workdirs]

    every = train.Intervals(total=end, log=base.get("log_every_steps", 50),
                            eval=base.get("eval_every_steps", 0) or group.steps_per_epoch,
                            checkpoint=base.get("checkpoint_every_steps", 0) or group.steps_per_epoch)
    step = start or 0
    say(f"group of {group.size} runs: {config_summary(configs)}; {group.total_steps} steps "
        f"{f'+ {group.finetune_steps} fine-tuning ' if group.finetune_steps else ''}"
        f"({group.steps_per_epoch} per epoch), batch {base.batch_size} per run, mesh "
        f"{dict(mesh.shape)}")
    diverged: dict[int, dict] = {}
    last_eval: list = [None] * group.size
    pending: list = []
    since, t_start, throughput_steps = time.time(), time.time(), 0
    permutations, perm_epoch = None, None
    simulated_devices = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    preempted = False

    def live():
        return [r for r in range(group.size) if r not in diverged]

    def read_pending(log: bool):
        nonlocal pending, since, throughput_steps
        got = jax.device_get(pending)
        for r in live():
            nonfinite = next(((s, m) for s, m in got if not m["finite"][r]), None)
            if nonfinite is not None:
                s, m = nonfinite
                message = train.diverged_message(s, float(m["loss"][r]),
                                                 checkpointers[r].latest_step())
                diverged[r] = {"status": "diverged", "message": message, "step": s,
                               "seed": configs[r].seed}
                say(f"run {r} ({workdirs[r]}): {message}; the other runs go on")
        if log and got:
            seconds = max(time.time() - since, 1e-9)
            rate = len(got) * base.batch_size / seconds  # images/s of each run
            if throughput_steps:  # the first interval includes compilation
                for r in live():
                    histories[r]["throughput"].append(rate)
            throughput_steps += 1
            lrs = {r: learning_rate(r, step) for r in live()}
            for r in live():
                values = {k: float(np.mean([m[k][r] for _, m in got])) for k in ("loss", "accuracy")}
                if group.schedules[r].active:
                    values["keep_fraction"] = scheduled_k(r)
                histories[r]["train"].append({"step": step, **values})
                writers[r].scalars(step, {"train/loss": values["loss"],
                                          "train/accuracy": values["accuracy"],
                                          "train/learning_rate": lrs[r],
                                          "train/images_per_sec": rate})
            losses = " ".join(f"{np.mean([m['loss'][r] for _, m in got]):.3f}" for r in live()[:8])
            lr = " ".join(f"{lrs[r]:.4g}" for r in live()[:8]) if len(set(lrs.values())) > 1 \
                else f"{next(iter(lrs.values()), 0.0):.4g}"
            say(f"step {step}/{end}: {len(live())} of {group.size} runs training, "
                f"{rate:.0f} img/s per run ({rate * len(live()):.0f} in all); losses {losses}"
                f"{' ...' if len(live()) > 8 else ''}; lr {lr}")
            since = time.time()
        pending = []

    counts_now = None  # the kept counts in data["counts"], while a sparsity schedule runs

    def set_counts(at: int) -> None:
        """data["counts"] for step `at`, sent only when a schedule changes them."""
        nonlocal counts_now
        if not group.annealing_steps or (counts_now is not None and at > group.annealing_steps):
            return
        new = group.counts(at)
        if counts_now is None or any(not np.array_equal(new[s], counts_now[s]) for s in new):
            data["counts"] = jax.device_put(new, runs_sh)
            counts_now = new

    lr_schedules = [(optim.learning_rate_schedule(c.optim, group.total_steps, group.steps_per_epoch),
                     optim.learning_rate_schedule(c.optim, max(group.finetune_steps, 1),
                                                  group.steps_per_epoch)) for c in configs]

    def learning_rate(r: int, at: int) -> float:
        """Run r's learning rate in step `at` (fine-tuning restarts the schedule)."""
        scores, finetuning = lr_schedules[r]
        return float(scores(at - 1) if at <= phase_end else finetuning(at - 1 - phase_end))

    def scheduled_k(r: int) -> float | None:
        return group.keep_fractions(step)[r] if group.schedules[r].active else None

    def check_frozen_before_finetuning():
        """The scores' training left the weights as they were (or as IteRand redrew them)."""
        if rerand:
            if ckpt_lib.checksum(states.frozen) != frozen_after_redraw:
                raise RuntimeError("frozen weights changed between IteRand's redraws: this is a bug")
            return
        for r in live():
            if ckpt_lib.tree_hash(jax.device_get(_unstack(states.frozen, r))) != frozen_hashes[r]:
                raise RuntimeError("frozen weights changed during training: this is a bug")

    def save(force=False):
        for r in live():
            meta = dataclasses.replace(metas[r], history=histories[r], keep_fraction=scheduled_k(r))
            checkpointers[r].save(step, _unstack(states, r), meta.to_json(), force=force)

    def evaluate():
        set_counts(step)  # the masks the runs have now
        variables = {"params": states.params, "frozen": states.frozen,
                     "batch_stats": states.batch_stats}
        sums = jax.device_get(steps.eval(variables, {k: data[k] for k in HYPER}, eval_data))
        for r in live():
            count = max(float(sums["count"][r]), 1.0)
            result = {"top1": float(sums["top1"][r]) / count, "top5": float(sums["top5"][r]) / count,
                      "loss": float(sums["loss"][r]) / count, "count": int(sums["count"][r])}
            histories[r]["eval"].append({"step": step, "epoch": step / group.steps_per_epoch, **result})
            writers[r].scalars(step, {f"eval/{k}": v for k, v in result.items() if k != "count"})
            last_eval[r] = result
        top1 = " ".join(f"{last_eval[r]['top1']:.4f}" for r in live()[:8])
        say(f"eval at step {step}: top-1 {top1}{' ...' if len(live()) > 8 else ''}")

    try:
        for r in range(group.size):
            h = histories[r]["eval"]
            if h and h[-1]["step"] == step:
                last_eval[r] = {k: v for k, v in h[-1].items() if k not in ("step", "epoch")}
        if 0 < step <= end and every.due(step, every.eval) and None in last_eval:
            evaluate()
        with Preemption() as preemption:
            while step < end and live():
                if step == phase_end and not fine_tuning:  # the mask is fixed from here on
                    check_frozen_before_finetuning()
                    states = jax.vmap(functools.partial(_start_finetune, group=group))(states)
                    pruned_at_start = ckpt_lib.checksum(steps.pruned(states, {k: data[k] for k in HYPER}))
                    fine_tuning = True
                    say(f"step {step}: the scores' training is done; fine-tuning the kept weights "
                        f"for {group.finetune_steps} steps, the masks fixed")
                set_counts(step)
                epoch = step // group.steps_per_epoch
                if epoch != perm_epoch:
                    permutations, perm_epoch = steps.permutations(data["seed"], epoch), epoch
                    if on_host:
                        host_permutations = jax.device_put(permutations, jax.devices("cpu")[0])
                if on_host:
                    batch = host_batches(host["image"], host["label"], host_permutations,
                                         host["seed"], step)
                    data["batch"] = jax.device_put(batch, batch_sh)
                step_fn = steps.finetune if fine_tuning else steps.train
                states, alive, metrics = step_fn(states, alive, permutations, step, data)
                if simulated_devices:
                    jax.block_until_ready(metrics)
                step += 1
                if rerand and step <= phase_end and iterand.due(base.model, step):
                    states = steps.redraw(states, alive, {k: data[k] for k in HYPER}, step)
                    frozen_after_redraw = ckpt_lib.checksum(states.frozen)
                pending.append((step, metrics))
                logging_now, evaluating, saving = (every.due(step, n) for n in
                                                   (every.log, every.eval, every.checkpoint))
                if group.finetune_steps and step == phase_end:  # the subnetwork before fine-tuning
                    evaluating = saving = True
                stop_asked = stop_after_steps is not None and step - (start or 0) >= stop_after_steps
                stop = stop_asked or preemption.requested
                if logging_now or evaluating or saving or stop:
                    read_pending(log=logging_now)  # never save (or evaluate) a diverged state
                if stop:
                    preempted = True
                    save(force=True)
                    say(f"stopping at step {step} ({'requested' if stop_asked else 'SIGTERM'}); "
                        "every run's checkpoint saved")
                    break
                if saving:
                    save()
                if evaluating and live():
                    for c in checkpointers:
                        c.wait()
                    evaluate()
        if None in [last_eval[r] for r in live()] and not preempted:
            evaluate()  # resumed a finished group: nothing to train, still report
    finally:
        for c in checkpointers:
            c.close()
        for w in writers:
            w.close()

    if fine_tuning:
        if ckpt_lib.checksum(steps.pruned(states, {k: data[k] for k in HYPER})) != pruned_at_start:
            raise RuntimeError("fine-tuning changed a weight its mask prunes: this is a bug")
    elif rerand and ckpt_lib.checksum(states.frozen) != frozen_after_redraw:
        raise RuntimeError("frozen weights changed between IteRand's redraws: this is a bug")
    wall = time.time() - t_start
    results = []
    for r, (config, workdir) in enumerate(zip(configs, workdirs)):
        if r in diverged:
            results.append(diverged[r])
            continue
        state = jax.device_get(_unstack(states, r))
        if not (rerand or fine_tuning) and ckpt_lib.tree_hash(state.frozen) != frozen_hashes[r]:
            raise RuntimeError("frozen weights changed during training: this is a bug")
        rows = train.check_kept_counts(
            state, group.models[r], lambda k: group.schedules[r].keep_fraction(step, k))
        history = histories[r]
        result = {
            "step": step, "total_steps": end, "preempted": preempted,
            "eval": last_eval[r], "frozen_sha256": frozen_hashes[r],
            "state_sha256": ckpt_lib.tree_hash({"params": state.params,
                                                "batch_stats": state.batch_stats,
                                                "opt_state": flax.serialization.to_state_dict(
                                                    state.opt_state)}),
            "train_history": history["train"], "eval_history": history["eval"],
            "layers": [dict(name=x.name, shape=list(x.shape), total=x.total, kept=x.kept,
                            mode=x.mode) for x in rows],
            "weights_total": sum(x.total for x in rows), "weights_kept": sum(x.kept for x in rows),
            "images_per_sec": (float(np.median(history["throughput"])) if history["throughput"]
                               else None),
            "wall_time_sec": wall, "num_devices": int(mesh.devices.size), "num_processes": 1,
            "data_order_changed": None, "pipeline": "device",
            "corrupt_checkpoint": train.corrupt_record(corrupt[r], start),
            "finetune": ({"steps": group.finetune_steps, "from_step": phase_end,
                          "eval_before": next((h for h in history["eval"] if h["step"] == phase_end), None)}
                         if group.finetune_steps else None),
            "iterand": ({"redraws": min(step, phase_end) // base.model.rerand_every,
                         "frozen_sha256_final": ckpt_lib.tree_hash(state.frozen)}
                        if rerand else None),
            "keep_fraction_schedule": ({**dataclasses.asdict(group.schedules[r]),
                                        "final": group.keep_fractions(step)[r]}
                                       if group.schedules[r].active else None),
            "skipped_examples": bad.count, "skipped_files": bad.all_names()[:100],
            "group": {"size": group.size, "index": r, "mesh": dict(mesh.shape)},
            "config": config.to_dict(),
        }
        files.write_json_atomically(epath.Path(workdir) / "results.json", result)
        if not preempted:
            logging.info("run %d done: top-1 %.4f; kept %d of %d weights\n%s", r,
                         last_eval[r]["top1"], result["weights_kept"], result["weights_total"],
                         summary.format_table(rows))
        results.append(result)
    return results


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
    """The pipeline a config trains on: config.data.pipeline, with "auto" resolved. The device
    path runs one process with the state replicated over its runs; "auto" takes tf_data for
    what only it does (several processes, state_sharding="fsdp"), and "device" refuses them."""
    wanted = config.data.get("pipeline", "tf_data")
    needs_tf_data = [why for why, bad in (
        (f"{jax.process_count()} processes", jax.process_count() > 1),
        (f"state_sharding={config.get('state_sharding', 'replicated')!r}",
         config.get("state_sharding", "replicated") != "replicated")) if bad]
    if wanted == "auto" and needs_tf_data:
        logging.info("data.pipeline='auto' -> 'tf_data': %s", ", ".join(needs_tf_data))
        return "tf_data"
    if wanted == "device" and needs_tf_data:
        raise ValueError(f"data.pipeline='device' trains in one process with the state replicated, "
                         f"but this run has {', '.join(needs_tf_data)}: use data.pipeline='tf_data'")
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


def train_config(config: ml_collections.ConfigDict, workdir: str, devices=None):
    """What main.py runs: one run on the pipeline the config resolves to (results as
    train.train_and_evaluate's), or config.parallel_runs seeds as one group (a list of
    results, one per seed, in workdir/seed_<s>). Raises train.TrainingDiverged when the one
    run (or every run) diverged."""
    check_split(config.get("parallel_split", "runs"))
    pipeline = pipeline_for(config, devices)
    many = config.get("parallel_runs", 1) != 1
    if pipeline == "tf_data":
        if many:
            raise ValueError("parallel_runs > 1 needs the device data path: set "
                             "data.pipeline='device' (or 'auto')")
        return train.train_and_evaluate(config, workdir, devices=devices)
    configs, workdirs = seed_workdirs(config, workdir) if many else ([config], [workdir])
    results = train_group(configs, workdirs, devices=devices)
    diverged = [r for r in results if r.get("status") == "diverged"]
    if len(diverged) == len(results):
        raise train.TrainingDiverged(diverged[0]["message"])
    return results if many else results[0]
