"""`pip install edgepopup_jax` is the library: jax, flax, optax, numpy. The trainer's dependencies
(TensorFlow, tfds, orbax, ml_collections, TensorBoard, matplotlib) are the [train] extra."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

LIBRARY = {"jax", "flax", "optax", "numpy"}
TRAIN_ONLY = ("tensorflow", "tensorflow_datasets", "ml_collections", "tensorboard", "matplotlib",
              "orbax.checkpoint")


def test_library_requirements_are_jax_flax_optax_numpy():
    try:
        requires = importlib.metadata.requires("edgepopup_jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("edgepopup_jax is not installed (pip install -e .)")
    reqs = [Requirement(r) for r in requires]
    assert {r.name for r in reqs if r.marker is None} == LIBRARY
    train = {r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "train"})}
    assert {"tensorflow-cpu", "tensorflow-datasets", "orbax-checkpoint", "ml-collections"} <= train


LIBRARY_USE = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # importing it now raises ImportError, as where it is not installed
import jax, jax.numpy as jnp, numpy as np
import edgepopup_jax as ep
from edgepopup_jax.core import nnx_layers
model = ep.get_model("fc", keep_fraction=0.3)
variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
logits = jax.jit(model.apply)(variables, jnp.ones((2, 28, 28, 1)))
assert logits.shape == (2, 10)
grads = jax.grad(lambda s: (ep.topk_mask(s, 0.3) * 2.0).sum())(jnp.arange(6.0) - 2.5)
assert bool((jnp.abs(grads) == 2.0).all())  # straight-through: 2 * sign(s)
ep.save_subnet({path!r}, model_name="fc", model_options=dict(keep_fraction=0.3),
               variables=variables)
loaded, loaded_vars = ep.load_subnet({path!r})
np.testing.assert_allclose(jax.jit(loaded.apply)(loaded_vars, jnp.ones((2, 28, 28, 1))), logits,
                           rtol=1e-5, atol=1e-5)
layer = nnx_layers.SubnetDense(4, 3, keep_fraction=0.5, rngs=__import__("flax").nnx.Rngs(0))
assert layer(jnp.ones((1, 4))).shape == (1, 3)
print("library ok")
"""


def test_library_works_without_the_trainer_dependencies(tmp_path):
    code = LIBRARY_USE.format(blocked=TRAIN_ONLY, path=str(tmp_path / "m.subnet"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "library ok" in proc.stdout


NO_TENSORFLOW = ("tensorflow", "tensorflow_datasets", "tensorboard")
ACCELERATOR_BENCHMARK_WITHOUT_TF = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = ["accelerator.py"] + {argv!r}
runpy.run_path("benchmarks/accelerator.py", run_name="__main__")
"""


def _accelerator_benchmark_without_tensorflow(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ACCELERATOR_BENCHMARK_WITHOUT_TF.format(blocked=NO_TENSORFLOW, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                                         "PYTHONPATH": root})


def test_trainer_step_runs_without_tensorflow():
    """GPU images (the lent H100/H200 ones included) hold JAX but no TensorFlow, which is too big to
    carry there. TF is imported on first use, so the trainer's real step (train.make_steps) and
    benchmarks/accelerator.py with --input_images 0 run without it."""
    proc = _accelerator_benchmark_without_tensorflow(
        ["--models", "conv4", "--batch_scale", "0.0625", "--rounds", "1", "--input_images", "0",
         "--dtype", "float32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| conv4 | 8 |" in proc.stdout, proc.stdout


def test_input_benchmark_without_tensorflow_is_a_usage_error():
    proc = _accelerator_benchmark_without_tensorflow(["--input_images", "512"])
    assert proc.returncode == 2
    assert "--input_images needs TensorFlow" in proc.stderr and "Traceback" not in proc.stderr
