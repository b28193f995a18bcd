"""Baseline: Zhou et al.'s supermask, Bernoulli(sigmoid(S)) sampled every forward pass.

As the reference's configs (configs/smallscale_baselines/sample/): signed constant weights,
SGD lr 200 (ResNet-18: 400), batch 128, no weight decay, and evaluation with a sampled mask
(the reference samples in eval mode too). Training is the same with
--config.model.supermask_eval=threshold, which evaluates (and exports) the fixed mask sigmoid(S) > 0.5.
Usage: --config=configs/cifar10_supermask.py:conv4
"""
from edgepopup_jax.configs import cifar10


def get_config(arch: str = "conv4"):
    c = cifar10.get_config(arch)
    c.model.mask = "supermask"
    c.model.weight_init = "signed_constant"
    c.model.supermask_eval = "sample"
    c.optim.learning_rate = 400.0 if arch == "cifar_resnet18" else 200.0
    c.optim.weight_decay = 0.0
    c.batch_size = 128
    return c
