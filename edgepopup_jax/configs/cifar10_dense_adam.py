"""Baseline: learned dense weights with Adam, batch 60, lr 2e-4 (Conv2) or 3e-4 (others), no decay.

Usage: --config=configs/cifar10_dense_adam.py:conv4
"""
from edgepopup_jax.configs import cifar10


def get_config(arch: str = "conv4"):
    c = cifar10.get_config(arch)
    c.model.mask = "dense"
    c.batch_size = 60
    c.eval_batch_size = 500
    c.optim.name = "adam"
    c.optim.learning_rate = 2e-4 if arch == "conv2" else 3e-4
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    return c
