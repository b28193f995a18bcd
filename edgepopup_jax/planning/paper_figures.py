"""The paper's figures as sweep grids: `python -m edgepopup_jax.planning.sweep --figure=NAME`.

Each has the paper's grid and recipe (the config it starts from), 5 seeds on CIFAR-10 as the
paper (1 on ImageNet), and the dense baselines with learned weights (the "Learned Dense
Weights" lines; SGD lr 0.01 on CIFAR-10, as configs/cifar10_dense_sgd.py). `followups` is not
the paper's: it sets the follow-up methods (Global EP, IteRand, biprop) beside edge-popup at
the paper's Conv6 recipe.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from edgepopup_jax.configs import cifar10, imagenet
from edgepopup_jax.planning.grid import Dim, Grid, Point

KEEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the paper's k in [10, 30, 50, 70, 90] %
CIFAR_SEEDS = (0, 1, 2, 3, 4)
DENSE_CIFAR = {"model.mask": "dense", "optim.learning_rate": 0.01}
WEIGHTS = {  # the paper's weight distributions (Sections 4.1, 4.5)
    "kaiming_normal": {"model.weight_init": "kaiming_normal", "model.scale_by_keep_fraction": False},
    "signed_constant": {"model.weight_init": "signed_constant", "model.scale_by_keep_fraction": False},
    "kaiming_uniform": {"model.weight_init": "kaiming_uniform", "model.scale_by_keep_fraction": False},
    "xavier_normal": {"model.weight_init": "xavier_normal", "model.scale_by_keep_fraction": False},
    "scaled_kaiming_normal": {"model.weight_init": "kaiming_normal", "model.scale_by_keep_fraction": True},
    "scaled_signed_constant": {"model.weight_init": "signed_constant", "model.scale_by_keep_fraction": True},
}


# IteRand (Chijiwa et al., NeurIPS 2021) at its own paper's Conv6-on-CIFAR-10 setting (their
# config.yaml, figure2_conv6_*_iterand: rerand_freq 300 iterations, rerand_lambda 0.1, which their
# Bernoulli mode uses as each pruned weight's redraw probability: our rerand_rate). 300 steps of
# batch 128 are 0.77 of a CIFAR-10 epoch (390 steps): about 130 redraws in 100 epochs. We keep
# their step count rather than "one epoch" so that the redraw frequency is theirs. (Their
# Conv6 runs used lr 0.3 for edge-popup and IteRand alike; here every method takes edge-popup's
# recipe, lr 0.1, so the methods differ only in their own options.)
ITERAND_CONV6 = {"model.rerand_every": 300, "model.rerand_rate": 0.1, "model.rerand_mode": "bernoulli"}
# method -> its overrides of the edge-popup recipe (EP: none); the labels name the runs'
# directories and the figure's lines. EP + learned BN (model.bn_affine) has no point here:
# the conv nets have no BatchNorm (it applies to the ResNets only).
FOLLOWUPS = {
    "EP": {},
    "GlobalEP": {"model.mask_scope": "global"},
    "EP+IteRand": ITERAND_CONV6,
    "biprop": {"model.binary_weights": True},
}


def values(key: str, vals) -> Dim:
    return Dim(key, tuple(Point(str(v), {key: v}) for v in vals))


def weights(*names: str) -> Dim:
    return Dim("weights", tuple(Point(n, WEIGHTS[n]) for n in names))


def methods(table: dict[str, dict[str, Any]]) -> Dim:
    return Dim("method", tuple(Point(n, o) for n, o in table.items()))


@dataclasses.dataclass(frozen=True)
class Figure:
    description: str
    config: Callable[[], ml_collections.ConfigDict]  # the recipe, when no --config is given
    fixed: dict[str, Any]  # overrides every run of the figure has
    grid: Grid


FIGURES = {
    "keep_fraction": Figure(
        "Fig. 3, CIFAR-10 top-1 vs keep_fraction for Conv2/4/6/8 and 2 weight distributions",
        lambda: cifar10.get_config("conv4"), {},
        Grid((values("model.keep_fraction", KEEP_FRACTIONS),
              values("model.name", ("conv2", "conv4", "conv6", "conv8")),
              weights("kaiming_normal", "signed_constant")),
             CIFAR_SEEDS, DENSE_CIFAR, ("model.name",), panel="model.name")),
    "width": Figure(
        "Fig. 4, CIFAR-10 top-1 vs width multiplier of Conv4/6 at keep_fraction 0.5",
        lambda: cifar10.get_config("conv4"), {"model.keep_fraction": 0.5},
        Grid((values("model.width", (0.25, 0.5, 1.0, 1.5, 2.0)),
              values("model.name", ("conv4", "conv6")),
              weights("kaiming_normal", "signed_constant")),
             CIFAR_SEEDS, DENSE_CIFAR, ("model.width", "model.name"), panel="model.name")),
    "weight_init": Figure(
        "Fig. 7, CIFAR-10 top-1 vs keep_fraction for 6 weight distributions, scaled ones included",
        lambda: cifar10.get_config("conv4"), {},
        Grid((values("model.keep_fraction", KEEP_FRACTIONS),
              values("model.name", ("conv4", "conv6")),
              weights(*WEIGHTS)),
             CIFAR_SEEDS, DENSE_CIFAR, ("model.name",), panel="model.name")),
    "imagenet": Figure(
        "Figs. 8-9, ImageNet top-1 vs keep_fraction for ResNet-50/101 and WRN-50-2",
        lambda: imagenet.get_config("resnet50"), {},
        Grid((values("model.keep_fraction", KEEP_FRACTIONS),
              values("model.name", ("resnet50", "resnet101", "wide_resnet50_2"))),
             (0,), {"model.mask": "dense"}, ("model.name",))),
    "followups": Figure(
        "Not in the paper: CIFAR-10 Conv6 top-1 vs keep_fraction {0.1, 0.3, 0.5} for EP, Global "
        "EP (mask_scope=global), EP + IteRand (rerand_every=300 steps, rerand_rate=0.1: IteRand's "
        "Conv6 setting) and biprop (binary_weights), 5 seeds, at the paper's Conv6 recipe, on the "
        "device data path (IteRand needs it); EP + learned BN (bn_affine) is left out: Conv6 has "
        "no BatchNorm",
        lambda: cifar10.get_config("conv6"), {"data.pipeline": "device"},
        Grid((values("model.keep_fraction", (0.1, 0.3, 0.5)), methods(FOLLOWUPS)),
             CIFAR_SEEDS, DENSE_CIFAR)),
}
