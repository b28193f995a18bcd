"""The paper's CIFAR-10 models: FC (LeNet-300-100) and Conv2/4/6/8 (VGG-like), all layers masked."""
from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from edgepopup_jax.core.layers import SubnetConv, SubnetDense
from edgepopup_jax.models.base import MaskedModel


def reference_layer_paths(arch: str, prefixes: list[str]) -> dict[str, tuple[str, ...]]:
    """The PyTorch reference's module names for FC/ConvN (`convs.N`, `linear.N`, numbered
    with gaps for its ReLUs and pools) -> this module's layer paths (conv0.., fc0.., head), for
    importing its checkpoints (interop.hidden_networks)."""
    def numbered(kind):
        found = (p for p in prefixes if re.fullmatch(kind + r"\.\d+", p))
        return sorted(found, key=lambda p: int(p.split(".")[1]))

    convs, linears = numbered("convs"), numbered("linear")
    if not linears:
        raise ValueError(f"{arch}: the state dict has no linear.* layers")
    return {**{p: (f"conv{i}",) for i, p in enumerate(convs)},
            **{p: (f"fc{i}",) for i, p in enumerate(linears[:-1])},
            linears[-1]: ("head",)}


def _width(features: int, multiplier: float) -> int:
    return max(1, int(features * multiplier))


class ConvNet(MaskedModel):
    """3x3 convs ("M" = 2x2 max-pool) with ReLU, no BN, no bias, then dense layers on the flattened features."""

    conv_widths: Sequence[int | str] = (64, 64, "M")
    dense_widths: Sequence[int] = (256, 256)
    width: float = 1.0  # width multiplier: scales every conv and hidden dense layer

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        n_layers = 0
        for w in self.conv_widths:
            if w == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = SubnetConv(_width(w, self.width), (3, 3), name=f"conv{n_layers}",
                           **self.layer_options("first" if n_layers == 0 else "hidden"))(x, train)
            x = nn.relu(x)
            n_layers += 1
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.dense_widths):
            x = SubnetDense(_width(w, self.width), name=f"fc{i}",
                            **self.layer_options("first" if n_layers == 0 else "hidden",
                                                 linear=True))(x, train)
            x = nn.relu(x)
            n_layers += 1
        x = SubnetDense(self.num_classes, name="head", **self.layer_options("last", linear=True))(x, train)
        return x.astype(jnp.float32)

    def first_and_last_layers(self) -> tuple[str, str]:
        if any(w != "M" for w in self.conv_widths):
            return "conv0", "head"
        return ("fc0" if self.dense_widths else "head"), "head"


class FC(ConvNet):
    """LeNet-300-100: dense 300, 100, num_classes on the flattened input."""

    conv_widths: Sequence[int | str] = ()
    dense_widths: Sequence[int] = (300, 100)


class Conv2(ConvNet):
    conv_widths: Sequence[int | str] = (64, 64, "M")


class Conv4(ConvNet):
    conv_widths: Sequence[int | str] = (64, 64, "M", 128, 128, "M")


class Conv6(ConvNet):
    conv_widths: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class Conv8(ConvNet):
    conv_widths: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M")
