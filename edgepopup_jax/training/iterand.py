"""IteRand: the pruned random weights redrawn every few steps (Chijiwa et al., NeurIPS 2021,
"Pruning Randomly Initialized Neural Networks with Iterative Randomization"; their code:
dchiji-ntt/iterand, `SparseModule.rerandomize_`).

Every `model.rerand_every` steps (0: off, the default), in every edge-popup layer, each weight
the current mask prunes (outside its layer's top-k, or outside the global top-k for
mask_scope "global") is changed; the kept weights never are:

  rerand_mode="bernoulli": redrawn from the layer's own weight distribution (the init the
      layer was built with) with probability rerand_rate, else left as it is;
  rerand_mode="manual": w <- rerand_lambda * w + rerand_mu * w_fresh, every pruned weight.

The fresh draw and the Bernoulli coins come from fold_in(fold_in(run rng, step), REDRAW_STREAM),
so a run is deterministic given its seed and a resumed run redraws exactly as an uninterrupted
one. The weights stay in `frozen`, out of the optimizer: the redraw is a separate function the
trainer applies after the due steps' updates. (IteRand's own code protects the weights above
the `rerand_rate * sparsity` percentile and uses rerand_lambda as the coins' probability; here
the pruned set is exactly the mask's and rerand_rate is that probability.)
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from edgepopup_jax.core import masking, transform

MODES = ("bernoulli", "manual")
FIELDS = ("rerand_every", "rerand_rate", "rerand_mode", "rerand_lambda", "rerand_mu")
DEFAULTS = {"rerand_every": 0, "rerand_rate": 0.1, "rerand_mode": "bernoulli",
            "rerand_lambda": 1.0, "rerand_mu": 0.0}
REDRAW_STREAM = 0x17E2A  # folded into each step's key: the redraws' own random stream


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check(model_config) -> None:
    """Raises ValueError naming the field and what is allowed."""
    every = model_config.get("rerand_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"model.rerand_every must be a whole number of steps >= 0 (0: off), got {every!r}")
    mode = model_config.get("rerand_mode", "bernoulli")
    if mode not in MODES:
        raise ValueError(f"unknown model.rerand_mode {mode!r}; allowed: {', '.join(MODES)}")
    rate = model_config.get("rerand_rate", 0.1)
    if not _number(rate) or not 0 <= rate <= 1:
        raise ValueError(f"model.rerand_rate must be a probability in [0, 1], got {rate!r}")
    lam, mu = model_config.get("rerand_lambda", 1.0), model_config.get("rerand_mu", 0.0)
    if not _number(lam) or not _number(mu):
        raise ValueError(f"model.rerand_lambda and model.rerand_mu must be numbers, got {lam!r}, {mu!r}")
    if every and mode == "manual" and lam == 1 and mu == 0:
        raise ValueError("model.rerand_mode='manual' with rerand_lambda=1 and rerand_mu=0 changes "
                         "nothing: set model.rerand_lambda and model.rerand_mu (w <- lambda w + mu w_fresh)")
    if every and model_config.get("mask", "edge_popup") != "edge_popup":
        raise ValueError(f"model.rerand_every ({every}) redraws the weights a top-k mask prunes: "
                         f"it needs model.mask='edge_popup', not {model_config.mask!r}")


def active(model_config) -> bool:
    return model_config.get("rerand_every", 0) > 0


def due(model_config, step: int) -> bool:
    """Whether the weights are redrawn after the update that completes `step` (1-based)."""
    every = model_config.get("rerand_every", 0)
    return every > 0 and step % every == 0


def redraw_key(rng, step):
    return jax.random.fold_in(jax.random.fold_in(rng, step), REDRAW_STREAM)


def redraw(frozen, masks, fresh, key, *, mode: str, rate: float, lam: float, mu: float):
    """The frozen weights after one redraw. frozen, fresh: {layer: {"kernel": W}}; masks:
    {layer: {"scores": mask}} (selection's, 1 = kept); key: redraw_key(...). Layers without a
    mask are left as they are: a transformed model's frozen biases, LayerNorms, position
    embeddings (core/transform.py; only a layer's "kernel" or "embedding" has a mask)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen))
    flat_fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh))
    flat_masks = flax.traverse_util.flatten_dict(flax.core.unfreeze(masks))
    out = {}
    for i, (path, w) in enumerate(sorted(flat.items())):
        mask = (flat_masks.get(path[:-1] + ("scores",)) if path[-1] in transform.WEIGHT_LEAVES
                else None)
        if mask is None:
            out[path] = w
            continue
        kept = mask > 0
        if mode == "bernoulli":
            coin = jax.random.bernoulli(jax.random.fold_in(key, i), rate, w.shape)
            out[path] = jnp.where(kept | ~coin, w, flat_fresh[path].astype(w.dtype))
        else:
            out[path] = jnp.where(kept, w, (lam * w + mu * flat_fresh[path]).astype(w.dtype))
    return flax.traverse_util.unflatten_dict(out)


def fresh_weights(model, key, image_shape):
    """A new draw of every frozen weight from its layer's own init (model.init with key)."""
    variables = model.init({"params": key, masking.SAMPLE_RNG: key},
                           jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    return variables["frozen"]
