"""The edge-popup layer options, declared once: names, defaults, allowed values, docs and checks.

The Linen layers and models inherit these fields (`class _SubnetLayer(nn.Module, EdgePopupOptions)`),
the NNX layers take them as keywords (`parse(options)`), and the config's `c.model` and the
subnet files take their defaults from `DEFAULTS`.
"""
from __future__ import annotations

import dataclasses
import types

from edgepopup_jax.core import inits, masking, selection

MASK_MODES = ("edge_popup", "supermask", "dense")


def check_mask_mode(mode: str) -> str:
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; allowed: {', '.join(MASK_MODES)}")
    return mode


def check_supermask_eval(mode: str) -> str:
    if mode not in masking.SUPERMASK_EVAL_MODES:
        raise ValueError(f"unknown supermask_eval {mode!r}; "
                         f"allowed: {', '.join(masking.SUPERMASK_EVAL_MODES)}")
    return mode


def check_optional_keep_fraction(name: str):
    """A check for a keep fraction that may be None (None: the same as keep_fraction)."""
    def check(value):
        if value is None:
            return None
        try:
            return masking.check_keep_fraction(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (or None: the same as keep_fraction)") from None
    return check


def check_bool(name: str):
    def check(value):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be False or True, got {value!r}")
        return value
    return check


def _option(default, doc: str, allowed, check=None):
    return dataclasses.field(default=default, metadata=dict(doc=doc, allowed=allowed, check=check))


@dataclasses.dataclass(kw_only=True)
class EdgePopupOptions:
    """The options every Subnet layer (and every MaskedModel) takes; checked on construction.

    Each field's metadata holds its `doc`, its `allowed` values and its `check` (ValueError
    naming the allowed values).
    """

    keep_fraction: float = _option(
        0.5, "fraction of weights KEPT per layer", "(0, 1]", masking.check_keep_fraction)
    weight_init: str = _option(
        "kaiming_normal", "the frozen random weights' distribution", inits.WEIGHT_INITS,
        inits.check_weight_init)
    weight_init_mode: str = _option(
        "fan_in", "the fan in std = sqrt(2 / fan) (xavier_normal uses both)", inits.FAN_MODES,
        inits.check_fan_mode)
    scale_by_keep_fraction: bool = _option(
        False, "the paper's \"scaled\" inits: std = gain / sqrt(k * fan)", (False, True))
    mask: str = _option(
        "edge_popup", "edge_popup | supermask (Zhou et al.) | dense (learned weights)",
        MASK_MODES, check_mask_mode)
    mask_scope: str = _option(
        "layer", "layer (the paper's: top-k in every layer) | global (one threshold over all layers)",
        selection.MASK_SCOPES, selection.check_mask_scope)
    supermask_eval: str = _option(
        "threshold", "a supermask's eval mask: threshold (S > 0) | expectation (sigmoid(S)) | sample",
        masking.SUPERMASK_EVAL_MODES, check_supermask_eval)
    binary_weights: bool = _option(
        False, "biprop (Diffenderfer & Kailkhura, ICLR 2021): W_eff = alpha * sign(W) * mask, "
        "alpha = sum(|W * mask|) / sum(mask) per layer (core/binary.py); needs mask='edge_popup'",
        (False, True), check_bool("binary_weights"))
    score_init: str = _option(
        "kaiming_uniform", "the scores' init: kaiming_uniform (edge-popup's U(+-1/sqrt(fan_in))) | "
        "uniform (U(+-score_init_scale)) | iterand (IteRand's U(+-sqrt(6/fan_in)), times "
        "score_init_scale); see inits.score_bound", inits.SCORE_INITS, inits.check_score_init)
    score_init_scale: float = _option(
        1.0, "multiplies the score init's bound (uniform: the bound itself)", "> 0",
        inits.check_score_init_scale)
    first_last_keep_fraction: float | None = _option(
        None, "the first and last masked layers' keep fraction (None: keep_fraction); a model "
        "option, resolved into each layer's keep_fraction", "(0, 1] or None",
        check_optional_keep_fraction("first_last_keep_fraction"))
    linear_keep_fraction: float | None = _option(
        None, "the other dense (linear) layers' keep fraction (None: keep_fraction; as IteRand's "
        "linear_sparsity, a kept fraction here); a model option, resolved into each layer's "
        "keep_fraction", "(0, 1] or None",
        check_optional_keep_fraction("linear_keep_fraction"))

    def __post_init__(self):
        check_options(self)


FIELDS = tuple(f.name for f in dataclasses.fields(EdgePopupOptions))
DEFAULTS = types.MappingProxyType({f.name: f.default for f in dataclasses.fields(EdgePopupOptions)})


def check_options(obj) -> None:
    """Raises ValueError naming the allowed values for any bad option of obj (an EdgePopupOptions,
    or a Linen layer or model that inherits its fields), or naming both fields of a combination
    that means nothing."""
    for f in dataclasses.fields(EdgePopupOptions):
        if f.metadata["check"] is not None:
            f.metadata["check"](getattr(obj, f.name))
    if obj.binary_weights and obj.mask != "edge_popup":
        # dense learns real weights (binarising them is BinaryConnect, another method); a
        # supermask is sampled in training and sigmoid(S) at an expectation eval, not biprop's
        # top-k set, whose kept weights' mean magnitude alpha is.
        raise ValueError(f"binary_weights=True needs mask='edge_popup' (biprop's top-k mask), "
                         f"got mask={obj.mask!r}")
    for name in PER_LAYER_KEEP_FRACTIONS:
        if getattr(obj, name) is not None and obj.mask_scope == "global":
            raise ValueError(f"{name} needs mask_scope='layer': mask_scope='global' keeps one "
                             f"fraction of all layers' weights together, got {name}="
                             f"{getattr(obj, name)!r}")


PER_LAYER_KEEP_FRACTIONS = ("first_last_keep_fraction", "linear_keep_fraction")


def check_layer_options(obj) -> None:
    """A single layer takes its own keep_fraction: the per-role fractions are model options
    (MaskedModel.layer_options resolves them)."""
    for name in PER_LAYER_KEEP_FRACTIONS:
        if getattr(obj, name) is not None:
            raise ValueError(f"{name} is a model option (MaskedModel resolves it into each "
                             f"layer's keep_fraction); a layer takes keep_fraction, got {name}="
                             f"{getattr(obj, name)!r}")


def keep_fraction_for(obj, *, first_or_last: bool, linear: bool) -> float:
    """A layer's keep fraction: first_last_keep_fraction for the first and last masked layers,
    else linear_keep_fraction for dense (linear) layers, else keep_fraction (each when not None;
    a dense last layer takes first_last_keep_fraction if set)."""
    if first_or_last and obj.first_last_keep_fraction is not None:
        return float(obj.first_last_keep_fraction)
    if linear and obj.linear_keep_fraction is not None:
        return float(obj.linear_keep_fraction)
    return obj.keep_fraction


def parse(options: dict) -> EdgePopupOptions:
    """EdgePopupOptions(**options); an unknown name is a TypeError listing the allowed ones."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown edge-popup option(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(FIELDS)}")
    return EdgePopupOptions(**options)
