"""ep.edge_popup_nnx(module, ...): the NNX twin of ep.edge_popup, for nnx.Module graphs.

NNX modules are mutable Python objects, so the transform works in place, on the module's own
layers, and returns the same object:

  - every matched kernel (nnx.Linear, LinearGeneral, Conv, ConvTranspose, Einsum; nnx.Embed's
    `embedding` with embed=True) is redrawn with weight_init from the layer's own fan-in and
    fan-out into a FrozenWeight (nnx_layers.FrozenWeight: an nnx.Variable that is not an
    nnx.Param), and the layer gets a `scores` nnx.Param of the same shape;
  - every other nnx.Param (biases, LayerNorm, position embeddings, class tokens) becomes a
    FrozenWeight holding its init, unless learn_unmatched names it (the Linen transform's
    policy); other variables (BatchStat, RngState) are left as they are;
  - the module's class becomes a subclass whose `__call__` (and every method in `methods`)
    first selects all masks at once (selection.edge_popup_masks: one batched selection, layer
    or global scope, a keep fraction per path pattern, the straight-through gradient of
    masking.topk_mask), sets each matched kernel to W * mask(S) for the duration of the call,
    runs the user's method, and puts W back.

So `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `nnx.grad(..., argnums=nnx.DiffState(0,
nnx.Param))` train the scores (and what learn_unmatched names) and never see W. Layer paths
are the "/"-joined attribute paths of nnx.iter_graph ("blocks/0/attn/query"), matched by the
same glob patterns as the Linen transform's include, exclude, keep_fractions, learn_unmatched.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from edgepopup_jax.core import binary, inits, selection
from edgepopup_jax.core.nnx_layers import FrozenWeight
from edgepopup_jax.core.transform import TransformOptions, _einsum_fans, _layer_key

KERNEL_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)
_CLASSES: dict = {}  # (user class, options) -> its transformed subclass


def _path(parts) -> str:
    return "/".join(str(p) for p in parts)


def kernel_fans(layer, embed: bool = False) -> tuple[str, int, int] | None:
    """(weight attribute, fan_in, fan_out) of a maskable NNX layer, or None.

    Linear (in, out); LinearGeneral (*batch, *in, *out); Conv (*window, in/groups, out) and
    ConvTranspose (*window, in, out; transpose_kernel: *window, out, in): prod(window) * in,
    prod(window) * out; Einsum: its contracted axes and its output-only axes (as the Linen
    transform's); Embed (num_embeddings, features): fan-in features, fan-out num_embeddings."""
    if isinstance(layer, nnx.Embed):
        shape = layer.embedding.shape
        return ("embedding", shape[1], shape[0]) if embed else None
    if not isinstance(layer, KERNEL_LAYERS) or not isinstance(getattr(layer, "kernel", None),
                                                               nnx.Variable):
        return None
    shape = layer.kernel.shape
    if isinstance(layer, nnx.Linear):
        return "kernel", shape[0], shape[1]
    if isinstance(layer, nnx.LinearGeneral):
        return "kernel", int(np.prod(layer.in_features)), int(np.prod(layer.out_features))
    if isinstance(layer, nnx.Einsum):
        return ("kernel",) + _einsum_fans(layer.einsum_str, shape)
    receptive = int(np.prod(shape[:-2]))
    fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
    if getattr(layer, "transpose_kernel", False):
        fan_in, fan_out = fan_out, fan_in
    return "kernel", fan_in, fan_out


def scored_layers(module: nnx.Module) -> list[tuple[str, nnx.Module, str]]:
    """(layer path, layer, weight attribute) of every layer the transform scored, by path."""
    found = []
    for parts, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "scores", None), nnx.Param):
            leaf = "embedding" if isinstance(node, nnx.Embed) else "kernel"
            found.append((_path(parts), node, leaf))
    return sorted(found, key=lambda item: item[0])


def _replace(parents: dict, parts: tuple, variable: nnx.Variable):
    parent = parents[parts[:-1]]
    if isinstance(parts[-1], int):
        parent[parts[-1]] = variable
    else:
        setattr(parent, parts[-1], variable)


def _select(options: TransformOptions, layers) -> dict:
    """{layer path: mask} for the scored layers, from one selection (straight-through)."""
    scores = {path: {"scores": layer.scores[...]} for path, layer, _ in layers}
    keep = options.keep_fraction
    if options.keep_fractions:
        keep = {path: options.layer_keep_fraction(path) for path, _, _ in layers}
    found = selection.edge_popup_masks(scores, keep, options.mask_scope)
    return {path: found[path]["scores"] for path, _, _ in layers}


def masks(module: nnx.Module) -> dict[str, jax.Array]:
    """Every scored layer's current 0/1 mask, by "/"-joined layer path, as the forward pass
    selects them."""
    options = getattr(type(module), "edge_popup_options", None)
    if not isinstance(options, TransformOptions):
        raise ValueError(f"masks needs a module transformed by edge_popup_nnx, got "
                         f"{type(module).__name__}")
    return jax.tree.map(jax.lax.stop_gradient, _select(options, scored_layers(module)))


def _masked(method, options: TransformOptions):
    """The user's method, run with every scored kernel set to W * mask(S) meanwhile."""
    def wrapped(self, *args, **kwargs):
        layers = scored_layers(self)
        found = _select(options, layers)
        saved = []
        try:
            for path, layer, leaf in layers:
                variable = getattr(layer, leaf)
                weights = variable[...]
                saved.append((variable, weights))
                kernel = weights * found[path].astype(weights.dtype)
                variable[...] = binary.binarize(kernel) if options.binary_weights else kernel
            return method(self, *args, **kwargs)
        finally:
            for variable, weights in saved:
                variable[...] = weights

    wrapped.__name__, wrapped.__doc__ = method.__name__, method.__doc__
    return wrapped


def _subclass(cls, options: TransformOptions):
    key = (cls, options)
    if key not in _CLASSES:
        body = {name: _masked(getattr(cls, name), options) for name in options.methods}
        sub = type(f"EdgePopup{cls.__name__}", (cls,), body)
        sub.__qualname__, sub.__module__ = sub.__name__, cls.__module__
        sub.edge_popup_options = options
        _CLASSES[key] = sub
    return _CLASSES[key]


def edge_popup_nnx(module: nnx.Module, keep_fraction: float = 0.5, *, rngs: nnx.Rngs,
                   weight_init: str = "kaiming_normal", weight_init_mode: str = "fan_in",
                   scale_by_keep_fraction: bool = False, score_init="kaiming_uniform",
                   score_init_scale: float = 1.0, mask_scope: str = "layer",
                   binary_weights: bool = False, include=("*",), exclude=(),
                   keep_fractions=None, embed: bool = False, learn_unmatched=False,
                   methods=("__call__",)) -> nnx.Module:
    """Turns an nnx.Module into its edge-popup version, in place, and returns it.

    The options are ep.edge_popup's (see there), on "/"-joined nnx.iter_graph paths
    ("blocks/0/attn/query"); the draws come from rngs.params(), one key per layer path.
    Matched: nnx.Linear, LinearGeneral, Conv, ConvTranspose, Einsum (and nnx.Embed with
    embed=True). Afterwards: W in a FrozenWeight (`layer.kernel`, Embed: `layer.embedding`),
    scores in an nnx.Param (`layer.scores`); unmatched nnx.Params frozen unless learn_unmatched
    names them. ep.masks(module) gives the current masks.

    Raises:
      ValueError: a bad option (naming it and what it allows), a module that is not an
        nnx.Module or is already transformed, a method in `methods` it lacks, or patterns that
        match no maskable layer.
    """
    if not isinstance(module, nnx.Module):
        raise ValueError(f"edge_popup_nnx transforms a flax.nnx Module, got {type(module).__name__}"
                         " (a flax.linen Module: use ep.edge_popup)")
    if isinstance(getattr(type(module), "edge_popup_options", None), TransformOptions):
        raise ValueError(f"{type(module).__name__} is already an edge-popup module")
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
    options = TransformOptions(
        keep_fraction=keep_fraction, weight_init=weight_init, weight_init_mode=weight_init_mode,
        scale_by_keep_fraction=scale_by_keep_fraction, score_init=score_init,
        score_init_scale=score_init_scale, mask_scope=mask_scope, binary_weights=binary_weights,
        include=include, exclude=exclude, keep_fractions=keep_fractions or (), embed=embed,
        learn_unmatched=learn_unmatched, methods=methods)
    for name in options.methods:
        if not callable(getattr(type(module), name, None)):
            raise ValueError(f"methods: {type(module).__name__} has no method {name!r}")

    nodes = dict(nnx.iter_graph(module))
    maskable, chosen = [], {}
    for parts, node in nodes.items():
        fans = kernel_fans(node, options.embed) if isinstance(node, nnx.Module) else None
        if fans is not None:
            maskable.append(_path(parts))
            if options.selects(_path(parts)):
                chosen[parts] = fans
    if not chosen:
        raise ValueError(f"include={list(options.include)}, exclude={list(options.exclude)} match "
                         f"no maskable layer of {type(module).__name__}; its maskable layers: "
                         f"{maskable or 'none (nnx.Linear, LinearGeneral, Conv, ConvTranspose, Einsum; Embed with embed=True)'}")

    key = rngs.params()
    for parts, (leaf, fan_in, fan_out) in chosen.items():
        layer, path = nodes[parts], _path(parts)
        weights = getattr(layer, leaf)
        k = options.layer_keep_fraction(path)
        weight_key, score_key = jax.random.split(_layer_key(key, path))
        init = inits.weight_init(options.weight_init, fan_in=fan_in, fan_out=fan_out,
                                 mode=options.weight_init_mode,
                                 keep_fraction=k if options.scale_by_keep_fraction else None)
        scores = inits.score_initializer(options.score_init, fan_in=fan_in,
                                         scale=options.score_init_scale)
        shape, dtype = weights.shape, weights[...].dtype
        setattr(layer, leaf, FrozenWeight.from_metadata(init(weight_key, shape, dtype),
                                                        weights.get_metadata()))
        layer.scores = nnx.Param(scores(score_key, shape, dtype))
    matched = {parts + (leaf,) for parts, (leaf, _, _) in chosen.items()}
    for parts, node in nodes.items():
        if (isinstance(node, nnx.Param) and parts not in matched
                and not options.learns(_path(parts))):
            _replace(nodes, parts, FrozenWeight.from_metadata(node[...], node.get_metadata()))
    object.__setattr__(module, "__class__", _subclass(type(module), options))
    return module


__all__ = ["edge_popup_nnx", "masks", "kernel_fans", "scored_layers"]
