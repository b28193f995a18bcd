"""TensorBoard scalars, written by process 0 only (tf.summary also writes to gs://)."""
from __future__ import annotations

import jax


class MetricWriter:
    """scalars(step, {name: value}) into workdir's event files; a no-op on other processes."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf
            self._writer = tf.summary.create_file_writer(workdir)

    def scalars(self, step: int, values: dict):
        if self._writer is not None:
            import tensorflow as tf
            with self._writer.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, float(v), step=step)
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
