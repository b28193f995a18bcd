"""A TensorFlow-free data path for data sets that fit in memory: shuffle and augment on the device.

A split is loaded once as uint8 numpy arrays (`load_split`) and moved to the device by the
trainer. Each epoch's order is a permutation computed with jax.random, and the paper's CIFAR
augmentation (zero-pad 4 pixels, random 32x32 crop, random horizontal flip) runs on the device in
plain jnp. Every function that takes a seed or a key accepts traced values, so a group trainer
can jit and vmap them over R runs that differ in their data seed.

Sources: "mnist5k" (the split of `input_pipeline`), "npz" (data_dir is an .npz file with
<split>_images and <split>_labels), "folder" (data_dir/<split>/<label>/<image>, decoded with PIL
and cached as an .npz) load without TensorFlow; any other name is a prepared tfds data set, read
whole with tfds (the only place this module imports TensorFlow).

Determinism contract. The batch a run sees at global step s is a function of (its data seed, s)
only, with
    epoch = s // steps_per_epoch,  index_in_epoch = s % steps_per_epoch,
    indices = epoch_permutation(seed, epoch, N)[index_in_epoch * B : (index_in_epoch + 1) * B],
    augmentation key = augment_key(seed, epoch, index_in_epoch),
where steps_per_epoch = N // B: the last N % (steps_per_epoch * B) examples of each epoch's
permutation are not used that epoch (like drop_remainder). So a run trained alone and the same
run inside a vmapped group see identical batches, and resuming at any step is exact. (The
numbers are those of the JAX version and PRNG implementation in use: jax.random's default
threefry; a different `jax_default_prng_impl` gives other, equally deterministic, batches.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from edgepopup_jax.training import input_pipeline

PIPELINES = ("auto", "device", "tf_data")
DEVICE_AUGMENTS = ("none", "cifar")
IN_MEMORY_SOURCES = ("mnist5k", "npz", "folder")

DATA_SEED_SALT = 0x5EED0DA7  # the root key of the epoch permutations
AUGMENT_SEED_SALT = 0x5EED0A06  # the root key of the augmentations: independent of the permutations
CROP_PADDING = 4
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the files tfds' ImageFolder lists (by name)
_GREY_BANDS = ("1", "L", "I", "F")  # PIL's first band of a grey image (L, LA, 1, I, I;16, F)
_CACHE_VERSION = 2  # 2: the names of the files that did not decode


# ----------------------------------------------------------------------------- loading


def _check_split(split: str, available) -> None:
    if split not in available:
        raise ValueError(f"Unknown split {split!r}; available splits: {sorted(available)}")


def _npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not path or not os.path.isfile(path):
        raise ValueError(f'name="npz" needs data_dir to be the path of an .npz file, got data_dir={path!r}')
    with np.load(path, allow_pickle=False) as f:
        keys = sorted(f.files)
        splits = sorted(k[:-7] for k in keys if k.endswith("_images") and k[:-7] + "_labels" in keys)
        if split not in splits:
            raise ValueError(f"Unknown split {split!r} in {path}: it needs the keys {split}_images and {split}_labels; "
                             f"available splits: {splits}; the file holds the keys {keys}")
        images, labels = f[f"{split}_images"], f[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{path}: {split}_images must be uint8 [N, H, W] or [N, H, W, C], "
                         f"got {images.dtype} {list(images.shape)}")
    if images.ndim == 3:
        images = images[..., None]
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {split}_labels must be integers [N] with N={len(images)} as {split}_images, "
                         f"got {labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: {split}_labels must be in [0, 2**31), got [{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int32)


def _subdirs(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if os.path.isdir(os.path.join(path, f)))


def _folder_index(data_dir: str) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """{split: [(path relative to data_dir, label name)]} sorted by label then file name, and the
    sorted label names. These are what tfds.folder_dataset.ImageFolder (the tf.data path) lists,
    read from its _get_split_label_images and checked against it by tests/test_device_data.py:
    files named .jpg/.jpeg/.png (any case); the labels are the label folders of all splits, sorted
    (case-sensitively), and a label's index is its position in that list."""
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f'name="folder" needs data_dir to be an existing directory, got data_dir={data_dir!r}')
    splits, labels = {}, set()
    for split in _subdirs(data_dir):
        for label in _subdirs(os.path.join(data_dir, split)):
            labels.add(label)
            names = sorted(os.listdir(os.path.join(data_dir, split, label)))
            splits.setdefault(split, []).extend(
                (os.path.join(split, label, n), label) for n in names if n.lower().endswith(_IMAGE_EXTENSIONS))
    return splits, sorted(labels)


def _open_image(path: str):
    from PIL import Image  # imported here: only the folder source needs Pillow
    try:
        return Image.open(path)  # identifies the format by content, not by the file's name
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise ValueError(f"Cannot decode image {path}: {e}") from e


def _decodes(path: str) -> bool:
    st = os.stat(path)
    return _decodes_as_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _decodes_as_of(path: str, size: int, mtime_ns: int) -> bool:  # once per version of a file
    try:
        _decode(path, 1)
    except ValueError:
        return False
    return True


def _folder_first_image(data_dir: str, splits) -> str:
    """The image input_pipeline reads the channel count from (relative path): the first that
    decodes of the first split (in sorted order) with images, in ImageFolder's order (its file
    list shuffled by random.Random(split), which permutes the same sorted list the same way)."""
    for split in sorted(splits):
        files = list(splits[split])
        random.Random(split).shuffle(files)
        for rel, _ in files:
            if _decodes(os.path.join(data_dir, rel)):
                return rel
    raise ValueError(f"No images (.png/.jpg/.jpeg) that decode found under data_dir={data_dir!r} "
                     "(layout: <split>/<label>/<image>)")


def _image_shape(path: str) -> tuple[int, int, int]:
    """(H, W, C) from the file's header, C = 1 for grey images and 3 for all others (RGB, RGBA,
    CMYK, P, ...: converted to RGB)."""
    with _open_image(path) as image:
        width, height = image.size
        return height, width, 1 if image.getbands()[0] in _GREY_BANDS else 3


def _decode(path: str, channels: int) -> np.ndarray:
    with _open_image(path) as image:
        try:
            mode = "L" if channels == 1 else "RGB"
            array = np.asarray(image if image.mode == mode else image.convert(mode), np.uint8)
        except Exception as e:
            raise ValueError(f"Cannot decode image {path}: {e}") from e
    return array.reshape(*array.shape[:2], channels)


def _folder_split(data_dir: str, split: str, cache_dir: str | None,
                  bad: input_pipeline.BadExamples) -> tuple[np.ndarray, np.ndarray]:
    splits, label_names = _folder_index(data_dir)
    _check_split(split, splits)
    files, first = splits[split], _folder_first_image(data_dir, splits)
    index = {name: i for i, name in enumerate(label_names)}

    def labels_without(skipped):
        return np.array([index[label] for rel, label in files if rel not in skipped], np.int32)

    def report(skipped):  # to bad, which decides whether the run goes on
        for rel, why in skipped.items():
            bad.found(split, os.path.join(data_dir, rel), len(files), why)
            bad.check()  # "error": at the first

    cache = None
    if cache_dir:  # keyed by what the arrays depend on, read without opening an image
        def stat(rel):
            st = os.stat(os.path.join(data_dir, rel))
            return [rel, st.st_size, st.st_mtime_ns]

        key = json.dumps({"version": _CACHE_VERSION, "labels": label_names, "channels_of": stat(first),
                          "files": [stat(rel) for rel, _ in files]})
        cache = os.path.join(cache_dir, f"folder-{split}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz")
        if os.path.exists(cache):
            try:
                with np.load(cache, allow_pickle=False) as f:
                    images, cached_labels = f["images"], f["labels"]
                    skipped = dict(zip(f["skipped"].tolist(), f["skipped_why"].tolist()))
                labels = labels_without(skipped)
                if np.array_equal(cached_labels, labels):
                    logging.info("Read %d decoded %s images of %s from %s", len(labels), split, data_dir, cache)
                    report(skipped)
                    return images, labels
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                logging.warning("Decoding again: cannot read the cache %s (%s)", cache, e)

    channels = _image_shape(os.path.join(data_dir, first))[-1]
    images, size, sized_by, skipped = None, None, None, {}
    step = max(1, len(files) // 10)
    logging.info("Decoding the %d %s images of %s", len(files), split, data_dir)
    for i, (rel, _) in enumerate(files):
        path = os.path.join(data_dir, rel)
        try:
            image = _decode(path, channels)
        except ValueError as e:
            skipped[rel] = str(e.__cause__ or e)
            report({rel: skipped[rel]})
            continue
        if images is None:
            size, sized_by, images = image.shape[:2], path, np.empty((len(files), *image.shape), np.uint8)
        elif image.shape[:2] != size:
            raise ValueError(f"All images of split {split!r} must have the same size (H, W) = {tuple(size)} as "
                             f"{sized_by}, but {path} has (H, W) = {image.shape[:2]}")
        images[i - len(skipped)] = image
        if (i + 1) % step == 0 or i + 1 == len(files):
            logging.info("Decoded %d / %d %s images (%d%%)", i + 1, len(files), split, 100 * (i + 1) // len(files))
    images = images[:len(files) - len(skipped)] if images is not None else np.zeros((0, 1, 1, channels), np.uint8)
    labels = labels_without(skipped)

    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".tmp-", suffix=".npz", delete=False) as tmp:
            try:
                np.savez(tmp, images=images, labels=labels, skipped=np.array(list(skipped), str),
                         skipped_why=np.array(list(skipped.values()), str))
            except BaseException:
                os.remove(tmp.name)
                raise
        os.replace(tmp.name, cache)  # atomic: a reader sees the whole file or none
        logging.info("Cached the decoded %s images in %s", split, cache)
    return images, labels


def _tfds_split(data_config, split: str, bad: input_pipeline.BadExamples) -> tuple[np.ndarray, np.ndarray]:
    """As the tf.data path reads it (a tfds catalog name: the only use of TensorFlow here): records
    that do not decode go to bad, named by their tfds_id."""
    ip = input_pipeline
    source = ip._tfds_source(data_config.name, data_config.get("data_dir"), split)  # never downloads
    ds = source.read(0, source.num_examples).map(functools.partial(ip._decoded, source),
                                                 num_parallel_calls=ip._AUTOTUNE)
    ds = ds.filter(ip._keep(bad, split, source.num_examples)).map(lambda ex: (ex["image"], ex["label"]))
    images, labels = [], []
    for image, label in ds.batch(1024).prefetch(1).as_numpy_iterator():
        bad.check()
        images.append(image)
        labels.append(label)
    bad.check()
    if not images:
        return np.zeros((0, 1, 1, source.channels), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_split(data_config, split: str, cache_dir: str | None = None,
               bad: input_pipeline.BadExamples | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory: images uint8 [N, H, W, C], labels int32 [N].

    "mnist5k", "npz" and "folder" never import TensorFlow; "folder" is decoded once and cached
    in cache_dir (when given) under a name keyed by its file list (names, sizes, mtimes), the label
    names and the file its channel count comes from. An image that does not decode goes to bad
    (default: a new BadExamples of data_config): with data.bad_images "skip" it is left out (so N
    is smaller than get_info's count), with "error" it raises input_pipeline.BadDataError naming
    it, as does "skip" with more than data.max_bad_fraction of the split bad. Raises ValueError
    for an unknown split, a malformed npz or images of different sizes within a split.
    """
    bad = bad if bad is not None else input_pipeline.BadExamples(data_config)
    name = data_config.name
    if name == "mnist5k":
        arrays = input_pipeline._mnist5k_arrays()
        _check_split(split, arrays)
        return arrays[split]
    if name == "npz":
        return _npz_split(data_config.get("data_dir"), split)
    if name == "folder":
        return _folder_split(data_config.get("data_dir"), split, cache_dir, bad)
    return _tfds_split(data_config, split, bad)


def get_info(data_config, cache_dir: str | None = None) -> input_pipeline.DatasetInfo:
    """Classes, image shape (H, W, C) and split sizes of the device path (the data's own shape: no
    augment changes it; the split sizes count every file, load_split may skip some). TF-free for the
    in-memory sources; "folder" opens only the first images of the splits. cache_dir is accepted for
    symmetry with load_split; no source needs it here."""
    del cache_dir
    input_pipeline.check_bad_images_options(data_config)
    name, train, test = data_config.name, data_config.train_split, data_config.eval_split
    if name == "mnist5k":
        arrays = input_pipeline._mnist5k_arrays()
        for split in (train, test):
            _check_split(split, arrays)
        return input_pipeline.DatasetInfo(10, (28, 28, 1), len(arrays[train][1]), len(arrays[test][1]))
    if name == "npz":
        path = data_config.get("data_dir")
        (x_train, y_train), (x_test, y_test) = _npz_split(path, train), _npz_split(path, test)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(f"{path}: {train}_images {x_train.shape[1:]} and {test}_images {x_test.shape[1:]} "
                             "differ in shape")
        num_classes = int(max([y.max() for y in (y_train, y_test) if len(y)], default=-1)) + 1
        with np.load(path, allow_pickle=False) as f:
            if "num_classes" in f.files:
                given = int(np.asarray(f["num_classes"]).reshape(()))
                if given < num_classes:
                    raise ValueError(f"{path}: num_classes={given}, but the labels go up to {num_classes - 1}")
                num_classes = given
        return input_pipeline.DatasetInfo(num_classes, tuple(x_train.shape[1:]), len(y_train), len(y_test))
    if name == "folder":
        data_dir = data_config.get("data_dir")
        splits, label_names = _folder_index(data_dir)
        for split in (train, test):
            _check_split(split, splits)
        first = os.path.join(data_dir, _folder_first_image(data_dir, splits))
        shape = _image_shape(first)
        for path in (os.path.join(data_dir, splits[s][0][0]) for s in (train, test) if splits[s]):
            if _decodes(path) and _image_shape(path)[:2] != shape[:2]:  # load_split checks all the others
                raise ValueError(f"{path} has (H, W) = {_image_shape(path)[:2]}, but {first} has {shape[:2]}: "
                                 "the device path needs images of one size")
        return input_pipeline.DatasetInfo(len(label_names), shape, len(splits[train]), len(splits[test]))
    builder = input_pipeline._tfds_builder(name, data_config.get("data_dir"))
    for split in (train, test):
        _check_split(split, builder.info.splits.keys())
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    shape = tuple(builder.info.features[image_key].shape)
    if None in shape:
        raise ValueError(f"Images of {name!r} vary in size {shape}: the device path needs one size; "
                         "use data.pipeline='tf_data' with augment='imagenet'")
    return input_pipeline.DatasetInfo(builder.info.features[label_key].num_classes, tuple(int(d) for d in shape),
                                      builder.info.splits[train].num_examples, builder.info.splits[test].num_examples)


def nbytes(info: input_pipeline.DatasetInfo) -> int:
    """Device bytes of both splits: uint8 images and int32 labels."""
    return (info.num_train + info.num_eval) * (int(np.prod(info.image_shape)) + 4)


# ----------------------------------------------------------------------------- order and augmentation


def check_device_augment(augment: str) -> None:
    if augment not in DEVICE_AUGMENTS:
        raise ValueError(f"augment={augment!r} is not supported by data.pipeline='device', which supports "
                         f"{'|'.join(DEVICE_AUGMENTS)}; augment='imagenet' needs data.pipeline='tf_data'")


def _fold_in(key: jax.Array, *data) -> jax.Array:
    """key folded with each of data: Python ints or (traced) integer scalars, taken mod 2**32 alike,
    so a seed gives the same key as a Python int alone as in an int32 array of a group's seeds."""
    for x in data:
        x = np.uint32(int(x) % 2**32) if isinstance(x, (int, np.integer)) else jnp.asarray(x).astype(jnp.uint32)
        key = jax.random.fold_in(key, x)
    return key


def epoch_permutation(seed, epoch, n: int) -> jax.Array:
    """int32 [n]: the order of epoch `epoch` for data seed `seed` (both may be traced int32 scalars)."""
    key = _fold_in(jax.random.PRNGKey(DATA_SEED_SALT), seed, epoch)
    return jax.random.permutation(key, n).astype(jnp.int32)


def batch_indices(permutation: jax.Array, index_in_epoch, batch_size: int) -> jax.Array:
    """int32 [batch_size]: batch `index_in_epoch` (traced; must be < len(permutation) // batch_size,
    which is not checked: dynamic_slice would clamp) of an epoch's permutation."""
    return lax.dynamic_slice(permutation, (jnp.asarray(index_in_epoch, jnp.int32) * batch_size,), (batch_size,))


def augment_key(seed, epoch, index_in_epoch) -> jax.Array:
    """The augmentation key of one batch, independent of the permutations (another root key)."""
    return _fold_in(jax.random.PRNGKey(AUGMENT_SEED_SALT), seed, epoch, index_in_epoch)


def crop_and_flip_params(key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example: crop offsets dy, dx (int32, uniform in 0..2*CROP_PADDING) into the padded
    image, and flip (bool, probability 1/2), all independent."""
    k_dy, k_dx, k_flip = jax.random.split(key, 3)
    dy = jax.random.randint(k_dy, (batch_size,), 0, 2 * CROP_PADDING + 1, jnp.int32)
    dx = jax.random.randint(k_dx, (batch_size,), 0, 2 * CROP_PADDING + 1, jnp.int32)
    return dy, dx, jax.random.bernoulli(k_flip, 0.5, (batch_size,))


def cifar_augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """uint8 [B, H, W, C] -> [B, H, W, C]: zero-pad 4 pixels, take a random H x W crop, flip left-right
    with probability 1/2, each example on its own (the parameters of crop_and_flip_params(key, B))."""
    b, h, w, c = images.shape
    dy, dx, flip = crop_and_flip_params(key, b)
    p = CROP_PADDING
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    crops = jax.vmap(lambda image, y, x: lax.dynamic_slice(image, (y, x, 0), (h, w, c)))(padded, dy, dx)
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def train_batch(images, labels, permutation, seed, epoch, index_in_epoch, batch_size: int, augment: str):
    """{"image": uint8 [B, H, W, C], "label": int32 [B]}: batch index_in_epoch of the epoch whose
    order is `permutation` (= epoch_permutation(seed, epoch, N)), augmented. batch_size and augment
    are static; vmap over (permutation, seed) with images and labels shared (in_axes None)."""
    check_device_augment(augment)
    idx = batch_indices(permutation, index_in_epoch, batch_size)
    image, label = jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0).astype(jnp.int32)
    if augment == "cifar":
        image = cifar_augment(image, augment_key(seed, epoch, index_in_epoch))
    return {"image": image, "label": label}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The whole eval split in order as {"image": [nb, B, H, W, C], "label": [nb, B], "valid": [nb, B]}
    with nb = ceil(N / B); the zero padding that fills the last batch has valid 0. On the host."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got batch_size={batch_size}")
    n = len(labels)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    image = np.concatenate([np.asarray(images, np.uint8), np.zeros((pad, *images.shape[1:]), np.uint8)])
    label = np.concatenate([np.asarray(labels, np.int32), np.zeros((pad,), np.int32)])
    valid = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    shape = (num_batches, batch_size)
    return {"image": image.reshape(*shape, *images.shape[1:]), "label": label.reshape(shape),
            "valid": valid.reshape(shape)}


# ----------------------------------------------------------------------------- which pipeline


def _device_memory(device) -> tuple[int, str]:
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def resolve_pipeline(data_config, info, devices) -> str:
    """"device" or "tf_data", from data_config.pipeline (default "tf_data"). "auto" picks "device"
    when the augment runs on the device and the data set (info, or get_info's when None) takes at
    most data_config.device_memory_fraction (default 0.25) of the first device's memory (the
    host's for CPU devices, which report none)."""
    pipeline = data_config.get("pipeline", "tf_data")
    if pipeline not in PIPELINES:
        raise ValueError(f"Unknown data.pipeline={pipeline!r}; allowed: {list(PIPELINES)}")
    if pipeline == "device":
        check_device_augment(data_config.augment)
        return pipeline
    if pipeline == "tf_data":
        return pipeline
    if data_config.augment not in DEVICE_AUGMENTS:
        reason, choice = f"augment={data_config.augment!r} runs only in tf.data", "tf_data"
    else:
        # Every name loads in memory: IN_MEMORY_SOURCES without TF, any other as a tfds name. What
        # can fail is the info (e.g. a tfds data set whose images vary in size).
        try:
            info = info if info is not None else get_info(data_config)
        except ValueError as e:
            reason, choice = f"not loadable in memory ({e})", "tf_data"
        else:
            fits, reason = fits_on_device(data_config, info, devices)
            choice = "device" if fits else "tf_data"
    logging.info("data.pipeline='auto' -> %r: %s", choice, reason)
    return choice


def fits_on_device(data_config, info, devices=None) -> tuple[bool, str]:
    """Whether the data set's bytes are at most data_config.device_memory_fraction (0.25) of the
    first device's memory (the host's for CPU devices, which report none), and why."""
    devices = [] if devices is None else list(np.ravel(np.asarray(devices, dtype=object)))
    memory, where = _device_memory(devices[0] if devices else jax.local_devices()[0])
    fraction = data_config.get("device_memory_fraction", 0.25)
    size = nbytes(info)
    fits = size <= fraction * memory
    return fits, (f"{data_config.name!r} takes {size / 2**20:.1f} MiB, {'<=' if fits else '>'} "
                  f"{fraction:g} x {memory / 2**30:.1f} GiB of {where}")
