"""The paper's models, the ones built with the transform, and a registry: get_model(name,
**options), register(name, factory)."""
from __future__ import annotations

import functools
import importlib

from edgepopup_jax.models.base import MaskedModel
from edgepopup_jax.models.conv import FC, Conv2, Conv4, Conv6, Conv8, ConvNet
from edgepopup_jax.models.resnet import ResNet
from edgepopup_jax.models.transformed import edge_popup_model, transformer_lm, vit

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
MODEL_NAMES = tuple(MODELS)  # the paper's (hand-written) models
MODELS.update({"vit": vit, "transformer_lm": transformer_lm})  # built with core.transform


def _imported_factory(name: str):
    """The factory a "package.module:function" name points to (config.model.name), imported."""
    module, _, attr = name.partition(":")
    if not (module and attr):
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}, or "
                         "'package.module:factory' naming a function that builds the model")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {name!r}: cannot import {attr} from {module}: {e}") from None
    if not callable(factory):
        raise ValueError(f"model {name!r}: {attr} is not callable")
    return factory


def register(name: str, factory, *, replace: bool = False) -> None:
    """Adds a model to the registry: get_model(name, **options) then calls factory(**options)
    (the trainer: num_classes and config.model's fields, e.g. keep_fraction, mask_scope; see
    models.transformed.edge_popup_model to make one from a plain Flax module)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model's name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"register({name!r}, factory): factory must be callable, got {factory!r}")
    if name in MODELS and not replace:
        raise ValueError(f"model {name!r} is registered already; pass replace=True to replace it")
    MODELS[name] = factory


def get_model(name: str, **options) -> MaskedModel:
    """Builds one of the paper's models.

    Args:
      name: a registered model: MODEL_NAMES ("fc", "conv2", ..., "cifar_resnet18", "resnet50", ...),
        "vit", "transformer_lm", one added with register(), or "package.module:factory" (a
        function that takes the options and returns the model, imported).
      **options: MaskedModel fields: num_classes, keep_fraction, weight_init, weight_init_mode,
        scale_by_keep_fraction, mask, mask_scope, supermask_eval, dense_first, dense_last,
        compute_dtype; width for the conv nets; bn_running_var for the ResNets.

    Returns:
      The Flax module; `init` gives {'params': scores, 'frozen': random weights} (and
      'batch_stats' for the ResNets).

    Raises:
      ValueError: an unknown name, an option the model does not have, or a bad option value
        (the message names the allowed values).
    """
    factory = MODELS.get(name) or _imported_factory(name)
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None


__all__ = ["MODELS", "MODEL_NAMES", "get_model", "register", "edge_popup_model", "vit",
           "transformer_lm", "MaskedModel", "ConvNet", "FC", "Conv2", "Conv4",
           "Conv6", "Conv8", "ResNet"]
