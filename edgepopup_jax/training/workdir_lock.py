"""One job per run directory: an exclusive lock that the OS releases when its holder dies.

A training takes `fcntl.flock` on `<workdir>/.lock.process<i>` (i: its process index) before
it reads or writes anything there, and keeps it until it returns. A second job on the same
workdir is refused with one line naming the holder; the processes of one multi-process job
take different files, so they share the workdir. The kernel drops a flock with its process
(SIGKILL, OOM, a lost host), so no stale lock outlives a crash.

Where a lock cannot be had (a gs:// workdir; a filesystem that answers flock with ENOLCK or
EOPNOTSUPP, as some NFS mounts do) the lock is taken on a file of this host's instead
(~/.cache/edgepopup_jax/locks/), with a warning: it still refuses a second job on the same
host, but not one on another host.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys

import jax
from absl import logging

BUSY_EXIT = 75  # EX_TEMPFAIL: main.py's exit code for a workdir in use

# the workdirs this process holds -> (the lock file's descriptor, its path, the topmost
# directory that acquire created for it, or None)
_held: dict[str, tuple[int, str, str | None]] = {}


class WorkdirBusy(Exception):
    """Another live job holds the workdir."""


def _host_lock_path(workdir: str, process_index: int) -> str:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(workdir.encode()).hexdigest()[:20]
    return os.path.join(home, "edgepopup_jax", "locks", f"{key}.process{process_index}")


def _key(workdir: str) -> str:
    return workdir if "://" in workdir else os.path.abspath(workdir)


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']} ({h['command']})"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def _try_flock(path: str) -> int:
    """The descriptor of `path`, locked; raises WorkdirBusy or OSError (ENOLCK, ...)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise WorkdirBusy(holder) from None
    except OSError:
        os.close(fd)
        raise
    return fd


def acquire(workdir: str) -> None:
    """Locks workdir for this process (creating it), or raises WorkdirBusy with one line."""
    key, index = _key(str(workdir)), jax.process_index()
    if key in _held:
        raise WorkdirBusy(f"{key} is already being trained by this process: one job per workdir")
    path = created = None
    if "://" not in key:
        created = _topmost_missing(key)
        os.makedirs(key, exist_ok=True)
        path = os.path.join(key, f".lock.process{index}")
    try:
        fd = _try_flock(path) if path else None
    except WorkdirBusy as busy:
        raise WorkdirBusy(_busy_message(key, str(busy))) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fd, why = None, f"its filesystem gives no lock ({os.strerror(e.errno)})"
        _remove_if_unused(path, created)
        created = None
    else:
        why = "it is not on a local or NFS filesystem"
    if fd is None:
        path = _host_lock_path(key, index)
        logging.warning("%s cannot be locked (%s): locking %s instead, which refuses a second "
                        "job on this host only; run one job per workdir", key, why, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = _try_flock(path)
        except WorkdirBusy as busy:
            raise WorkdirBusy(_busy_message(key, str(busy))) from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
          "command": " ".join(os.path.basename(a) if i == 0 else a
                              for i, a in enumerate(sys.argv))[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = (fd, path, created)


def _topmost_missing(directory: str) -> str | None:
    """The highest of directory and its parents that does not exist yet (None: it exists)."""
    missing = None
    while not os.path.exists(directory):
        missing, directory = directory, os.path.dirname(directory)
    return missing


def _remove_if_unused(lock_path: str, created: str | None) -> None:
    """Removes the lock file and the directories acquire made for it, where nothing else was
    written there: a run refused for its config leaves no trace. (Only in a directory this
    process created, so no other job can be waiting on that lock file.)"""
    if created is None:
        return
    directory = os.path.dirname(lock_path)
    if os.listdir(directory) != [os.path.basename(lock_path)]:
        return
    os.unlink(lock_path)
    while True:
        try:
            os.rmdir(directory)
        except OSError:
            return
        if directory == created:
            return
        directory = os.path.dirname(directory)


def _busy_message(workdir: str, holder: str) -> str:
    return (f"{workdir} is in use by another training: {_describe(holder)}. One job per "
            "workdir: wait for it to end or stop it, or give this run another --workdir")


def release(workdir: str) -> None:
    held = _held.pop(_key(str(workdir)), None)
    if held is not None:
        fd, path, created = held
        _remove_if_unused(path, created)
        os.close(fd)  # closing the last descriptor drops the flock


def holds(path: str) -> bool:
    """Whether this process holds the lock of path or of a directory above it."""
    path = _key(str(path))
    return any(path == k or path.startswith(k.rstrip("/") + "/") for k in _held)


@contextlib.contextmanager
def hold(*workdirs: str):
    """Locks every workdir for the block (all or none), releasing them at its end."""
    taken = []
    try:
        for w in workdirs:
            acquire(w)
            taken.append(w)
        yield
    finally:
        for w in taken:
            release(w)
