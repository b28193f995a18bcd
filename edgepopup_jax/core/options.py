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

    def __post_init__(self):
        check_options(self)


FIELDS = tuple(f.name for f in dataclasses.fields(EdgePopupOptions))
DEFAULTS = types.MappingProxyType({f.name: f.default for f in dataclasses.fields(EdgePopupOptions)})


def check_options(obj) -> None:
    """Raises ValueError naming the allowed values for any bad option of obj (an EdgePopupOptions,
    or a Linen layer or model that inherits its fields)."""
    for f in dataclasses.fields(EdgePopupOptions):
        if f.metadata["check"] is not None:
            f.metadata["check"](getattr(obj, f.name))


def parse(options: dict) -> EdgePopupOptions:
    """EdgePopupOptions(**options); an unknown name is a TypeError listing the allowed ones."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown edge-popup option(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(FIELDS)}")
    return EdgePopupOptions(**options)
