"""The one training loop: R >= 1 runs trained together by one jitted step (step.py) from one
source of batches (sources.py). A single run is a group of one.

    config -> source -> group -> mesh -> steps -> loop -> each run's directory

Each run behaves as if it trained alone: its state, random numbers and (device source) batches
follow from its own seed and the step only, and it has its own directory with its checkpoints,
results.json and TensorBoard events. A run whose loss or gradients stop being finite is frozen
at its last good state and recorded as diverged (never saved after it); the others go on. A
group resumes from the newest step that every run of it saved. IteRand's redraws and the
fine-tuning phase are stages of this loop; SIGTERM saves every run and returns.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from edgepopup_jax.core import summary
from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import (device_data, files, input_pipeline, iterand, optim, parallel,
                                    sharding, sources, step as step_lib, train, workdir_lock)
from edgepopup_jax.training.metric_writer import MetricWriter
from edgepopup_jax.training.parallel import RUNS_AXIS
from edgepopup_jax.training.preemption import Preemption


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
                       stop_after_steps: int | None = None, source=None) -> dict:
    """Trains config's model on config's data, evaluating and checkpointing into workdir: a
    group of one (train_group). Resumes from the latest checkpoint in workdir at its exact step;
    SIGTERM saves a checkpoint and returns early (results["preempted"]).

    Returns the results also written to workdir/results.json: final eval (top1, top5, loss),
    step, total_steps, preempted, train/eval history, kept weights per layer, images/s, wall time.

    Raises:
      ValueError: a bad config or data set (before anything is written), or a checkpoint in
        workdir that is corrupted or belongs to another run (checkpoint.CheckpointError).
      train.TrainingDiverged: the loss or gradients stopped being finite; the last good
        checkpoint is kept as the latest.
      workdir_lock.WorkdirBusy: another live job trains in workdir (nothing is touched).
    """
    result, = train_group([config], [workdir], devices=devices, stop_after_steps=stop_after_steps,
                          source=source)
    if result.get("status") == "diverged":
        raise train.TrainingDiverged(result["message"])
    return result


def train_group(configs: list, workdirs: list, *, devices=None, cache_dir: str | None = None,
                stop_after_steps: int | None = None, say=None, source=None) -> list[dict]:
    """Trains configs' runs as one group, run i into workdirs[i].

    Args:
      configs: full configs (see configs/base.py) that differ only in parallel.VARYING fields.
      workdirs: one directory per run: its checkpoints/, TensorBoard events and results.json.
      devices: the mesh's devices (default: all of every process); config.parallel_split says
        what they split.
      cache_dir: where a decoded image folder is cached (default: beside the first workdir).
      stop_after_steps: stop after this many steps, saving every run's checkpoint (as SIGTERM).
      say: called with one line per group event (default: absl logging).
      source: a sources.IteratorSource of your own batches (default: config.data.pipeline's).

    Returns:
      Per run, the results written to its results.json, or {"status": "diverged", "message",
      "step"} for a run that diverged.

    Raises:
      ValueError: a bad config, configs that cannot form a group (parallel.GroupError), or a
        checkpoint that belongs to another run.
      workdir_lock.WorkdirBusy: another live job trains in one of workdirs (nothing is touched).
    """
    if len(configs) != len(workdirs) or len(set(map(str, workdirs))) != len(workdirs):
        raise ValueError("train_group needs one distinct workdir per config")
    with workdir_lock.hold(*map(str, workdirs)):
        return _train(list(configs), [str(w) for w in workdirs], devices, cache_dir,
                      stop_after_steps, say or (lambda line: logging.info("%s", line)), source)


# ----------------------------------------------------------------------------- the data


@dataclasses.dataclass
class _Data:
    """A config's data before the mesh exists: its info, the examples that do not decode, and
    how to make the source once the group and mesh are known."""
    pipeline: str
    info: input_pipeline.DatasetInfo
    bad: input_pipeline.BadExamples
    arrays: tuple | None = None  # the device source's numpy splits
    given: sources.IteratorSource | None = None


def _open_data(config, devices, cache_dir: str, given) -> _Data:
    bad = input_pipeline.BadExamples(config.data)
    if given is not None:
        return _Data("iterator", given.info, bad, given=given)
    pipeline = parallel.pipeline_for(config, devices)
    if pipeline == "tf_data":
        return _Data(pipeline, input_pipeline.get_info(config.data), bad)
    device_data.check_device_augment(config.data.augment)
    info = device_data.get_info(config.data, cache_dir)
    arrays = (*device_data.load_split(config.data, config.data.train_split, cache_dir, bad),
              *device_data.load_split(config.data, config.data.eval_split, cache_dir, bad))
    if bad.count:  # every image is decoded before training: the epochs are those that decoded
        info = dataclasses.replace(info, num_train=len(arrays[1]), num_eval=len(arrays[3]))
    return _Data(pipeline, info, bad, arrays)


def _make_source(data: _Data, config, group: parallel.Group, mesh, say):
    eval_batch = config.eval_batch_size or config.batch_size
    if data.given is not None:
        return data.given.open(mesh)
    if data.pipeline == "tf_data":
        if group.size > 1 and len({c.seed for c in group.configs}) > 1:
            say(f"the {group.size} runs share one tf.data stream (the order of seed "
                f"{config.seed}); their seeds differ only in their weights, scores and masks")
        return sources.stream_source(config.data, batch_size=config.batch_size,
                                     eval_batch_size=eval_batch, seed=config.seed, mesh=mesh,
                                     bad=data.bad)
    # A data set that does not fit in data.device_memory_fraction of a device's memory stays in
    # host memory: every step's batches are gathered and augmented there (by the same functions,
    # on the host's CPU device) and sent, so a run sees the same batches either way.
    fits, why = device_data.fits_on_device(config.data, data.info, mesh.devices)
    if not fits:
        say(f"the data stays in host memory ({why}); each step's batches are gathered there")
    return sources.device_source(config.data, data.arrays, num_runs_seeds=[c.seed for c in group.configs],
                                 steps_per_epoch=group.steps_per_epoch, batch_size=config.batch_size,
                                 eval_batch_size=eval_batch, mesh=mesh, on_host=not fits)


_COMPILED: dict = {}  # the 8 most recent groups' Steps


def _steps_for(group: parallel.Group, mesh, source, state_sharding: str) -> step_lib.Steps:
    """make_steps, reused while the configs (but their seeds), data, mesh and source kind are the
    same, so a resumed or repeated run in one process (a notebook, a sweep, the tests) does not
    compile again: the seeds are arguments of the steps."""
    key = (json.dumps([{**c.to_dict(), "seed": None} for c in group.configs], sort_keys=True,
                      default=str), group.info, mesh, source.batches, source.shared,
           json.dumps(jax.tree.map(str, source.item_sharding)), state_sharding)
    if key not in _COMPILED:
        _COMPILED[key] = step_lib.make_steps(group, mesh, source, state_sharding)
        while len(_COMPILED) > 8:
            _COMPILED.pop(next(iter(_COMPILED)))
    return _COMPILED[key]


# ----------------------------------------------------------------------------- run directories


class _RunDirs:
    """The runs' directories: checkpoints, TensorBoard writers and histories."""

    def __init__(self, configs, workdirs, info, num_processes: int):
        self.workdirs = workdirs
        self.metas = [ckpt_lib.RunMeta(model=c.model.to_dict(), seed=c.seed, dataset=c.data.name,
                                       batch_size=c.batch_size, num_classes=info.num_classes,
                                       process_count=num_processes) for c in configs]
        for w in workdirs:
            epath.Path(w).mkdir(parents=True, exist_ok=True)
        self.checkpointers = [ckpt_lib.Checkpointer(os.path.join(w, "checkpoints"),
                                                    max_to_keep=configs[0].keep_checkpoints)
                              for w in workdirs]
        self.writers = []
        self.histories = [m.history for m in self.metas]

    def open_writers(self, tensorflow: bool) -> None:
        self.writers = [MetricWriter(w, tensorflow=tensorflow) for w in self.workdirs]

    def resumed(self, r: int, saved_meta: dict) -> None:
        self.metas[r] = dataclasses.replace(self.metas[r],
                                            history=ckpt_lib.RunMeta.from_json(saved_meta).history)
        self.histories[r] = self.metas[r].history

    def save(self, r: int, step: int, state, keep_fraction, force: bool = False) -> None:
        meta = dataclasses.replace(self.metas[r], history=self.histories[r], keep_fraction=keep_fraction)
        self.checkpointers[r].save(step, state, meta.to_json(), force=force)

    def wait(self) -> None:
        for c in self.checkpointers:
            c.wait()

    def close(self) -> None:
        for c in self.checkpointers:
            c.close()
        for w in self.writers:
            w.close()


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


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- the loop


def _train(configs, workdirs, devices, cache_dir, stop_after_steps, say, given) -> list[dict]:
    base = configs[0]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdirs[0])), ".data_cache")
    data = _open_data(base, devices, cache_dir, given)  # checks data.pipeline and the data set
    group = parallel.make_group(configs, data.info)  # checks every config: nothing written yet
    mesh = sharding.make_mesh(devices, group.size, base.batch_size, base.parallel_split)
    source = _make_source(data, base, group, mesh, say)
    steps = _steps_for(group, mesh, source, base.state_sharding)
    num_processes = sharding.process_count(mesh)
    runs_sh = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
    hyper = jax.tree.map(lambda x: sharding.place(np.asarray(x), runs_sh), group.hyper)

    def host(tree):  # every process reads the whole tree
        return jax.device_get(sharding.replicate(tree, mesh))

    # Each run's initial state exactly as it would be alone; restored where the group saved.
    states = [init(c.seed) for init, c in zip(steps.init, configs)]
    frozen_hashes = [ckpt_lib.tree_hash(host(s.frozen)) for s in states]
    dirs = _RunDirs(configs, workdirs, data.info, num_processes)
    rerand = steps.redraw is not None
    phase_end = group.total_steps  # the scores' training ends here; fine-tuning (if any) follows
    end = phase_end + group.finetune_steps

    def template_for(at: int, r: int):  # a fine-tuning step's checkpoint holds its optimizer
        return steps.start_finetune(states[r]) if at > phase_end else states[r]

    start, restored, corrupt = _restore_group(dirs.checkpointers, template_for,
                                              [m.identity() for m in dirs.metas],
                                              train.on_corrupt(base), say)
    fine_tuning = start is not None and start > phase_end
    data_order_change = None
    if start is not None:
        for r, c in enumerate(dirs.checkpointers):
            states[r], saved = restored[r]
            dirs.resumed(r, saved)
            # (IteRand's redraws and fine-tuning change them: the checksums vouch for them then)
            if not (rerand or fine_tuning) and ckpt_lib.tree_hash(host(states[r].frozen)) != frozen_hashes[r]:
                raise ckpt_lib.CheckpointError(f"{c.directory}: the frozen weights differ from "
                                               "this seed's")
        saved_processes = ckpt_lib.RunMeta.from_json(restored[0][1]).process_count
        if source.process_dependent and saved_processes != num_processes:
            # Each process shuffles its own contiguous shard, so the batches after this step
            # differ from those the saved run would have seen (the data seen per epoch does not).
            data_order_change = {"step": start, "process_count_before": saved_processes,
                                 "process_count_now": num_processes}
            logging.warning("DATA ORDER CHANGED: checkpoint %d was written by %s processes, this run "
                            "has %d; training continues from the same state, but the batches from "
                            "step %d on differ from the original run's", start,
                            saved_processes if saved_processes is not None
                            else "an unknown number of", num_processes, start)
        say(f"Resumed from step {start}{f' (a group of {group.size})' if group.size > 1 else ''}")
    # (a fine-tuning state holds the fine-tuning optimizer's state: every leaf split over the runs)
    states = jax.device_put(steps.stack(*states), runs_sh if fine_tuning else steps.state_sharding)
    alive = sharding.place(np.ones((group.size,), bool), runs_sh)
    # The frozen weights as the last redraw left them (per leaf, all runs): nothing else may
    # change them, and the end of the run checks that nothing did.
    frozen_after_redraw = ckpt_lib.checksum(states.frozen) if rerand else None
    # Fine-tuning's invariant: the weights the fixed mask prunes never move.
    pruned_at_start = ckpt_lib.checksum(steps.pruned(states, hyper)) if fine_tuning else None
    dirs.open_writers(tensorflow=data.pipeline == "tf_data")

    every = train.Intervals(total=end, log=base.log_every_steps,
                            eval=base.eval_every_steps or group.steps_per_epoch,
                            checkpoint=base.checkpoint_every_steps or group.steps_per_epoch)
    step = start or 0
    say(f"{f'group of {group.size} runs: {parallel.config_summary(configs)}; ' if group.size > 1 else ''}"
        f"{base.model.name} on {base.data.name} ({data.pipeline}): {group.total_steps} steps "
        f"{f'+ {group.finetune_steps} fine-tuning ' if group.finetune_steps else ''}"
        f"({group.steps_per_epoch} per epoch), batch {base.batch_size} per run, mesh "
        f"{dict(mesh.shape)}, {num_processes} process(es)")
    diverged: dict[int, dict] = {}
    last_eval: list = [None] * group.size
    pending: list = []
    since, t_start, throughput_steps = time.time(), time.time(), 0
    # Several CPU devices (simulated, XLA_FLAGS=--xla_force_host_platform_device_count): with
    # many steps queued, XLA:CPU's in-process all-reduce rendezvous sometimes never completes.
    # Waiting for each step there avoids it; accelerators keep asynchronous dispatch.
    simulated_devices = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
    preempted = False
    lr_schedules = [(optim.learning_rate_schedule(c.optim, group.total_steps, group.steps_per_epoch),
                     optim.learning_rate_schedule(c.optim, max(group.finetune_steps, 1),
                                                  group.steps_per_epoch)) for c in configs]
    counts_now = None  # the kept counts in hyper, while a sparsity schedule runs

    def live():
        return [r for r in range(group.size) if r not in diverged]

    def learning_rate(r: int, at: int) -> float:
        """Run r's learning rate in step `at` (fine-tuning restarts the schedule)."""
        scores, finetuning = lr_schedules[r]
        return float(scores(at - 1) if at <= phase_end else finetuning(at - 1 - phase_end))

    def scheduled_k(r: int) -> float | None:
        return group.keep_fractions(step)[r] if group.schedules[r].active else None

    def read_pending(log: bool):
        nonlocal pending, since, throughput_steps
        got = jax.device_get(pending)
        for r in live():
            nonfinite = next(((s, m) for s, m in got if not m["finite"][r]), None)
            if nonfinite is not None:
                s, m = nonfinite
                message = train.diverged_message(s, float(m["loss"][r]),
                                                 dirs.checkpointers[r].latest_step())
                diverged[r] = {"status": "diverged", "message": message, "step": s,
                               "seed": configs[r].seed}
                say(f"run {r} ({workdirs[r]}): {message}"
                    f"{'; the other runs go on' if group.size > 1 else ''}")
        if log and got:
            rate = len(got) * base.batch_size / max(time.time() - since, 1e-9)  # images/s per run
            if throughput_steps:  # the first interval includes compilation
                for r in live():
                    dirs.histories[r]["throughput"].append(rate)
            throughput_steps += 1
            lrs = {r: learning_rate(r, step) for r in live()}
            for r in live():
                values = {k: float(np.mean([m[k][r] for _, m in got])) for k in ("loss", "accuracy")}
                if group.schedules[r].active:
                    values["keep_fraction"] = scheduled_k(r)
                dirs.histories[r]["train"].append({"step": step, **values})
                if dirs.writers:
                    dirs.writers[r].scalars(step, {"train/loss": values["loss"],
                                                   "train/accuracy": values["accuracy"],
                                                   "train/learning_rate": lrs[r],
                                                   "train/images_per_sec": rate})
            losses = " ".join(f"{np.mean([m['loss'][r] for _, m in got]):.4f}" for r in live()[:8])
            lr = " ".join(f"{lrs[r]:.4g}" for r in live()[:8]) if len(set(lrs.values())) > 1 \
                else f"{next(iter(lrs.values()), 0.0):.4g}"
            eta = _format_eta((end - step) * base.batch_size / rate)
            runs = f"{len(live())} of {group.size} runs, " if group.size > 1 else ""
            acc = (f"  acc {np.mean([m['accuracy'][0] for _, m in got]):.4f}"
                   if group.size == 1 else "")
            say(f"step {step}/{end}  epoch {step / group.steps_per_epoch:.2f}  {runs}loss {losses}"
                f"{' ...' if len(live()) > 8 else ''}{acc}  lr {lr}  {rate:.0f} img/s"
                f"{f' per run ({rate * len(live()):.0f} in all)' if group.size > 1 else ''}  ETA {eta}")
            since = time.time()
        pending = []

    def set_counts(at: int) -> None:
        """hyper["counts"] for step `at`, sent only when a schedule changes them."""
        nonlocal counts_now
        if not group.annealing_steps or (counts_now is not None and at > group.annealing_steps):
            return
        new = group.counts(at)
        if counts_now is None or any(not np.array_equal(new[s], counts_now[s]) for s in new):
            hyper["counts"] = jax.tree.map(lambda x: sharding.place(x, runs_sh), new)
            counts_now = new

    def check_frozen_before_finetuning():
        """The scores' training left the weights as they were (or as IteRand redrew them)."""
        if rerand:
            if ckpt_lib.checksum(states.frozen) != frozen_after_redraw:
                raise RuntimeError("frozen weights changed between IteRand's redraws: this is a bug")
            return
        frozen = host(states.frozen)
        for r in live():
            if ckpt_lib.tree_hash(step_lib.take(frozen, r)) != frozen_hashes[r]:
                raise RuntimeError("frozen weights changed during training: this is a bug")

    def save(force=False):
        for r in live():
            dirs.save(r, step, steps.take(states, r), scheduled_k(r), force=force)

    def evaluate():
        set_counts(step)  # the masks the runs have now
        folded = steps.fold({"params": states.params, "frozen": states.frozen,
                             "batch_stats": states.batch_stats}, hyper)
        totals = None
        for chunk in source.eval_chunks():
            sums = steps.eval(folded, chunk)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        sums = jax.device_get(totals)
        for r in live():
            count = max(float(sums["count"][r]), 1.0)
            result = {"top1": float(sums["top1"][r]) / count, "top5": float(sums["top5"][r]) / count,
                      "loss": float(sums["loss"][r]) / count, "count": int(sums["count"][r])}
            dirs.histories[r]["eval"].append({"step": step, "epoch": step / group.steps_per_epoch,
                                              **result})
            if dirs.writers:
                dirs.writers[r].scalars(step, {f"eval/{k}": v for k, v in result.items() if k != "count"})
            last_eval[r] = result
        top1 = " ".join(f"{last_eval[r]['top1']:.4f}" for r in live()[:8])
        detail = ""
        if group.size == 1 and live():
            e = last_eval[0]
            detail = f"  top-5 {e['top5']:.4f}  loss {e['loss']:.4f} ({e['count']} examples)"
        say(f"eval at step {step}: top-1 {top1}{' ...' if len(live()) > 8 else ''}{detail}")

    try:
        for r in range(group.size):
            h = dirs.histories[r]["eval"]
            if h and h[-1]["step"] == step:
                last_eval[r] = {k: v for k, v in h[-1].items() if k not in ("step", "epoch")}
        if 0 < step <= end and every.due(step, every.eval) and None in last_eval:
            evaluate()  # saved before its evaluation ran: run it now
        source.start(step)
        with Preemption() as preemption:
            while step < end and live():
                if step == phase_end and not fine_tuning:  # the mask is fixed from here on
                    check_frozen_before_finetuning()
                    states = jax.vmap(functools.partial(step_lib.start_finetune, group=group))(states)
                    pruned_at_start = ckpt_lib.checksum(steps.pruned(states, hyper))
                    fine_tuning = True
                    say(f"step {step}: the scores' training is done; fine-tuning the kept weights "
                        f"for {group.finetune_steps} steps, the masks fixed")
                set_counts(step)
                step_fn = steps.finetune if fine_tuning else steps.train
                states, alive, metrics = step_fn(states, alive, source.next(step), step, hyper)
                if simulated_devices:
                    jax.block_until_ready(metrics)
                step += 1
                if rerand and step <= phase_end and iterand.due(base.model, step):
                    states = steps.redraw(states, alive, hyper, step)
                    frozen_after_redraw = ckpt_lib.checksum(states.frozen)
                pending.append((step, metrics))
                logging_now, evaluating, saving = (every.due(step, n) for n in
                                                   (every.log, every.eval, every.checkpoint))
                if group.finetune_steps and step == phase_end:  # the subnetwork before fine-tuning
                    evaluating = saving = True
                stop_asked = stop_after_steps is not None and step - (start or 0) >= stop_after_steps
                stop = stop_asked or preemption.any_process(sync=logging_now or evaluating or saving)
                if logging_now or evaluating or saving or stop:
                    read_pending(log=logging_now)  # never save (or evaluate) a diverged state
                if stop:
                    preempted = True
                    save(force=True)
                    say(f"stopping at step {step} ({'requested' if stop_asked else 'SIGTERM'}); "
                        f"{'every run' if group.size > 1 else 'the'}'s checkpoint saved")
                    break
                if saving:
                    save()
                if evaluating and live():
                    dirs.wait()  # the step's checkpoint is complete before evaluating
                    evaluate()
        if None in [last_eval[r] for r in live()] and not preempted:
            evaluate()  # resumed a finished group: nothing to train, still report
    except input_pipeline.BadDataError:  # the state so far trained on good data: keep it
        read_pending(log=False)
        if dirs.checkpointers[0].latest_step() != step:
            save(force=True)
            say(f"Stopping at step {step} (data that does not decode); checkpoint saved")
        raise
    finally:
        dirs.close()

    if fine_tuning:
        if ckpt_lib.checksum(steps.pruned(states, hyper)) != pruned_at_start:
            raise RuntimeError("fine-tuning changed a weight its mask prunes: this is a bug")
    elif rerand and ckpt_lib.checksum(states.frozen) != frozen_after_redraw:
        raise RuntimeError("frozen weights changed between IteRand's redraws: this is a bug")
    wall = time.time() - t_start
    final = host(states)
    results = []
    for r, (config, workdir) in enumerate(zip(configs, workdirs)):
        if r in diverged:
            results.append(diverged[r])
            continue
        state = step_lib.take(final, r)
        if not (rerand or fine_tuning) and ckpt_lib.tree_hash(state.frozen) != frozen_hashes[r]:
            raise RuntimeError("frozen weights changed during training: this is a bug")
        rows = train.check_kept_counts(
            state, group.models[r], lambda k: group.schedules[r].keep_fraction(step, k))
        history = dirs.histories[r]
        result = {
            "step": step, "total_steps": end, "preempted": preempted, "resumed_from": start,
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
            "wall_time_sec": wall, "num_devices": int(mesh.devices.size),
            "num_processes": num_processes, "data_order_changed": data_order_change,
            "pipeline": data.pipeline,
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
            "skipped_examples": data.bad.count, "skipped_files": data.bad.all_names()[:100],
            "group": {"size": group.size, "index": r, "mesh": dict(mesh.shape)},
            "config": config.to_dict(),
        }
        if jax.process_index() == 0:
            files.write_json_atomically(epath.Path(workdir) / "results.json", result)
        if not preempted:
            logging.info("run %d done: top-1 %.4f; kept %d of %d weights\n%s", r,
                         last_eval[r]["top1"], result["weights_kept"], result["weights_total"],
                         summary.format_table(rows))
        results.append(result)
    return results


# ----------------------------------------------------------------------------- main.py's entry


def train_config(config: ml_collections.ConfigDict, workdir: str, devices=None):
    """What main.py runs: one run (results as train_and_evaluate's), or config.parallel_runs
    seeds as one group (a list of results, one per seed, in workdir/seed_<s>). Raises
    train.TrainingDiverged when the one run (or every run) diverged."""
    sharding.check_split(config.parallel_split)
    if config.parallel_runs == 1:
        return train_and_evaluate(config, workdir, devices=devices)
    configs, workdirs = parallel.seed_workdirs(config, workdir)
    results = train_group(configs, workdirs, devices=devices)
    diverged = [r for r in results if r.get("status") == "diverged"]
    if len(diverged) == len(results):
        raise train.TrainingDiverged(diverged[0]["message"])
    return results
