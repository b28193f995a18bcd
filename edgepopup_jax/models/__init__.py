"""The paper's models and a registry: get_model(name, **options)."""
from __future__ import annotations

import functools

from edgepopup_jax.models.base import MaskedModel
from edgepopup_jax.models.conv import FC, Conv2, Conv4, Conv6, Conv8, ConvNet
from edgepopup_jax.models.resnet import ResNet

MODELS = {
    "fc": FC,
    "conv2": Conv2,
    "conv4": Conv4,
    "conv6": Conv6,
    "conv8": Conv8,
    "cifar_resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic", cifar_stem=True),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    "wide_resnet50_2": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck",
                                         width_multiplier=2),
    "wide_resnet101_2": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck",
                                          width_multiplier=2),
}
MODEL_NAMES = tuple(MODELS)


def get_model(name: str, **options) -> MaskedModel:
    """Builds model `name` (one of MODEL_NAMES) with options such as num_classes, keep_fraction,
    weight_init, weight_init_mode, scale_by_keep_fraction, mask, dense_first, dense_last,
    compute_dtype and, for the conv nets, width."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    try:
        return MODELS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None


__all__ = ["MODELS", "MODEL_NAMES", "get_model", "MaskedModel", "ConvNet", "FC", "Conv2", "Conv4",
           "Conv6", "Conv8", "ResNet"]
