"""Devices and data placement: one code path for 1 CPU, 8 GPUs or a TPU pod.

The mesh has a single `data` axis over all devices of all processes; the batch is sharded on
it and the train state is replicated. Each process feeds only its own share of the batch.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, multihost: bool = False) -> None:
    """Joins a multi-process job: explicit coordinator flags; or multihost=True, where
    jax.distributed finds its peers itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes); or
    auto-detected on SLURM with several tasks. Otherwise (a single process) does nothing.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id too")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global batch; the global batch must split evenly over devices."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"batch size {global_batch_size} must be divisible by the number of "
                         f"devices ({n})")
    return global_batch_size // jax.process_count()


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy arrays (this process's rows) -> global jax.Arrays sharded on `data`."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
