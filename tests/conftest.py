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


# Under xdist (`make test` runs -n 2) the tests are handed out in collection order; these, the
# longest (tens of seconds to a minute each on 2 cores), go first so that no worker is left idle
# at the end while the other still runs one of them. Only the order changes: a name that stops
# matching merely loses its place. The @pytest.mark.slow ones lead their group.
LONG_FIRST = (
    "test_multihost.py::",
    "test_configs.py::test_config_trains_one_step[imagenet",
    "test_configs.py::test_config_trains_one_step[cifar10_resnet18",
    "test_configs.py::test_config_trains_one_step",
    "test_train.py::test_any_device_count_trains_evaluates_checkpoints_and_resumes",
    "test_notebooks.py::",
    "test_export_evaluate.py::",
    "test_preflight.py::test_conv4_compiles",
    "test_sweep.py::test_sweep_stops_resumes_skips_and_tabulates",
    "test_sharding.py::test_fsdp_state_is_split",
    "test_interop.py::test_cresnet18_import_matches_reference",
    "test_packaging.py::test_trainer_step_runs_without_tensorflow",
)


def _long_first_rank(item):
    name = item.nodeid.rsplit("/", 1)[-1]
    rank = next((i for i, prefix in enumerate(LONG_FIRST) if name.startswith(prefix)), len(LONG_FIRST))
    return rank, item.get_closest_marker("slow") is None


def pytest_collection_modifyitems(config, items):
    items.sort(key=_long_first_rank)  # stable: the rest keep their order
