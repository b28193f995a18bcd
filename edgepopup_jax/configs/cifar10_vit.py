"""CIFAR-10 ViT (ViT-Tiny-style, patch 4: models/vit.py, made edge-popup by core.transform),
edge-popup on every kernel (patch conv, attention projections, MLP, head); biases, LayerNorms,
the class token and the position embeddings frozen at their init. The paper's CIFAR-10 recipe
otherwise (SGD on the scores, cosine); overrides as in cifar10.py, e.g.
--config.model.keep_fraction=0.3 --config.model.mask_scope=global, and the ViT's own size:
--config.model.depth=6 --config.model.dim=128."""
from edgepopup_jax.configs.base import get_base


def get_config():
    c = get_base()
    c.model.name = "vit"
    c.model.weight_init = "signed_constant"
    c.model.scale_by_keep_fraction = True
    c.model.dim = 192
    c.model.depth = 12
    c.model.heads = 3
    c.model.mlp_dim = 768
    c.model.patch = 4
    return c
