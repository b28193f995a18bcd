"""Test-wide setup: 8 CPU devices, so sharding is tested on any machine.

JAX_PLATFORMS=cpu: where the [preflight] extra is installed, the CUDA and TPU plugins would
otherwise try (and fail, noisily) to start on this accelerator-less machine.

A compilation cache for the session: many tests (and the processes they start: main.py, the
multihost workers, the notebook's kernel) compile the same steps (the default FC's init, eval,
masks and counts above all), and compiling is most of the suite's time. The cache lives in a new
temporary directory per `pytest` command, shared by its xdist workers and subprocesses through
the environment and removed at the end, so no run ever reads another's entries. A hit loads the
executable XLA compiled for the same program and options: the tests run the same code either way.
Set JAX_COMPILATION_CACHE_DIR yourself to use (and keep) another directory.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="edgepopup-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
