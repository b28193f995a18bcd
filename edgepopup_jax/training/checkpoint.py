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
  keep_fraction  float | null         the k of the saved step under a sparsity schedule (else null)

Versions: 1 had neither `format` nor `checksum`; 2 added both. `process_count` and `history`
came later within version 2, and `keep_fraction` later still, so readers treat them as optional. Model options added since
checkpoints were first written are in ADDED_MODEL_OPTIONS with the value older runs had.
A run resumes only from a checkpoint whose RUN_IDENTITY fields equal its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging as pylogging
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from edgepopup_jax.training import iterand, sparsity, workdir_lock


class _HideOrbaxInfo(pylogging.Filter):
    """Orbax logs dozens of INFO lines per save; keep the console to the trainer's progress.
    Its background threads also log each failed write with a traceback: a full disk is
    reported once, as DiskFull, so those records are dropped."""

    def filter(self, record):
        if "orbax" not in record.pathname:
            return True
        if record.exc_info and _is_disk_full(record.exc_info[1]):
            return False
        return record.levelno >= pylogging.WARNING


logging.get_absl_logger().addFilter(_HideOrbaxInfo())


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run."""


class DiskFull(RuntimeError):
    """A checkpoint could not be written: no space left. The earlier checkpoints are intact."""


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether error, or one it was raised from, says no space is left (an OSError, or
    tensorstore's RESOURCE_EXHAUSTED with the OS's message)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os_error_code='28'" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _drop_closed_loop_callbacks(unraisablehook):
    """sys.unraisablehook, less one report: after a failed save (a full disk) orbax closes its
    event loop while tensorstore still calls back into it, and each such callback prints
    "RuntimeError: Event loop is closed" with a traceback. The failure itself is raised once."""
    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            unraisablehook(unraisable)
    hook.drops_closed_loop_callbacks = True
    return hook


if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)

TEMPORARY = "*.orbax-checkpoint-tmp*"  # orbax writes a step here, then renames it to <step>


class CorruptCheckpoint(CheckpointError):
    """A checkpoint of this run whose files cannot be read or no longer match their checksum
    (not one of another run, nor one whose arrays have other shapes: those are CheckpointError)."""


ON_CORRUPT = ("fall_back", "refuse")  # config.checkpoint.on_corrupt


def check_on_corrupt(mode: str) -> str:
    if mode not in ON_CORRUPT:
        raise ValueError(f"unknown checkpoint.on_corrupt {mode!r}; allowed: {', '.join(ON_CORRUPT)}")
    return mode


FORMAT_VERSION = 2  # 2: meta holds "format" and the state's "checksum"; 1 (no "format"): neither

# Model options added after checkpoints were first written, with the value older runs had
# (also the value of a config without the option: bn_running_var is only in ResNet configs).
ADDED_MODEL_OPTIONS = {"mask_scope": "layer", "bn_running_var": "biased", "binary_weights": False,
                       "score_init": "kaiming_uniform", "score_init_scale": 1.0,
                       "first_last_keep_fraction": None, "linear_keep_fraction": None,
                       "bn_affine": None, **sparsity.DEFAULTS, **iterand.DEFAULTS}

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
    keep_fraction: float | None = None  # the saved step's k under a sparsity schedule

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
                   history={k: list(v) for k, v in history.items()},
                   keep_fraction=meta.get("keep_fraction"))

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
        self._remove_temporary()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step of the save in flight

    def _remove_temporary(self) -> None:
        """Removes what a save that never finished left (a full disk, a killed process): orbax
        writes into <step>.orbax-checkpoint-tmp-* and renames it only once it is complete. Only
        the holder of the workdir's lock does, so a live writer's save is never taken for one."""
        if (jax.process_index() != 0 or "://" in self.directory
                or not workdir_lock.holds(self.directory)):
            return
        for path in sorted(epath.Path(self.directory).glob(TEMPORARY)):
            logging.warning("removing %s, left by a checkpoint save that did not finish", path)
            path.rmtree() if path.is_dir() else path.unlink()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _complete_steps(self) -> list[int]:
        """The steps whose directories orbax finished (named by their step alone)."""
        return sorted(int(p.name) for p in epath.Path(self.directory).iterdir() if p.name.isdigit())

    @contextlib.contextmanager
    def _reporting_a_full_disk(self):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            if not _is_disk_full(e):
                raise
            steps = [s for s in self._complete_steps() if s != self._saving]
            good = f"step {steps[-1]}" if steps else "none"
            raise DiskFull(
                f"the disk is full: checkpoint {self._saving} could not be written to "
                f"{self.directory}. The latest good checkpoint is {good}, intact; free space (or "
                "move the workdir to a disk with room), then run the same command again to "
                f"resume{' from ' + good if steps else ''}") from None

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Saves state and meta (plus the format version and the state's checksum). Raises
        DiskFull when the disk is full (here, or for the previous, asynchronous save)."""
        if not force and not self.manager.should_save(step):
            return False
        meta = {**meta, "format": FORMAT_VERSION, "checksum": checksum(state)}
        with self._reporting_a_full_disk():
            self.manager.wait_until_finished()  # the previous save's failure is reported as its own
            self._saving = step
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
            raise CorruptCheckpoint(f"{where} is unreadable ({type(e).__name__}: {e}); move it away "
                                  "or use another --workdir") from e
        for key, defaults in (added_defaults or {}).items():
            if isinstance(meta.get(key), dict):
                meta = {**meta, key: {**defaults, **meta[key]}}
        # Compared as JSON reads them back: a tuple option (stage_sizes=(1,)) is saved as a list.
        expected_meta = json.loads(json.dumps(expected_meta))
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
            # Arrays of other shapes are another model; the same shapes that fail to read are
            # damaged files.
            if self._same_shapes(step, abstract):
                raise CorruptCheckpoint(f"{where} is unreadable: its arrays have this model's "
                                        f"shapes but do not read ({type(e).__name__}: {e})") from e
            raise CheckpointError(f"{where} could not be restored into this model "
                                  f"({type(e).__name__}: {e})") from e
        if "checksum" in meta:  # each process checks the state as it restored it, on its devices
            got = checksum(restored)
            bad = [path for path, a, b in zip(_leaf_paths(restored), got, meta["checksum"]) if a != b]
            if bad or len(got) != len(meta["checksum"]):
                raise CorruptCheckpoint(
                    f"{where} is corrupted: its data no longer matches the checksum saved with it "
                    f"(in {', '.join(bad[:5]) or 'the number of arrays'}); move that step's "
                    "directory away to resume from the previous checkpoint")
        else:
            logging.warning("%s has no checksum (written before format %d): not verified", where,
                            FORMAT_VERSION)
        return restored, meta

    def _saved_state_tree(self, step: int):
        """The saved state's tree of array metadata (shapes, dtypes), read without a template."""
        saved = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        tree = getattr(saved, "item_metadata", saved)
        return getattr(tree, "tree", tree)

    def _same_shapes(self, step: int, abstract) -> bool:
        """Whether the saved state's arrays have the shapes and dtypes of abstract's (compared
        as sorted lists: orbax names a tree's nodes its own way). Unreadable metadata counts as
        the same: the files are damaged, not another model's."""
        def signature(tree):
            return sorted((tuple(a.shape), str(np.dtype(a.dtype))) for a in jax.tree.leaves(tree))
        try:
            saved_signature = signature(self._saved_state_tree(step))
        except Exception:  # noqa: BLE001
            return True
        return not saved_signature or saved_signature == signature(abstract)

    def set_aside(self, step: int, suffix: str) -> str:
        """Renames checkpoint `step` to `<step>.<suffix>` (never deletes it; a name already taken
        gets a number), so that orbax no longer sees it; returns the new path. In a multi-process
        job process 0 renames and the others wait for it."""
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.directory) / f"{step}.{suffix}"
        n = 1
        while dst.exists():
            dst, n = epath.Path(self.directory) / f"{step}.{suffix}.{n}", n + 1
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return str(dst)

    def restore_intact(self, state_template, expected_meta: dict, *, on_corrupt: str = "fall_back",
                       added_defaults: dict | None = None, step: int | None = None):
        """restore(step) (default: the latest); with on_corrupt="fall_back", a CorruptCheckpoint
        is moved aside to `<step>.corrupt` and the next older checkpoint is tried, until one
        restores. Returns (state, meta, corrupt): state and meta are None when no intact
        checkpoint is left (the run starts over); corrupt lists the steps moved aside.
        on_corrupt="refuse" raises the CorruptCheckpoint, leaving everything in place."""
        check_on_corrupt(on_corrupt)
        corrupt = []
        step = self.latest_step() if step is None else step
        while step is not None:
            try:
                state, meta = self.restore(state_template, expected_meta, step=step,
                                           added_defaults=added_defaults)
                return state, meta, corrupt
            except CorruptCheckpoint as e:
                if on_corrupt == "refuse":
                    raise
                moved = self.set_aside(step, "corrupt")
                logging.warning("%s. Moved it aside to %s (checkpoint.on_corrupt='fall_back'); "
                                "trying the previous checkpoint", e, moved)
                corrupt.append(step)
            older = [s for s in self.manager.all_steps() if s < corrupt[-1]]
            step = max(older) if older else None
        return None, None, corrupt

    def restore_raw(self, step: int | None = None):
        """The saved state as nested dicts of numpy arrays, and its meta; needs no template
        (for tools such as export that know the model only from the checkpoint's meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            # Onto this process's first device: the checkpoint may come from another topology
            # (a pod slice, 8 GPUs), whose saved shardings cannot be rebuilt here.
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
                                    self._saved_state_tree(step))
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step} in {self.directory} is unreadable "
                                  f"({type(e).__name__}: {e})") from e
        return jax.device_get(restored["state"]), restored["meta"]

    def wait(self):
        with self._reporting_a_full_disk():
            self.manager.wait_until_finished()

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()
