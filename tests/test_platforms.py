"""JAX starts the CPU alone on a machine with no accelerator, and nothing else changes."""
import os
import pathlib
import subprocess
import sys

from edgepopup_jax.core import platforms

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(environ: dict, device_files=()):
    did = platforms.default_to_cpu_without_accelerator(environ, device_files=device_files)
    return did, environ.get("JAX_PLATFORMS")


def test_no_accelerator_means_cpu(tmp_path):
    absent = (str(tmp_path / "nvidia[0-9]*"),)
    assert _run({}, absent) == (True, "cpu")


def test_an_accelerator_device_file_leaves_jax_to_choose(tmp_path):
    (tmp_path / "nvidia0").touch()
    assert _run({}, (str(tmp_path / "nvidia[0-9]*"),)) == (False, None)


def test_a_tpu_environment_leaves_jax_to_choose():
    assert _run({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}) == (False, None)


def test_the_users_choice_is_kept():
    assert _run({"JAX_PLATFORMS": "cuda"}) == (False, "cuda")
    assert _run({"JAX_PLATFORM_NAME": "gpu"}) == (False, None)


def test_main_prints_no_traceback_where_the_plugins_find_no_device(tmp_path):
    """On this machine (no GPU; CI installs the [preflight] extra, so the CUDA and TPU plugins
    are there), without JAX_PLATFORMS: before, every start printed 'Unable to load CUDA'."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "main.py", "--config=configs/default.py",
                           f"--workdir={tmp_path / 'run'}", "--config.num_train_steps=2",
                           "--config.log_every_steps=1", "--config.eval_batch_size=1000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Unable to load CUDA" not in proc.stderr, proc.stderr[-3000:]
    assert "top-1" in proc.stdout
