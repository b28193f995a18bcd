"""Baseline: the same architecture with learned dense weights, SGD lr 0.01 (the paper's recipe;
ResNet-18: lr 0.1, as the reference's resnet18-dense.yaml).

Usage: --config=configs/cifar10_dense_sgd.py:conv4
"""
from edgepopup_jax.configs import cifar10


def get_config(arch: str = "conv4"):
    c = cifar10.get_config(arch)
    c.model.mask = "dense"
    c.optim.learning_rate = 0.1 if arch == "cifar_resnet18" else 0.01
    return c
