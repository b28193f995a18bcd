"""TensorBoard scalars, written by process 0 only.

With TensorFlow (the tf.data path) through tf.summary, which also writes to gs://. Without it
(the device data path, which never imports TensorFlow) through the `tensorboard` package's own
event writer; where that is not installed either (a GPU image with only JAX), no events are
written, and that is said once: the metrics are in results.json either way.
"""
from __future__ import annotations

import sys
import time
import types

import jax
from absl import logging

_warned = False


def _event_writer(workdir: str):
    """tensorboard's event file writer with TensorFlow kept out, or None. The marker module
    `tensorboard.compat.notf` (tensorboard's own switch) makes its file I/O use its stub, not
    TensorFlow, when first used."""
    global _warned
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        if not _warned:
            logging.warning("tensorboard is not installed: no TensorBoard events are written "
                            "(the metrics are in results.json)")
            _warned = True
        return None
    return EventFileWriter(workdir)


class MetricWriter:
    """scalars(step, {name: value}) into workdir's event files; a no-op on other processes.
    tensorflow=False: never imports TensorFlow."""

    def __init__(self, workdir: str, tensorflow: bool = True):
        self._writer = self._events = None
        if jax.process_index() != 0:
            return
        if tensorflow:
            import tensorflow as tf
            self._writer = tf.summary.create_file_writer(workdir)
        else:
            self._events = _event_writer(workdir)

    def scalars(self, step: int, values: dict):
        if self._writer is not None:
            import tensorflow as tf
            with self._writer.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, float(v), step=step)
            self._writer.flush()
        elif self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                                 for k, v in values.items()])
            self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
            self._events.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
        if self._events is not None:
            self._events.close()
