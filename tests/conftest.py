"""Test-wide setup: 8 CPU devices, so sharding is tested on any machine.

JAX_PLATFORMS=cpu: where the [preflight] extra is installed, the CUDA and TPU plugins would
otherwise try (and fail, noisily) to start on this accelerator-less machine.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
