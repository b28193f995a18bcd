"""Evaluation over a whole split, used by the trainer and by the `evaluate` command.

An evaluation selects (and folds into the kernels) every layer's mask once, then runs the
jitted eval step over the split's batches, each example exactly once: padding examples carry
`valid` = 0 and count for nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from edgepopup_jax.core import masking, selection
from edgepopup_jax.training import input_pipeline, sharding

# supermask_eval="sample" evaluates one sampled subnetwork, the same in every batch and every
# evaluation, on every device (the other modes draw nothing from this key).
EVAL_SAMPLE_SEED = 0


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def eval_step(variables, batch, *, model, num_classes: int, mean, std, mesh=None):
    """Sums over the batch's valid examples: loss, top-1 and top-5 hits, count. Uses variables'
    `masks` when given (evaluate selects them once per evaluation)."""
    images = input_pipeline.normalize(batch["image"], mean, std)
    variables = selection.with_masks(variables, model, mesh, sharding.DATA_AXIS)
    logits = model.apply(variables, images, train=False,
                         rngs={masking.SAMPLE_RNG: jax.random.PRNGKey(EVAL_SAMPLE_SEED)})
    valid, labels = batch["valid"], batch["label"]
    top = jax.lax.top_k(logits, min(5, num_classes))[1]
    hits5 = jnp.any(top == labels[:, None], axis=-1)
    return {"loss": jnp.sum(cross_entropy(logits, labels, num_classes) * valid),
            "top1": jnp.sum((top[:, 0] == labels) * valid),
            "top5": jnp.sum(hits5 * valid),
            "count": jnp.sum(valid)}


def make_eval_fn(model, num_classes: int, mesh, data_config):
    """eval_step jitted over the mesh: variables replicated, batch sharded; normalises the
    batch's uint8 images with data_config's mean and std."""
    return jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes, mesh=mesh,
                                     mean=tuple(data_config.mean), std=tuple(data_config.std)),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                   out_shardings=sharding.replicated(mesh))


def make_masks_fn(model, mesh, variables_sharding=None):
    """variables -> variables with the masks folded into the kernels (the `masks` collection),
    jitted over the mesh: what an evaluation computes once before its batches. The variables
    come as variables_sharding says (default: replicated); the result is replicated."""
    return jax.jit(functools.partial(selection.with_masks, model=model, mesh=mesh,
                                     axis_name=sharding.DATA_AXIS, fold=True,
                                     params_sharding=(None if variables_sharding is None
                                                      else variables_sharding["params"])),
                   in_shardings=(sharding.replicated(mesh) if variables_sharding is None
                                 else (variables_sharding,)),
                   out_shardings=sharding.replicated(mesh))


def evaluate(variables, eval_fn, config, mesh, masks_fn=None, bad=None) -> dict:
    """Top-1, top-5 and mean loss over config's whole eval split (every example exactly once).

    Args:
      variables: the model's variables (params, frozen, batch_stats) on the mesh, placed as
        masks_fn expects (replicated, or the trainer's state_sharding).
      eval_fn: make_eval_fn's function for this model, mesh and data.
      config: the run's config (data, batch_size, eval_batch_size).
      mesh: the device mesh (sharding.make_mesh).
      masks_fn: make_masks_fn's function: selects and folds the masks once here rather than
        in every eval batch (without it, each batch selects them).
      bad: an input_pipeline.BadExamples to record the examples that do not decode in.

    Returns:
      {"top1", "top5", "loss", "count"}: fractions, the mean loss, and the number of examples.
    """
    if masks_fn is not None:
        variables = masks_fn(variables)
    totals = None
    local, _ = sharding.eval_batch_sizes(config.get("eval_batch_size") or config.batch_size, mesh)
    for batch in input_pipeline.eval_iterator(config.data, batch_size=local, bad=bad):
        sums = eval_fn(variables, sharding.to_global(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count, "count": int(totals["count"])}
