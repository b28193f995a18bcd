"""CIFAR-10 ResNet-18 (3x3 stem, no max-pool), edge-popup: batch 256, wd 5e-4 (see cifar10.py)."""
from edgepopup_jax.configs import cifar10


def get_config():
    return cifar10.get_config("cifar_resnet18")
