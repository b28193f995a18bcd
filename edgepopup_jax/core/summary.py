"""Per-layer counts of weights and kept weights, and a table to print."""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgepopup_jax.core import masking, selection


@dataclasses.dataclass(frozen=True)
class LayerStats:
    name: str  # "/"-joined path of the layer
    shape: tuple[int, ...]
    total: int
    kept: int
    mode: str  # "edge_popup", "supermask" (kept: sigmoid(S) > 0.5) or "dense"


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _count_kept(scores: dict, keep_fraction, mask: str, mask_scope: str) -> dict:
    if isinstance(keep_fraction, tuple):  # ((name, k), ...): hashable, as a static argument
        keep_fraction = dict(keep_fraction)
    if mask == "edge_popup":
        masks = selection.masks_by_path(scores, keep_fraction, mask_scope)
    else:
        masks = jax.tree.map(lambda s: masking.layer_mask(s, mask, keep_fraction), scores)
    return jax.tree.map(lambda m: jnp.sum(m != 0, dtype=jnp.int32), masks)


def layer_stats(variables, keep_fraction=None, mask: str = "edge_popup",
                mask_scope: str = "layer", *, model=None) -> list[LayerStats]:
    """Counts each layer's weights and the weights its current mask keeps (counted from the mask).
    keep_fraction: one for every layer, or {"/"-joined layer path: k} (MaskedModel.keep_fractions).
    model (instead of keep_fraction, mask and mask_scope): a MaskedModel or a transformed module
    (transform.edge_popup), whose own keep fractions, mask and scope are used."""
    if model is not None:
        keep_fraction = (model.keep_fraction if model.uniform_keep_fraction()
                         else model.keep_fractions(variables["params"]))
        mask, mask_scope = model.mask, model.mask_scope
    elif keep_fraction is None:
        raise ValueError("layer_stats needs keep_fraction (or model)")
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]), sep="/")
    scores = {k[: -len("/scores")]: v for k, v in params.items() if k.endswith("/scores")}
    dense = {k[: -len("/kernel")]: v for k, v in params.items() if k.endswith("/kernel")}

    if isinstance(keep_fraction, dict):
        keep_fraction = tuple(sorted(keep_fraction.items()))
    kept = jax.device_get(_count_kept(scores, keep_fraction, mask, mask_scope))
    rows = [LayerStats(name, tuple(s.shape), int(np.prod(s.shape)), int(kept[name]), mask)
            for name, s in scores.items()]
    rows += [LayerStats(name, tuple(k.shape), int(np.prod(k.shape)), int(np.prod(k.shape)), "dense")
             for name, k in dense.items()]
    order = {name: i for i, name in enumerate(k.rsplit("/", 1)[0] for k in params)}
    return sorted(rows, key=lambda r: order[r.name])


def format_table(rows: list[LayerStats]) -> str:
    """A fixed-width table: one line per layer and a total line."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'shape':<20} {'mode':<10} {'weights':>12} {'kept':>12} {'kept %':>7}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {str(r.shape):<20} {r.mode:<10} {r.total:>12,} {r.kept:>12,} "
                     f"{100 * r.kept / r.total:>6.2f}%")
    total, kept = sum(r.total for r in rows), sum(r.kept for r in rows)
    lines.append(f"{'total':<{width}}  {'':<20} {'':<10} {total:>12,} {kept:>12,} {100 * kept / max(total, 1):>6.2f}%")
    return "\n".join(lines)
