"""Orbax checkpoints of the train state: saved asynchronously and atomically, restored exactly.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds two items:
  state/  the TrainState (orbax StandardSave): step, params, frozen, batch_stats, opt_state, rng.
  meta/   one JSON object, the run's `RunMeta` plus what `Checkpointer.save` adds:

  field          type                 meaning
  format         int                  FORMAT_VERSION of the writer (absent: version 1)
  checksum       [uint32]             per state leaf, in tree order (see `checksum`); from v2
  model          {str: value}         config.model: "name" and the model's options
  seed           int                  config.seed (the frozen weights follow from it)
  dataset        str                  config.data.name
  batch_size     int                  the global batch
  num_classes    int                  the model's classes
  process_count  int                  processes of the writing run (absent: unknown)
  history        {train, eval,        the log so far: train [{step, loss, accuracy}], eval
                  throughput}         [{step, epoch, top1, top5, loss, count}], images/s [float]

Versions: 1 had neither `format` nor `checksum`; 2 added both. `process_count` and `history`
came later within version 2, so readers treat them as optional. Model options added since
checkpoints were first written are in ADDED_MODEL_OPTIONS with the value older runs had.
A run resumes only from a checkpoint whose RUN_IDENTITY fields equal its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as pylogging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class _HideOrbaxInfo(pylogging.Filter):
    """Orbax logs dozens of INFO lines per save; keep the console to the trainer's progress."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


logging.get_absl_logger().addFilter(_HideOrbaxInfo())


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run."""


FORMAT_VERSION = 2  # 2: meta holds "format" and the state's "checksum"; 1 (no "format"): neither

# Model options added after checkpoints were first written, with the value older runs had
# (also the value of a config without the option: bn_running_var is only in ResNet configs).
ADDED_MODEL_OPTIONS = {"mask_scope": "layer", "bn_running_var": "biased", "binary_weights": False, "score_init": "kaiming_uniform", "score_init_scale": 1.0, "first_last_keep_fraction": None, "linear_keep_fraction": None, "bn_affine": None}

RUN_IDENTITY = ("model", "seed", "dataset", "batch_size")  # what a resumed run must match


def empty_history() -> dict:
    return {"train": [], "eval": [], "throughput": []}


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """The trainer's part of every checkpoint's meta (the table in this module's docstring)."""
    model: dict
    seed: int
    dataset: str
    batch_size: int
    num_classes: int
    process_count: int | None = None
    history: dict = dataclasses.field(default_factory=empty_history)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, meta: dict) -> RunMeta:
        """Reads any version's meta: optional fields missing from older ones get their defaults.
        The model options stay as saved (`identity` completes them for comparing)."""
        history = {**empty_history(), **(meta.get("history") or {})}
        return cls(model=dict(meta["model"]), seed=meta["seed"],
                   dataset=meta["dataset"], batch_size=meta["batch_size"],
                   num_classes=meta["num_classes"], process_count=meta.get("process_count"),
                   history={k: list(v) for k, v in history.items()})

    def identity(self) -> dict:
        """The fields a resumed run must share with its checkpoint, the model's options
        completed with ADDED_MODEL_OPTIONS (as Checkpointer.restore completes a saved meta's)."""
        meta = {k: getattr(self, k) for k in RUN_IDENTITY}
        return {**meta, "model": {**ADDED_MODEL_OPTIONS, **meta["model"]}}


def _words(x):
    """A leaf's bits as uint32 words (narrower types widened, 64-bit types split in two)."""
    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = x.dtype.itemsize * 8
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _leaf_checksums(state):
    """Per leaf: sum over words of word * (index + 1), mod 2**32 (position-weighted, so a changed
    or moved word changes it). Computed where the state lives; only the sums reach the host."""
    def one(x):
        w = _words(x)
        return jnp.sum(w * (jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
    return [one(x) for x in jax.tree.leaves(state)]


def checksum(state) -> list[int]:
    return [int(c) for c in jax.device_get(_leaf_checksums(state))]


def tree_hash(tree) -> str:
    """sha256 over every leaf's bytes, in path order, on the host: equal hashes mean
    bit-identical trees (the trainer's check that the frozen weights never change)."""
    h = hashlib.sha256()
    for path, leaf in sorted(flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/").items()):
        h.update(path.encode())
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Saves state and meta (plus the format version and the state's checksum)."""
        if not force and not self.manager.should_save(step):
            return False
        meta = {**meta, "format": FORMAT_VERSION, "checksum": checksum(state)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, state_template, expected_meta: dict, step: int | None = None,
                added_defaults: dict | None = None):
        """Restores `step` (default: the latest) into the shapes/shardings of state_template.

        Raises CheckpointError when the checkpoint's meta disagrees with expected_meta on any
        key of expected_meta, or when it cannot be read (corrupt, truncated, other layout).
        added_defaults: {meta key: {field: default}} for fields added since older checkpoints
        were written; a checkpoint without such a field counts as having its default.
        """
        step = self.latest_step() if step is None else step
        where = f"checkpoint {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "unreadable"
            raise CheckpointError(f"{where} is unreadable ({type(e).__name__}: {e}); move it away "
                                  "or use another --workdir") from e
        for key, defaults in (added_defaults or {}).items():
            if isinstance(meta.get(key), dict):
                meta = {**meta, key: {**defaults, **meta[key]}}
        diffs = {k: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v}
        if diffs:
            lines = "; ".join(f"{k}: checkpoint has {json.dumps(a)}, this run has {json.dumps(b)}"
                              for k, (a, b) in diffs.items())
            raise CheckpointError(f"{where} belongs to another run ({lines}); use another --workdir "
                                  "or the original config")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{where} could not be restored into this model "
                                  f"({type(e).__name__}: {e})") from e
        if "checksum" in meta:  # each process checks the state as it restored it, on its devices
            got = checksum(restored)
            bad = [path for path, a, b in zip(_leaf_paths(restored), got, meta["checksum"]) if a != b]
            if bad or len(got) != len(meta["checksum"]):
                raise CheckpointError(
                    f"{where} is corrupted: its data no longer matches the checksum saved with it "
                    f"(in {', '.join(bad[:5]) or 'the number of arrays'}); move that step's "
                    "directory away to resume from the previous checkpoint")
        else:
            logging.warning("%s has no checksum (written before format %d): not verified", where,
                            FORMAT_VERSION)
        return restored, meta

    def restore_raw(self, step: int | None = None):
        """The saved state as nested dicts of numpy arrays, and its meta; needs no template
        (for tools such as export that know the model only from the checkpoint's meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            # Onto this process's first device: the checkpoint may come from another topology
            # (a pod slice, 8 GPUs), whose saved shardings cannot be rebuilt here.
            saved = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
            tree = getattr(saved, "item_metadata", saved)
            tree = getattr(tree, "tree", tree)
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), tree)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step} in {self.directory} is unreadable "
                                  f"({type(e).__name__}: {e})") from e
        return jax.device_get(restored["state"]), restored["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
