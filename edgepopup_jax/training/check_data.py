"""Decodes every image of a config's data set and lists those that do not decode.

  python -m edgepopup_jax.check_data --config=configs/cifar10.py --config.data.name=folder
      --config.data.data_dir=/data/my_images

Every file of every split of a folder (data_dir/<split>/<label>/<image>), or every record of
every split of a prepared tfds data set, is decoded in parallel as the trainer decodes it, by
content and to the data set's channels: with PIL for data.pipeline="device", with TensorFlow
for "tf_data", with both for "auto" (bad if either fails). Progress goes to stderr; stdout gets
one line per bad example, its file (or tfds_id), a tab and why. Exit status: 0 when every
example decodes, 1 when some do not, 2 for a bad command line or config. Train on the rest
with --config.data.bad_images=skip, or remove the files listed.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import sys
import time
from typing import Callable, Iterable, Iterator

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program, so importing this module defines no flags
    config_flags.DEFINE_config_file("config", None, "Config file whose `data` section names the data set "
                                    "(name, data_dir, pipeline).", lock_config=True)
    flags.DEFINE_integer("workers", 0, "Threads decoding at once (0: one per CPU core).")


class _Progress:
    """'<split>: n / total checked, b bad' on stderr, every few seconds and at the end."""

    def __init__(self, split: str, total: int, every_s: float = 2.0):
        self.split, self.total, self.every_s = split, total, every_s
        self.done = self.bad = 0
        self._last = time.time()

    def add(self, bad: bool) -> None:
        self.done += 1
        self.bad += bad
        if self.done == self.total or time.time() - self._last >= self.every_s:
            self._last = time.time()
            percent = 100 * self.done // max(self.total, 1)
            print(f"{self.split}: {self.done} / {self.total} checked ({percent}%), {self.bad} bad",
                  file=sys.stderr, flush=True)


def _pil_error(path: str, channels: int) -> str | None:
    from edgepopup_jax.training import device_data
    try:
        device_data._decode(path, channels)
    except ValueError as e:
        return f"PIL: {e.__cause__ or e}"
    return None


def _tf_message(e) -> str:  # TF's first line, without its op and function names
    return re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:.*$", "", e.message.splitlines()[0])


def _tf_error(path: str, channels: int) -> str | None:
    from edgepopup_jax.training import input_pipeline as ip
    try:
        raw = ip.tf.io.read_file(path)
    except ip.tf.errors.OpError as e:
        return f"unreadable: {_tf_message(e)}"
    why = None
    for decode in (lambda r: ip._decode_image(r, channels), ip._decode_as_grey)[:2 if channels == 1 else 1]:
        try:
            decode(raw)
            return None
        except ip.tf.errors.InvalidArgumentError as e:
            why = why or f"TensorFlow: {_tf_message(e)}"
    return why


def _folder(data_dir: str, pipeline: str, workers: int) -> Iterator[tuple[str, int, Iterable]]:
    """(split, size, iterator of (path, why or None)) per split of the folder."""
    from edgepopup_jax.training import device_data
    splits, _ = device_data._folder_index(data_dir)
    first = os.path.join(data_dir, device_data._folder_first_image(data_dir, splits))
    channels = device_data._image_shape(first)[-1]
    checks: list[Callable] = {"device": [_pil_error], "tf_data": [_tf_error]}.get(pipeline, [_pil_error, _tf_error])

    def why(path):
        reasons = [r for r in (check(path, channels) for check in checks) if r]
        return path, "; ".join(reasons) or None

    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for split in sorted(splits):
            paths = [os.path.join(data_dir, rel) for rel, _ in splits[split]]
            yield split, len(paths), pool.map(why, paths)


def _tfds(config) -> Iterator[tuple[str, int, Iterable]]:
    from edgepopup_jax.training import input_pipeline as ip
    builder = ip._tfds_builder(config.name, config.get("data_dir"))

    def results(source):
        ds = source.read(0, source.num_examples).map(lambda ex: ip._decoded(source, ex),
                                                     num_parallel_calls=ip._AUTOTUNE)
        for batch in ds.map(lambda ex: (ex["name"], ex["ok"])).batch(256).as_numpy_iterator():
            for name, ok in zip(*batch):
                yield name.decode(), None if ok else "TensorFlow: does not decode"

    for split in sorted(builder.info.splits.keys()):
        source = ip._tfds_source(config.name, config.get("data_dir"), split)
        yield split, source.num_examples, results(source)


def check(data_config, workers: int = 0, out=sys.stdout) -> tuple[int, int]:
    """Decodes every example of every split of data_config's data set; writes a line to `out` per
    bad one. Returns (bad, total). ValueError: a data set that cannot be read at all."""
    name = data_config.name
    if name in ("mnist5k", "npz"):
        print(f"data.name={name!r} is held as arrays: nothing to decode", file=sys.stderr)
        return 0, 0
    pipeline = data_config.get("pipeline", "auto")
    if name == "folder":
        data_dir = data_config.get("data_dir")
        splits = _folder(data_dir, pipeline, workers)
    else:
        splits = _tfds(data_config)
    bad = total = 0
    for split, size, results in splits:
        progress = _Progress(split, size)
        for example, why in results:
            progress.add(why is not None)
            if why is not None:
                print(f"{example}\t{why}", file=out, flush=True)
        bad, total = bad + progress.bad, total + progress.done
    return bad, total


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required (its data section names the data set)")
    try:
        bad, total = check(FLAGS.config.data, FLAGS.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bad:
        print(f"{bad} of {total} examples do not decode (listed on stdout); data.bad_images='skip' "
              "trains without them", file=sys.stderr)
        return 1
    print(f"all {total} examples decode", file=sys.stderr)
    return 0


def cli():
    """`python -m edgepopup_jax.check_data` and the `edgepopup-check-data` console script."""
    from edgepopup_jax.training import command
    _define_flags()
    command.run(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()
