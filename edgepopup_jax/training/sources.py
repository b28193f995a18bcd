"""Where a group's batches come from: one interface, three kinds of source.

The loop asks a source for each step's `item` (global arrays on the mesh); the jitted step turns
it into the runs' batches with the source's traced `batches(item, step)`:

- DeviceSource: the data set resident on the devices as uint8 (or in host memory when it does
  not fit). The item is this epoch's per-run permutations; each run's batch is gathered and
  augmented inside the step, by its own seed (device_data's determinism contract).
- StreamSource: the tf.data pipeline (input_pipeline), for ImageNet and anything that does not
  fit. Each process reads its share of every global batch, and all R runs of a group see the same
  batch: one decode feeds R runs.
- IteratorSource: your own iterators of numpy batches {"image": uint8 [B, H, W, C], "label":
  int [B]} (eval batches add "valid"), fed like a stream.

`shared` says whether one batch feeds every run (streams) or each run has its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edgepopup_jax.training import device_data, input_pipeline, sharding

RUNS_AXIS, DATA_AXIS = sharding.RUNS_AXIS, sharding.DATA_AXIS


def _local_share(global_size: int, mesh: Mesh, what: str) -> int:
    """This process's rows of a global batch split over the mesh's data axis."""
    n, p = mesh.shape[DATA_AXIS], sharding.process_count(mesh)
    if global_size <= 0 or global_size % n:
        raise ValueError(f"{what} {global_size} cannot be split over the {n} devices of the data axis: "
                         f"use a positive multiple of {n}")
    return global_size // p


def gather_batches(images, labels, permutations, seeds, step, *, steps_per_epoch: int,
                   batch_size: int, augment: str):
    """Every run's batch of `step`: its slice of this epoch's permutation, gathered and augmented
    (device_data.train_batch, vmapped over the runs). Traceable."""
    epoch, index = step // steps_per_epoch, step % steps_per_epoch
    gather = functools.partial(device_data.train_batch, batch_size=batch_size, augment=augment)
    return jax.vmap(gather, in_axes=(None, None, 0, 0, None, None))(
        images, labels, permutations, seeds, epoch, index)


def _as_is(item, step):
    return item


@dataclasses.dataclass
class DeviceSource:
    """The data set in memory: per-run order and augmentation, computed on the devices."""
    train: dict  # {"image", "label"}: on the devices (replicated), or on the host's CPU device
    eval_data: dict  # {"image", "label", "valid"} [num_batches, B, ...], replicated
    seeds: Any  # [R] int32 data seeds, split over the runs
    batches: Callable  # (item, step) -> every run's batch, traced in the step
    item_sharding: dict
    on_host: bool
    shared: bool = False
    process_dependent: bool = False  # the batches do not depend on the process count
    _epoch: int | None = None
    _permutations: Any = None
    _host_gather: Any = None
    _permute: Any = None
    _steps_per_epoch: int = 1

    def start(self, step: int) -> None:
        del step  # the batch of a step follows from the step alone

    def next(self, step: int):
        epoch = step // self._steps_per_epoch
        if epoch != self._epoch:
            self._permutations, self._epoch = self._permute(self.seeds, epoch), epoch
        if not self.on_host:
            return {**self.train, "permutations": self._permutations, "seed": self.seeds}
        cpu = jax.devices("cpu")[0]
        batch = self._host_gather(self.train["image"], self.train["label"],
                                  jax.device_put(self._permutations, cpu),
                                  jax.device_put(self.seeds, cpu), step)
        return jax.device_put(batch, self.item_sharding)

    def eval_chunks(self) -> Iterator[dict]:
        yield self.eval_data


def device_source(data_config, arrays, *, num_runs_seeds, steps_per_epoch: int, batch_size: int,
                  eval_batch_size: int, mesh: Mesh, on_host: bool) -> DeviceSource:
    """arrays: (train images, train labels, eval images, eval labels) as numpy."""
    train_images, train_labels, eval_images, eval_labels = arrays
    runs = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
    repl = NamedSharding(mesh, PartitionSpec())
    gather = functools.partial(gather_batches, steps_per_epoch=steps_per_epoch,
                               batch_size=batch_size, augment=data_config.augment)
    n = len(train_labels)
    permute = jax.jit(jax.vmap(lambda seed, epoch: device_data.epoch_permutation(seed, epoch, n),
                               in_axes=(0, None)), out_shardings=runs)
    seeds = sharding.place(np.asarray(num_runs_seeds, np.int32), runs)
    eval_data = sharding.place(device_data.eval_batches(eval_images, eval_labels, eval_batch_size), repl)
    if on_host:
        cpu = jax.devices("cpu")[0]
        train = jax.device_put({"image": train_images, "label": train_labels}, cpu)
        return DeviceSource(train, eval_data, seeds, _as_is,
                            NamedSharding(mesh, PartitionSpec(RUNS_AXIS, DATA_AXIS)), True,
                            _host_gather=jax.jit(gather), _permute=permute,
                            _steps_per_epoch=steps_per_epoch)
    train = sharding.place({"image": train_images, "label": train_labels}, repl)

    def batches(item, step):
        return gather(item["image"], item["label"], item["permutations"], item["seed"], step)

    return DeviceSource(train, eval_data, seeds, batches,
                        {"image": repl, "label": repl, "permutations": runs, "seed": runs}, False,
                        _permute=permute, _steps_per_epoch=steps_per_epoch)


@dataclasses.dataclass
class StreamSource:
    """Batches that arrive from the host: each process gives its rows of every global batch, and
    every run of the group trains on the same batch."""
    train_from: Callable[[int], Iterator[dict]]  # start_step -> this process's train batches
    eval_from: Callable[[], Iterator[dict]]  # -> this process's eval batches (with "valid")
    mesh: Mesh
    process_dependent: bool = True  # each process shuffles its own shard
    shared: bool = True
    _iterator: Any = None

    @property
    def item_sharding(self):
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    batches = staticmethod(_as_is)

    def start(self, step: int) -> None:
        self._iterator = self.train_from(step)

    def next(self, step: int):
        del step
        return sharding.to_global_on(next(self._iterator), self.item_sharding)

    def eval_chunks(self) -> Iterator[dict]:
        where = NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS))
        for batch in self.eval_from():
            yield sharding.to_global_on(jax.tree.map(lambda x: x[None], batch), where)


def stream_source(data_config, *, batch_size: int, eval_batch_size: int, seed: int, mesh: Mesh,
                  bad: input_pipeline.BadExamples) -> StreamSource:
    """The tf.data pipeline of data_config, this process's share of the batches."""
    local = _local_share(batch_size, mesh, "batch_size")
    n = mesh.shape[DATA_AXIS]
    eval_local = -(-eval_batch_size // n) * n // sharding.process_count(mesh)
    return StreamSource(
        lambda start: input_pipeline.train_iterator(data_config, batch_size=local, seed=seed,
                                                    start_step=start, bad=bad),
        lambda: input_pipeline.eval_iterator(data_config, batch_size=eval_local, bad=bad), mesh)


@dataclasses.dataclass(frozen=True)
class IteratorSource:
    """Your own data: `train(start_step)` returns an iterator of this process's numpy train
    batches from that step on; `eval()` one of its eval batches (the whole split once, padding
    marked by valid = 0). `info` describes the data (classes, image shape, split sizes)."""
    info: input_pipeline.DatasetInfo
    train: Callable[[int], Iterator[dict]]
    eval: Callable[[], Iterator[dict]]

    def open(self, mesh: Mesh) -> StreamSource:
        return StreamSource(self.train, self.eval, mesh, process_dependent=False)
