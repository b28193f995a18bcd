"""The trainer: `train_and_evaluate(config, workdir)`.

Data flows one way: config -> input pipeline -> model -> state -> step -> eval -> checkpoint.
One code path for every device count: the batch is sharded on the mesh's `data` axis, the state
is replicated, and jit inserts the collectives (BatchNorm statistics are over the global batch).
Evaluation is in evaluation.py, checkpoints and their meta in checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
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

from edgepopup_jax.core import masking, selection, summary
from edgepopup_jax.models import get_model
from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import workdir_lock
from edgepopup_jax.training import (evaluation, files, finetune, input_pipeline, iterand, optim,
                                    sharding, sparsity)
from edgepopup_jax.training.metric_writer import MetricWriter
from edgepopup_jax.training.preemption import Preemption


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
    options = model_options(config.model.to_dict())
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


def train_step(state: TrainState, batch, *, model, tx, num_classes: int, label_smoothing: float,
               mean, std, mesh=None, params_sharding=None):
    rng = jax.random.fold_in(state.rng, state.step)
    images = input_pipeline.normalize(batch["image"], mean, std)

    def loss_fn(params):
        variables = selection.with_masks({**state.variables(), "params": params}, model, mesh,
                                         sharding.DATA_AXIS, params_sharding=params_sharding)
        logits, updates = model.apply(variables, images, train=True,
                                      mutable=["batch_stats"], rngs={masking.SAMPLE_RNG: rng})
        loss = evaluation.cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
        return loss, (logits, updates.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                                     for g in jax.tree.leaves(grads)]))
    return state, {"loss": loss, "accuracy": accuracy, "finite": finite.astype(jnp.float32)}


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; no such state is ever saved."""


def check_finite(pending: list[tuple[int, dict]], last_saved: int | None) -> None:
    """Raises TrainingDiverged naming the first step whose loss or gradients were not finite.
    pending: (step, metrics) not yet checked; reading them is the host sync, so the loop calls
    this only at log steps and before saving."""
    for step, metrics in pending:
        if not float(metrics["finite"]):
            raise TrainingDiverged(diverged_message(step, float(metrics["loss"]), last_saved))


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
class Steps:
    """A run's jitted functions on a mesh, with their shardings and donation: what the trainer
    runs, and exactly what `preflight` compiles ahead of time for an accelerator."""
    init: Any  # seed -> TrainState, placed as state_sharding says
    train: Any  # (state, batch) -> (state, metrics); the state is donated
    eval: Any  # (variables, batch) -> sums over the batch's valid examples
    masks: Any  # variables -> variables with every layer's mask (once per evaluation)
    state_sharding: Any  # a NamedSharding per TrainState leaf (config.state_sharding)


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


_COMPILED: dict = {}  # (config, data info, mesh) -> (Plan, Steps), the 8 most recent


def plan_and_steps(config, info: input_pipeline.DatasetInfo, mesh) -> tuple[Plan, Steps]:
    """make_plan and make_steps, reused while config, data and mesh are the same, so a resumed
    or repeated run in one process (a notebook, a sweep, the tests) does not compile its steps
    again. The seed is left out of the key: the steps take it as an argument."""
    key = (json.dumps({**config.to_dict(), "seed": None}, sort_keys=True, default=str), info, mesh)
    if key not in _COMPILED:
        plan = make_plan(config, info)
        _COMPILED[key] = plan, make_steps(config, info, plan, mesh)
        while len(_COMPILED) > 8:
            _COMPILED.pop(next(iter(_COMPILED)))
    return _COMPILED[key]


def make_steps(config, info: input_pipeline.DatasetInfo, plan: Plan, mesh) -> Steps:
    repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    create = functools.partial(create_state, plan.model, plan.tx, tuple(info.image_shape))
    state_sh = sharding.state_shardings(jax.eval_shape(create, 0), mesh,
                                        config.get("state_sharding", "replicated"))
    init = jax.jit(create, static_argnums=0, out_shardings=state_sh)
    train = jax.jit(functools.partial(train_step, model=plan.model, tx=plan.tx,
                                      num_classes=info.num_classes,
                                      label_smoothing=config.optim.get("label_smoothing", 0.0),
                                      mean=tuple(config.data.mean), std=tuple(config.data.std),
                                      mesh=mesh, params_sharding=state_sh.params),
                    in_shardings=(state_sh, data), out_shardings=(state_sh, repl), donate_argnums=0)
    return Steps(init=init, train=train,
                 eval=evaluation.make_eval_fn(plan.model, info.num_classes, mesh, config.data),
                 masks=evaluation.make_masks_fn(plan.model, mesh,
                                                state_sh.variables()),
                 state_sharding=state_sh)


@dataclasses.dataclass(frozen=True)
class Intervals:
    """When the loop's periodic actions run: every `n` steps and at the last step."""
    total: int
    log: int
    eval: int
    checkpoint: int

    def due(self, step: int, n: int) -> bool:
        return step % n == 0 or step == self.total


class _MetricsSinceLog:
    """The train metrics of the steps since the last log step, still on the devices (reading
    them is a host sync), and the images/s since then."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size
        self._pending: list[tuple[int, dict]] = []
        self._since = time.time()
        self.reads = 0

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))

    def check_finite(self, last_saved: int | None) -> None:
        check_finite(self._pending, last_saved)

    def read(self, last_saved: int | None) -> tuple[dict, float]:
        """(mean loss and accuracy, images/s) since the last read; raises TrainingDiverged for
        a non-finite step."""
        pending = jax.device_get(self._pending)
        check_finite(pending, last_saved)
        values = {k: float(np.mean([m[k] for _, m in pending])) for k in ("loss", "accuracy")}
        images_per_sec = len(pending) * self._batch_size / max(time.time() - self._since, 1e-9)
        self._pending, self._since = [], time.time()
        self.reads += 1
        return values, images_per_sec


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
                       stop_after_steps: int | None = None) -> dict:
    """Trains config's model on config's data, evaluating and checkpointing into workdir.

    Resumes from the latest checkpoint in workdir at its exact step; SIGTERM saves a checkpoint
    and returns early (results["preempted"]).

    Args:
      config: a full config (see configs/base.py).
      workdir: where checkpoints/, TensorBoard events and results.json go (local or gs://).
      devices: the devices of the mesh (default: all devices of all processes).
      stop_after_steps: stop after this many steps, saving a checkpoint, as a preemption
        would (for tests and time-limited jobs).

    Returns:
      The results also written to workdir/results.json: final eval (top1, top5, loss), step,
      total_steps, preempted, train/eval history, kept weights per layer, images/s, wall time.

    Raises:
      ValueError: a bad config or data set (before anything is written), or a checkpoint in
        workdir that is corrupted or belongs to another run (checkpoint.CheckpointError).
      TrainingDiverged: the loss or gradients stopped being finite; the last good checkpoint is
        kept as the latest.
      workdir_lock.WorkdirBusy: another live job trains in workdir (nothing is touched).
    """
    with workdir_lock.hold(workdir):
        return _train_and_evaluate(config, workdir, devices, stop_after_steps)


def _train_and_evaluate(config, workdir, devices, stop_after_steps) -> dict:
    # Everything that can be wrong with the config fails here, before anything is written.
    info = input_pipeline.get_info(config.data)
    plan = make_plan(config, info)  # checks the config here, so a bad one fails before the mesh is built
    if sparsity.schedule(config.model, plan.steps_per_epoch).active:
        raise ValueError("model.keep_fraction_anneal_epochs > 0 (a sparsity schedule) trains on "
                         "the device data path: set data.pipeline='device' (or 'auto'); the "
                         "tf_data path selects with a fixed keep_fraction")
    if config.get("finetune_epochs", 0.0):
        raise ValueError("finetune_epochs > 0 trains on the device data path: set "
                         "data.pipeline='device' (or 'auto')")
    if iterand.active(config.model):
        raise ValueError("model.rerand_every > 0 (IteRand) trains on the device data path: set "
                         "data.pipeline='device' (or 'auto')")
    mesh = sharding.make_mesh(devices)
    local_batch = sharding.local_batch_size(config.batch_size, mesh)
    _, eval_global = sharding.eval_batch_sizes(
        config.get("eval_batch_size") or config.batch_size, mesh)
    plan, steps = plan_and_steps(config, info, mesh)
    total_steps, steps_per_epoch = plan.total_steps, plan.steps_per_epoch
    every = Intervals(total=total_steps, log=config.get("log_every_steps", 50),
                      eval=config.get("eval_every_steps", 0) or steps_per_epoch,
                      checkpoint=config.get("checkpoint_every_steps", 0) or steps_per_epoch)
    num_processes = sharding.process_count(mesh)

    state = steps.init(config.seed)
    frozen_hash_init = ckpt_lib.tree_hash(sharding.replicate(state.frozen, mesh))

    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    meta = ckpt_lib.RunMeta(model=config.model.to_dict(), seed=config.seed,
                            dataset=config.data.name, batch_size=config.batch_size,
                            num_classes=info.num_classes, process_count=num_processes)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.get("keep_checkpoints", 3))
    data_order_change, corrupt, saved = None, [], None
    if checkpointer.latest_step() is not None:
        restored, saved, corrupt = checkpointer.restore_intact(
            state, meta.identity(), on_corrupt=on_corrupt(config),
            added_defaults={"model": ckpt_lib.ADDED_MODEL_OPTIONS})
        state = state if restored is None else restored
        if corrupt:
            logging.warning("corrupt checkpoint(s) %s moved aside; %s", corrupt,
                            "no intact checkpoint is left: starting over" if restored is None
                            else f"resuming from step {int(state.step)}")
    if saved is not None:
        saved = ckpt_lib.RunMeta.from_json(saved)
        logging.info("Resumed from step %d of %s", int(state.step), checkpointer.directory)
        meta = dataclasses.replace(meta, history=saved.history)
        if saved.process_count != num_processes:
            # Each process shuffles its own contiguous shard, so the batches after this step
            # differ from those the saved run would have seen (the data seen per epoch does not).
            data_order_change = {"step": int(state.step),
                                 "process_count_before": saved.process_count,
                                 "process_count_now": num_processes}
            logging.warning("DATA ORDER CHANGED: checkpoint %d was written by %s processes, this run "
                            "has %d; training continues from the same state, but the batches from "
                            "step %d on differ from the original run's", int(state.step),
                            saved.process_count if saved.process_count is not None
                            else "an unknown number of", num_processes, int(state.step))
    if ckpt_lib.tree_hash(sharding.replicate(state.frozen, mesh)) != frozen_hash_init:
        raise ckpt_lib.CheckpointError("the checkpoint's frozen weights differ from this seed's")
    logging.info("Frozen weights sha256 %s", frozen_hash_init)
    history = meta.history  # appended to as the run goes; saved with every checkpoint

    writer = MetricWriter(workdir)
    start_step = int(state.step)
    bad = input_pipeline.BadExamples(config.data)  # the examples that do not decode
    train_iter = input_pipeline.train_iterator(config.data, batch_size=local_batch, seed=config.seed,
                                               start_step=start_step, bad=bad)
    logging.info("Training %s on %s: %d steps (%d per epoch), global batch %d on %d devices, "
                 "%d processes; eval batch %d (%d per device)", config.model.name, config.data.name,
                 total_steps, steps_per_epoch, config.batch_size, mesh.devices.size, num_processes,
                 eval_global, eval_global // mesh.devices.size)

    def log_train(step, values, images_per_sec):
        history["train"].append({"step": step, **values})
        lr = float(plan.schedule(step - 1))
        eta = (total_steps - step) * config.batch_size / images_per_sec
        logging.info("step %d/%d  epoch %.2f  loss %.4f  acc %.4f  lr %.4g  %.0f img/s  ETA %s",
                     step, total_steps, step / steps_per_epoch, values["loss"],
                     values["accuracy"], lr, images_per_sec, _format_eta(eta))
        writer.scalars(step, {"train/loss": values["loss"], "train/accuracy": values["accuracy"],
                              "train/learning_rate": lr, "train/images_per_sec": images_per_sec})

    def run_evaluation(step):
        result = evaluation.evaluate(state.variables(), steps.eval, config, mesh, steps.masks, bad=bad)
        history["eval"].append({"step": step, "epoch": step / steps_per_epoch, **result})
        logging.info("eval at step %d: top-1 %.4f  top-5 %.4f  loss %.4f (%d examples)",
                     step, result["top1"], result["top5"], result["loss"], result["count"])
        writer.scalars(step, {f"eval/{k}": v for k, v in result.items() if k != "count"})
        return result

    # Several CPU devices (simulated, XLA_FLAGS=--xla_force_host_platform_device_count): with
    # many steps queued, XLA:CPU's in-process all-reduce rendezvous sometimes never completes
    # (2 of 3 one-epoch runs of the default config on 8 such devices and 2 cores hung here).
    # Waiting for each step there avoids it; accelerators keep asynchronous dispatch.
    simulated_devices = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    t_start = time.time()
    since_log = _MetricsSinceLog(config.batch_size)
    step, last_eval, preempted = start_step, None, False
    if history["eval"] and history["eval"][-1]["step"] == step:
        last_eval = {k: v for k, v in history["eval"][-1].items() if k not in ("step", "epoch")}
    try:  # on any failure, still finish the checkpoint saves already started
        if 0 < step <= total_steps and every.due(step, every.eval) and last_eval is None:
            last_eval = run_evaluation(step)  # saved before its evaluation ran: run it now
        with Preemption() as preemption:
            while step < total_steps:
                state, metrics = steps.train(state, sharding.to_global(next(train_iter), mesh))
                if simulated_devices:
                    jax.block_until_ready(metrics)
                step += 1
                since_log.add(step, metrics)
                logging_now, evaluating, saving = (every.due(step, n) for n in
                                                   (every.log, every.eval, every.checkpoint))
                if logging_now:
                    values, images_per_sec = since_log.read(checkpointer.latest_step())
                    if since_log.reads > 1:  # the first interval includes compilation
                        history["throughput"].append(images_per_sec)
                    log_train(step, values, images_per_sec)
                # Save (or start saving) the step's checkpoint, and honour SIGTERM, before
                # evaluating: a failure in evaluation must not lose the training done.
                stop_asked = stop_after_steps is not None and step - start_step >= stop_after_steps
                stop = stop_asked or preemption.any_process(sync=logging_now or evaluating)
                if stop or saving:
                    since_log.check_finite(checkpointer.latest_step())  # never save a diverged state
                if stop:
                    preempted = True
                    checkpointer.save(step, state, meta.to_json(), force=True)
                    logging.info("Stopping at step %d (%s); checkpoint saved", step,
                                 "requested" if stop_asked else "SIGTERM")
                    break
                if saving:
                    checkpointer.save(step, state, meta.to_json())
                if evaluating:
                    checkpointer.wait()  # the step's checkpoint is complete before evaluating
                    last_eval = run_evaluation(step)
        if last_eval is None and not preempted:  # resumed a finished run: nothing to train, still report
            last_eval = evaluation.evaluate(state.variables(), steps.eval, config, mesh, steps.masks,
                                            bad=bad)
    except input_pipeline.BadDataError:  # the state so far trained on good data: keep it
        if checkpointer.latest_step() != step:
            since_log.check_finite(checkpointer.latest_step())
            checkpointer.save(step, state, meta.to_json(), force=True)
            logging.info("Stopping at step %d (data that does not decode); checkpoint saved", step)
        raise
    finally:
        checkpointer.close()
        writer.close()

    state = sharding.replicate(state, mesh)  # read on the host below, on every process
    if ckpt_lib.tree_hash(state.frozen) != frozen_hash_init:
        raise RuntimeError("frozen weights changed during training: this is a bug")
    rows = check_kept_counts(state, plan.model)
    results = {
        "step": step, "total_steps": total_steps, "preempted": preempted,
        "eval": last_eval,
        "frozen_sha256": frozen_hash_init,
        "state_sha256": ckpt_lib.tree_hash({"params": state.params, "batch_stats": state.batch_stats,
                                            "opt_state": flax.serialization.to_state_dict(state.opt_state)}),
        "train_history": history["train"],
        "eval_history": history["eval"],
        "layers": [dict(name=r.name, shape=list(r.shape), total=r.total, kept=r.kept, mode=r.mode)
                   for r in rows],
        "weights_total": sum(r.total for r in rows), "weights_kept": sum(r.kept for r in rows),
        "images_per_sec": float(np.median(history["throughput"])) if history["throughput"] else None,
        "wall_time_sec": time.time() - t_start,
        "num_devices": int(mesh.devices.size), "num_processes": num_processes,
        "data_order_changed": data_order_change,
        "corrupt_checkpoint": corrupt_record(corrupt, start_step or None),
        "skipped_examples": bad.count, "skipped_files": bad.all_names()[:100],
        "config": config.to_dict(),
    }
    if jax.process_index() == 0:
        files.write_json_atomically(epath.Path(workdir) / "results.json", results)
    if not preempted:
        logging.info("Done: top-1 %.4f top-5 %.4f; kept %d of %d weights\n%s",
                     last_eval["top1"], last_eval["top5"], results["weights_kept"],
                     results["weights_total"], summary.format_table(rows))
    return results
