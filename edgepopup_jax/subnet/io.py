"""The found subnetwork as a product: a compact, checksummed file and a loader for inference.

A trained edge-popup model is random weights W plus scores S; what it computes depends only on
W * mask(S). `save_subnet` stores exactly that: per masked layer the mask as 1 bit per weight
and the kept weights (for constant-magnitude inits: 1 sign bit per kept weight plus one float32
magnitude; otherwise the kept float32 values in mask order; binary_weights: the layer's alpha
and 1 sign bit per kept weight, the same encoding, of binary.binarize(W * mask), so about 1 + k
bits per weight with the mask). Learned kernels (mask="dense",
dense_first / dense_last) and BN state are stored whole.

`load_subnet` returns `(model, variables)` for `model.apply(variables, x)` (ResNets: train=False,
the default): the architecture with mask="dense" (plain kernels W * mask) and the trained
model's BN kind, reproducing the trained model's eval logits bit for bit.

This module converts between variables/models and files; the bytes (layout, checksums,
encodings, typed header entries) are `format.py`. Files are written to a temporary file
in the same directory and renamed into place.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgepopup_jax.core import binary, masking, selection, transform
from edgepopup_jax.core.options import DEFAULTS as LAYER_OPTION_DEFAULTS
from edgepopup_jax.subnet import format as fmt
from edgepopup_jax.subnet.format import (FORMAT_VERSION, MAGIC, SubnetFile,  # noqa: F401
                                         pack_layer, unpack_layer)

SUFFIX = ".subnet"


# --------------------------------------------------------------------------------------------
# the masks


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _eval_masks(scores: dict, mask_mode, keep_fraction, mask_scope):
    if isinstance(keep_fraction, tuple):  # ((name, k), ...): hashable, as a static argument
        keep_fraction = dict(keep_fraction)
    if mask_mode == "edge_popup":
        masks = selection.masks_by_path(scores, keep_fraction, mask_scope)
    else:
        masks = {k: masking.layer_mask(s, mask_mode, keep_fraction) for k, s in scores.items()}
    return {k: m != 0 for k, m in masks.items()}


def layer_masks(scores: dict, *, mask_mode: str, keep_fraction,
                supermask_eval: str = "threshold", mask_scope: str = "layer") -> dict:
    """The 0/1 eval-time masks (bool numpy arrays) of a dict of score arrays, in one computation.
    keep_fraction: one for every layer, or {"/"-joined layer path: k} (MaskedModel.keep_fractions)."""
    if mask_mode == "supermask" and supermask_eval != "threshold":
        raise ValueError(
            f"a supermask model exports only with supermask_eval='threshold' (a fixed 0/1 mask), "
            f"got {supermask_eval!r}: 'expectation' scales weights by sigmoid(S) and 'sample' "
            "draws a new mask on every call")
    if mask_mode not in ("edge_popup", "supermask"):
        raise ValueError(f"no mask for mask mode {mask_mode!r}")
    keep = (tuple(sorted(keep_fraction.items())) if isinstance(keep_fraction, dict)
            else masking.check_keep_fraction(keep_fraction))
    out = _eval_masks({k: jnp.asarray(v) for k, v in scores.items()}, mask_mode, keep, mask_scope)
    return {k: np.asarray(jax.device_get(out[k])) for k in scores}


# --------------------------------------------------------------------------------------------
# model options


def _json_options(options: dict) -> dict:
    """model options with JSON-safe values (dtypes as names, tuples as lists); checks they are JSON."""
    out = {}
    for k, v in dict(options).items():
        if isinstance(v, (np.dtype, type)) or k.endswith("dtype"):
            v = jnp.dtype(v).name
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    try:
        json.dumps(out)
    except TypeError as e:
        raise ValueError(f"model_options must be JSON-serializable: {e}") from None
    return out


def inference_options(model_name: str, model_options: dict) -> dict:
    """The options of the loaded (all-dense) model: mask='dense', no dense_first/last, and for
    ResNets the trained model's BN kind (non-affine unless it was the dense baseline), so the
    loaded model runs exactly the trained model's eval program with W * mask precomputed."""
    from edgepopup_jax.models import ResNet, get_model

    opts = dict(model_options)
    if isinstance(get_model(model_name, **opts), ResNet) and opts.get("bn_affine") is None:
        opts["bn_affine"] = opts.get("mask", "edge_popup") == "dense"
    opts["mask"] = "dense"
    opts.pop("binary_weights", None)  # the stored kernels are alpha * sign(W) * mask already
    opts.pop("dense_first", None)
    opts.pop("dense_last", None)
    opts.pop("supermask_eval", None)
    return opts


# --------------------------------------------------------------------------------------------
# tree helpers


def _flat(tree) -> dict[tuple[str, ...], Any]:
    if tree is None:
        return {}
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _get(variables, name):
    try:
        return variables[name]
    except (KeyError, TypeError):
        return None


def _layer_roles(variables) -> tuple[dict, dict, dict]:
    """(masked layers {path: (scores, weights)}, learned kernels {path: kernel}, other leaves {(col, path): value})."""
    params = _flat(_get(variables, "params"))
    frozen = _flat(_get(variables, "frozen"))
    masked, dense, other = {}, {}, {}
    for path, v in params.items():
        if path[-1] == "scores":
            layer = path[:-1]
            w = frozen.get(layer + ("kernel",))
            if w is None:
                raise ValueError(f"layer {'/'.join(layer)} has scores but no frozen kernel "
                                 "(pass the full variables: params, frozen and batch_stats)")
            masked[layer] = (v, w)
        elif path[-1] == "kernel":
            dense[path[:-1]] = v
        else:
            other[("params",) + path] = v
    for path, v in frozen.items():
        if path[-1] != "kernel" or path[:-1] not in masked:
            raise ValueError(f"frozen variable {'/'.join(path)} belongs to no masked layer")
    for col, tree in flax.core.unfreeze(variables).items():
        if col in ("params", "frozen"):
            continue
        for path, v in _flat(tree).items():
            other[(col,) + path] = v
    return masked, dense, other


# --------------------------------------------------------------------------------------------
# sizes


def float_state_bytes(variables) -> dict[str, int]:
    """Bytes of the float32 state: weights + scores + BN (the reference's checkpoint), and the
    same plus one SGD-momentum buffer per trainable parameter (a full training-state checkpoint)."""
    total = sum(int(np.prod(np.shape(v))) * 4 for v in jax.tree.leaves(variables))
    trainable = sum(int(np.prod(np.shape(v))) * 4 for v in jax.tree.leaves(_get(variables, "params") or {}))
    return {"float32_state_bytes": total, "train_state_bytes": total + trainable}


def size_report(variables, model_name: str, model_options: dict, keep_fraction=None) -> dict:
    """The sizes save_subnet would report, without writing a file (it packs in memory)."""
    blob, stats = _encode(model_name=model_name, model_options=model_options, variables=variables,
                          keep_fraction=keep_fraction)
    return stats


# --------------------------------------------------------------------------------------------
# encode / decode


def _encode(*, model_name: str, model_options: dict, variables, keep_fraction=None):
    from edgepopup_jax.models import get_model  # local: models import layers, not this module

    options = _json_options(model_options)
    get_model(model_name, **options)  # validates the name and options
    full = {**LAYER_OPTION_DEFAULTS, **options}
    k = masking.check_keep_fraction(full["keep_fraction"] if keep_fraction is None else keep_fraction)
    options["keep_fraction"] = k
    mask_mode = full["mask"]
    model = get_model(model_name, **options)
    if transform.is_transformed(model):  # a registered model built with the transform (vit)
        return _encode_transformed(model, variables, model_name=model_name, model_options=options)
    keep = k if model.uniform_keep_fraction() else model.keep_fractions(_get(variables, "params"))

    masked, dense, other = _layer_roles(variables)
    if masked and mask_mode == "dense":
        raise ValueError("model_options say mask='dense' but the variables hold scores")
    if not masked and not dense:
        raise ValueError("variables hold no layers (expected params with 'scores' or 'kernel')")

    table = fmt.ArrayTable()

    def add(a) -> int:
        return table.add(np.asarray(jax.device_get(a)))

    layers = []
    n_masked = n_kept = 0
    if masked:
        masks = layer_masks({p: s for p, (s, _) in masked.items()}, mask_mode=mask_mode,
                            keep_fraction=keep, supermask_eval=full["supermask_eval"],
                            mask_scope=full["mask_scope"])
    for path, (scores, w) in masked.items():
        if full["binary_weights"]:  # alpha * sign(W) * mask: the sign_scale encoding
            w = _binary_kernel(jnp.asarray(w), jnp.asarray(masks[path]))
        packed = pack_layer(np.asarray(jax.device_get(w)), masks[path])
        encoding = packed["encoding"]
        layers.append(fmt.MaskedLayer(
            tuple(path), tuple(packed["shape"]), packed["kept"], encoding, add(packed["mask_bits"]),
            values=add(packed["values"]) if encoding == fmt.ENC_VALUES else None,
            value=None if encoding == fmt.ENC_VALUES else float(packed["value"]).hex(),
            sign_bits=add(packed["sign_bits"]) if encoding == fmt.ENC_SIGN_SCALE else None))
        n_masked += layers[-1].total
        n_kept += packed["kept"]
    for path, kernel in dense.items():
        layers.append(fmt.DenseLayer(tuple(path), tuple(np.shape(kernel)), add(kernel)))
    extra = [fmt.ExtraArray(tuple(path), add(v)) for path, v in other.items()]

    blob, header_bytes = fmt.encode(model_name=model_name, model_options=options, keep_fraction=k,
                                    mask=mask_mode, layers=layers, extra=extra, table=table)
    fs = float_state_bytes(variables)
    stats = {
        "subnet_bytes": len(blob),
        "header_bytes": header_bytes,
        "masked_weights": n_masked,
        "kept_weights": n_kept,
        "dense_weights": sum(int(np.prod(np.shape(v))) for v in dense.values()),
        "other_values": sum(int(np.prod(np.shape(v))) for v in other.values()),
        **fs,
        "ratio_vs_float32_state": fs["float32_state_bytes"] / len(blob),
        "ratio_vs_train_state": fs["train_state_bytes"] / len(blob),
        "bits_per_masked_weight": 8 * len(blob) / max(n_masked, 1),
        "bits_per_kept_weight": 8 * len(blob) / max(n_kept, 1),
        "kept_per_layer": {"/".join(e.path): e.kept for e in layers if isinstance(e, fmt.MaskedLayer)},
    }
    return blob, stats


MODULE_PREFIX = "module:"  # model_name of a transformed module's file (per-path entries)


def _encode_transformed(model, variables, model_name=None, model_options=None):
    """A transformed module's file: each masked kernel (W * mask) at its parameter path
    (layer + "kernel" or "embedding"), everything else as it sits in the plain module's
    variables (frozen and learned parameters under "params", batch_stats, ...). A registered
    model (model_name, model_options: get_model's) is named so; any other module
    "module:<its class>" with its transform options."""
    if not transform.is_transformed(model):
        raise ValueError(f"save_subnet(model=...) takes a module transformed with edge_popup, got "
                         f"{type(model).__name__}")
    options = model.edge_popup_options
    masks = {k: np.asarray(jax.device_get(m)) != 0
             for k, m in transform.masks(variables, model).items()} if model.mask != "dense" else {}
    frozen, params = _flat(_get(variables, "frozen")), _flat(_get(variables, "params"))
    table = fmt.ArrayTable()
    layers, extra, n_masked, n_kept = [], [], 0, 0
    for layer in sorted(p[:-1] for p in params if p[-1] == "scores"):
        leaf = transform.weight_leaf(frozen, layer)
        w, mask = jnp.asarray(frozen[leaf]), masks["/".join(layer)]
        if options.binary_weights:
            w = _binary_kernel(w, jnp.asarray(mask))
        packed = pack_layer(np.asarray(jax.device_get(w)), mask)
        encoding = packed["encoding"]
        layers.append(fmt.MaskedLayer(
            leaf, tuple(packed["shape"]), packed["kept"], encoding, table.add(packed["mask_bits"]),
            values=table.add(packed["values"]) if encoding == fmt.ENC_VALUES else None,
            value=None if encoding == fmt.ENC_VALUES else float(packed["value"]).hex(),
            sign_bits=table.add(packed["sign_bits"]) if encoding == fmt.ENC_SIGN_SCALE else None))
        n_masked += layers[-1].total
        n_kept += packed["kept"]
    weights = {e.path for e in layers}
    others = {("params",) + p: v for p, v in {**frozen, **params}.items()
              if p[-1] != "scores" and p not in weights}
    for col, tree in flax.core.unfreeze(variables).items():
        if col not in ("params", "frozen", selection.MASKS):
            others.update({(col,) + p: v for p, v in _flat(tree).items()})
    for path, v in sorted(others.items()):
        extra.append(fmt.ExtraArray(path, table.add(np.asarray(jax.device_get(v)))))
    summary = {k: (v if isinstance(v, (bool, int, float, str)) or v is None else
                   [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple)
                   else repr(v))
               for k, v in dataclasses.asdict(options).items()}
    if model_name is None:
        model_name = MODULE_PREFIX + type(model).__name__.removeprefix("EdgePopup")
        model_options = summary
    blob, header_bytes = fmt.encode(
        model_name=model_name, model_options=model_options,
        keep_fraction=options.keep_fraction, mask=model.mask,
        layers=layers, extra=extra, table=table)
    return blob, {"subnet_bytes": len(blob), "header_bytes": header_bytes,
                  "masked_weights": n_masked, "kept_weights": n_kept,
                  "kept_per_layer": {"/".join(e.path): e.kept for e in layers}}


def _per_path_variables(sf) -> dict:
    """The plain module's variables from a transformed model's file (per-path entries)."""
    flat = {("params",) + e.path: jnp.asarray(sf.kernel(e)) for e in sf.layers}
    flat.update({e.path: jnp.asarray(sf.arrays[e.array]) for e in sf.extra})
    return flax.traverse_util.unflatten_dict(flat)


def _plain(module):
    """The user's own module: a transformed one's class without the transform."""
    if not transform.is_transformed(module):
        return module
    base = type(module).__mro__[1]
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name != "parent"}
    return base(**fields)


@jax.jit
def _binary_kernel(weights, mask):
    """The kernel a binary_weights layer computes: binarize(W * mask), as the folded eval does."""
    return binary.binarize(weights * mask.astype(weights.dtype))


def save_subnet(path, *, variables, model_name: str | None = None,
                model_options: dict | None = None, keep_fraction=None, model=None) -> dict:
    """Writes the subnetwork of a trained model to `path` (atomically: a temporary file, renamed).

    Args:
      path: the .subnet file to write.
      model_name, model_options: the model, as for get_model.
      model (instead of model_name and model_options): a module transformed with
        core.transform.edge_popup; the file then holds per-path entries (every masked kernel
        at its parameter path, every other variable in the plain module's layout) and needs no
        registry: load_subnet(path, module=...) rebuilds it with the user's module.
      variables: the model's full variables ({'params': scores (and learned kernels), 'frozen':
        random kernels, 'batch_stats': ...}).
      keep_fraction: the k of the mask (default: the one in model_options, else 0.5).

    Returns:
      Sizes (subnet_bytes, ratios against float32 state), kept weights in all and per layer.

    Raises:
      ValueError: an unknown model or bad option, variables that do not fit the options (scores
        with mask="dense"; no layers), a supermask whose eval is not a fixed threshold.
    """
    if model is not None:
        if model_name is not None or model_options is not None or keep_fraction is not None:
            raise ValueError("save_subnet: give model (a transformed module) or model_name and "
                             "model_options, not both")
        blob, stats = _encode_transformed(model, variables)
    elif model_name is None or model_options is None:
        raise ValueError("save_subnet needs model_name and model_options (or model=, a module "
                         "transformed with edge_popup)")
    else:
        blob, stats = _encode(model_name=model_name, model_options=model_options,
                              variables=variables, keep_fraction=keep_fraction)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    stats["path"] = path
    return stats


def read_subnet(path) -> SubnetFile:
    """Parses and verifies a subnet file (magic, version, lengths, both checksums)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return fmt.parse(data, source=path)


def subnet_masks(path) -> dict[str, np.ndarray]:
    """The 0/1 masks stored in a subnet file, by '/'-joined layer path (bool arrays)."""
    sf = read_subnet(path)
    return {"/".join(e.path): sf.layer_mask(e) for e in sf.layers if isinstance(e, fmt.MaskedLayer)}


def load_subnet(path, *, expect_model: str | None = None, expect_options: dict | None = None,
                module=None):
    """Reads a subnet file for inference.

    Args:
      path: a .subnet file (from save_subnet, export or interop).
      expect_model, expect_options: refuse the file unless it holds this architecture.
      module: for a file saved from a transformed module (save_subnet(model=...)): the user's
        Flax module (plain, or the transformed one); returns (the plain module, its variables:
        every masked kernel W * mask, the other parameters as trained), no registry needed.

    Returns:
      (model, variables) for model.apply(variables, x): get_model(name, **options,
      mask="dense"), every layer a plain kernel holding W * mask (ResNets keep the trained
      model's non-affine BN), so it runs the trained model's eval program: the same logits.

    Raises:
      ValueError: a truncated, corrupt or foreign file, another format version, or another
        architecture than expected.
    """
    from edgepopup_jax.models import get_model

    sf = read_subnet(path)
    if sf.model_name.startswith(MODULE_PREFIX) or module is not None:
        if module is None:
            raise ValueError(f"{os.fspath(path)}: holds a transformed Flax module "
                             f"({sf.model_name[len(MODULE_PREFIX):]}): pass module=, the module "
                             "it was saved from")
        if not sf.model_name.startswith(MODULE_PREFIX):
            raise ValueError(f"{os.fspath(path)}: holds the registered model {sf.model_name!r}: "
                             "load it without module=")
        return _plain(module), _per_path_variables(sf)
    if expect_model is not None and sf.model_name != expect_model:
        raise ValueError(f"{os.fspath(path)}: architecture mismatch: the file holds {sf.model_name!r}, "
                         f"expected {expect_model!r}")
    if expect_options:
        want = _json_options(expect_options)
        diff = {k: (sf.model_options.get(k), v) for k, v in want.items() if sf.model_options.get(k) != v}
        if diff:
            raise ValueError(f"{os.fspath(path)}: architecture mismatch in options "
                             + ", ".join(f"{k}: file {a!r}, expected {b!r}" for k, (a, b) in diff.items()))
    built = get_model(sf.model_name, **sf.model_options)
    if transform.is_transformed(built):  # a registered model built with the transform (vit)
        return _plain(built), _per_path_variables(sf)
    model = get_model(sf.model_name, **inference_options(sf.model_name, sf.model_options))
    flat = {("params",) + e.path + ("kernel",): jnp.asarray(sf.kernel(e)) for e in sf.layers}
    for e in sf.extra:
        flat[e.path] = jnp.asarray(sf.arrays[e.array])
    return model, flax.traverse_util.unflatten_dict(flat)


__all__ = ["FORMAT_VERSION", "MAGIC", "save_subnet", "load_subnet", "read_subnet",
           "subnet_masks", "size_report", "float_state_bytes", "pack_layer", "unpack_layer",
           "layer_masks", "inference_options", "SubnetFile"]
