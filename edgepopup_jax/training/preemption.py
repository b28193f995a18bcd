"""SIGTERM (a preemption, a scheduler's stop) as a flag the training loop polls, so the loop can
save a checkpoint and exit cleanly instead of dying mid-step."""
from __future__ import annotations

import signal

import jax
import numpy as np


class Preemption:
    """A context manager: while inside, SIGTERM sets `requested` instead of killing the process."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self, sync: bool) -> bool:
        """Whether any process got SIGTERM. With several processes they must agree, which costs a
        host sync, so they compare flags only when `sync` (log and eval steps)."""
        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
