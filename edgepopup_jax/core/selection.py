"""Every edge-popup layer's top-k mask in one selection, split across the devices of a mesh.

Layer by layer (masking.topk_mask), a GPU/TPU runs one 31-pass bisection loop per layer, and
every device does all of it. Here all layers' thresholds are found together: one loop of 8
counting passes (each tests 15 candidate thresholds per layer, a 16-way split of what is left,
in one read of the keys), each pass counting every layer (or group of layers); with a mesh, each
device counts over its 1/N share of every layer's scores, and the per-layer counts are summed
across devices once per pass (one small all-reduce of 15 int32 per layer per pass, for all
layers).

Scopes: "layer" (the paper's): every layer keeps kept_count(n_layer, k) of its own weights.
"global": one threshold over all layers' scores, kept_count(n_total, k) weights in all; ties
are broken towards the earlier layer (in the order of the params tree) and then the lower index,
as a stable sort of the concatenated scores would.

The masks equal masking.topk_mask_reference (a sort) exactly, ties included.
"""
from __future__ import annotations

import contextlib
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from edgepopup_jax.core import masking

MASK_SCOPES = ("layer", "global")
MASKS = "masks"  # the variable collection the layers read their precomputed mask from
# The search for each threshold tests `candidates` values per pass, splitting what is left of
# the interval 16 ways (4 bits), so 8 dependent passes (and all-reduces) find a 31-bit key where a
# bisection (1 candidate) needs 31; each pass reads every key once either way. XLA:CPU does not
# vectorise the 15 compares per key: there the batched search bisects (15 candidates measured
# 3x slower on this CPU); GPUs and TPUs have compute to spare and pay per pass.
ACCELERATOR_CANDIDATES = 15
CPU_CANDIDATES = 1


@contextlib.contextmanager
def accelerator_candidates(n: int):
    """Within the block, GPU/TPU selections are traced with n candidates per pass (1: the 31-pass
    bisection the search replaced): for old-vs-new benchmarks. Takes effect at trace time."""
    global ACCELERATOR_CANDIDATES
    passes(n)  # checks n
    original, ACCELERATOR_CANDIDATES = ACCELERATOR_CANDIDATES, n
    try:
        yield
    finally:
        ACCELERATOR_CANDIDATES = original


def passes(candidates: int) -> int:
    """Dependent counting passes to find a non-negative int32 key (31 bits)."""
    bits = (candidates + 1).bit_length() - 1
    if candidates < 1 or 2**bits != candidates + 1:
        raise ValueError(f"candidates must be 2**b - 1 (1, 3, 7, 15, ...), got {candidates}")
    return -(-31 // bits)


def check_mask_scope(scope: str) -> str:
    if scope not in MASK_SCOPES:
        raise ValueError(f"unknown mask_scope {scope!r}; allowed: {', '.join(MASK_SCOPES)}")
    return scope


def _group_thresholds(keys, groups, counts, candidates, axis_name=None):
    """Per group g: t[g] = the counts[g]-th largest key over the group's layers, plus
    room[g] = counts[g] - #(keys > t) and per-layer ties #(keys == t[group]).

    keys: list of flat int32 arrays (this device's share of each layer, padded with -1, which
    no threshold counts); groups: static group index of each layer.
    """
    num_groups = max(groups) + 1

    def per_group(values):  # per-layer counts -> per-group sums (static, tiny)
        return jnp.stack([sum(values[i] for i, g in enumerate(groups) if g == gi)
                          for gi in range(num_groups)])

    def layer_counts(compare, t):
        """[layers, C]: per layer, #(compare(key, t[group, j])) for each of its group's C
        thresholds, from one read of the keys."""
        c = jnp.stack([jnp.sum(compare(k[:, None], t[g][None, :]), axis=0, dtype=jnp.int32)
                       for k, g in zip(keys, groups)])
        return jax.lax.psum(c, axis_name) if axis_name else c

    def body(_, lo_hi):
        lo, hi = lo_hi  # per group: #(keys >= lo) >= count > #(keys >= hi), so lo < hi
        step = (hi - lo - 1) // (candidates + 1) + 1  # ceil((hi - lo) / (candidates + 1)), no overflow
        offsets = jnp.arange(1, candidates + 1, dtype=jnp.int32)
        values = lo[:, None] + jnp.minimum(offsets * step[:, None], (hi - lo)[:, None])
        enough = per_group(layer_counts(jnp.greater_equal, values)) >= counts[:, None]
        # Candidates ascend and counts descend, so `enough` is True for the first n of them.
        n = jnp.sum(enough, axis=1)
        below = jnp.take_along_axis(values, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        above = jnp.take_along_axis(values, jnp.minimum(n, candidates - 1)[:, None], axis=1)[:, 0]
        return jnp.where(n > 0, below, lo), jnp.where(n < candidates, above, hi)

    lo = jnp.zeros((num_groups,), jnp.int32)
    hi = jnp.full((num_groups,), 2**31 - 1, jnp.int32)
    # Each pass leaves at most ceil(width / (candidates + 1)) of it: 2**31 - 1 -> 1.
    t, _ = jax.lax.fori_loop(0, passes(candidates), body, (lo, hi))
    room = counts - per_group(layer_counts(jnp.greater, t[:, None])[:, 0])
    return t, room, layer_counts(jnp.equal, t[:, None])[:, 0]


def _local_share(key, axis_name, num_shards):
    """This device's contiguous 1/num_shards of a flat key array (padded with -1)."""
    chunk = -(-key.size // num_shards)
    padded = jnp.pad(key, (0, chunk * num_shards - key.size), constant_values=-1)
    return jax.lax.dynamic_slice_in_dim(padded, jax.lax.axis_index(axis_name) * chunk, chunk)


def _thresholds(keys, groups, counts, mesh, axis_name, specs, candidates):
    """keys in their layers' shapes; specs: how each is split over axis_name (None: all
    replicated). A split key is counted on its own block; a replicated one, every device counts
    a contiguous 1/N of it, so no key is gathered for counting."""
    if mesh is None or mesh.shape[axis_name] == 1:
        return _group_thresholds([k.reshape(-1) for k in keys], groups, counts, candidates)
    n = mesh.shape[axis_name]
    replicated = PartitionSpec()
    specs = tuple(replicated for _ in keys) if specs is None else specs

    def sharded(keys):
        # A spec naming no mesh axis (P(), P(None, None)) is a whole copy on every device:
        # counting it whole there would count it n times.
        local = [k.reshape(-1) if any(a is not None for a in spec)
                 else _local_share(k.reshape(-1), axis_name, n) for k, spec in zip(keys, specs)]
        return _group_thresholds(local, groups, counts, candidates, axis_name)

    return jax.shard_map(sharded, mesh=mesh, in_specs=(list(specs),),
                         out_specs=(replicated, replicated, replicated), check_vma=False)(keys)


def _flat_index(shape) -> jax.Array:
    """Each entry's row-major flat index, in `shape` (built from iotas, so it can be split like
    the keys without reshaping them)."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return index


def _masks_from_thresholds(keys, dtypes, groups, t, room, ties):
    """Keep keys > t, then the first `room` keys == t of each group in (layer, flat index) order.
    keys in their layers' shapes; the masks come in the same shapes (and splits)."""
    masks = []
    for i, (key, g) in enumerate(zip(keys, groups)):
        before = sum((ties[j] for j in range(i) if groups[j] == g), jnp.int32(0))
        room_here = jnp.clip(room[g] - before, 0, ties[i])  # ties of this layer still to keep
        n = key.size
        cut = jax.lax.cond(room_here == ties[i], lambda: jnp.int32(n),
                           lambda: jnp.where(room_here == 0, jnp.int32(0), masking._tie_cut(
                               key.reshape(-1), t[g], jnp.maximum(room_here, 1))))
        keep = (key > t[g]) | ((key == t[g]) & (_flat_index(key.shape) < cut))
        masks.append(keep.astype(dtypes[i]))
    return masks


SELECTION_METHODS = ("batched", "per_layer")


def layer_fractions(keep_fraction, num_layers: int) -> tuple[float, ...]:
    """One checked keep fraction per layer: keep_fraction is one number for every layer or a
    sequence of one per layer (in selection order)."""
    if isinstance(keep_fraction, (list, tuple)):
        if len(keep_fraction) != num_layers:
            raise ValueError(f"{len(keep_fraction)} keep fractions for {num_layers} layers")
        return tuple(masking.check_keep_fraction(k) for k in keep_fraction)
    return (masking.check_keep_fraction(keep_fraction),) * num_layers


def _by_path(keep_fraction, paths) -> float | tuple[float, ...]:
    """keep_fraction as select_masks takes it: a number as it is, a {"/"-joined layer path: k}
    mapping (MaskedModel.keep_fractions) as one k per path (tuples: layer paths, or score paths
    ending in "scores")."""
    if not isinstance(keep_fraction, dict):
        return keep_fraction
    names = ["/".join(p[:-1] if p[-1] == "scores" else p) if isinstance(p, tuple) else p
             for p in paths]
    missing = [n for n in names if n not in keep_fraction]
    if missing:
        raise ValueError(f"no keep fraction for layer(s) {', '.join(missing)}")
    return tuple(keep_fraction[n] for n in names)


def select_masks(scores: list, keep_fraction, scope: str = "layer", mesh=None,
                 axis_name: str = "data", method: str | None = None, specs=None,
                 candidates: int | None = None) -> list:
    """The 0/1 top-k masks of |scores| for a list of score arrays, all selected together.

    keep_fraction: one number, or one per array (layer_fractions; scope "layer" only).

    With `mesh`, the counting is split over `axis_name` (call inside jit). specs: each score
    array's PartitionSpec on the mesh when they are split (state_sharding="fsdp"), so each
    device counts its own block and nothing is gathered; None: all replicated.
    method: None picks per compiled platform: on GPU/TPU the batched search with
    ACCELERATOR_CANDIDATES per pass; on CPU, layer scope uses each layer's radix select
    (masking.topk_mask_forward: 2-3 histogram passes) and global scope the batched search
    bisecting (CPU_CANDIDATES). "batched" (the accelerators' search, with `candidates` per pass
    if given) or "per_layer" force one (for tests and benchmarks).
    """
    check_mask_scope(scope)
    fractions = layer_fractions(keep_fraction, len(scores))
    keep_fraction = (masking.check_keep_fraction(keep_fraction)
                     if not isinstance(keep_fraction, (list, tuple)) else fractions)
    if method not in (None, *SELECTION_METHODS):
        raise ValueError(f"unknown selection method {method!r}; allowed: {', '.join(SELECTION_METHODS)}")
    if method == "per_layer" and scope != "layer":
        raise ValueError("method='per_layer' selects each layer on its own: it needs scope='layer'")
    if candidates is not None and method != "batched":
        raise ValueError("candidates is an option of method='batched'")
    if method == "per_layer":
        return [masking.topk_mask_forward(s, k) for s, k in zip(scores, fractions)]

    def batched(n):
        return functools.partial(_select_batched, keep_fraction=keep_fraction, scope=scope,
                                 mesh=mesh, axis_name=axis_name, specs=specs, candidates=n)

    if method == "batched":
        return batched(candidates or ACCELERATOR_CANDIDATES)(scores)
    if scope == "layer":
        cpu = lambda s: [masking.topk_mask_forward(x, k) for x, k in zip(s, fractions)]  # noqa: E731
    else:
        cpu = batched(CPU_CANDIDATES)
    return jax.lax.platform_dependent(scores, cpu=cpu, default=batched(ACCELERATOR_CANDIDATES))


def _groups(num_layers: int, scope: str) -> list[int]:
    return list(range(num_layers)) if scope == "layer" else [0] * num_layers


def kept_counts(sizes, keep_fraction, scope: str = "layer") -> np.ndarray:
    """int32 [groups]: the weights each group keeps, kept_count(group size, k), computed on the
    host exactly as the reference does. Layers of `sizes` (in selection order) form one group
    each (scope "layer") or one group in all ("global"). keep_fraction: one number, or one per
    layer (layer_fractions), all equal for the global scope."""
    check_mask_scope(scope)
    groups = _groups(len(sizes), scope)
    fractions = layer_fractions(keep_fraction, len(sizes))
    if scope == "global" and len(set(fractions)) > 1:
        raise ValueError("mask_scope='global' keeps one fraction of all layers together: give "
                         f"one keep fraction, got {sorted(set(fractions))}")
    totals = [sum(n for n, g in zip(sizes, groups) if g == gi) for gi in range(max(groups) + 1)]
    ks = fractions if scope == "layer" else fractions[:1]
    return np.array([masking.kept_count(n, k) for n, k in zip(totals, ks)], np.int32)


def _select_batched(scores, *, keep_fraction, scope, mesh, axis_name, specs, candidates):
    counts = jnp.asarray(kept_counts([s.size for s in scores], keep_fraction, scope))
    return _select_counts(scores, counts, scope, mesh, axis_name, specs, candidates)


def _select_counts(scores, counts, scope, mesh, axis_name, specs, candidates):
    groups = _groups(len(scores), scope)
    keys = [masking._order_keys(s) for s in scores]
    t, room, ties = _thresholds(keys, groups, counts, mesh, axis_name, specs, candidates)
    return _masks_from_thresholds(keys, [s.dtype for s in scores], groups, t, room, ties)


def select_masks_for_counts(scores: list, counts, scope: str = "layer") -> list:
    """select_masks with the kept counts given as an int32 [groups] array (kept_counts), which
    may be traced: runs of different keep fractions vmapped in one program select their masks
    in one batched search on GPU/TPU (ACCELERATOR_CANDIDATES per pass). On CPU, as
    select_masks: each layer's radix select for the layer scope, the bisecting search for the
    global one. Exact either way."""
    check_mask_scope(scope)

    def search(n):
        return lambda s, c: _select_counts(s, c, scope, None, None, None, n)

    if scope == "layer":
        # Under vmap, one run after another: XLA:CPU's batched scatter-add (the radix
        # histograms of all runs at once) measured 2.7x slower than R plain ones (FC, 11 runs).
        cpu = jax.custom_batching.sequential_vmap(
            lambda s, c: [masking.topk_mask_for_count(x, c[i]) for i, x in enumerate(s)])
    else:
        cpu = search(CPU_CANDIDATES)
    return jax.lax.platform_dependent(scores, counts, cpu=cpu,
                                      default=search(ACCELERATOR_CANDIDATES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _straight_through_counts(abs_scores, counts, scope):
    return select_masks_for_counts(abs_scores, counts, scope)


def _stc_fwd(abs_scores, counts, scope):
    return _straight_through_counts(abs_scores, counts, scope), counts


def _stc_bwd(scope, counts, g):
    return g, np.zeros(counts.shape, jax.dtypes.float0)


_straight_through_counts.defvjp(_stc_fwd, _stc_bwd)


def score_paths(params) -> list[tuple]:
    """The paths of params' `scores` leaves, in selection order (sorted)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return sorted(p for p in flat if p[-1] == "scores")


def edge_popup_masks_for_counts(params, counts, scope: str = "layer"):
    """edge_popup_masks with the kept counts given (select_masks_for_counts; may be traced),
    with the same straight-through gradient."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    paths = score_paths(params)
    if not paths:
        return {}
    masks = _straight_through_counts([jnp.abs(flat[p]) for p in paths], counts, scope)
    return flax.traverse_util.unflatten_dict(dict(zip(paths, masks)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _straight_through(abs_scores, keep_fraction, scope, mesh, axis_name, specs):
    return select_masks(abs_scores, keep_fraction, scope, mesh, axis_name, specs=specs)


def _st_fwd(abs_scores, keep_fraction, scope, mesh, axis_name, specs):
    return _straight_through(abs_scores, keep_fraction, scope, mesh, axis_name, specs), None


def _st_bwd(keep_fraction, scope, mesh, axis_name, specs, _, g):
    return (g,)


_straight_through.defvjp(_st_fwd, _st_bwd)


def masks_by_path(scores: dict, keep_fraction, scope: str = "layer", mesh=None,
                  axis_name: str = "data", method: str | None = None) -> dict:
    """select_masks over a {path: scores} dict (paths as tuples or "/"-joined), layers in sorted
    path order (the global scope's tie order, as in edge_popup_masks), as {path: mask}. Forward only: no gradient (for counting and export).
    keep_fraction: a number, or {"/"-joined path: k} (MaskedModel.keep_fractions)."""
    paths = sorted(scores, key=lambda p: tuple(p.split("/")) if isinstance(p, str) else tuple(p))
    masks = select_masks([scores[p] for p in paths], _by_path(keep_fraction, paths), scope, mesh,
                         axis_name, method)
    return dict(zip(paths, masks))


def edge_popup_masks(params, keep_fraction, scope: str = "layer", mesh=None,
                     axis_name: str = "data", params_sharding=None):
    """The `masks` collection for model.apply: every `scores` leaf of params -> its top-k mask,
    all selected together (select_masks; layers in sorted path order), with the straight-through
    gradient of masking.topk_mask (d mask / d scores = sign(scores)). params_sharding: the
    params' NamedShardings when they are split over the mesh (see select_masks' specs).
    keep_fraction: a number, or {"/"-joined layer path: k} (MaskedModel.keep_fractions)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    paths = sorted(p for p in flat if p[-1] == "scores")
    if not paths:
        return {}
    specs = None
    if params_sharding is not None:
        where = flax.traverse_util.flatten_dict(flax.core.unfreeze(params_sharding))
        specs = tuple(where[p].spec for p in paths)
    abs_scores = [jnp.abs(flat[p]) for p in paths]
    masks = _straight_through(abs_scores, _by_path(keep_fraction, paths), scope, mesh, axis_name,
                              specs)
    return flax.traverse_util.unflatten_dict(dict(zip(paths, masks)))


def fold_into_kernels(frozen, masks):
    """The `masks` collection with each mask folded into its layer's kernel: {layer: {"kernel":
    W * mask}} ("embedding" for an embedding table). The layers use such a kernel as it is, so
    an evaluation multiplies once, not once per batch."""
    flat_frozen = flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen))
    folded = {}
    for path, mask in flax.traverse_util.flatten_dict(flax.core.unfreeze(masks)).items():
        # a layer's weight: "kernel", or an nn.Embed's "embedding" (transform.edge_popup)
        leaf = next((path[:-1] + (n,) for n in ("kernel", "embedding")
                     if path[:-1] + (n,) in flat_frozen), path[:-1] + ("kernel",))
        weights = flat_frozen[leaf]
        folded[leaf] = weights * mask.astype(weights.dtype)
    return flax.traverse_util.unflatten_dict(folded)


def with_masks(variables: dict, model, mesh=None, axis_name: str = "data", fold: bool = False,
               params_sharding=None) -> dict:
    """variables plus the `masks` collection that model.apply's edge-popup layers use: every
    layer's mask, selected in one pass over all layers (split over the mesh's devices). fold=True
    (for evaluation) stores W * mask instead of the mask, multiplied here once (binary_weights
    layers binarise it as they do W * mask). model: any model with `mask`, `keep_fraction` and
    `mask_scope` (models.MaskedModel: each layer's own keep fraction, keep_fractions). params_sharding:
    the params' NamedShardings when they are split over the mesh (state_sharding="fsdp")."""
    if model.mask != "edge_popup" or MASKS in variables:
        return variables
    keep = model.keep_fraction
    if not getattr(model, "uniform_keep_fraction", lambda: True)():  # per-role keep fractions
        keep = model.keep_fractions(variables["params"])
    masks = edge_popup_masks(variables["params"], keep, model.mask_scope, mesh, axis_name,
                             params_sharding)
    if fold:
        masks = fold_into_kernels(variables["frozen"], masks)
    return {**variables, MASKS: masks}
