"""Devices and data placement: one code path for 1 CPU, 8 GPUs or a TPU pod.

The mesh is 2-D, (runs, data), over all devices of all processes: a group's runs are split over
`runs`, every run's batch over `data`. A run's state is replicated over `data`, or with
state_sharding="fsdp" each large array is split over it (XLA gathers the weights for the
forward). Each process feeds only its own share of the batch.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RUNS_AXIS, DATA_AXIS = "runs", "data"
SPLITS = ("runs", "data")  # what the devices split: the runs (default) or every run's batch
STATE_SHARDINGS = ("replicated", "fsdp")
# With fsdp, smaller arrays (BatchNorm statistics, biases, the step, the rng) stay replicated:
# gathering them would cost more than the memory they take.
FSDP_MIN_SIZE = 2**12


# A process that stops answering for this long ends the job (main.py's supervisor explains it).
HEARTBEAT_TIMEOUT_S = 40


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, multihost: bool = False) -> None:
    """Joins a multi-process job: explicit coordinator flags; or multihost=True, where
    jax.distributed finds its peers itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes); or
    auto-detected on SLURM with several tasks. Otherwise (a single process) does nothing.
    """
    # Collectives between the processes' CPU devices (a CPU-only job, or tests) need gloo;
    # accelerators use their own.
    if coordinator_address or multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id too")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    elif multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown parallel_split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


def make_mesh(devices=None, num_runs: int = 1, batch_size: int | None = None,
              split: str = "runs") -> Mesh:
    """The (runs, data) mesh over `devices` (default: every device of every process) for a
    group of num_runs runs. split="runs": as many devices on the runs axis as divide both the
    device count and the number of runs (gcd), the rest split each run's batch; "data": every
    device splits the batch, each holds every run. Devices of several processes always split
    the batch (each process feeds its share of it). batch_size: checked to split evenly."""
    check_split(split)
    devices = np.asarray(jax.devices() if devices is None else list(devices))
    n = devices.size
    several = len({d.process_index for d in devices.flat}) > 1
    on_runs = math.gcd(num_runs, n) if split == "runs" and not several else 1
    on_data = n // on_runs
    if batch_size is not None and (batch_size <= 0 or batch_size % on_data):
        raise ValueError(f"batch_size {batch_size} cannot be split over the {on_data} devices of the "
                         f"data axis ({n} devices, {on_runs} on the runs axis): it must be a positive "
                         f"multiple of {on_data}; the nearest that work are "
                         f"{nearest_multiples(max(batch_size, 1), on_data)}")
    return Mesh(devices.reshape(on_runs, on_data), (RUNS_AXIS, DATA_AXIS))


def place(tree, where: NamedSharding):
    """Host numpy arrays, equal on every process, as global arrays placed as `where` says."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, where, lambda i: x[i]), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_state_sharding(mode: str) -> str:
    if mode not in STATE_SHARDINGS:
        raise ValueError(f"unknown state_sharding {mode!r}; allowed: {', '.join(STATE_SHARDINGS)}")
    return mode


def state_shardings(abstract_tree, mesh: Mesh, mode: str):
    """A NamedSharding per leaf of abstract_tree (shapes suffice). "replicated": all replicated.
    "fsdp": each array of >= FSDP_MIN_SIZE elements is split over `data` along its largest
    dimension that the device count divides (ties: the first); arrays with no such dimension,
    and small ones, stay replicated."""
    check_state_sharding(mode)
    n = mesh.shape[DATA_AXIS]

    def one(leaf):
        dims = [i for i, size in enumerate(leaf.shape) if size % n == 0]
        if mode == "replicated" or n == 1 or leaf.size < FSDP_MIN_SIZE or not dims:
            return replicated(mesh)
        axis = max(dims, key=lambda i: (leaf.shape[i], -i))
        return NamedSharding(mesh, PartitionSpec(*[DATA_AXIS if i == axis else None
                                                   for i in range(len(leaf.shape))]))

    return jax.tree.map(one, abstract_tree)


@functools.lru_cache(maxsize=8)
def _replicator(mesh: Mesh):
    return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def replicate(tree, mesh: Mesh):
    """tree with every array replicated over the mesh: fully addressable on every process, so
    it can be read on the host (a copy for arrays that already are)."""
    return _replicator(mesh)(tree)


def process_count(mesh: Mesh) -> int:
    """How many processes own devices of the mesh (each feeds its own share of every batch)."""
    return len({d.process_index for d in mesh.devices.flat})


def local_device_count(mesh: Mesh) -> int:
    """How many of the mesh's devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def nearest_multiples(value: int, n: int) -> str:
    below, above = value // n * n, (value // n + 1) * n
    return f"{below} or {above}" if below > 0 else f"{above}"


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global train batch; raises unless it splits evenly over the
    mesh's devices (which also gives every process a non-empty share)."""
    n, p = mesh.devices.size, process_count(mesh)
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"batch_size {global_batch_size} cannot be split over {n} devices ({p} processes): it "
            f"must be a positive multiple of {n}; the nearest that work are "
            f"{nearest_multiples(max(global_batch_size, 1), n)}")
    return global_batch_size // p


def eval_batch_sizes(eval_batch_size: int, mesh: Mesh) -> tuple[int, int]:
    """(per-process, global) eval batch for `eval_batch_size` on this mesh.

    Any eval batch size works on any device count: each device gets ceil(eval_batch_size / n)
    examples, so the global batch is eval_batch_size rounded up to a multiple of n. The eval
    iterator pads the split's last batches (valid 0), so every example is still counted once.
    """
    if eval_batch_size <= 0:
        raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size}")
    per_device = -(-eval_batch_size // mesh.devices.size)
    return per_device * local_device_count(mesh), per_device * mesh.devices.size


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy arrays (this process's rows) -> global jax.Arrays sharded on `data`."""
    return to_global_on(local_batch, batch_sharded(mesh))


def to_global_on(local_batch: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy arrays (this process's share) -> global jax.Arrays placed by sharding."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
