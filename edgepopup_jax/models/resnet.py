"""ResNets with every conv masked: CIFAR ResNet-18 and ImageNet ResNet-18..152 / Wide ResNets (v1.5)."""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from edgepopup_jax.core.layers import NonAffineBatchNorm, SubnetConv, SubnetDense
from edgepopup_jax.models.base import MaskedModel

BN_RUNNING_VARS = ("unbiased", "biased")
_REFERENCE_STEM_AND_HEAD = {"conv1": ("stem_conv",), "bn1": ("stem_bn",), "fc": ("head",)}


def block_name(stage: int, block: int) -> str:
    return f"stage{stage}_block{block}"


def reference_layer_path(arch: str, prefix: str) -> tuple[str, ...]:
    """A PyTorch reference (torchvision-style) module name -> this module's layer path, for
    importing its checkpoints (interop.hidden_networks): layer{s}.{b}.conv{k} ->
    (stage{s-1}_block{b}, conv{k-1}), its downsample/shortcut .0/.1 -> shortcut_conv/_bn."""
    if prefix in _REFERENCE_STEM_AND_HEAD:
        return _REFERENCE_STEM_AND_HEAD[prefix]
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv|bn)(\d+)", prefix)
    if m:
        return block_name(int(m[1]) - 1, int(m[2])), f"{m[3]}{int(m[4]) - 1}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(downsample|shortcut)\.([01])", prefix)
    if m:
        return block_name(int(m[1]) - 1, int(m[2])), "shortcut_conv" if m[4] == "0" else "shortcut_bn"
    raise ValueError(f"{arch}: unexpected module {prefix!r} in the state dict")


class _Block(nn.Module):
    """Shared shortcut logic; conv and norm are module factories bound to the model's options."""

    filters: int
    strides: int
    conv: Any
    norm: Any

    def shortcut(self, x, out_features: int, train: bool):
        if self.strides == 1 and x.shape[-1] == out_features:
            return x
        x = self.conv(out_features, (1, 1), strides=self.strides, name="shortcut_conv")(x, train)
        return self.norm(name="shortcut_bn")(x)


class BasicBlock(_Block):
    expansion = 1
    inner_width: int = 0  # unused; kept so both blocks take the same arguments

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.conv(self.filters, (3, 3), strides=self.strides, name="conv0")(x, train)
        y = nn.relu(self.norm(name="bn0")(y))
        y = self.conv(self.filters, (3, 3), name="conv1")(y, train)
        y = self.norm(name="bn1")(y)
        return nn.relu(y + self.shortcut(x, self.filters, train))


class Bottleneck(_Block):
    """v1.5: the stride sits on the 3x3 conv."""

    expansion = 4
    inner_width: int = 0

    @nn.compact
    def __call__(self, x, train: bool):
        out = self.filters * self.expansion
        y = self.conv(self.inner_width, (1, 1), name="conv0")(x, train)
        y = nn.relu(self.norm(name="bn0")(y))
        y = self.conv(self.inner_width, (3, 3), strides=self.strides, name="conv1")(y, train)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(out, (1, 1), name="conv2")(y, train)
        y = self.norm(name="bn2")(y)
        return nn.relu(y + self.shortcut(x, out, train))


class ResNet(MaskedModel):
    """ResNet with masked convs and non-affine BN (affine BN for mask="dense", the learned baseline).

    cifar_stem: 3x3 stride-1 stem, no max-pool (CIFAR ResNet-18); otherwise 7x7 stride 2 + max-pool.
    width_multiplier scales the inner width of bottlenecks (2 for Wide ResNet-50-2).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    cifar_stem: bool = False
    width_multiplier: int = 1
    width: float = 1.0  # scales every layer's channels (stem, stages); 1.0 is the paper's
    # True: every BatchNorm's scale and bias are learned, in `params` with the scores (and
    # decayed with them: optim's L2 covers all of params, as the reference's default, without
    # --no_bn_decay); False: none; None: learned only for mask="dense" (the dense baseline).
    bn_affine: bool | None = None
    bn_momentum: float = 0.9
    bn_running_var: str = "biased"  # "unbiased": n/(n-1) x batch variance, as torch (the reference)

    def __post_init__(self):
        if not (self.bn_affine is None or isinstance(self.bn_affine, bool)):
            raise ValueError(f"bn_affine must be None (learned BN only for mask='dense'), False "
                             f"or True, got {self.bn_affine!r}")
        if self.bn_running_var not in BN_RUNNING_VARS:
            raise ValueError(f"unknown bn_running_var {self.bn_running_var!r}; "
                             f"allowed: {', '.join(BN_RUNNING_VARS)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        affine = self.mask == "dense" if self.bn_affine is None else self.bn_affine
        norm = lambda name: NonAffineBatchNorm(  # noqa: E731
            use_running_average=not train, momentum=self.bn_momentum, use_scale=affine,
            use_bias=affine, unbiased_running_var=self.bn_running_var == "unbiased",
            dtype=self.dtype, name=name)

        def conv(features, kernel_size, *, name, strides=1, role="hidden", padding=None):
            pad = padding if padding is not None else [((k - 1) // 2, k // 2) for k in kernel_size]
            return SubnetConv(features, kernel_size, strides=strides, padding=pad, name=name,
                              **self.layer_options(role))

        x = x.astype(self.dtype)
        stem = max(1, int(64 * self.width))
        if self.cifar_stem:
            x = conv(stem, (3, 3), name="stem_conv", role="first")(x, train)
            x = nn.relu(norm("stem_bn")(x))
        else:
            x = conv(stem, (7, 7), strides=2, name="stem_conv", role="first",
                     padding=[(3, 3), (3, 3)])(x, train)
            x = nn.relu(norm("stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        for i, size in enumerate(self.stage_sizes):
            filters = max(1, int(64 * 2**i * self.width))
            for j in range(size):
                x = block_cls(filters=filters, strides=2 if i > 0 and j == 0 else 1,
                              inner_width=filters * self.width_multiplier, conv=conv,
                              norm=lambda name: norm(name), name=block_name(i, j))(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = SubnetDense(self.num_classes, name="head", **self.layer_options("last", linear=True))(x, train)
        return x.astype(jnp.float32)

    def first_and_last_layers(self) -> tuple[str, str]:
        return "stem_conv", "head"
