"""Zoo models built from plain Flax modules with core.transform.edge_popup, taking the options
every MaskedModel takes (the trainer's config.model), so `get_model("vit", ...)` trains as the
hand-written models do."""
from __future__ import annotations

from edgepopup_jax.core import masking, options as options_lib, transform
from edgepopup_jax.models.transformer_lm import TransformerLM
from edgepopup_jax.models.vit import ViT


def edge_popup_model(module, *, first: str, last: str, keep_fraction: float = 0.5,
                     weight_init: str = "kaiming_normal", weight_init_mode: str = "fan_in",
                     scale_by_keep_fraction: bool = False, mask: str = "edge_popup",
                     mask_scope: str = "layer", supermask_eval: str = "threshold",
                     binary_weights: bool = False, score_init="kaiming_uniform",
                     score_init_scale: float = 1.0, first_last_keep_fraction=None,
                     linear_keep_fraction=None, dense_first: bool = False,
                     dense_last: bool = False, embed: bool = False):
    """edge_popup(module) with a MaskedModel's options. first / last: the first and last
    layers' paths (first_last_keep_fraction, dense_first, dense_last); every other matched
    layer counts as linear (linear_keep_fraction). mask: "edge_popup", or "dense" (the
    baseline: nothing masked, every parameter learned); "supermask" is not available here.
    Unmatched parameters (biases, LayerNorm, position embeddings, class token) stay frozen at
    their init; a dense first or last layer is learned whole."""
    options_lib.check_mask_mode(mask)
    options_lib.check_supermask_eval(supermask_eval)
    if mask == "supermask":
        raise ValueError("mask='supermask' needs the hand-written layers; a transformed model "
                         "takes mask='edge_popup' or 'dense'")
    fractions = {}
    for name, value in (("first_last_keep_fraction", first_last_keep_fraction),
                        ("linear_keep_fraction", linear_keep_fraction)):
        options_lib.check_optional_keep_fraction(name)(value)
    if first_last_keep_fraction is not None:
        fractions.update({first: first_last_keep_fraction, last: first_last_keep_fraction})
    if linear_keep_fraction is not None:
        fractions["*"] = linear_keep_fraction
    dense = [p for p, on in ((first, dense_first), (last, dense_last)) if on]
    return transform.edge_popup(
        module, masking.check_keep_fraction(keep_fraction), weight_init=weight_init,
        weight_init_mode=weight_init_mode, scale_by_keep_fraction=scale_by_keep_fraction,
        mask=mask, mask_scope=mask_scope, binary_weights=binary_weights, score_init=score_init,
        score_init_scale=score_init_scale, keep_fractions=fractions, embed=embed,
        exclude=tuple(dense), learn_unmatched=tuple(f"{p}/*" for p in dense))


def vit(num_classes: int = 10, compute_dtype="float32", patch: int = 4, dim: int = 192,
        depth: int = 12, heads: int = 3, mlp_dim: int = 768, **options):
    """ViT-Tiny-style (patch 4 for 32x32 CIFAR images), every Dense, attention projection and
    the patch conv masked."""
    module = ViT(num_classes=num_classes, patch=patch, dim=dim, depth=depth, heads=heads,
                 mlp_dim=mlp_dim, dtype=compute_dtype)
    return edge_popup_model(module, first="patch_embed", last="head", **options)


def transformer_lm(num_classes: int = 256, compute_dtype="float32", max_len: int = 128,
                   dim: int = 128, depth: int = 2, heads: int = 4, mlp_dim: int = 512, **options):
    """A small decoder-only Transformer over num_classes tokens (256: bytes), the embedding
    masked too."""
    module = TransformerLM(vocab_size=num_classes, max_len=max_len, dim=dim, depth=depth,
                           heads=heads, mlp_dim=mlp_dim, dtype=compute_dtype)
    return edge_popup_model(module, first="embed", last="unembed", embed=True, **options)
