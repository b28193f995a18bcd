"""Which JAX platforms to start: the CPU alone on a machine with no accelerator.

With the CUDA or TPU plugin installed (the [preflight] extra brings both) on a machine without
a GPU or TPU, JAX tries every plugin at its first computation and prints a traceback ending in
"Unable to load CUDA. Is it installed?". `default_to_cpu_without_accelerator` (run when the
package is imported, before JAX starts a backend) sets JAX_PLATFORMS=cpu there, and only there:
a machine with an NVIDIA or AMD GPU or a TPU, or a user's own JAX_PLATFORMS, is left as it is.
"""
from __future__ import annotations

import glob
import os
import sys

# Device files the drivers create: NVIDIA (/dev/nvidia0, ...), AMD ROCm (/dev/kfd), TPU VMs
# (/dev/accel0 on v2-v4, /dev/vfio/<n> on v5e and later).
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
# Set on TPU VMs and by TPU launchers even where the device files are elsewhere.
TPU_ENVIRONMENT = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")


def has_accelerator(device_files=ACCELERATOR_DEVICE_FILES, environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return (any(glob.glob(pattern) for pattern in device_files)
            or any(environ.get(name) for name in TPU_ENVIRONMENT))


def default_to_cpu_without_accelerator(environ=None, device_files=ACCELERATOR_DEVICE_FILES) -> bool:
    """Sets JAX_PLATFORMS=cpu when neither the user (JAX_PLATFORMS, JAX_PLATFORM_NAME) nor the
    machine (an accelerator's device files) says otherwise; True when it did."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME"):
        return False
    if has_accelerator(device_files, environ):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules and environ is os.environ:  # imported first: its config read the env
        _update_jax_config()
    return True


def _update_jax_config() -> None:
    import jax
    from jax._src import xla_bridge
    if not getattr(xla_bridge, "_backends", None):  # no backend started yet: still in time
        jax.config.update("jax_platforms", "cpu")
