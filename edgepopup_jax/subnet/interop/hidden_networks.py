"""Import checkpoints of the PyTorch reference (github.com/allenai/hidden-networks).

Its checkpoint holds a 'state_dict' (keys often prefixed 'module.' by DataParallel) with, per
masked layer, `weight` (OIHW; its linear layers are 1x1 convs, (out, in, 1, 1)) and `scores`
(same shape), and non-affine BN `running_mean` / `running_var`. Its mask keeps
n - int((1 - k) * n) weights of a layer, where k is its `prune_rate` (the KEPT fraction there).

Conversion: conv kernels OIHW -> HWIO; 1x1-conv linears -> (in, out); the first linear after
the convs gets its input rows permuted from the reference's (C, H, W) flatten order to ours
(H, W, C). Layers without scores become learned-kernel layers (dense_first / dense_last, or the
mask="dense" baseline, whose BN is affine).

CLI:
    python -m edgepopup_jax.subnet.interop.hidden_networks --checkpoint=model_best.pth \\
        --arch=WideResNet50_2 --keep_fraction=0.3 --out=wrn50.subnet
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

# reference arch -> (our model name, fixed options)
ARCHS: dict[str, tuple[str, dict]] = {
    "FC": ("fc", {}),
    "Conv2": ("conv2", {}),
    "Conv4": ("conv4", {}),
    "Conv6": ("conv6", {}),
    "Conv8": ("conv8", {}),
    "Conv4Wide": ("conv4", {}),  # + width from --width (the reference's --width-mult)
    "Conv6Wide": ("conv6", {}),
    "cResNet18": ("cifar_resnet18", {}),
    "cResNet50": ("resnet50", {"cifar_stem": True}),
    "cResNet101": ("resnet101", {"cifar_stem": True}),
    "ResNet18": ("resnet18", {}),
    "ResNet50": ("resnet50", {}),
    "ResNet101": ("resnet101", {}),
    "WideResNet50_2": ("wide_resnet50_2", {}),
    "WideResNet101_2": ("wide_resnet101_2", {}),
}
TORCH_PIN = "torch==2.13.0"


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if hasattr(t, "float") and str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def strip_prefix(state_dict: dict) -> dict:
    """Drops DataParallel's 'module.' prefix and num_batches_tracked entries."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.endswith("num_batches_tracked"):
            continue
        out[k] = v
    return out


def _layer_map(arch: str, prefixes: list[str]) -> dict[str, tuple[str, ...]]:
    """Reference module prefix -> our layer path (the maps live beside the models they name)."""
    from edgepopup_jax.models import conv, resnet

    if arch in ("FC",) or arch.startswith("Conv"):
        return conv.reference_layer_paths(arch, prefixes)
    return {p: resnet.reference_layer_path(arch, p) for p in prefixes}


def _guess_weight_init(kernels: list[np.ndarray]) -> str:
    """Metadata only (the weights are imported as they are): constant magnitudes or not."""
    if all(np.unique(np.abs(k)).size == 1 for k in kernels):
        return "unsigned_constant" if all((k >= 0).all() for k in kernels) else "signed_constant"
    return "kaiming_normal"


def convert_state_dict(state_dict: dict, arch: str, *, keep_fraction: float, width: float = 1.0,
                       check: bool = True):
    """Converts a checkpoint of the PyTorch reference (allenai/hidden-networks) to our model.

    Args:
      state_dict: the reference's state dict (tensors or arrays; a "module." prefix is fine).
      arch: the reference's architecture name, one of ARCHS (FC, Conv2, ..., WideResNet50_2).
      keep_fraction: the k it was trained with (the reference's prune_rate as "kept").
      width: the conv nets' width multiplier.
      check: compare every leaf with our model's variable tree (traced); False skips that (for
        benchmarks/reference_parity.py, which converts the same layers at every step).

    Returns:
      (model_name, model_options, variables) with variables {'params': {... 'scores'},
      'frozen': {... 'kernel'}, 'batch_stats': {... mean/var}} (learned layers: 'params'
      'kernel'; affine BN of the dense baseline: 'params' scale/bias).

    Raises:
      ValueError: an unknown arch, a bad keep_fraction, or a state dict that does not match the
        arch's layers.
    """
    import flax
    import jax
    import jax.numpy as jnp

    from edgepopup_jax.core import masking
    from edgepopup_jax.models import get_model

    if arch not in ARCHS:
        raise ValueError(f"unknown reference arch {arch!r}; supported: {', '.join(ARCHS)}")
    keep_fraction = masking.check_keep_fraction(keep_fraction)
    sd = {k: _np(v) for k, v in strip_prefix(state_dict).items()}
    prefixes = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in sd))  # module order
    mapping = _layer_map(arch, prefixes)
    name, fixed = ARCHS[arch]
    is_convnet = arch == "FC" or arch.startswith("Conv")

    conv_prefixes = [p for p in prefixes if p + ".weight" in sd and sd[p + ".weight"].ndim == 4]
    first, last = conv_prefixes[0], conv_prefixes[-1]
    with_scores = {p for p in conv_prefixes if p + ".scores" in sd}
    if not with_scores:
        mask = "dense"
    else:
        mask = "edge_popup"
        missing = [p for p in conv_prefixes if p not in with_scores and p not in (first, last)]
        if missing:
            raise ValueError(f"layers without scores in the middle of the network: {missing}; "
                             "only the first and last layers may be dense")
    options: dict[str, Any] = dict(fixed, keep_fraction=keep_fraction, mask=mask)
    if mask != "dense":
        options["dense_first"] = first not in with_scores
        options["dense_last"] = last not in with_scores
    if is_convnet and width != 1.0:
        options["width"] = width
    head_w = sd[last + ".weight"]
    options["num_classes"] = int(head_w.shape[0])

    flat: dict[tuple[str, ...], np.ndarray] = {}
    kernels = []
    last_conv_channels = None
    first_linear = next((p for p in conv_prefixes if mapping[p][0] in ("fc0", "head")), None) if is_convnet else None
    for p in conv_prefixes:
        path = mapping[p]
        w = sd[p + ".weight"].astype(np.float32)
        bias = sd.get(p + ".bias")
        if bias is not None and np.any(bias != 0):
            raise ValueError(f"layer {p} has a non-zero bias; edgepopup_jax models have no biases")
        is_linear = (is_convnet and not path[0].startswith("conv")) or path == ("head",)
        tensors = {"weight": w}
        if p in with_scores:
            tensors["scores"] = sd[p + ".scores"].astype(np.float32)
        for key, t in tensors.items():
            if t.shape != w.shape:
                raise ValueError(f"{p}.{key} has shape {t.shape}, its weight {w.shape}")
            if not is_linear:
                t = t.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            else:
                if t.shape[2:] != (1, 1):
                    raise ValueError(f"{p}: expected a 1x1-conv linear layer, got weight {t.shape}")
                t = t[:, :, 0, 0]  # (out, in)
                if p == first_linear and last_conv_channels:
                    c = last_conv_channels
                    hw = t.shape[1] // c
                    h = int(round(math.sqrt(hw)))
                    if c * h * h != t.shape[1]:
                        raise ValueError(f"{p}: {t.shape[1]} inputs are not {c} channels x a square map")
                    # reference input index c*H*W + h*W + w  ->  ours h*W*C + w*C + c
                    t = t.reshape(t.shape[0], c, h, h).transpose(0, 2, 3, 1).reshape(t.shape[0], -1)
                t = t.T  # (in, out)
            tensors[key] = np.ascontiguousarray(t)
        if not is_linear:
            last_conv_channels = w.shape[0]
        if p in with_scores:
            flat[("params",) + path + ("scores",)] = tensors["scores"]
            flat[("frozen",) + path + ("kernel",)] = tensors["weight"]
        else:
            flat[("params",) + path + ("kernel",)] = tensors["weight"]
        kernels.append(tensors["weight"])
    for p in prefixes:
        if p + ".running_mean" not in sd:
            continue
        path = mapping[p]
        flat[("batch_stats",) + path + ("mean",)] = sd[p + ".running_mean"].astype(np.float32)
        flat[("batch_stats",) + path + ("var",)] = sd[p + ".running_var"].astype(np.float32)
        affine = p + ".weight" in sd
        if affine and mask != "dense":
            raise ValueError(f"{p} is an affine (learned) BatchNorm but the convs are masked; "
                             "edgepopup_jax's edge-popup ResNets use non-affine BN")
        if mask == "dense":
            if not affine:
                raise ValueError(f"{p} is non-affine but the dense baseline's BN is affine")
            flat[("params",) + path + ("scale",)] = sd[p + ".weight"].astype(np.float32)
            flat[("params",) + path + ("bias",)] = sd[p + ".bias"].astype(np.float32)
    options["weight_init"] = _guess_weight_init(kernels)

    if not check:
        return name, options, flax.traverse_util.unflatten_dict(flat)
    # Check every leaf against our model's own variable tree (shapes from tracing, no compute).
    model = get_model(name, **options)
    x_shape = (1, 28, 28, 1) if arch == "FC" else (1, 32, 32, 3)
    want = flax.traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape, jnp.float32)))
    got_keys, want_keys = set(flat), set(want)
    if got_keys != want_keys:
        raise ValueError(f"{arch} checkpoint does not match {name}: missing "
                         f"{sorted('/'.join(k) for k in want_keys - got_keys)[:8]}, unexpected "
                         f"{sorted('/'.join(k) for k in got_keys - want_keys)[:8]}")
    bad = [f"{'/'.join(k)}: {flat[k].shape} vs {want[k].shape}" for k in want
           if tuple(flat[k].shape) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"{arch} checkpoint does not match {name}: " + "; ".join(bad[:8]))
    variables = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    return name, options, variables


def _torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("reading PyTorch checkpoints needs torch: pip install " + TORCH_PIN) from None
    return torch


def load_checkpoint(path: str, *, trust: bool = False) -> dict:
    """torch.load (weights_only unless trust=True); returns the state dict inside."""
    torch = _torch()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - pickle errors differ by torch version
        if trust:
            raise
        raise ValueError(f"could not load {path} with weights_only=True ({type(e).__name__}: {e}); "
                         "if you trust the file, pass --trust_checkpoint") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a checkpoint dict with a 'state_dict', got {type(ckpt).__name__}")
    return ckpt


def import_checkpoint(path: str, arch: str, *, keep_fraction: float, width: float = 1.0,
                      trust: bool = False):
    """load_checkpoint + convert_state_dict."""
    return convert_state_dict(load_checkpoint(path, trust=trust), arch, keep_fraction=keep_fraction,
                              width=width)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgepopup_jax.subnet.interop.hidden_networks",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the reference's .pth (e.g. model_best.pth)")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--keep_fraction", type=float, required=True,
                    help="fraction of weights KEPT (the reference's --prune-rate)")
    ap.add_argument("--width", type=float, default=1.0, help="the reference's --width-mult (Conv*Wide)")
    ap.add_argument("--out", required=True, help="*.subnet: compact subnetwork; *.msgpack: full Flax variables")
    ap.add_argument("--trust_checkpoint", action="store_true", help="torch.load with weights_only=False")
    args = ap.parse_args(argv)
    try:
        name, options, variables = import_checkpoint(args.checkpoint, args.arch,
                                                     keep_fraction=args.keep_fraction,
                                                     width=args.width, trust=args.trust_checkpoint)
        if args.out.endswith(".msgpack"):
            import json
            import os

            import flax.serialization

            tmp = args.out + ".tmp"
            with open(tmp, "wb") as f:
                f.write(flax.serialization.msgpack_serialize(
                    {"model_name": name, "model_options": json.dumps(options),
                     "variables": jax_to_numpy(variables)}))
            os.replace(tmp, args.out)
            print(f"wrote {args.out}: Flax variables of {name} {options}")
        else:
            from edgepopup_jax.subnet import io as subnet

            stats = subnet.save_subnet(args.out, model_name=name, model_options=options, variables=variables)
            print(f"wrote {args.out}: {name} {options}, {stats['subnet_bytes']:,} bytes "
                  f"({stats['ratio_vs_float32_state']:.1f}x smaller than float32 weights+scores), "
                  f"{stats['kept_weights']:,} of {stats['masked_weights']:,} masked weights kept")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


if __name__ == "__main__":
    sys.exit(main())
