"""Prune, then fine-tune: after the scores' training, the mask is fixed and the kept weights train.

The comparison of Gem-Miner (Sreenivasan et al., NeurIPS 2022) and of the lottery-ticket line
(Frankle & Carbin, ICLR 2019): does a subnetwork found by edge-popup gain from training its
weights? `finetune_epochs` (a top-level config field; 0: off, the default) adds that many epochs
after the run's `num_epochs`: the mask is the one the final scores select (the scores no longer
train), and the frozen weights become what the optimizer trains, with the run's optimizer
recipe (config.optim: lr, momentum, decay, schedule) restarted over the fine-tuning steps.
Only the kept weights move: their gradients are W_eff's, and the optimizer's updates (weight
decay included) are multiplied by the mask, so a pruned weight stays bit-identical (checked at
the end of the run). The checkpoints of the fine-tuning steps hold the fine-tuned weights, so
`export` and `evaluate` see them.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from edgepopup_jax.core import transform
from edgepopup_jax.training import optim


def check(config) -> None:
    """Raises ValueError naming the fields for a bad or meaningless finetune_epochs."""
    epochs = config.get("finetune_epochs", 0.0)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs < 0:
        raise ValueError(f"finetune_epochs must be a number >= 0 (0: no fine-tuning), got {epochs!r}")
    if epochs and config.model.get("mask", "edge_popup") != "edge_popup":
        raise ValueError(f"finetune_epochs ({epochs}) trains the weights a top-k mask keeps: it "
                         f"needs model.mask='edge_popup', not {config.model.mask!r}")
    if epochs and config.model.get("binary_weights", False):
        raise ValueError(f"finetune_epochs ({epochs}) trains real-valued weights, but "
                         "model.binary_weights=True uses only their signs: turn one of them off")


def num_steps(config, steps_per_epoch: int) -> int:
    return int(round(config.get("finetune_epochs", 0.0) * steps_per_epoch))


def optimizer(config, total_steps: int, steps_per_epoch: int, learning_rate, weight_decay):
    """config.optim's recipe over the fine-tuning steps (its schedule restarts at their start)."""
    schedule = optim.learning_rate_schedule(config.optim, max(total_steps, 1), steps_per_epoch,
                                            learning_rate=learning_rate)
    return optim.make_optimizer(config.optim, schedule, weight_decay=weight_decay)


def kernel_masks(masks, frozen):
    """{layer: {"kernel": mask}} for every kernel of frozen, from selection's {layer:
    {"scores": mask}}, in the kernels' dtype. A frozen leaf that is no masked layer's weight (a
    transformed model's frozen bias, LayerNorm, position embedding: core/transform.py) gets a
    zero mask: fine-tuning leaves it as it is."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(masks))

    def mask(path, w):
        m = flat.get(path[:-1] + ("scores",)) if path[-1] in transform.WEIGHT_LEAVES else None
        return jnp.zeros_like(w) if m is None else m.astype(w.dtype)

    out = {path: mask(path, w)
           for path, w in flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen)).items()}
    return flax.traverse_util.unflatten_dict(out)


def masked(tree, mask):
    return jax.tree.map(jnp.multiply, tree, mask)


def pruned_weights(frozen, mask):
    """The weights the mask prunes (kept ones zeroed): what fine-tuning must leave as it is."""
    return jax.tree.map(lambda w, m: jnp.where(m > 0, jnp.zeros_like(w), w), frozen, mask)
