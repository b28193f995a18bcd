"""edgepopup_jax: edge-popup (Ramanujan et al., 2020) in JAX/Flax.

Find a subnetwork of a randomly weighted network by learning a score per weight and keeping
the top keep_fraction of weights by |score| in every layer; the weights never train.

The package by role (docs/ARCHITECTURE.md): core (the library), models, configs, training,
subnet (the .subnet files and their commands), planning (sweeps, preflight). Importing it loads
the library only: core, models and subnet's file I/O, no trainer dependencies.
"""
from edgepopup_jax.core import platforms

platforms.default_to_cpu_without_accelerator()  # before JAX starts: no CUDA traceback on a CPU

from edgepopup_jax import models, subnet  # noqa: E402
from edgepopup_jax.core import inits, layers, masking, nnx_layers, nnx_transform, summary, transform
from edgepopup_jax.core.layers import NonAffineBatchNorm, SubnetConv, SubnetDense
from edgepopup_jax.core.masking import kept_count, supermask, topk_mask
from edgepopup_jax.core.summary import format_table, layer_stats
from edgepopup_jax.core.nnx_transform import edge_popup_nnx
from edgepopup_jax.core.transform import edge_popup, masks, train_step
from edgepopup_jax.models import get_model
from edgepopup_jax.subnet import load_subnet, read_subnet, save_subnet, size_report

__version__ = "0.1.0"
__all__ = ["inits", "layers", "masking", "models", "nnx_layers", "nnx_transform", "subnet", "summary",
           "transform",
           "edge_popup", "edge_popup_nnx", "masks", "train_step",
           "NonAffineBatchNorm", "SubnetConv", "SubnetDense", "kept_count", "supermask", "topk_mask",
           "get_model", "format_table", "layer_stats", "load_subnet", "read_subnet", "save_subnet",
           "size_report"]
