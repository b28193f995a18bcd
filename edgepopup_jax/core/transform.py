"""ep.edge_popup(module, ...): any Flax Linen model's kernels -> frozen random weights + scores.

The returned module is the user's module class lifted by one variable map (a custom
`flax.core.lift.pack`, the building block of `nn.map_variables`), so its `__call__` (and any
method named in `methods`) is the user's, unchanged. Outside, the variables are edge-popup's:

  params: {layer: {"scores": S}} for every matched kernel, plus the unmatched leaves learned
          (learn_unmatched)
  frozen: {layer: {"kernel": W}} (Embed: "embedding") drawn with weight_init from the layer's
          own fan-in and fan-out, plus every other unmatched leaf, as the module initialised it

Inside, the module sees {"params": {layer: {"kernel": W * mask(S), ...}}}. The map sees the
whole tree at once, so every layer's mask comes from one selection (core/selection.py: layer or
global scope, a keep fraction per path pattern), with the straight-through gradient of
masking.topk_mask. A `masks` collection given to apply (the trainer's selection.with_masks:
{layer: {"scores": mask}}, or folded {layer: {"kernel": W * mask}}) is used as it is.

Why a variable map and not nn.intercept_methods: an interceptor sees one method call of one
layer at a time, so a global threshold (or one batched selection for all layers) would need a
second pass; and Flax layers read their kernel with `self.param`, which no interceptor can
replace. The map also keeps the layers' own paths (params/encoder/attn/query/scores).
Why not nn.map_variables itself: its out-map has no rng (the frozen weights and scores are
drawn at init from the `params` stream), and with init=True it runs the model twice on every
call that has a mutable collection (a training step's batch_stats); the lift below runs the
module twice at init only.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import zlib
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
from flax.core import lift
from flax.core.scope import Scope

from edgepopup_jax.core import binary, inits, masking, selection

FROZEN = "frozen"
MAPPED = ("params", FROZEN, selection.MASKS)  # the collections the map rewrites
WEIGHT_LEAVES = ("kernel", "embedding")  # a matched layer's weight: Dense/Conv/Einsum, Embed
TRANSFORM_MASKS = ("edge_popup", "dense")
KERNEL_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Einsum)
# Attributes the trainer reads from a model (models.base.MaskedModel's); the transformed class
# answers them, so the user's module must not have fields of these names.
MODEL_ATTRIBUTES = ("edge_popup_options", "mask", "keep_fraction", "mask_scope", "binary_weights",
                    "keep_fractions", "uniform_keep_fraction")


def _patterns(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        value = None
    if value is None or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a path pattern or a sequence of them (glob patterns "
                         f"on '/'-joined paths, e.g. 'encoder/*/query'), got {value!r}")
    return value


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    """edge_popup's options, checked on construction (each bad one a ValueError naming it).

    Layer paths are "/"-joined module paths ("encoder/block0/attn/query"), matched by glob
    patterns (fnmatch: `*` also matches "/"); a leaf path adds the leaf ("head/bias").
    """

    keep_fraction: float = 0.5  # fraction of each matched kernel's weights KEPT
    weight_init: str = "kaiming_normal"  # inits.WEIGHT_INITS, from each layer's own fans
    weight_init_mode: str = "fan_in"
    scale_by_keep_fraction: bool = False
    score_init: Any = "kaiming_uniform"  # inits.SCORE_INITS or an init function
    score_init_scale: float = 1.0
    mask_scope: str = "layer"  # "layer" | "global"
    binary_weights: bool = False  # biprop: alpha * sign(W) * mask (core/binary.py)
    include: tuple[str, ...] = ("*",)  # layer paths whose kernels are masked ...
    exclude: tuple[str, ...] = ()  # ... unless one of these matches
    keep_fractions: tuple[tuple[str, float], ...] = ()  # (layer pattern, k): first match wins
    embed: bool = False  # also mask nn.Embed tables
    learn_unmatched: bool | tuple[str, ...] = False  # True, False, or leaf-path patterns
    methods: tuple[str, ...] = ("__call__",)  # the module's methods that see the masked kernels
    mask: str = "edge_popup"  # or "dense": the baseline, nothing masked, every parameter learned

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.mask not in TRANSFORM_MASKS:
            raise ValueError(f"mask must be one of {', '.join(TRANSFORM_MASKS)} for a transformed "
                             f"model, got {self.mask!r}")
        set_("keep_fraction", masking.check_keep_fraction(self.keep_fraction))
        inits.check_weight_init(self.weight_init)
        inits.check_fan_mode(self.weight_init_mode)
        inits.check_score_init(self.score_init)
        set_("score_init_scale", inits.check_score_init_scale(self.score_init_scale))
        selection.check_mask_scope(self.mask_scope)
        for name in ("scale_by_keep_fraction", "binary_weights", "embed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be False or True, got {getattr(self, name)!r}")
        set_("include", _patterns(self.include, "include"))
        set_("exclude", _patterns(self.exclude, "exclude"))
        set_("methods", _patterns(self.methods, "methods"))
        if not isinstance(self.learn_unmatched, bool):
            set_("learn_unmatched", _patterns(self.learn_unmatched, "learn_unmatched"))
        fractions = self.keep_fractions
        if isinstance(fractions, dict):
            fractions = tuple(fractions.items())
        try:
            fractions = tuple((str(p), float(masking.check_keep_fraction(k))) for p, k in fractions)
        except ValueError as e:
            raise ValueError(f"keep_fractions: {e} (a {{layer pattern: keep fraction}} mapping)") from None
        except TypeError:
            raise ValueError("keep_fractions must be a {layer pattern: keep fraction} mapping, "
                             f"got {self.keep_fractions!r}") from None
        set_("keep_fractions", fractions)
        if fractions and self.mask_scope == "global":
            raise ValueError("keep_fractions (per-path keep fractions) needs mask_scope='layer': "
                             "mask_scope='global' keeps one fraction of all layers together")

    def layer_keep_fraction(self, layer: str) -> float:
        for pattern, k in self.keep_fractions:
            if fnmatch.fnmatchcase(layer, pattern):
                return k
        return self.keep_fraction

    def selects(self, layer: str) -> bool:
        return (self.mask == "edge_popup" and _matches(layer, self.include)
                and not _matches(layer, self.exclude))

    def learns(self, leaf_path: str) -> bool:
        if self.mask == "dense":
            return True
        if isinstance(self.learn_unmatched, bool):
            return self.learn_unmatched
        return _matches(leaf_path, self.learn_unmatched)


def _einsum_fans(einsum_str: str, shape) -> tuple[int, int]:
    """An nn.Einsum kernel's fans: its axes contracted with the input (fan-in) and those only
    in the output (fan-out); axes shared by all three (batch-like, e.g. heads) count in neither."""
    spec = einsum_str.replace(" ", "").replace("...", "")
    inputs, output = spec.split("->")
    lhs, rhs = inputs.split(",")
    fan_in = [n for a, n in zip(rhs, shape) if a in lhs and a not in output]
    fan_out = [n for a, n in zip(rhs, shape) if a in output and a not in lhs]
    return int(np.prod(fan_in)), int(np.prod(fan_out))


def kernel_fans(module, leaf: str, shape, embed: bool = False) -> tuple[int, int] | None:
    """(fan_in, fan_out) of a matched layer's weight leaf, or None if it is not matched.

    Dense (in, out); DenseGeneral (*batch, *in, *features); Conv and ConvTranspose
    (*window, in[/groups], out): prod(window) * in, prod(window) * out (as layers.SubnetConv);
    Einsum: see _einsum_fans; Embed (num_embeddings, features): fan-in features, fan-out
    num_embeddings (flax's own embedding init takes its fan-in on the features axis)."""
    if isinstance(module, nn.Embed):
        return (shape[1], shape[0]) if embed and leaf == "embedding" else None
    if leaf != "kernel" or not isinstance(module, KERNEL_LAYERS):
        return None
    if isinstance(module, nn.Dense):
        return shape[0], shape[1]
    if isinstance(module, nn.DenseGeneral):
        features = module.features if isinstance(module.features, Sequence) else (module.features,)
        n_out, n_batch = len(features), len(tuple(module.batch_dims))
        return int(np.prod(shape[n_batch:len(shape) - n_out])), int(np.prod(shape[-n_out:]))
    if isinstance(module, nn.Einsum):
        return _einsum_fans(module.einsum_str, shape)
    receptive = int(np.prod(shape[:-2]))
    return receptive * shape[-2], receptive * shape[-1]


def _layer_key(key, layer: str):
    """The layer's own key (a stable hash of its path): one layer's draw does not depend on
    which other layers the model has."""
    return jax.random.fold_in(key, zlib.crc32(layer.encode()) & 0x7FFFFFFF)


def _draw(options: TransformOptions, inner: dict, modules: dict, key) -> dict:
    """The outer variables from the module's own init: matched kernels redrawn (weight_init,
    from their fans) into frozen with fresh scores in params; the rest frozen or learned."""
    params, frozen = {}, {}
    for path, value in flax.traverse_util.flatten_dict(inner).items():
        layer = "/".join(path[:-1])
        module = modules.get(path[:-1])
        fans = kernel_fans(module, path[-1], value.shape, options.embed) if module else None
        if fans is not None and options.selects(layer):
            k = options.layer_keep_fraction(layer)
            weight_key, score_key = jax.random.split(_layer_key(key, layer))
            init = inits.weight_init(options.weight_init, fan_in=fans[0], fan_out=fans[1],
                                     mode=options.weight_init_mode,
                                     keep_fraction=k if options.scale_by_keep_fraction else None)
            scores = inits.score_initializer(options.score_init, fan_in=fans[0],
                                             scale=options.score_init_scale)
            frozen[path] = init(weight_key, value.shape, value.dtype)
            params[path[:-1] + ("scores",)] = scores(score_key, value.shape, value.dtype)
        elif options.learns("/".join(path)):
            params[path] = value
        else:
            frozen[path] = value
    unflatten = flax.traverse_util.unflatten_dict
    return {"params": unflatten(params), FROZEN: unflatten(frozen)}


def weight_leaf(frozen_flat: dict, layer: tuple) -> tuple:
    """The path of a scored layer's frozen weight (its "kernel", or an Embed's "embedding")."""
    for leaf in WEIGHT_LEAVES:
        if layer + (leaf,) in frozen_flat:
            return layer + (leaf,)
    raise ValueError(f"layer {'/'.join(layer)} has scores but no frozen kernel or embedding")


def layer_masks(options: TransformOptions, params, given=None) -> dict:
    """{layer path tuple: mask} for every scored layer of params: the `masks` collection's when
    given for all of them, else one selection over all layers (straight-through gradient)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    layers = sorted(p[:-1] for p in flat if p[-1] == "scores")
    given = flax.traverse_util.flatten_dict(flax.core.unfreeze(given or {}))
    if layers and all(layer + ("scores",) in given for layer in layers):
        return {layer: given[layer + ("scores",)] for layer in layers}
    if not layers:
        return {}
    keep = options.keep_fraction
    if options.keep_fractions:
        keep = {"/".join(layer): options.layer_keep_fraction("/".join(layer)) for layer in layers}
    scores = flax.traverse_util.unflatten_dict({layer + ("scores",): flat[layer + ("scores",)]
                                                for layer in layers})
    masks = flax.traverse_util.flatten_dict(selection.edge_popup_masks(scores, keep,
                                                                       options.mask_scope))
    return {p[:-1]: m for p, m in masks.items()}


def _view(options: TransformOptions, outer: dict) -> dict:
    """What the module sees: {"params": its own tree}, each matched kernel W * mask(S)."""
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(outer.get("params", {})))
    frozen = flax.traverse_util.flatten_dict(flax.core.unfreeze(outer.get(FROZEN, {})))
    given = flax.traverse_util.flatten_dict(flax.core.unfreeze(outer.get(selection.MASKS, {})))
    inner = {p: v for p, v in {**frozen, **params}.items() if p[-1] != "scores"}
    folded = {p[:-1]: v for p, v in given.items() if p[-1] in WEIGHT_LEAVES}
    masks = {} if folded else layer_masks(options, outer.get("params", {}),
                                          outer.get(selection.MASKS))
    for layer in sorted({p[:-1] for p in params if p[-1] == "scores"}):
        leaf = weight_leaf(frozen, layer)
        if layer in folded:  # W * mask, multiplied once per evaluation (selection.with_masks)
            kernel = folded[layer]
        else:
            weights = frozen[leaf]
            kernel = weights * masks[layer].astype(weights.dtype)
        inner[leaf] = binary.binarize(kernel) if options.binary_weights else kernel
    return {"params": flax.traverse_util.unflatten_dict(inner)}


def _record_modules(modules: dict, base: tuple):
    """An interceptor noting every module the model calls, by its path below `base`."""
    def interceptor(next_fun, args, kwargs, context):
        scope = context.module.scope
        if scope is not None and tuple(scope.path[:len(base)]) == tuple(base):
            modules.setdefault(tuple(scope.path[len(base):]), context.module)
        return next_fun(*args, **kwargs)
    return interceptor


def _lift(fn, options: TransformOptions):
    """The lifted method: at init, the module initialises itself (its layers' types recorded),
    then _draw gives the outer variables; on every call, the module runs on _view of them."""
    others = lift.subtract_filters(True, MAPPED)

    def wrapper(scope_fn, repack, variable_groups, rng_groups, *args, **kwargs):
        target, rest = variable_groups
        if len(target) != 1:
            raise ValueError("edge_popup transforms one module: pass no modules as arguments")
        outer = flax.core.unfreeze(target[0])
        if not outer.get("params") and not outer.get(FROZEN):  # init: draw W and S
            scopes = scope_fn(variable_groups, rng_groups)
            scope = jax.tree_util.tree_leaves(scopes, is_leaf=lambda s: isinstance(s, Scope))[0]
            modules = {}
            with nn.intercept_methods(_record_modules(modules, scope.path)):
                fn(scopes, *args, **kwargs)
            key = scope.make_rng("params")
            (inner,), _ = repack(scopes)
            outer = _draw(options, flax.core.unfreeze(inner).get("params", {}), modules, key)
        scopes = scope_fn(((_view(options, outer),), rest), rng_groups, mutable_filter=others)
        y = fn(scopes, *args, **kwargs)
        _, rest_out = repack(scopes)
        return y, (({c: outer[c] for c in ("params", FROZEN) if c in outer},), rest_out)

    return lift.pack(wrapper, (MAPPED, others), (MAPPED, others), (True,), enable_kwargs=True,
                     name="edge_popup")


def _keep_fractions(self, params) -> dict[str, float]:
    """Each masked layer's keep fraction, by "/"-joined layer path (as MaskedModel's)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    options = self.edge_popup_options
    return {"/".join(p[:-1]): options.layer_keep_fraction("/".join(p[:-1]))
            for p in sorted(flat) if p[-1] == "scores"}


def edge_popup(module: nn.Module, keep_fraction: float = 0.5, *,
               weight_init: str = "kaiming_normal", weight_init_mode: str = "fan_in",
               scale_by_keep_fraction: bool = False, score_init="kaiming_uniform",
               score_init_scale: float = 1.0, mask_scope: str = "layer",
               binary_weights: bool = False, include=("*",), exclude=(),
               keep_fractions=None, embed: bool = False, learn_unmatched=False,
               methods=("__call__",), mask: str = "edge_popup", name: str | None = None) -> nn.Module:
    """An edge-popup version of any Flax Linen module: the same class and fields, the same
    `__call__`; every matched kernel becomes frozen random weights (`frozen`) times the top-k
    mask of learned scores (`params`).

    Args:
      module: a Linen module (unbound), e.g. MyViT(num_classes=10).
      keep_fraction: the fraction of each matched kernel's weights kept (0, 1].
      weight_init, weight_init_mode, scale_by_keep_fraction: the frozen weights' distribution
        (inits.WEIGHT_INITS), drawn from each layer's own fan-in and fan-out (kernel_fans).
      score_init, score_init_scale: the scores' init (inits.SCORE_INITS), from the fan-in.
      mask_scope: "layer" (every layer keeps its own fraction) or "global" (one threshold).
      binary_weights: biprop's alpha * sign(W) * mask.
      include, exclude: glob patterns on "/"-joined layer paths: a Dense, DenseGeneral, Conv,
        ConvTranspose or Einsum (and with embed=True an Embed) is masked when a pattern of
        include matches its path and none of exclude does.
      keep_fractions: {layer pattern: keep fraction}; the first matching pattern wins, other
        layers keep keep_fraction (layer scope only).
      embed: also mask nn.Embed tables.
      learn_unmatched: what happens to every other parameter (biases, LayerNorm, position
        embeddings, class tokens, excluded kernels): False (default) frozen at its init, in
        `frozen`; True learned, in `params` with the scores; or glob patterns on "/"-joined
        leaf paths ("head/*", "*/bias") naming those learned.
      methods: the module's methods that see the masked kernels.
      mask: "edge_popup", or "dense" (the dense baseline: nothing masked, every parameter
        learned in `params`, the module as it is).
      name: the transformed module's name as a submodule (inside a parent's compact method,
        give the module parent=None: ep.edge_popup(MLP(parent=None), name="mlp")).

    Returns:
      A module of a subclass of type(module) with the same fields. It also answers what the
      trainer reads from a model (MODEL_ATTRIBUTES: keep_fraction, mask_scope, keep_fractions,
      ...). apply uses a `masks` collection when given (selection.with_masks).

    Raises:
      ValueError: a bad option (naming it and what it allows), or a module whose fields clash
        with MODEL_ATTRIBUTES.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"edge_popup transforms a flax.linen Module, got {type(module).__name__}")
    if isinstance(module.parent, nn.Module):
        raise ValueError(f"edge_popup needs a module that no parent has adopted: inside "
                         f"{type(module.parent).__name__}, build it with parent=None, e.g. "
                         f"ep.edge_popup({type(module).__name__}(parent=None), name=...)")
    options = TransformOptions(
        keep_fraction=keep_fraction, weight_init=weight_init, weight_init_mode=weight_init_mode,
        scale_by_keep_fraction=scale_by_keep_fraction, score_init=score_init,
        score_init_scale=score_init_scale, mask_scope=mask_scope, binary_weights=binary_weights,
        include=include, exclude=exclude, keep_fractions=keep_fractions or (), embed=embed,
        learn_unmatched=learn_unmatched, methods=methods, mask=mask)
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name != "parent"}
    if name is not None:
        fields["name"] = name
    clash = sorted(set(fields) & set(MODEL_ATTRIBUTES))
    if clash:
        raise ValueError(f"{type(module).__name__} has field(s) {', '.join(clash)}, which the "
                         f"transformed model uses ({', '.join(MODEL_ATTRIBUTES)}): rename them")
    for name in options.methods:
        if not callable(getattr(type(module), name, None)):
            raise ValueError(f"methods: {type(module).__name__} has no method {name!r}")
    cls = nn.transforms.lift_transform(_lift, type(module), options, methods=list(options.methods))
    cls.__name__ = cls.__qualname__ = f"EdgePopup{type(module).__name__}"
    cls.edge_popup_options = options
    cls.mask = options.mask
    cls.keep_fraction = options.keep_fraction
    cls.mask_scope = options.mask_scope
    cls.binary_weights = options.binary_weights
    cls.keep_fractions = _keep_fractions
    cls.uniform_keep_fraction = lambda self: not self.edge_popup_options.keep_fractions
    return cls(**fields)


def is_transformed(model) -> bool:
    return isinstance(getattr(type(model), "edge_popup_options", None), TransformOptions)


def masks(variables, model=None) -> dict[str, jax.Array]:
    """Every masked layer's current 0/1 mask, by "/"-joined layer path: one selection over all
    layers, as the forward pass makes it. model: the transformed module (edge_popup) or any
    models.MaskedModel. For NNX, masks(module): a module transformed by edge_popup_nnx."""
    from flax import nnx
    if isinstance(variables, nnx.Module):
        from edgepopup_jax.core import nnx_transform
        return nnx_transform.masks(variables)
    if not hasattr(model, "keep_fractions"):
        raise ValueError(f"masks needs the transformed module or a MaskedModel, got {model!r}")
    keep = model.keep_fraction if model.uniform_keep_fraction() else tuple(sorted(
        model.keep_fractions(variables["params"]).items()))
    found = _select(variables["params"], keep, model.mask_scope)
    return {"/".join(p[:-1]): m for p, m in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(found)).items()}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _select(params, keep, scope):
    keep = dict(keep) if isinstance(keep, tuple) else keep  # hashable, as a static argument
    return selection.edge_popup_masks(params, keep, scope)


def train_step(model, tx: optax.GradientTransformation, loss_fn: Callable, *,
               mutable: Sequence[str] = ("batch_stats",)) -> Callable:
    """The optax-style entry for your own loop: step(variables, opt_state, *batch, rngs=None)
    -> (variables, opt_state, loss, aux), to jit.

    The trainable tree is variables["params"]: the scores (and the unmatched parameters that
    learn_unmatched learns); `frozen` never reaches tx. Every layer's mask is selected once per
    step (selection.with_masks, one selection for all layers) and serves the forward pass and
    the straight-through backward. loss_fn(outputs, *batch) -> loss or (loss, aux), outputs
    those of model.apply(variables, batch[0], ...); collections in `mutable` (batch_stats)
    are updated. opt_state = tx.init(variables["params"]).
    """
    def step(variables, opt_state, *batch, rngs=None, **apply_kwargs):
        def loss(params):
            full = selection.with_masks({**variables, "params": params}, model)
            outputs, updates = model.apply(full, batch[0], rngs=rngs, mutable=list(mutable),
                                           **apply_kwargs)
            value = loss_fn(outputs, *batch)
            value, aux = value if isinstance(value, tuple) else (value, None)
            return value, (aux, updates)

        (value, (aux, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], changes)
        return {**variables, **updates, "params": params}, opt_state, value, aux

    return step

