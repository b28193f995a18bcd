"""Training and evaluation: `train_and_evaluate(config, workdir)`.

Data flows one way: config -> input pipeline -> model -> state -> step -> eval -> checkpoint.
One code path for every device count: the batch is sharded on the mesh's `data` axis, the state
is replicated, and jit inserts the collectives (BatchNorm statistics are over the global batch).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
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

from edgepopup_jax import checkpoint as ckpt_lib
from edgepopup_jax import input_pipeline, masking, optim, selection, sharding, summary
from edgepopup_jax.models import get_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # what the optimizer trains: scores (and a baseline's learned weights)
    frozen: Any  # the random weights: never given to the optimizer
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step keys are fold_in(rng, step), so resuming is exact


EVAL_MASK_SEED = 0

# Model options added after checkpoints were first written, with the value older runs had
# (also the value of a config without the option: bn_running_var is only in ResNet configs).
ADDED_MODEL_OPTIONS = {"mask_scope": "layer", "bn_running_var": "biased"}


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    options = config.model.to_dict()
    name = options.pop("name")
    return get_model(name, num_classes=num_classes, **options)


def _variables(state: TrainState) -> dict:
    return {"params": state.params, "frozen": state.frozen, "batch_stats": state.batch_stats}


def create_state(model, tx, image_shape, seed: int) -> TrainState:
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": init_key, "mask": init_key},
                           jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=variables.get("frozen", {}), batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def with_masks(variables: dict, model, mesh=None, fold: bool = False) -> dict:
    """variables plus the `masks` collection: every edge-popup layer's mask, selected in one pass
    over all layers (split over the mesh's devices), which the layers then use. fold=True (for
    evaluation) stores W * mask instead of the mask, multiplied here once."""
    if model.mask != "edge_popup" or selection.MASKS in variables:
        return variables
    masks = selection.edge_popup_masks(variables["params"], model.keep_fraction, model.mask_scope,
                                       mesh, sharding.DATA_AXIS)
    if fold:
        masks = selection.fold_into_kernels(variables["frozen"], masks)
    return {**variables, selection.MASKS: masks}


def train_step(state: TrainState, batch, *, model, tx, num_classes: int, label_smoothing: float,
               mean, std, mesh=None):
    rng = jax.random.fold_in(state.rng, state.step)
    images = input_pipeline.normalize(batch["image"], mean, std)

    def loss_fn(params):
        variables = with_masks({**_variables(state), "params": params}, model, mesh)
        logits, updates = model.apply(variables, images, train=True,
                                      mutable=["batch_stats"], rngs={"mask": rng})
        loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
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
            saved = (f"the latest checkpoint (step {last_saved}) is from before it and intact"
                     if last_saved is not None else "no checkpoint was saved")
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {float(metrics['loss'])}, non-finite loss "
                f"or gradients; stopped without saving that state ({saved}). Lower "
                "optim.learning_rate or add warm-up (optim.warmup_epochs), then resume or restart")


def eval_step(variables, batch, *, model, num_classes: int, mean, std, mesh=None):
    """Sums over the real (mask = 1) examples of the batch: loss, top-1 and top-5 hits, count.
    Uses variables' `masks` when given (the trainer selects them once per evaluation)."""
    images = input_pipeline.normalize(batch["image"], mean, std)
    # A fixed `mask` key: supermask_eval="sample" evaluates one sampled subnetwork, the same in
    # every batch and every evaluation, on every device (other modes draw nothing from it).
    logits = model.apply(with_masks(variables, model, mesh), images, train=False,
                         rngs={"mask": jax.random.PRNGKey(EVAL_MASK_SEED)})
    mask = batch["mask"]
    labels = batch["label"]
    top = jax.lax.top_k(logits, min(5, num_classes))[1]
    hits5 = jnp.any(top == labels[:, None], axis=-1)
    return {"loss": jnp.sum(cross_entropy(logits, labels, num_classes) * mask),
            "top1": jnp.sum((top[:, 0] == labels) * mask),
            "top5": jnp.sum(hits5 * mask),
            "count": jnp.sum(mask)}


def tree_hash(tree) -> str:
    """sha256 over every leaf's bytes, in path order: equal hashes mean bit-identical trees."""
    h = hashlib.sha256()
    for path, leaf in sorted(flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/").items()):
        h.update(path.encode())
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def check_kept_counts(state: TrainState, config) -> list[summary.LayerStats]:
    """Every edge-popup layer keeps exactly kept_count(n, k) weights; raises if not."""
    k, scope = config.model.keep_fraction, config.model.get("mask_scope", "layer")
    rows = summary.layer_stats({"params": state.params}, k, config.model.get("mask", "edge_popup"),
                               mask_scope=scope)
    masked = [r for r in rows if r.mode == "edge_popup"]
    groups = [masked] if scope == "global" else [[r] for r in masked]
    for group in groups:
        total, kept = sum(r.total for r in group), sum(r.kept for r in group)
        if kept != masking.kept_count(total, k):
            raise RuntimeError(f"layers {[r.name for r in group]} keep {kept} of {total} weights, "
                               f"expected {masking.kept_count(total, k)}")
    return rows


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so the loop can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self, sync: bool) -> bool:
        """Whether any process got SIGTERM. With several processes they must agree, which costs a
        host sync, so they compare flags only when `sync` (log and eval steps)."""
        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


class _Writer:
    """TensorBoard scalars from process 0 (a no-op elsewhere); tf.summary writes to gs:// too."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf
            self._writer = tf.summary.create_file_writer(workdir)

    def scalars(self, step: int, values: dict):
        if self._writer is not None:
            import tensorflow as tf
            with self._writer.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, float(v), step=step)
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


def _write_json_atomically(path: epath.Path, obj) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def make_eval_fn(model, num_classes: int, mesh, data_config):
    """eval_step jitted over the mesh: variables replicated, batch sharded; normalises the
    batch's uint8 images with data_config's mean and std."""
    return jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes, mesh=mesh,
                                     mean=tuple(data_config.mean), std=tuple(data_config.std)),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                   out_shardings=sharding.replicated(mesh))


def make_masks_fn(model, mesh):
    """variables -> variables with the masks folded into the kernels (the `masks` collection),
    jitted over the mesh (replicated): what an evaluation computes once before its batches."""
    return jax.jit(functools.partial(with_masks, model=model, mesh=mesh, fold=True),
                   in_shardings=sharding.replicated(mesh), out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Steps:
    """A run's jitted functions on a mesh, with their shardings and donation: what the trainer
    runs, and exactly what `preflight` compiles ahead of time for an accelerator."""
    init: Any  # seed -> replicated TrainState
    train: Any  # (state, batch) -> (state, metrics); the state is donated
    eval: Any  # (variables, batch) -> sums over the batch's real examples
    masks: Any  # variables -> variables with every layer's mask (once per evaluation)


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
    channels = info.image_shape[-1]
    for field in ("mean", "std"):
        values = tuple(config.data[field])
        if len(values) not in (1, channels):
            allowed = "1 value" if channels == 1 else f"1 value or {channels}"
            raise ValueError(f"data.{field} has {len(values)} values, but {config.data.name} images "
                             f"have {channels} channel(s): give {allowed}")
    if min(config.data.std) <= 0:
        raise ValueError(f"data.std must be > 0 for every channel, got {tuple(config.data.std)}")


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
    init = jax.jit(functools.partial(create_state, plan.model, plan.tx, tuple(info.image_shape)),
                   static_argnums=0, out_shardings=repl)
    train = jax.jit(functools.partial(train_step, model=plan.model, tx=plan.tx,
                                      num_classes=info.num_classes,
                                      label_smoothing=config.optim.get("label_smoothing", 0.0),
                                      mean=tuple(config.data.mean), std=tuple(config.data.std),
                                      mesh=mesh),
                    in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
    return Steps(init=init, train=train,
                 eval=make_eval_fn(plan.model, info.num_classes, mesh, config.data),
                 masks=make_masks_fn(plan.model, mesh))


def evaluate(variables, jitted_eval, config, mesh, masks_fn=None) -> dict:
    """Top-1, top-5 and loss over the whole eval split (every example exactly once).
    masks_fn (Steps.masks): select the masks once here rather than in every eval batch."""
    if masks_fn is not None:
        variables = masks_fn(variables)
    totals = None
    local, _ = sharding.eval_batch_sizes(config.get("eval_batch_size") or config.batch_size, mesh)
    for batch in input_pipeline.eval_iterator(config.data, batch_size=local):
        sums = jitted_eval(variables, sharding.to_global(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count, "count": int(totals["count"])}


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
    """
    # Everything that can be wrong with the config fails here, before anything is written.
    info = input_pipeline.get_info(config.data)
    plan = make_plan(config, info)  # here, so a bad config fails before the mesh is built
    mesh = sharding.make_mesh(devices)
    local_batch = sharding.local_batch_size(config.batch_size, mesh)
    _, eval_global = sharding.eval_batch_sizes(
        config.get("eval_batch_size") or config.batch_size, mesh)
    total_steps, steps_per_epoch, schedule = plan.total_steps, plan.steps_per_epoch, plan.schedule
    eval_every = config.get("eval_every_steps", 0) or steps_per_epoch
    ckpt_every = config.get("checkpoint_every_steps", 0) or steps_per_epoch
    log_every = config.get("log_every_steps", 50)
    plan, steps = plan_and_steps(config, info, mesh)
    num_processes = sharding.process_count(mesh)

    state = steps.init(config.seed)
    frozen_hash_init = tree_hash(state.frozen)

    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    meta = {"model": config.model.to_dict(), "seed": config.seed, "dataset": config.data.name,
            "batch_size": config.batch_size, "num_classes": info.num_classes,
            "process_count": num_processes}
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.get("keep_checkpoints", 3))
    data_order_change = None
    history, eval_history, throughput = [], [], []  # kept in every checkpoint's meta
    if checkpointer.latest_step() is not None:
        expected = {k: meta[k] for k in ("model", "seed", "dataset", "batch_size")}
        expected["model"] = {**ADDED_MODEL_OPTIONS, **expected["model"]}
        state, saved_meta = checkpointer.restore(
            state, expected, added_defaults={"model": ADDED_MODEL_OPTIONS})
        logging.info("Resumed from step %d of %s", int(state.step), checkpointer.directory)
        saved_history = saved_meta.get("history") or {}
        history, eval_history, throughput = (list(saved_history.get(k, []))
                                             for k in ("train", "eval", "throughput"))
        saved_processes = saved_meta.get("process_count")
        if saved_processes != num_processes:
            # Each process shuffles its own contiguous shard, so the batches after this step
            # differ from those the saved run would have seen (the data seen per epoch does not).
            data_order_change = {"step": int(state.step), "process_count_before": saved_processes,
                                 "process_count_now": num_processes}
            logging.warning("DATA ORDER CHANGED: checkpoint %d was written by %s processes, this run "
                            "has %d; training continues from the same state, but the batches from "
                            "step %d on differ from the original run's", int(state.step),
                            saved_processes if saved_processes is not None else "an unknown number of",
                            num_processes, int(state.step))
    if tree_hash(state.frozen) != frozen_hash_init:
        raise ckpt_lib.CheckpointError("the checkpoint's frozen weights differ from this seed's")
    logging.info("Frozen weights sha256 %s", frozen_hash_init)

    writer = _Writer(workdir)
    start_step = int(state.step)
    train_iter = input_pipeline.train_iterator(config.data, batch_size=local_batch, seed=config.seed,
                                               start_step=start_step)
    logging.info("Training %s on %s: %d steps (%d per epoch), global batch %d on %d devices, "
                 "%d processes; eval batch %d (%d per device)", config.model.name, config.data.name,
                 total_steps, steps_per_epoch, config.batch_size, mesh.devices.size, num_processes,
                 eval_global, eval_global // mesh.devices.size)

    def meta_with_history():
        return {**meta, "history": {"train": history, "eval": eval_history, "throughput": throughput}}

    def is_eval_step(s):
        return s % eval_every == 0 or s == total_steps

    def run_evaluation(s):
        result = evaluate(_variables(state), steps.eval, config, mesh, steps.masks)
        eval_history.append({"step": s, "epoch": s / steps_per_epoch, **result})
        logging.info("eval at step %d: top-1 %.4f  top-5 %.4f  loss %.4f (%d examples)",
                     s, result["top1"], result["top5"], result["loss"], result["count"])
        writer.scalars(s, {f"eval/{k}": v for k, v in result.items() if k != "count"})
        return result

    # Several CPU devices (simulated, XLA_FLAGS=--xla_force_host_platform_device_count): with
    # many steps queued, XLA:CPU's in-process all-reduce rendezvous sometimes never completes
    # (2 of 3 one-epoch runs of the default config on 8 such devices and 2 cores hung here).
    # Waiting for each step there avoids it; accelerators keep asynchronous dispatch.
    simulated_devices = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    t_start = time.time()
    pending, last_eval, preempted = [], None, False
    t_log, steps_since_log = time.time(), 0
    step = start_step
    if eval_history and eval_history[-1]["step"] == step:
        last_eval = {k: v for k, v in eval_history[-1].items() if k not in ("step", "epoch")}
    try:  # on any failure, still finish the checkpoint saves already started
        if 0 < step <= total_steps and is_eval_step(step) and last_eval is None:
            last_eval = run_evaluation(step)  # saved before its evaluation ran: run it now
        with _Preemption() as preemption:
            while step < total_steps:
                batch = sharding.to_global(next(train_iter), mesh)
                state, metrics = steps.train(state, batch)
                if simulated_devices:
                    jax.block_until_ready(metrics)
                step += 1
                pending.append((step, metrics))
                steps_since_log += 1
                if step % log_every == 0 or step == total_steps:
                    pending = jax.device_get(pending)
                    check_finite(pending, checkpointer.latest_step())
                    values = jax.tree.map(lambda *xs: float(np.mean(xs)), *[m for _, m in pending])
                    values.pop("finite")
                    pending = []
                    history.append({"step": step, **values})
                    elapsed = time.time() - t_log
                    images_per_sec = steps_since_log * config.batch_size / max(elapsed, 1e-9)
                    if step - start_step > steps_since_log:  # the first interval includes compilation
                        throughput.append(images_per_sec)
                    t_log, steps_since_log = time.time(), 0
                    lr = float(schedule(step - 1))
                    eta = (total_steps - step) * config.batch_size / images_per_sec
                    logging.info("step %d/%d  epoch %.2f  loss %.4f  acc %.4f  lr %.4g  %.0f img/s  ETA %s",
                                 step, total_steps, step / steps_per_epoch, values["loss"],
                                 values["accuracy"], lr, images_per_sec, _format_eta(eta))
                    writer.scalars(step, {"train/loss": values["loss"], "train/accuracy": values["accuracy"],
                                          "train/learning_rate": lr, "train/images_per_sec": images_per_sec})
                # Save (or start saving) the step's checkpoint, and honour SIGTERM, before evaluating:
                # a failure in evaluation must not lose the training done.
                evaluating = is_eval_step(step)
                stop_now = stop_after_steps is not None and step - start_step >= stop_after_steps
                sync = step % log_every == 0 or evaluating
                saving = step % ckpt_every == 0 or step == total_steps
                stop = stop_now or preemption.any_process(sync=sync)
                if stop or saving:
                    check_finite(pending, checkpointer.latest_step())  # never save a diverged state
                if stop:
                    preempted = True
                    checkpointer.save(step, state, meta_with_history(), force=True)
                    logging.info("Stopping at step %d (%s); checkpoint saved", step,
                                 "requested" if stop_now else "SIGTERM")
                    break
                if saving:
                    checkpointer.save(step, state, meta_with_history())
                if evaluating:
                    checkpointer.wait()  # the step's checkpoint is complete before evaluating
                    last_eval = run_evaluation(step)
        if last_eval is None and not preempted:  # resumed a finished run: nothing to train, still report
            last_eval = evaluate(_variables(state), steps.eval, config, mesh, steps.masks)
    finally:
        checkpointer.close()
        writer.close()

    if tree_hash(state.frozen) != frozen_hash_init:
        raise RuntimeError("frozen weights changed during training: this is a bug")
    rows = check_kept_counts(state, config)
    results = {
        "step": step, "total_steps": total_steps, "preempted": preempted,
        "eval": last_eval,
        "frozen_sha256": frozen_hash_init,
        "state_sha256": tree_hash({"params": state.params, "batch_stats": state.batch_stats,
                                   "opt_state": flax.serialization.to_state_dict(state.opt_state)}),
        "train_history": history,
        "eval_history": eval_history,
        "layers": [dict(name=r.name, shape=list(r.shape), total=r.total, kept=r.kept, mode=r.mode)
                   for r in rows],
        "weights_total": sum(r.total for r in rows), "weights_kept": sum(r.kept for r in rows),
        "images_per_sec": float(np.median(throughput)) if throughput else None,
        "wall_time_sec": time.time() - t_start,
        "num_devices": int(mesh.devices.size), "num_processes": num_processes,
        "data_order_changed": data_order_change,
        "config": config.to_dict(),
    }
    if jax.process_index() == 0:
        _write_json_atomically(epath.Path(workdir) / "results.json", results)
    if not preempted:
        logging.info("Done: top-1 %.4f top-5 %.4f; kept %d of %d weights\n%s",
                     last_eval["top1"], last_eval["top5"], results["weights_kept"],
                     results["weights_total"], summary.format_table(rows))
    return results
