"""ImageNet resnet50, edge-popup, k = 0.3, signed constant (see imagenet.py for overrides)."""
from edgepopup_jax.configs import imagenet


def get_config():
    return imagenet.get_config("resnet50")
