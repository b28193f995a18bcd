"""Accelerators to compile for without having them: `tpu:<libtpu topology>` or `gpu:<kind>:<count>`.

A TPU target is libtpu's deviceless topology (needs `jax[tpu]`); a GPU target is a CUDA topology
built from a GpuTargetConfig of the card (needs jax-cuda12-plugin and -pjrt; the CUDA libraries
themselves are not needed to compile). Both give a Mesh whose devices jit can compile for.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
from jax.sharding import Mesh

from edgepopup_jax.training.sharding import DATA_AXIS

GiB = 2**30

# HBM per JAX device. v4 and v5p run as megacore (one device per chip); v3 as one per core.
TPU_HBM = {"v3": 16 * GiB, "v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
_MEGACORE = ("v4", "v5p")

# The card facts XLA's GPU compiler needs (device memory as the driver reports it).
_GPU_SPECS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", cc=(9, 0), cores=132, fpus=128, clock=1.98,
                 memory=84_942_979_072, bandwidth=3_352_320_000_000, l2=50 * 2**20,
                 smem_core=233_472, smem_optin=232_448),
    "h200": dict(name="NVIDIA H200 141GB HBM3e", cc=(9, 0), cores=132, fpus=128, clock=1.98,
                 memory=151_397_597_184, bandwidth=4_800_000_000_000, l2=50 * 2**20,
                 smem_core=233_472, smem_optin=232_448),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", cc=(8, 0), cores=108, fpus=64, clock=1.41,
                 memory=85_100_068_864, bandwidth=2_039_040_000_000, l2=40 * 2**20,
                 smem_core=167_936, smem_optin=166_912),
    "a100_40gb": dict(name="NVIDIA A100-SXM4-40GB", cc=(8, 0), cores=108, fpus=64, clock=1.41,
                      memory=42_505_273_344, bandwidth=1_555_200_000_000, l2=40 * 2**20,
                      smem_core=167_936, smem_optin=166_912),
}
GPU_KINDS = tuple(_GPU_SPECS)
GPUS_PER_HOST = 8
# XLA preallocates this fraction of GPU memory and can use no more (XLA_PYTHON_CLIENT_MEM_FRACTION).
_GPU_DEFAULT_MEM_FRACTION = 0.75

EXAMPLES = ("tpu:v5e:2x2", "tpu:v5e:2x4", "tpu:v4:2x2x4", "tpu:v5p:2x2x4", "tpu:v6e:2x2",
            "gpu:h100:8", "gpu:a100:8", "gpu:h200:8", "gpu:a100_40gb:8")


class TargetError(ValueError):
    """A target that cannot be compiled for; the message lists what is allowed."""


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as given, e.g. "tpu:v5e:2x4"
    platform: str  # "tpu" or "gpu"
    device_kind: str
    mesh: Mesh  # 1-D `data` mesh over all the target's devices
    hbm_bytes: int  # per device
    usable_bytes: int  # per device: what XLA may allocate

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.mesh.devices.flat})


def _usage() -> str:
    return ("targets are tpu:<version>:<topology> with version one of " + ", ".join(TPU_HBM)
            + " (a libtpu topology name, e.g. v4:2x2x2, v5e:4x4, v5p:2x2x4), or gpu:<kind>:<count> with"
            f" kind one of {', '.join(GPU_KINDS)} and count 1-{GPUS_PER_HOST} or a multiple of "
            f"{GPUS_PER_HOST}; e.g. {', '.join(EXAMPLES[:2])}, {EXAMPLES[5]}")


def gpu_target_config(kind: str) -> str:
    """The GpuTargetConfigProto (text format) of a card, with the fields jax's compiler reads."""
    g = _GPU_SPECS[kind]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g['smem_core']}
  shared_memory_per_block_optin: {g['smem_optin']}
  threads_per_core_limit: 2048
  core_count: {g['cores']}
  fpus_per_core: {g['fpus']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {g['bandwidth']}
  l2_cache_size: {g['l2']}
  clock_rate_ghz: {g['clock']}
  device_memory_size: {g['memory']}
  cuda_compute_capability {{ major: {g['cc'][0]} minor: {g['cc'][1]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{g['name']}"
"""


def _need(module: str, extra_hint: str):
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise TargetError(f"compiling for {extra_hint} needs the preflight extra: "
                          "pip install -e '.[preflight]'")


def _tpu(spec: str, rest: str) -> Target:
    version = rest.split(":", 1)[0]
    if version not in TPU_HBM or not re.fullmatch(r"[a-z0-9]+:\d+(x\d+)+", rest):
        raise TargetError(f"bad TPU target {spec!r}; {_usage()}")
    _need("libtpu", "a TPU")
    # libtpu takes a machine-wide lock meant for real TPUs; a deviceless compile needs none, and
    # without this a second preflight (or test worker) on the same machine would be refused.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    kwargs = {"chip_config_name": "megacore"} if version in _MEGACORE else {}
    try:
        topology = topologies.get_topology_desc(topology_name=rest, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu says what is wrong with the name
        raise TargetError(f"libtpu refuses the topology {rest!r}: {str(e).splitlines()[0]}; "
                          f"{_usage()}") from None
    devices = topology.devices
    return Target(spec, "tpu", devices[0].device_kind, Mesh(np.asarray(devices), (DATA_AXIS,)),
                  TPU_HBM[version], TPU_HBM[version])


def _gpu(spec: str, rest: str) -> Target:
    m = re.fullmatch(r"([a-z0-9_]+):(\d+)", rest)
    if not m or m.group(1) not in _GPU_SPECS:
        raise TargetError(f"bad GPU target {spec!r}; {_usage()}")
    kind, count = m.group(1), int(m.group(2))
    if not (1 <= count <= GPUS_PER_HOST or count % GPUS_PER_HOST == 0):
        raise TargetError(f"bad GPU count {count} in {spec!r}; {_usage()}")
    _need("jax_plugins.xla_cuda12", "a GPU")
    from jax.experimental import topologies
    hosts = max(count // GPUS_PER_HOST, 1)
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=gpu_target_config(kind),
        topology=f"1x{hosts}x{count // hosts}")
    devices = topology.devices
    memory = _GPU_SPECS[kind]["memory"]
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", _GPU_DEFAULT_MEM_FRACTION))
    return Target(spec, "gpu", devices[0].device_kind, Mesh(np.asarray(devices), (DATA_AXIS,)),
                  memory, int(memory * fraction))


def parse_target(spec: str) -> Target:
    """The Target for `tpu:<version>:<topology>` or `gpu:<kind>:<count>`; TargetError if bad."""
    platform, _, rest = (spec or "").partition(":")
    if platform == "tpu":
        return _tpu(spec, rest)
    if platform == "gpu":
        return _gpu(spec, rest)
    raise TargetError(f"bad target {spec!r}; {_usage()}")
