"""The one training step, over a runs axis (a single run is R = 1), and its companions.

Each run's step (`_run_step`, vmapped over the runs) selects its masks from its kept counts
(traced data, so sparsity schedules never recompile), applies the model with the
straight-through top-k, updates its scores with its own learning rate and weight decay, and
keeps its last good state when its loss or gradients are not finite. Fine-tuning (the kept
weights trained, the masks fixed) and IteRand's redraws are stages of the same loop, with their
own jitted functions here. Batches come from the source (sources.py): one per run, or one
batch shared by every run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edgepopup_jax.core import masking, selection
from edgepopup_jax.training import (evaluation, finetune, input_pipeline, iterand, optim,
                                    sharding, train)
from edgepopup_jax.training.parallel import HYPER, RUNS_AXIS, Group

DATA_AXIS = sharding.DATA_AXIS


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
                                    config.optim.label_smoothing).mean()
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
    """One run's train step (vmapped over the runs), with the masks selected for this run's
    kept counts. A run that is not alive, or whose loss or gradients are not finite, keeps its
    state."""
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


def start_finetune(state: train.TrainState, *, group: Group) -> train.TrainState:
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


def group_step(states, alive, item, step, hyper, *, group: Group, mesh: Mesh, batches,
               shared: bool, run_step=None):
    """All runs' step `step`: the source's item made into batches (`batches(item, step)`: one
    per run, or one shared by all when `shared`), then _run_step vmapped over the runs."""
    batch = batches(item, step)
    spec = PartitionSpec(DATA_AXIS) if shared else PartitionSpec(RUNS_AXIS, DATA_AXIS)
    batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, spec))
    run_step = run_step or _run_step  # (looked up here, so that tests can replace it)
    return jax.vmap(functools.partial(run_step, group=group),
                    in_axes=(0, None if shared else 0, 0, 0, None))(states, batch, hyper, alive, step)


def fold_masks(variables, hyper, *, group: Group):
    """Every run's variables with its masks selected and folded into the kernels: what an
    evaluation computes once before its batches."""
    if group.models[0].mask != "edge_popup":
        return variables

    def one(v, hyper_r):
        return {**v, selection.MASKS: selection.fold_into_kernels(
            v["frozen"], _masks(v["params"], hyper_r, group))}
    return jax.vmap(one)(variables, hyper)


def _eval_run(variables, chunk, *, group: Group):
    """One run's sums over a chunk of eval batches [n, B, ...] (vmapped over the runs)."""
    step = functools.partial(evaluation.eval_step, model=group.models[0],
                             num_classes=group.info.num_classes,
                             mean=tuple(group.configs[0].data.mean),
                             std=tuple(group.configs[0].data.std))

    def body(i, totals):
        sums = step(variables, {k: v[i] for k, v in chunk.items()})
        return jax.tree.map(jnp.add, totals, sums)

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}
    return jax.lax.fori_loop(0, chunk["label"].shape[0], body, zeros)


def group_eval(variables, chunk, *, group: Group):
    return jax.vmap(functools.partial(_eval_run, group=group), in_axes=(0, None))(variables, chunk)


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


def _stack(*states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def take(tree, r):
    """Run r's slice of a tree with a runs axis."""
    return jax.tree.map(lambda x: x[r], tree)


@dataclasses.dataclass(frozen=True)
class Steps:
    """A group's jitted functions on a mesh, with their shardings and donation: what the loop
    runs, and what `preflight` compiles ahead of time for an accelerator."""
    init: tuple  # per run: seed -> its TrainState (one jitted function per distinct model)
    stack: Any  # (*states) -> the group's state (the loop places it as state_sharding says)
    train: Any  # (states, alive, item, step, hyper) -> (states, alive, metrics)
    fold: Any  # (variables, hyper) -> variables with every run's folded masks
    eval: Any  # (folded variables, chunk) -> per-run sums
    take: Any  # (tree, r) -> run r's slice
    state_sharding: Any  # a NamedSharding per leaf of the group's TrainState
    redraw: Any = None  # IteRand: (states, alive, hyper, step) -> states; None when off
    start_finetune: Any = None  # fine-tuning: one run's state -> its fine-tuning state
    finetune: Any = None  # as train, for the fine-tuning steps; None when off
    pruned: Any = None  # (states, hyper) -> every run's pruned weights


def make_steps(group: Group, mesh: Mesh, source, state_sharding: str = "replicated") -> Steps:
    config, shape = group.configs[0], tuple(group.info.image_shape)
    template_tx = run_optimizer(config, group, 1.0, 0.0)  # init builds the same structure
    abstract = jax.eval_shape(functools.partial(train.create_state, group.models[0], template_tx,
                                                shape), 0)
    one_sh = sharding.state_shardings(abstract, mesh, state_sharding)
    state_sh = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(RUNS_AXIS, *s.spec)), one_sh)
    inits = {}
    for model in group.models:
        if model not in inits:
            inits[model] = jax.jit(functools.partial(train.create_state, model, template_tx, shape),
                                   out_shardings=one_sh)
    runs = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
    repl = NamedSharding(mesh, PartitionSpec())
    hyper_sh = {k: runs for k in HYPER}
    step_args = dict(group=group, mesh=mesh, batches=source.batches, shared=source.shared)
    train_fn = jax.jit(functools.partial(group_step, **step_args),
                       in_shardings=(state_sh, runs, source.item_sharding, repl, hyper_sh),
                       out_shardings=(state_sh, runs, repl), donate_argnums=(0, 1))
    redraw = None
    if iterand.active(config.model):
        redraw = jax.jit(functools.partial(group_redraw, group=group),
                         in_shardings=(state_sh, runs, hyper_sh, None),
                         out_shardings=state_sh, donate_argnums=0)
    start_ft = finetune_fn = pruned = None
    if group.finetune_steps:
        start_ft = jax.jit(functools.partial(start_finetune, group=group))
        # Every leaf of a fine-tuning state is split over the runs, as the training state's
        finetune_fn = jax.jit(functools.partial(group_step, run_step=_finetune_run_step, **step_args),
                              in_shardings=(runs, runs, source.item_sharding, repl, hyper_sh),
                              out_shardings=(runs, runs, repl), donate_argnums=(0, 1))
        pruned = jax.jit(functools.partial(group_pruned_weights, group=group), out_shardings=runs)
    return Steps(init=tuple(inits[m] for m in group.models),
                 stack=jax.jit(_stack),
                 train=train_fn,
                 fold=jax.jit(functools.partial(fold_masks, group=group)),
                 eval=jax.jit(functools.partial(group_eval, group=group), out_shardings=repl),
                 take=jax.jit(take),
                 state_sharding=state_sh, redraw=redraw, start_finetune=start_ft,
                 finetune=finetune_fn, pruned=pruned)


def run_of_one(config, info, devices=None):
    """One run's init and jitted step, without the runs axis, for notebooks, benchmarks and
    tests: the group step with R = 1, fed a stream's batch (global, split over the devices).
    Returns (init: seed -> state, train: (state, batch) -> (state, metrics))."""
    from edgepopup_jax.training import parallel, sources
    group = parallel.make_group([config], info)
    mesh = sharding.make_mesh(devices, 1, config.batch_size)
    steps = make_steps(group, mesh, sources.StreamSource(None, None, mesh), config.state_sharding)
    runs = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
    hyper = jax.device_put(group.hyper, runs)

    def train_one(state, batch):
        alive = jax.device_put(np.ones((1,), bool), runs)  # (donated by every step)
        states = jax.device_put(steps.stack(state), steps.state_sharding)
        states, _, metrics = steps.train(states, alive, batch, state.step, hyper)
        return steps.take(states, 0), steps.take(metrics, 0)

    return steps.init[0], train_one
