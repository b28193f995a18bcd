"""CIFAR-10, the paper's recipe: SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, cosine, 100 epochs.

As the reference runs it: the cosine lr is set once per epoch, its CIFAR normalisation constants,
and (ResNet-18) BatchNorm's running variance updated with the unbiased batch variance.

Usage: --config=configs/cifar10.py:conv4 (fc, conv2, conv4, conv6, conv8, cifar_resnet18), or the
named files (cifar10_conv4.py, ...). Sweeps are overrides: --config.model.keep_fraction=0.3,
--config.model.width=2, --config.model.weight_init=signed_constant,
--config.model.scale_by_keep_fraction=True. Data: a prepared tfds `cifar10`, or the PNG folder:
--config.data.name=folder --config.data.data_dir=/path/to/cifar10_png.
"""
import ml_collections

from edgepopup_jax.configs.base import get_base

ARCHS = ("fc", "conv2", "conv4", "conv6", "conv8", "cifar_resnet18")


def get_config(arch: str = "conv4"):
    if arch not in ARCHS:
        raise ValueError(f"unknown CIFAR-10 arch {arch!r}; allowed: {', '.join(ARCHS)}")
    c = get_base()
    c.model.name = arch
    if arch != "cifar_resnet18":
        c.model.width = 1.0  # width multiplier of the conv nets
    if arch == "cifar_resnet18":
        c.batch_size = 256
        c.optim.weight_decay = 5e-4
        c.model.bn_running_var = "unbiased"  # unbiased | biased (flax's)
        # True: learned BN scale and bias (decayed as the scores); None: only for mask="dense"
        c.model.bn_affine = ml_collections.config_dict.placeholder(bool)
    return c
