"""CIFAR-10 conv2, edge-popup, the paper's recipe (see cifar10.py for overrides)."""
from edgepopup_jax.configs import cifar10


def get_config():
    return cifar10.get_config("conv2")
