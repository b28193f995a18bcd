"""Baseline: Zhou et al.'s supermask, Bernoulli(sigmoid(S)) sampled every forward pass.

Signed constant weights as Zhou et al.; it needs a very large learning rate (the paper's tuning: ~200).
Usage: --config=configs/cifar10_supermask.py:conv4
"""
from edgepopup_jax.configs import cifar10


def get_config(arch: str = "conv4"):
    c = cifar10.get_config(arch)
    c.model.mask = "supermask"
    c.model.weight_init = "signed_constant"
    c.optim.learning_rate = 200.0
    c.optim.weight_decay = 0.0
    return c
