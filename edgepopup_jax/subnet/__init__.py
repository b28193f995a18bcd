"""The found subnetwork as a product: the .subnet file format (format), writing and loading it
(io: save_subnet, load_subnet, read_subnet, size_report, subnet_masks, re-exported here), the
export and evaluate commands, and importers of other implementations' checkpoints (interop).
io and format need only the library; export and evaluate use the trainer's checkpoints and
eval step."""
from edgepopup_jax.subnet.io import (layer_masks, load_subnet, read_subnet, save_subnet,
                                     size_report, subnet_masks)

__all__ = ["layer_masks", "load_subnet", "read_subnet", "save_subnet", "size_report",
           "subnet_masks"]
