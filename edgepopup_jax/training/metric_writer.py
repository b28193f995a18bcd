"""TensorBoard scalars, written by process 0 only.

With TensorFlow (the tf.data path) through tf.summary, which also writes to gs://. Without it
(the device data path, which never imports TensorFlow) as event records written here with the
`tensorboard` package's protos and record framing, which need no TensorFlow; where tensorboard
is not installed either (a GPU image with only JAX), no events are written, and that is said
once: the metrics are in results.json either way.
"""
from __future__ import annotations

import os
import socket
import time

import jax
from absl import logging

_warned = False


class _EventFile:
    """An events.out.tfevents.* file of Event records (what TensorBoard reads), local paths."""

    def __init__(self, workdir: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
        os.makedirs(workdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(os.path.join(workdir, name), "wb")
        self._records = RecordWriter(self._file)
        self._event = event_pb2.Event
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, values: dict):
        from tensorboard.compat.proto import summary_pb2
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))
        self._records.flush()

    def close(self):
        self._records.close()


def _event_file(workdir: str):
    global _warned
    try:
        return _EventFile(workdir)
    except ImportError:
        if not _warned:
            logging.warning("tensorboard is not installed: no TensorBoard events are written "
                            "(the metrics are in results.json)")
            _warned = True
        return None


class MetricWriter:
    """scalars(step, {name: value}) into workdir's event files; a no-op on other processes.
    tensorflow=False: never imports TensorFlow (local workdirs only)."""

    def __init__(self, workdir: str, tensorflow: bool = True):
        self._writer = self._events = None
        if jax.process_index() != 0:
            return
        if tensorflow:
            import tensorflow as tf
            self._writer = tf.summary.create_file_writer(workdir)
        else:
            self._events = _event_file(workdir)

    def scalars(self, step: int, values: dict):
        if self._writer is not None:
            import tensorflow as tf
            with self._writer.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, float(v), step=step)
            self._writer.flush()
        elif self._events is not None:
            self._events.scalars(step, values)

    def close(self):
        if self._writer is not None:
            self._writer.close()
        if self._events is not None:
            self._events.close()
