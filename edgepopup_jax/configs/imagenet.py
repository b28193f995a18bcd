"""ImageNet, the paper's recipe: SGD lr 0.256 (0.1 with scaled inits), momentum 0.875,
wd 3.0517578125e-5, batch 256, 100 epochs with 5 warm-up epochs then cosine, label smoothing 0.1,
keep_fraction 0.3. As the reference runs it: lr set once per epoch, warm-up lr * (epoch + 1) / 5,
BatchNorm's running variance updated with the unbiased batch variance.

Usage: --config=configs/imagenet.py:resnet50 (resnet50, resnet101, wide_resnet50_2, ...) or the
named files. ImageNet must be prepared for tfds first (see README): --config.data.data_dir=...
Kaiming normal instead of signed constant: --config.model.weight_init=kaiming_normal.
"""
import ml_collections

from edgepopup_jax.configs.base import IMAGENET_MEAN, IMAGENET_STD, get_base

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
         "wide_resnet101_2")


def get_config(arch: str = "resnet50"):
    if arch not in ARCHS:
        raise ValueError(f"unknown ImageNet arch {arch!r}; allowed: {', '.join(ARCHS)}")
    c = get_base()
    c.model.name = arch
    c.model.keep_fraction = 0.3
    c.model.weight_init = "signed_constant"
    c.model.compute_dtype = "bfloat16"
    c.model.bn_running_var = "unbiased"  # unbiased | biased (flax's)
    # True: learned BN scale and bias (decayed as the scores); None: only for mask="dense"
    c.model.bn_affine = ml_collections.config_dict.placeholder(bool)
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.shuffle_buffer = 16_384
    c.data.cache = False
    c.optim.learning_rate = 0.256
    c.optim.momentum = 0.875
    c.optim.weight_decay = 3.0517578125e-5
    c.optim.warmup_epochs = 5.0
    c.optim.label_smoothing = 0.1
    c.batch_size = 256
    c.eval_batch_size = 1000
    c.num_epochs = 100.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    return c
